"""Conditional DCGAN (Radford et al. 2016, with class conditioning).

G: label embedding concatenated with z, transposed-conv blocks with BatchNorm + ReLU, Tanh out.
D: strided conv blocks with LeakyReLU(0.2), BatchNorm from the second block, one logit, and the
label either by projection (Miyato & Koyama 2018, recommended) or as one-hot planes concatenated
with the image. Sizes: a power of two >= 8 (4x4 base) or 28 (7x7 base, for MNIST-like data).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from gan.config import ModelConfig
from gan.models import register


def _base_and_ups(img_size: int) -> tuple[int, int]:
    base = 7 if img_size == 28 else 4
    return base, int(round(math.log2(img_size // base)))


def dcgan_init(module: nn.Module) -> None:
    """DCGAN init: conv weights ~ N(0, 0.02), BatchNorm gamma ~ N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)


class Generator(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.z_dim, self.num_classes = cfg.z_dim, cfg.num_classes
        base, ups = _base_and_ups(cfg.img_size)
        ch = cfg.g_channels * 2 ** (ups - 1)
        self.embed = nn.Embedding(cfg.num_classes, cfg.z_dim)
        layers = [nn.ConvTranspose2d(2 * cfg.z_dim, ch, base, 1, 0, bias=False), nn.BatchNorm2d(ch), nn.ReLU(True)]
        for _ in range(ups - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, cfg.img_channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        dcgan_init(self)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([z, self.embed(y)], dim=1)
        return self.net(h[:, :, None, None])


class Discriminator(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_classes, self.conditioning = cfg.num_classes, cfg.d_conditioning
        base, ups = _base_and_ups(cfg.img_size)
        in_ch = cfg.img_channels + (cfg.num_classes if self.conditioning == "concat" else 0)
        ch = cfg.d_channels
        layers = [nn.Conv2d(in_ch, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for _ in range(ups - 1):
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch * 2), nn.LeakyReLU(0.2, True)]
            ch *= 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(ch, 1, base, 1, 0)  # the unconditional logit
        self.embed = nn.Embedding(cfg.num_classes, ch) if self.conditioning == "projection" else None
        dcgan_init(self)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.conditioning == "concat":
            planes = nn.functional.one_hot(y, self.num_classes).to(x.dtype)[:, :, None, None]
            x = torch.cat([x, planes.expand(-1, -1, x.shape[2], x.shape[3])], dim=1)
        h = self.features(x)
        logit = self.head(h).flatten(1).sum(1)
        if self.embed is not None:  # projection: <embed(y), sum-pooled features>
            logit = logit + (self.embed(y) * h.sum(dim=(2, 3))).sum(1)
        return logit


@register("cdcgan")
def build(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    return Generator(cfg), Discriminator(cfg)
