"""One evaluation: check the request; each rank generates and measures its own slice; statistics are summed
across ranks and every rank finishes with the same values."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from gan.data import ShardError, read_manifest
from gan.metrics import collective
from gan.metrics.errors import MetricError
from gan.metrics.names import FIDELITY, count_problems
from gan.metrics.realdata import real_count

EVAL_SEED = 20_240_601  # the evaluation noise: the same z for every evaluation of every run


@dataclasses.dataclass
class EvalRequest:
    """What to compute and with what. ``names``: metrics of ``family`` (its ``parse_metrics``); ``real_shards``:
    the real images (the GAN) or the held-out split (the VAE, pix2pix)."""
    names: list[str]
    num_samples: int
    real_shards: str
    real_key: str = "data.shards"  # the config key (or flag) that named real_shards: what a shard error names
    batch_size: int = 100
    inception_weights: str = ""
    classifier: str = ""
    kid_subset_size: int = 1000
    isc_splits: int = 10
    max_real: int = 0  # 0 = every real image
    cache_dir: str = ""
    seed: int = EVAL_SEED
    verbose: bool = False
    progress: bool = False  # rank 0: progress bars on stderr for generation and feature extraction (its slice)
    family: str = "gan"  # whose metric names these are
    num_workers: int = 0  # loader workers reading held-out shards

    def __post_init__(self):
        from gan.family import get_family

        try:
            self.names = get_family(self.family).parse_metrics(self.names)
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
        m = read_manifest(req.real_shards, req.real_key)
        m.check(channels=channels, size=size, num_classes=num_classes, key=req.real_key)
    except ShardError as e:
        raise MetricError(f"real images for the metrics ({req.real_key}): {e}") from None
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


def _local(images: torch.Tensor, labels: torch.Tensor, req: EvalRequest, resolved: dict, device) -> tuple:
    """Not a collective. Every requested metric's extractor on this rank's slice: (sums, rows, details)."""
    from gan.metrics import per_sample
    from gan.metrics.fidelity import fidelity_local
    from gan.metrics.offline import cls_local

    progress = req.progress and collective.rank() == 0
    parts = []
    if any(n in FIDELITY for n in req.names):
        parts.append(fidelity_local(images, req.names, req.real_shards, Path(resolved["inception_weights"]), device,
                                    req.batch_size, req.max_real, req.cache_dir or None,
                                    (req.verbose or req.progress) and progress))
    if any(n.startswith("cls_") for n in req.names):
        parts.append(cls_local(images, labels, req.names, resolved["classes"], req.real_shards, req.classifier,
                               device, req.batch_size, req.max_real, req.cache_dir or None, progress))
    sums, rows = per_sample.local_sums(req.names, images, labels), {}
    for part in parts:
        sums.update(part["sums"])
        rows.update(part.get("rows", {}))
    return sums, rows, [part["details"] for part in parts]


def _finish(sums: dict, rows: dict, local_details: list, req: EvalRequest, resolved: dict) -> tuple[dict, dict]:
    """Every rank, from what crossed ranks: the values (the same on every rank) and the details."""
    from gan.metrics import per_sample
    from gan.metrics.fidelity import fidelity_finish
    from gan.metrics.offline import cls_finish

    values, details = per_sample.finish(sums, req.names), {}
    local_details = iter(local_details)
    if any(n in FIDELITY for n in req.names):
        next(local_details)
        v, d = fidelity_finish(sums, rows, req.names, Path(resolved["inception_weights"]), req.kid_subset_size,
                               req.isc_splits)
        values.update(v)
        details["inception"] = d
    if any(n.startswith("cls_") for n in req.names):
        v, d = cls_finish(sums, req.names, resolved["classes"])
        values.update(v)
        details["offline"] = {**next(local_details), **d}
    return values, details


def compute(local, req: EvalRequest, resolved: dict, num_samples: int) -> tuple[dict, dict]:
    """Collective. ``local()`` (this rank's part, see :func:`_local`) on every rank at once, then one
    float64 all-reduce of the sums (and a gather of the feature rows IS/KID/precision-recall need);
    every rank finishes alike and returns the same ``(values, details)``."""
    t0 = time.perf_counter()
    sums, rows, local_details = collective.everywhere(local)
    sums = collective.all_sum(sums)
    rows = {k: collective.all_rows(rows[k]) for k in sorted(rows)}
    values, details = _finish(sums, rows, local_details, req, resolved)
    details.update({"num_samples": int(num_samples), "real": resolved["real"], "metrics": req.names,
                    "seconds": round(time.perf_counter() - t0, 2)})
    return values, details


def evaluate_generator(G: torch.nn.Module, z_dim: int, num_classes: int, channels: int, size: int,
                       req: EvalRequest, device) -> tuple[dict, dict]:
    """Collective (every rank calls it). Checks, then ``req.num_samples`` class-balanced samples of
    ``G``: each rank generates its own slice and runs every metric's extractor on it (and on its slice
    of the real images); only statistics cross ranks. Every rank returns the same ``(values, details)``
    or raises (a failed rank's error on every rank; :class:`gan.dist.PeerError` if a rank died)."""
    check_counts(req, num_classes)  # pure: every rank fails alike, before any collective
    resolved = collective.everywhere(preflight, req, num_classes, channels, size)

    def local():
        was_training = G.training
        G.eval()
        try:
            images, labels = collective.generate_slice(G, req.num_samples, z_dim, num_classes, req.seed,
                                                       req.batch_size, device, progress=req.progress)
        finally:
            G.train(was_training)
        return _local(images, labels, req, resolved, device)

    return compute(local, req, resolved, req.num_samples)


def evaluate_images(images: torch.Tensor, labels: torch.Tensor, req: EvalRequest, device) -> tuple[dict, dict]:
    """The metrics of given uint8 images (e.g. the test split, for the real-data floor). Collective when
    several ranks run: each passes all the images and measures its own slice."""
    req.num_samples = len(images)
    num_classes = int(read_manifest(req.real_shards).num_classes)
    check_counts(req, num_classes)
    resolved = collective.everywhere(preflight, req, num_classes, images.shape[1], images.shape[2])
    lo, hi = collective.my_range(len(images))
    return compute(lambda: _local(images[lo:hi], labels[lo:hi], req, resolved, device), req, resolved, len(images))
