"""SNGAN-style ResNet pair (Miyato et al. 2018; projection D of Miyato & Koyama 2018).

G: linear z -> g_channels x 4x4 (7x7 for 28), one residual up block per doubling with
class-conditional BatchNorm (per-class gain/bias), then BN-ReLU-conv3x3-Tanh.
D: SNGAN's optimized first block, residual blocks (downsampling to 8x8, then plain ones: four
blocks at 32x32), ReLU, global sum pooling, a linear logit plus the projection <embed(y), h>.
Widths are constant and given directly: the CIFAR-10 recipe is g_channels=256, d_channels=128.
Spectral norm is switched on by model.d_spectral_norm (and g_spectral_norm), applied by
``build_models``. Default init: Glorot uniform, gain sqrt(2) inside residual branches, as SNGAN.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from gan.families.gan.config import ModelConfig
from gan.families.gan.models import register
from gan.families.gan.models.layers import (ClassConditionalBatchNorm2d, DBlock, GBlock, ResidualG, ResidualProjectionD,
                               SelfAttention, apply_init, base_and_ups, check_attention, d_down_schedule, map_sizes)


def sngan_init(module: nn.Module) -> None:
    apply_init(module, "xavier")
    for m in module.modules():
        if isinstance(m, (GBlock, DBlock)):
            for conv in (m.c1, m.c2):
                nn.init.xavier_uniform_(conv.weight, math.sqrt(2))


class Generator(ResidualG):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.z_dim, self.num_classes = cfg.z_dim, cfg.num_classes
        self.base, ups = base_and_ups(cfg.img_size)
        ch = self.ch = cfg.g_channels
        sizes = [self.base * 2 ** i for i in range(ups + 1)]  # feature maps: after linear, after each block
        level = check_attention(cfg, "generator", sizes)
        self.linear = nn.Linear(cfg.z_dim, ch * self.base ** 2)
        self.attn_after = sizes.index(level) if level else -1  # 0 = after the linear, i = after block i
        self.attn = SelfAttention(ch) if level else None
        self.blocks = nn.ModuleList(
            GBlock(ch, ch, lambda c: ClassConditionalBatchNorm2d(c, cfg.num_classes)) for _ in range(ups))
        self.bn = nn.BatchNorm2d(ch)
        self.out = nn.Conv2d(ch, cfg.img_channels, 3, 1, 1)
        sngan_init(self)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.linear(z).view(z.shape[0], self.ch, self.base, self.base)
        return self.synthesize(h, [y] * len(self.blocks))


class Discriminator(ResidualProjectionD):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ch = cfg.d_channels
        downs = d_down_schedule(cfg.img_size)
        sizes = map_sizes(cfg.img_size, downs)
        level = check_attention(cfg, "discriminator", sizes)
        self.attn_after = sizes.index(level) if level else -1  # after block i (first map of that size)
        self.blocks = nn.ModuleList(
            DBlock(cfg.img_channels if i == 0 else ch, ch, down=d, optimized=i == 0) for i, d in enumerate(downs))
        self.attn = SelfAttention(ch) if level else None
        self.linear = nn.Linear(ch, 1)
        self.embed = nn.Embedding(cfg.num_classes, ch)
        sngan_init(self)


@register("sngan")
def build(cfg: ModelConfig, build_d: bool = True) -> tuple[nn.Module, nn.Module | None]:
    return Generator(cfg), Discriminator(cfg) if build_d else None
