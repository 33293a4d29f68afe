"""Conditional DCGAN (Radford et al. 2016, with class conditioning).

G: label embedding concatenated with z, transposed-conv blocks with BatchNorm + ReLU, Tanh out.
D: strided conv blocks with LeakyReLU(0.2), BatchNorm from the second block, one logit, and the
label either by projection (Miyato & Koyama 2018, recommended) or as one-hot planes concatenated
with the image. Sizes: a power of two >= 8 (4x4 base) or 28 (7x7 base, for MNIST-like data).
Options: model.upsample=nearest swaps each stride-2 transposed conv of G for nearest upsampling +
conv3x3 (no checkerboard artifacts; same shapes); model.attn_res adds a SAGAN self-attention
block after the G and D layers whose feature map has that size.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from gan.families.gan.config import ModelConfig
from gan.families.gan.models import register
from gan.families.gan.models.layers import SelfAttention, base_and_ups, check_attention

_base_and_ups = base_and_ups  # the old private name


def _up(cin: int, cout: int, mode: str, bias: bool) -> list[nn.Module]:
    """A 2x upsampling layer: transposed conv 4x4/2, or nearest upsample + conv3x3."""
    if mode == "nearest":
        return [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, 1, 1, bias=bias)]
    return [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=bias)]


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
        base, ups = base_and_ups(cfg.img_size)
        level = check_attention(cfg, "generator", [base * 2 ** i for i in range(ups)])
        ch = cfg.g_channels * 2 ** (ups - 1)
        self.embed = nn.Embedding(cfg.num_classes, cfg.z_dim)
        layers = [nn.ConvTranspose2d(2 * cfg.z_dim, ch, base, 1, 0, bias=False), nn.BatchNorm2d(ch), nn.ReLU(True)]
        size = base
        for _ in range(ups):
            if size == level:
                layers.append(SelfAttention(ch))
            if size * 2 == cfg.img_size:
                break
            layers += _up(ch, ch // 2, cfg.upsample, False) + [nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch, size = ch // 2, size * 2
        layers += _up(ch, cfg.img_channels, cfg.upsample, True) + [nn.Tanh()]
        self.net = nn.Sequential(*layers)
        dcgan_init(self)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([z, self.embed(y)], dim=1)
        return self.net(h[:, :, None, None])


class Discriminator(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_classes, self.conditioning = cfg.num_classes, cfg.d_conditioning
        base, ups = base_and_ups(cfg.img_size)
        level = check_attention(cfg, "discriminator", [cfg.img_size >> i for i in range(1, ups + 1)])
        in_ch = cfg.img_channels + (cfg.num_classes if self.conditioning == "concat" else 0)
        ch, size = cfg.d_channels, cfg.img_size // 2
        layers = [nn.Conv2d(in_ch, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for _ in range(ups - 1):
            if size == level:
                layers.append(SelfAttention(ch))
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch * 2), nn.LeakyReLU(0.2, True)]
            ch, size = ch * 2, size // 2
        if size == level:
            layers.append(SelfAttention(ch))
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
def build(cfg: ModelConfig, build_d: bool = True) -> tuple[nn.Module, nn.Module | None]:
    return Generator(cfg), Discriminator(cfg) if build_d else None
