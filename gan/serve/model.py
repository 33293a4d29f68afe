"""What the server runs: the modes of a network (its family's: the GAN's generate, the VAE's generate and
reconstruct, pix2pix's translate) loaded from an exported artifact or from a run directory, and the
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
    """``model.run(mode, *inputs)`` -> float (N, C, H, W) in [-1, 1] on the CPU; ``model(z, y)`` is the
    generate mode. ``modes``: {name: gan.family.Mode} in the family's order; ``info`` for /info."""

    def __init__(self, runners: dict, modes: dict, info: dict):
        self.runners, self.modes = runners, modes
        generate = modes.get("generate")
        self.z_dim = int(generate.input("noise").shape[1]) if generate else None
        self.class_names = list(info.get("class_names") or [])
        self.info = {**info, "modes": {n: m.to_json() for n, m in modes.items()}}

    def run(self, mode: str, *inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.runners[mode](*inputs).float().cpu()

    def __call__(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.run("generate", z, y)


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
    runners = {name: (lambda *xs, name=name: art.run(name, *xs)) for name in art.modes}
    return ServedModel(runners, art.modes, {"family": m.get("family", "gan"), **info, "source": str(d), "device": device})


def load_run(run_dir: str | Path, device: str = "cpu", best: bool = False) -> ServedModel:
    """The run's newest export (RUN/export) or its best (RUN/best), eager, every mode of its family."""
    from gan.checkpoint import CheckpointError
    from gan.config import ConfigError
    from gan.export import bake, pick_weights, run_metrics, signature_info
    from gan.metrics import MetricError, load_generator

    try:
        loaded = load_generator(run_dir, pick_weights(run_dir, None, best), device)
    except (ExportError, MetricError, CheckpointError, ConfigError) as e:
        raise ModelError(str(e)) from None
    family = loaded.family
    net = bake(loaded.G).to(device)
    modes = {mode.name: mode for mode in family.modes()}
    runners = {}
    for name in modes:
        forward = family.mode_forward(net, name)
        runners[name] = lambda *xs, f=forward: f(*(x.to(device) for x in xs))
    info = {"z_dim": None, "num_classes": None, "class_names": [], **signature_info(family, list(modes.values())),
            "step": loaded.step,
            "metrics": run_metrics(run_dir, loaded.label), "format": "eager", "quantize": "none",
            "run": str(run_dir), "label": loaded.label, "source": str(loaded.source), "device": device}
    return ServedModel(runners, modes, info)
