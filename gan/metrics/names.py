"""Metric names: what ``--metrics`` / ``metrics.metrics`` accept, what each produces, which way is better.

Kept free of heavy imports: ``gan.config`` validates ``MetricsConfig`` against this table.
"""
from __future__ import annotations

# metric (as requested) -> (keys it writes, needs Inception weights)
METRICS: dict[str, tuple[tuple[str, ...], bool]] = {
    "fid": (("fid",), True),  # Frechet Inception Distance (torch-fidelity, Inception-v3 pool3)
    "isc": (("isc", "isc_std"), True),  # Inception Score over isc_splits splits
    "kid": (("kid", "kid_std"), True),  # Kernel Inception Distance over subsets of kid_subset_size
    "prc": (("precision", "recall", "f_score"), True),  # improved precision/recall (Inception features)
    "cls_acc": (("cls_acc",), False),  # share of samples the CIFAR-10 classifier puts in their class
    "cls_fd": (("cls_fd",), False),  # Frechet distance in the classifier's feature space (NOT FID)
}
# Per-class keys ("cls_acc/<class>", "cls_fd/<class>") are written too; they are not selectable.

HIGHER_IS_BETTER = {"isc", "precision", "recall", "f_score", "cls_acc"}
LOWER_IS_BETTER = {"fid", "kid", "cls_fd"}
FIDELITY = tuple(m for m, (_, w) in METRICS.items() if w)


def valid_list() -> str:
    return ", ".join(METRICS)


def parse_metrics(spec: str | list | tuple, valid=None, family: str = "") -> list[str]:
    """"fid, cls_acc" -> ["fid", "cls_acc"] (deduplicated); raises ValueError naming unknown names and the
    valid ones. ``valid``: the names accepted (default: the GAN's, :data:`METRICS`); ``family``: named in the
    message (gan.family.Family.parse_metrics passes its table and name)."""
    valid = list(METRICS if valid is None else valid)
    whose = f" for family {family}" if family else ""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = list(dict.fromkeys(s.strip().lower() for s in items if s and s.strip()))
    bad = [n for n in names if n not in valid]
    if not names or bad:
        what = f"unknown metric(s) {', '.join(repr(b) for b in bad)}" if bad else "no metric named"
        raise ValueError(f"{what}{whose}; valid metrics: {', '.join(valid)}")
    return names


def keys_of(names: list[str]) -> list[str]:
    return [k for n in names for k in METRICS[n][0]]


def better(key: str, new: float, old: float | None) -> bool:
    """Is ``new`` an improvement over ``old`` for metric key ``key``?"""
    if old is None:
        return True
    base = key.split("/")[0]
    return new > old if base in HIGHER_IS_BETTER else new < old


def count_problems(names: list[str], num_samples: int, kid_subset_size: int, isc_splits: int,
                   num_classes: int | None = None, num_real: int | None = None,
                   prc_neighborhood: int = 3) -> list[str]:
    """Why ``num_samples`` generated (and ``num_real`` real) images are too few for these metrics;
    empty when they suffice. Each line names the setting that fixes it."""
    out = []
    if "kid" in names:
        if num_samples < kid_subset_size:
            out.append(f"kid draws subsets of kid_subset_size={kid_subset_size} samples, but only {num_samples} "
                       f"are generated: raise the sample count or lower the KID subset size "
                       f"(--kid-subset-size / metrics.kid_subset_size)")
        if num_real is not None and num_real < kid_subset_size:
            out.append(f"kid needs {kid_subset_size} real images per subset, the real set has {num_real}")
    if "isc" in names and num_samples < isc_splits:
        out.append(f"isc splits the samples into isc_splits={isc_splits} parts, but only {num_samples} are "
                   f"generated: raise the sample count or lower --isc-splits / metrics.isc_splits")
    if "prc" in names:
        if num_samples < prc_neighborhood + 1:
            out.append(f"prc needs at least {prc_neighborhood + 1} samples (k={prc_neighborhood} neighbours), "
                       f"got {num_samples}")
        if num_real is not None and num_real < prc_neighborhood + 1:
            out.append(f"prc needs at least {prc_neighborhood + 1} real images, the real set has {num_real}")
    if "fid" in names and num_samples < 2:
        out.append(f"fid needs at least 2 samples for a covariance, got {num_samples}")
    if num_classes:
        if "cls_fd" in names and num_samples < 2 * num_classes:
            out.append(f"cls_fd needs at least 2 samples per class ({2 * num_classes} for {num_classes} classes), "
                       f"got {num_samples}")
        if "cls_acc" in names and num_samples < num_classes:
            out.append(f"cls_acc needs at least one sample per class ({num_classes}), got {num_samples}")
    return out
