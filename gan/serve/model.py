"""What the server runs: a generator loaded from an exported artifact or from a run directory, and the
request's latent codes.

z of a request comes from its own seed only (``torch.Generator().manual_seed(seed)``), so the same
seed and class give the same images however requests are batched together. Truncation (BigGAN's
trick): entries with ``|z| > t`` are resampled from the same generator until all lie within ``t``
(a truncated normal); ``truncation`` absent or 0 = no truncation.
"""
from __future__ import annotations

from pathlib import Path

import torch

from gan.export import ExportError


class ModelError(ValueError):
    """A run or artifact the server cannot start with; the message names it and the fix."""


def latents(n: int, z_dim: int, seed: int, truncation: float | None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, z_dim, generator=g)
    if truncation:
        for _ in range(1000):
            bad = z.abs() > truncation
            if not bad.any():
                break
            z[bad] = torch.randn(int(bad.sum()), generator=g)
    return z


class ServedModel:
    """``model(z, y)`` -> float (N, C, H, W) in [-1, 1] on the CPU, plus ``info`` for /info."""

    def __init__(self, fn, info: dict):
        self.fn, self.info = fn, info
        self.z_dim = int(info["z_dim"])
        self.class_names = list(info["class_names"])

    def __call__(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.fn(z, y).float().cpu()


def load_artifact(directory: str | Path, device: str = "cpu") -> ServedModel:
    from gan.export import Artifact

    d = Path(directory)
    if not d.is_dir():
        raise ModelError(f"artifact directory not found: {d}. Make one with "
                         f"`python launch/export.py --run RUN --out {d}`")
    try:
        art = Artifact(d, device)
    except ExportError as e:
        raise ModelError(str(e)) from None
    m = art.meta
    info = {k: m.get(k) for k in ("model", "z_dim", "num_classes", "class_names", "image_shape", "step", "metrics",
                                  "format", "quantize", "run", "label")}
    return ServedModel(art, {**info, "source": str(d), "device": device})


def load_run(run_dir: str | Path, device: str = "cpu", best: bool = False) -> ServedModel:
    """The run's newest export (RUN/export) or its best (RUN/best), eager."""
    from gan.checkpoint import CheckpointError
    from gan.config import ConfigError
    from gan.data import class_names
    from gan.export import bake, pick_weights, run_metrics
    from gan.metrics import MetricError, load_generator

    try:
        loaded = load_generator(run_dir, pick_weights(run_dir, None, best), device)
    except (ExportError, MetricError, CheckpointError, ConfigError) as e:
        raise ModelError(str(e)) from None
    m = loaded.cfg.model
    G = bake(loaded.G).to(device)
    info = {"model": m.name, "z_dim": m.z_dim, "num_classes": m.num_classes, "class_names": class_names(loaded.cfg.data.shards, m.num_classes),
            "image_shape": [m.img_channels, m.img_size, m.img_size], "step": loaded.step,
            "metrics": run_metrics(run_dir, loaded.label), "format": "eager", "quantize": "none",
            "run": str(run_dir), "label": loaded.label, "source": str(loaded.source), "device": device}
    return ServedModel(lambda z, y: G(z.to(device), y.to(device)), info)
