"""The VAE's config sections, each a dataclass validating itself: ``model`` (the architecture and its
likelihood, compared on resume), ``loss`` (the weights of the objective, free to change on resume) and
``val`` (the held-out split that evaluation and the offline pictures read)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from gan.config import ConfigError, _check

RECON_LOSSES = ("mse", "bce")


@dataclass
class VAEConfig:
    img_size: int = 32  # 28 (MNIST-like) or a power of two >= 16 (32, 64, ...)
    img_channels: int = 3
    latent_dim: int = 128  # size of z
    channels: int = 32  # width of the first encoder conv; doubles at every 2x down (capped at 8x)
    num_classes: int = 10  # labels in the data (used by the class-conditional decoder)
    conditional: bool = False  # decoder takes a class embedding beside z: per-class sampling
    recon: str = "mse"  # likelihood: mse (Gaussian, mean tanh(h)) | bce (Bernoulli logits h on pixels rescaled to [0, 1])

    def __post_init__(self):
        _check(self.img_size == 28 or (self.img_size >= 16 and self.img_size & (self.img_size - 1) == 0),
               "model.img_size", f"{self.img_size} is not 28 or a power of two >= 16 (e.g. 32, 64)")
        _check(self.img_channels in (1, 3), "model.img_channels", "must be 1 or 3")
        _check(self.latent_dim > 0, "model.latent_dim", "must be > 0")
        _check(self.channels > 0, "model.channels", "must be > 0")
        _check(self.num_classes >= 1, "model.num_classes", "must be >= 1")
        _check(not self.conditional or self.num_classes >= 2, "model.conditional",
               "a class-conditional decoder needs vae.num_classes >= 2 (or set model.conditional=false)")
        _check(self.recon in RECON_LOSSES, "model.recon", f"'{self.recon}' is not one of: {', '.join(RECON_LOSSES)}")


@dataclass
class VAELossConfig:
    beta: float = 1.0  # weight of the KL term (beta-VAE; 1 = the ELBO)
    kl_warmup_steps: int = 0  # KL weight rises linearly from 0 to beta over these steps (0 = beta from the start)
    obs_std: float = math.sqrt(0.5)  # recon=mse: std of the Gaussian likelihood; sqrt(1/2) makes the term sum((x - x')^2)

    def __post_init__(self):
        _check(self.beta >= 0 and math.isfinite(self.beta), "loss.beta", "must be a finite number >= 0")
        _check(self.kl_warmup_steps >= 0, "loss.kl_warmup_steps", "must be >= 0")
        _check(self.obs_std > 0 and math.isfinite(self.obs_std), "loss.obs_std", "must be a finite number > 0")


@dataclass
class VAEValConfig:
    # held-out single-image shards the metrics and the offline pictures read (e.g. the test split:
    # `python -m data_shards build --source cifar10 --root data/cifar10 --split test --out DIR`);
    # "" = data.shards (not held out: the metrics then say so, "held_out": false)
    shards: str = ""


__all__ = ["VAEConfig", "VAELossConfig", "VAEValConfig", "ConfigError", "RECON_LOSSES"]
