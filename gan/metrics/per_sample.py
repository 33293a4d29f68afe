"""Per-sample measures (L1, PSNR, SSIM, ... for the families that reconstruct or translate images): one
number per sample, averaged over every sample of every rank.

A measure is a function ``fn(images, labels) -> values``: uint8 images (N, C, H, W) of this rank's
slice and their conditioning labels (N,) in, one value per sample (N,) out. Register it once, at
import, with the direction that is better:

    from gan.metrics.per_sample import register
    register("l1", lambda images, labels: ..., higher_is_better=False)

It is then a metric name like any other (``--metrics l1``, ``metrics.metrics``). Each rank applies it
to its own slice; only the float64 sum and count cross ranks, so the value is the mean over all
samples whatever the world size. :func:`means` is the same exchange for values a caller already has.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from gan.metrics import names as _names

Measure = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MEASURES: dict[str, Measure] = {}


def register(name: str, fn: Measure, higher_is_better: bool) -> None:
    """Make ``name`` a metric whose value is the mean of ``fn`` over every sample (see the module doc)."""
    if name in _names.METRICS and name not in MEASURES:
        raise ValueError(f"metric name {name!r} is taken")
    MEASURES[name] = fn
    _names.METRICS[name] = ((name,), False)
    (_names.HIGHER_IS_BETTER if higher_is_better else _names.LOWER_IS_BETTER).add(name)


def local_sums(names: list[str], images: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray]:
    """Not a collective. This rank's float64 sums and counts of every requested measure."""
    out = {}
    for name in (n for n in names if n in MEASURES):
        v = torch.as_tensor(MEASURES[name](images, labels)).detach().cpu().double().reshape(-1) if len(images) else \
            torch.zeros(0, dtype=torch.float64)
        if len(v) != len(images):
            raise ValueError(f"per-sample measure {name!r} gave {len(v)} values for {len(images)} samples")
        out.update({f"ps.{name}.sum": np.array(float(v.sum())), f"ps.{name}.n": np.array(float(len(v)))})
    return out


def finish(sums: dict[str, np.ndarray], names: list[str]) -> dict[str, float]:
    """Every rank, from the sums over all ranks: the mean of each requested measure."""
    return {n: float(sums[f"ps.{n}.sum"] / sums[f"ps.{n}.n"]) for n in names if n in MEASURES}


def means(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Collective. ``{name: per-sample values of this rank}`` -> ``{name: mean over all ranks' samples}``,
    summed in float64. Every rank passes the same names and gets the same means."""
    from gan.metrics.collective import all_sum

    local = {}
    for name, v in values.items():
        v = torch.as_tensor(v).detach().cpu().double().reshape(-1)
        local.update({f"{name}.sum": np.array(float(v.sum())), f"{name}.n": np.array(float(len(v)))})
    total = all_sum(local)
    return {name: float(total[f"{name}.sum"] / total[f"{name}.n"]) for name in values}
