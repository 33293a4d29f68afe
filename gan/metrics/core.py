"""One evaluation: check the request, generate across ranks, compute on rank 0, hand out the result."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from gan.data import ShardError, read_manifest
from gan.metrics import collective
from gan.metrics.errors import MetricError
from gan.metrics.names import FIDELITY, count_problems, parse_metrics
from gan.metrics.realdata import real_count

EVAL_SEED = 20_240_601  # the evaluation noise: the same z for every evaluation of every run


@dataclasses.dataclass
class EvalRequest:
    """What to compute and with what. ``names`` as accepted by :func:`gan.metrics.names.parse_metrics`."""
    names: list[str]
    num_samples: int
    real_shards: str
    batch_size: int = 100
    inception_weights: str = ""
    classifier: str = ""
    kid_subset_size: int = 1000
    isc_splits: int = 10
    max_real: int = 0  # 0 = every real image
    cache_dir: str = ""
    seed: int = EVAL_SEED
    verbose: bool = False
    progress: bool = False  # rank 0: progress bars on stderr for generation and feature extraction

    def __post_init__(self):
        try:
            self.names = parse_metrics(self.names)
        except ValueError as e:
            raise MetricError(str(e)) from None
        if self.num_samples < 1:
            raise MetricError(f"the sample count must be >= 1, got {self.num_samples}")
        if self.batch_size < 1:
            raise MetricError(f"the batch size must be >= 1, got {self.batch_size}")


def check_counts(req: EvalRequest, num_classes: int, num_real: int | None = None) -> None:
    problems = count_problems(req.names, req.num_samples, req.kid_subset_size, req.isc_splits, num_classes, num_real)
    if problems:
        raise MetricError(f"too few samples for the requested metrics: {'; '.join(problems)}")


def preflight(req: EvalRequest, num_classes: int, channels: int, size: int) -> dict:
    """Every check that needs no generation: real shards (they must fit the generator), sample counts,
    the Inception weights file, the classifier. Returns what it resolved. Run on rank 0."""
    from gan.metrics.fidelity import check_inception_file, resolve_inception_weights
    from gan.metrics.offline import check_classifier

    try:
        m = read_manifest(req.real_shards)
        m.check(channels=channels, size=size, num_classes=num_classes)
    except ShardError as e:
        raise MetricError(f"real images for the metrics: {e}") from None
    check_counts(req, num_classes, real_count(req.real_shards, req.max_real))
    out = {"classes": list(m.classes), "real": {"shards": str(req.real_shards), "dataset": m.dataset,
                                                 "split": m.split, "count": real_count(req.real_shards, req.max_real)}}
    if any(n in FIDELITY for n in req.names):
        w = resolve_inception_weights(req.inception_weights)
        check_inception_file(w)
        out["inception_weights"] = str(w)
    if any(n.startswith("cls_") for n in req.names):
        out["classifier"] = check_classifier(req.classifier, list(m.classes))
    return out


def compute(images: torch.Tensor, labels: torch.Tensor, req: EvalRequest, resolved: dict, device) -> tuple[dict, dict]:
    """Rank 0: every requested metric on uint8 ``images`` drawn for classes ``labels``."""
    from gan.metrics.fidelity import fidelity_metrics
    from gan.metrics.offline import cls_metrics

    values, details = {}, {}
    t0 = time.perf_counter()
    if any(n in FIDELITY for n in req.names):
        v, d = fidelity_metrics(images, req.names, req.real_shards, Path(resolved["inception_weights"]), device,
                                req.batch_size, req.kid_subset_size, req.isc_splits, req.max_real,
                                req.cache_dir or None, req.verbose or req.progress)
        values.update(v)
        details["inception"] = d
    if any(n.startswith("cls_") for n in req.names):
        v, d = cls_metrics(images, labels, req.names, resolved["classes"], req.real_shards, req.classifier,
                           device, max(req.batch_size, 1), req.max_real, req.cache_dir or None, req.progress)
        values.update(v)
        details["offline"] = d
    details.update({"num_samples": int(len(images)), "real": resolved["real"], "metrics": req.names,
                    "seconds": round(time.perf_counter() - t0, 2)})
    return values, details


def evaluate_generator(G: torch.nn.Module, z_dim: int, num_classes: int, channels: int, size: int,
                       req: EvalRequest, device) -> tuple[dict, dict]:
    """Collective (every rank calls it). Checks, then ``req.num_samples`` class-balanced samples of
    ``G`` split over the ranks, gathered to rank 0, which computes the metrics while the others wait.
    Every rank returns the same ``(values, details)`` or raises the same error."""
    check_counts(req, num_classes)  # pure: every rank fails alike, before any collective
    resolved = collective.on_rank0(preflight, req, num_classes, channels, size)
    was_training = G.training
    G.eval()
    try:
        gathered = collective.generate_gathered(G, req.num_samples, z_dim, num_classes, req.seed,
                                                req.batch_size, device, progress=req.progress)
    finally:
        G.train(was_training)
    return collective.on_rank0(lambda: compute(gathered[0], gathered[1], req, resolved, device))


def evaluate_images(images: torch.Tensor, labels: torch.Tensor, req: EvalRequest, device) -> tuple[dict, dict]:
    """One process: the metrics of given uint8 images (e.g. the test split, for the real-data floor)."""
    req.num_samples = len(images)
    num_classes = int(read_manifest(req.real_shards).num_classes)
    check_counts(req, num_classes)
    resolved = preflight(req, num_classes, images.shape[1], images.shape[2])
    return compute(images, labels, req, resolved, device)
