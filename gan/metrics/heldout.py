"""What the families that measure a held-out split share (the VAE, pix2pix): the checks before any work,
float64 per-sample sums, the read of this rank's part of the split, and FID from summed moments.

Each rank reads its own samples of the split (``gan.data.eval_batches``: sample i goes to rank i mod W,
so every sample is read exactly once), measures them, and keeps only float64 sums and counts; those
sums (and, for FID, the Inception feature moments) are all that crosses ranks
(:func:`gan.metrics.collective.all_sum`), so every rank ends with the same values whatever the world size.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gan.metrics import collective
from gan.metrics.errors import MetricError


def check_split(req, who: str, fits, family) -> dict:
    """Not a collective. The held-out shards of ``req`` exist, are single images or pairs as ``family`` needs,
    and fit the model (``fits(manifest)`` raises ShardError); fid's Inception weights and sample counts.
    Returns what it resolved: {"real": {..., "held_out": whether they are other than data.shards},
    "inception_weights": path (with fid)}."""
    from gan.data import ShardError, read_manifest, require_paired, require_single
    from gan.metrics.fidelity import check_inception_file, resolve_inception_weights

    key = req.real_key
    try:
        m = read_manifest(req.real_shards, key, family.paired)
        (require_paired if family.paired else require_single)(m, who, key)
        fits(m)
    except ShardError as e:
        raise MetricError(f"held-out images for the metrics ({key}): {e}") from None
    if req.max_real < 0:
        raise MetricError(f"--max-real must be >= 0 (0 = every held-out image), got {req.max_real}")
    count = min(m.total, req.max_real) if req.max_real else m.total  # the first N in shard order
    if count < 1:
        raise MetricError(f"the held-out shards in {m.dir} hold no samples")
    if "fid" in req.names and (req.num_samples < 2 or count < 2):
        raise MetricError(f"fid needs at least 2 images on each side for a covariance: {req.num_samples} "
                          f"samples, {count} held-out images")
    if "ssim" in req.names and min(m.image_shape[1:]) < 11:
        raise MetricError(f"ssim's 11x11 window needs images of at least 11x11 pixels, the shards in {m.dir} "
                          f"hold {m.image_shape[1]}x{m.image_shape[2]}")
    out = {"real": {"shards": str(req.real_shards), "dataset": m.dataset, "split": m.split, "count": count,
                    "held_out": Path(req.real_shards).resolve() != Path(family.cfg.data.shards).resolve()}}
    if "fid" in req.names:
        w = resolve_inception_weights(req.inception_weights)
        check_inception_file(w)
        out["inception_weights"] = str(w)
    return out


def split_batches(req, progress_desc: str):
    """This rank's part of the held-out split in batches of ``req.batch_size`` (a progress bar on rank 0)."""
    from tqdm import tqdm

    from gan.data import eval_batches

    batches = eval_batches(req.real_shards, req.batch_size, collective.rank(), collective.world_size(),
                           req.num_workers, req.real_key, limit=req.max_real)
    return tqdm(batches, desc=progress_desc, unit="batch", disable=not (req.progress and collective.rank() == 0),
                dynamic_ncols=True)


def add(sums: dict, values: dict[str, torch.Tensor]) -> None:
    """Add per-sample values (name -> (N,)) into float64 sums and counts ``ps.<name>.sum`` / ``.n``."""
    for name, v in values.items():
        v = torch.as_tensor(v).detach().cpu().double().reshape(-1)
        sums[f"ps.{name}.sum"] = sums.get(f"ps.{name}.sum", np.array(0.0)) + float(v.sum())
        sums[f"ps.{name}.n"] = sums.get(f"ps.{name}.n", np.array(0.0)) + float(len(v))


def zeros(names) -> dict:
    """Sums of no samples (a rank whose part is empty still passes every key to the all-reduce)."""
    return {f"ps.{n}.{k}": np.array(0.0) for n in names for k in ("sum", "n")}


def means(sums: dict, names) -> dict[str, float]:
    """The mean of each per-sample measure over every rank's samples (from the summed sums)."""
    return {n: float(sums[f"ps.{n}.sum"] / sums[f"ps.{n}.n"]) for n in names}


def fid_moments(images: torch.Tensor, side: str, weights: Path, device, batch_size: int,
                progress: bool = False) -> dict[str, np.ndarray]:
    """float64 moments (n, sum, outer-product sum) of torch-fidelity's Inception pool features of uint8
    ``images``, as ``inc.<side>.<layer>.*`` (side: fake or real), the keys :func:`fid_finish` reads."""
    from gan.metrics.fidelity import features, layer_for
    from gan.metrics.frechet import moments

    layer = layer_for("fid")
    return moments(features(images, (layer,), weights, device, batch_size, progress)[layer], f"inc.{side}.{layer}.")


def cached_moments(shards, side: str, weights: Path, cache_dir, compute, max_real: int = 0,
                   count: int = 0) -> dict[str, np.ndarray]:
    """:func:`fid_moments` of this rank's part of a shard set (its first ``max_real`` samples when > 0),
    cached under a key of the shards' checksums, the extractor, ``max_real`` and the part (rank, world size):
    ``compute()`` runs only on a miss, said in one line (``count``: the images of every rank)."""
    from gan.metrics.cache import StatsCache, cache_key
    from gan.metrics.fidelity import layer_for, weights_identity

    from gan.metrics.cache import announce

    part = [collective.rank(), collective.world_size()]
    key = cache_key(shards, {**weights_identity(weights), "layers": [layer_for("fid")]}, side=side, part=part,
                    **({"max_real": max_real} if max_real else {}))  # all images: the key it always had
    cache = StatsCache(Path(cache_dir) if cache_dir else None)
    hit = cache.load("heldout", key)
    if hit is not None:
        return {k: v for k, v in hit.items() if k.startswith(f"inc.{side}.")}
    announce(f"{side} statistics (Inception features)", count, shards, cache)
    out = compute()
    cache.save("heldout", key, out, {"shards": str(shards), "weights": str(weights), "side": side})
    return out


def fid_finish(sums: dict, weights: Path) -> tuple[dict, dict]:
    """FID (torch-fidelity's formula) from the moments of both sides summed over every rank."""
    from gan.metrics.fidelity import fidelity_finish

    return fidelity_finish(sums, {}, ["fid"], weights)


def finish_means_and_fid(sums: dict, names, weights: Path | None) -> tuple[dict, dict]:
    """The families' ``finish``: the per-sample measures' means, and FID when Inception ``weights`` are given."""
    values, details = means(sums, names), {}
    if weights is not None:
        v, details["inception"] = fid_finish(sums, weights)
        values.update(v)
    return values, details


def run(local, finish, req, resolved: dict, num_samples: int) -> tuple[dict, dict]:
    """Collective. ``local()`` on every rank (an error on one reaches all), one float64 all-reduce of its
    sums, then ``finish(sums) -> (values, details)`` alike on every rank."""
    import time

    t0 = time.perf_counter()
    sums = collective.all_sum(collective.everywhere(local))
    values, details = finish(sums)
    measured = {int(sums[k]) for k in sums if k.startswith("ps.") and k.endswith(".n")}
    details.update({"num_samples": int(num_samples), "real": resolved["real"], "metrics": req.names,
                    "measured": measured.pop() if len(measured) == 1 else None,  # held-out images, every rank's
                    "processes": collective.world_size(), "seconds": round(time.perf_counter() - t0, 2)})
    return values, details
