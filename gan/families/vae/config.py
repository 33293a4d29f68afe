"""The VAE's config section: one dataclass that validates itself."""
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
    recon: str = "mse"  # reconstruction term: mse (Gaussian likelihood) | bce (pixels rescaled to [0, 1])
    obs_std: float = math.sqrt(0.5)  # mse: std of the Gaussian likelihood; sqrt(1/2) makes the term sum((x - x')^2)
    beta: float = 1.0  # weight of the KL term (beta-VAE; 1 = the ELBO)
    kl_warmup_steps: int = 0  # KL weight rises linearly from 0 to beta over these steps (0 = beta from the start)

    def __post_init__(self):
        _check(self.img_size == 28 or (self.img_size >= 16 and self.img_size & (self.img_size - 1) == 0),
               "vae.img_size", f"{self.img_size} is not 28 or a power of two >= 16 (e.g. 32, 64)")
        _check(self.img_channels in (1, 3), "vae.img_channels", "must be 1 or 3")
        _check(self.latent_dim > 0, "vae.latent_dim", "must be > 0")
        _check(self.channels > 0, "vae.channels", "must be > 0")
        _check(self.num_classes >= 1, "vae.num_classes", "must be >= 1")
        _check(not self.conditional or self.num_classes >= 2, "vae.conditional",
               "a class-conditional decoder needs vae.num_classes >= 2 (or set vae.conditional=false)")
        _check(self.recon in RECON_LOSSES, "vae.recon", f"'{self.recon}' is not one of: {', '.join(RECON_LOSSES)}")
        _check(self.obs_std > 0 and math.isfinite(self.obs_std), "vae.obs_std", "must be a finite number > 0")
        _check(self.beta >= 0 and math.isfinite(self.beta), "vae.beta", "must be a finite number >= 0")
        _check(self.kl_warmup_steps >= 0, "vae.kl_warmup_steps", "must be >= 0")


__all__ = ["VAEConfig", "ConfigError", "RECON_LOSSES"]
