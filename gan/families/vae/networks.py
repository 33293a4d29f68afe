"""The VAE's networks: a conv encoder to (mu, log sigma^2), the reparameterization trick, and a decoder
of FC -> reshape -> transposed convolutions, optionally conditioned on a class label.

The decoder returns its raw output ``h`` (one value per pixel); :meth:`VAE.to_image` maps it to an image
in [-1, 1] the way the likelihood reads it: ``tanh(h)`` is the Gaussian mean (``recon: mse``), and
``sigmoid(h)`` the Bernoulli mean on pixels rescaled to [0, 1] (``recon: bce``, where ``h`` are logits).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from gan.families.vae.config import VAEConfig

MAX_MULT = 8  # encoder/decoder widths stop doubling at 8x the base width


def layout(img_size: int) -> tuple[int, int]:
    """Spatial size of the smallest feature map (7 for 28 px, else 4) and the number of 2x steps to it."""
    base = 7 if img_size == 28 else 4
    return base, int(round(math.log2(img_size // base)))


def _widths(channels: int, steps: int) -> list[int]:
    """Feature widths after each 2x down: channels, 2*channels, ... capped at MAX_MULT * channels."""
    return [channels * min(2 ** i, MAX_MULT) for i in range(steps)]


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        base, steps = layout(cfg.img_size)
        widths = _widths(cfg.channels, steps)
        layers: list[nn.Module] = [nn.Conv2d(cfg.img_channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
        self.convs = nn.Sequential(*layers, nn.Flatten())
        flat = widths[-1] * base * base
        self.fc_mu = nn.Linear(flat, cfg.latent_dim)
        self.fc_logvar = nn.Linear(flat, cfg.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.convs(x)
        return self.fc_mu(h), self.fc_logvar(h)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        base, steps = layout(cfg.img_size)
        widths = _widths(cfg.channels, steps)[::-1]  # widest first
        self.base, self.top = base, widths[0]
        self.embed = nn.Embedding(cfg.num_classes, cfg.latent_dim) if cfg.conditional else None
        in_dim = cfg.latent_dim * (2 if cfg.conditional else 1)
        self.fc = nn.Linear(in_dim, widths[0] * base * base)
        layers: list[nn.Module] = [nn.BatchNorm2d(widths[0]), nn.ReLU()]
        for c_in, c_out in zip(widths, widths[1:] + [widths[-1]]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), nn.BatchNorm2d(c_out), nn.ReLU()]
        layers.append(nn.Conv2d(widths[-1], cfg.img_channels, 3, 1, 1))
        self.convs = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            if y is None:
                raise ValueError("this decoder is class-conditional (vae.conditional=true): pass labels y")
            z = torch.cat([z, self.embed(y)], dim=1)
        return self.convs(self.fc(z).view(z.shape[0], self.top, self.base, self.base))


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I): a sample whose gradient flows to mu and log sigma^2."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Raw decoder output h (see the module docstring); :meth:`to_image` turns it into an image."""
        return self.decoder(z, y)

    def to_image(self, h: torch.Tensor) -> torch.Tensor:
        """Decoder output -> the likelihood's mean as an image in [-1, 1]."""
        return torch.tanh(h) if self.cfg.recon == "mse" else 2 * torch.sigmoid(h) - 1

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, sample: bool = True):
        """-> (h, mu, logvar). ``sample=False`` decodes the mean mu (deterministic reconstructions)."""
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar) if sample else mu
        return self.decode(z, y), mu, logvar

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [-1, 1] decoded from the posterior means."""
        return self.to_image(self(x, y, sample=False)[0])

    @torch.no_grad()
    def sample(self, n: int, y: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images in [-1, 1] from the prior z ~ N(0, I) (with labels y when the decoder is conditional)."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.cfg.latent_dim, generator=generator, device=generator.device if generator else device)
        return self.to_image(self.decode(z.to(device), y))


def build_vae(cfg: VAEConfig) -> VAE:
    return VAE(cfg)
