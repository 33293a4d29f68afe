"""BigGAN-style pair (Brock et al. 2019), laid out as BigGAN-PyTorch / StudioGAN do for small images.

G: a shared class embedding (model.shared_dim, not spectrally normalised). With hierarchical z
(model.hier_z) z is split into one chunk for the input linear and one per up block; each block's
BatchNorms take gain = 1 + W_g c and bias = W_b c from c = [shared(y), its z chunk] (without
hier_z: the whole z goes to the linear and c = shared(y)). Residual up blocks, self-attention
after the block that reaches model.attn_res, then BN-ReLU-conv3x3-Tanh.
D: residual blocks (SNGAN's optimized first block), attention at the same resolution, ReLU,
global sum pooling, linear logit + projection.
Widths use BigGAN's channel multiplier ``ch`` (model.g_channels / d_channels; 96 in StudioGAN's
CIFAR-10 BigGAN): up to 32x32, G blocks are 4*ch wide and D blocks 2*ch; from 64x64 on, the
ImageNet layout (G 16*ch halving per block, D ch doubling up to 16*ch, down to 4x4).
Default init: orthogonal (G and D). Spectral norm on both is set by the config flags.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from gan.config import ConfigError
from gan.families.gan.config import ModelConfig
from gan.families.gan.models import register
from gan.families.gan.models.layers import (ConditionalBatchNorm2d, DBlock, GBlock, ResidualG, ResidualProjectionD, SelfAttention,
                               apply_init, base_and_ups, check_attention, d_down_schedule, map_sizes)


def g_widths(img_size: int, ch: int) -> list[tuple[int, int]]:
    """(in, out) channels of each G block."""
    _, ups = base_and_ups(img_size)
    if img_size <= 32:
        return [(4 * ch, 4 * ch)] * ups
    outs = [ch * min(2 ** (ups - 1 - i), 16) for i in range(ups)]
    return list(zip([16 * ch] + outs[:-1], outs))


def d_layout(img_size: int, in_ch: int, ch: int) -> list[tuple[int, int, bool]]:
    """(in, out, downsample) of each D block."""
    if img_size <= 32:
        downs = d_down_schedule(img_size)
        return [(in_ch if i == 0 else 2 * ch, 2 * ch, d) for i, d in enumerate(downs)]
    _, ups = base_and_ups(img_size)
    outs = [ch * min(2 ** i, 16) for i in range(ups)] + [16 * ch]
    return [(([in_ch] + outs)[i], outs[i], i < ups) for i in range(ups + 1)]


def z_chunks(z_dim: int, n: int) -> list[int]:
    """Split z_dim into n near-equal chunk sizes (the first ones one larger if it doesn't divide)."""
    return [z_dim // n + (1 if i < z_dim % n else 0) for i in range(n)]


class Generator(ResidualG):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.z_dim, self.num_classes, self.hier_z = cfg.z_dim, cfg.num_classes, cfg.hier_z
        self.base, ups = base_and_ups(cfg.img_size)
        widths = g_widths(cfg.img_size, cfg.g_channels)
        if self.hier_z:
            if cfg.z_dim < ups + 1:
                raise ConfigError(f"config key 'model.z_dim': hierarchical z splits z into {ups + 1} chunks "
                                  f"for img_size {cfg.img_size}; z_dim {cfg.z_dim} is too small "
                                  f"(use z_dim >= {ups + 1} or model.hier_z=false)")
            self.chunks = z_chunks(cfg.z_dim, ups + 1)
        else:
            self.chunks = [cfg.z_dim]
        sizes = [self.base * 2 ** i for i in range(ups + 1)]
        level = check_attention(cfg, "generator", sizes)
        self.attn_after = sizes.index(level) if level else -1  # 0 = after the linear, i = after block i

        self.shared = nn.Embedding(cfg.num_classes, cfg.shared_dim)
        self.shared.no_spectral_norm = True  # BigGAN leaves the shared embedding unnormalised
        self.linear = nn.Linear(self.chunks[0], widths[0][0] * self.base ** 2)
        self.blocks = nn.ModuleList()
        for i, (cin, cout) in enumerate(widths):
            cond_dim = cfg.shared_dim + (self.chunks[i + 1] if self.hier_z else 0)
            self.blocks.append(GBlock(cin, cout, lambda c, d=cond_dim: ConditionalBatchNorm2d(c, d)))
        attn_ch = widths[0][0] if self.attn_after == 0 else widths[self.attn_after - 1][1]
        self.attn = SelfAttention(attn_ch) if level else None
        self.bn = nn.BatchNorm2d(widths[-1][1])
        self.out = nn.Conv2d(widths[-1][1], cfg.img_channels, 3, 1, 1)
        apply_init(self, "ortho")

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shared = self.shared(y)
        if self.hier_z:
            zs = torch.split(z, self.chunks, dim=1)
            conds = [torch.cat([shared, c], dim=1) for c in zs[1:]]
        else:
            zs, conds = (z,), [shared] * len(self.blocks)
        h = self.linear(zs[0]).view(z.shape[0], -1, self.base, self.base)
        return self.synthesize(h, conds)


class Discriminator(ResidualProjectionD):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        layout = d_layout(cfg.img_size, cfg.img_channels, cfg.d_channels)
        sizes = map_sizes(cfg.img_size, [d for _, _, d in layout])
        level = check_attention(cfg, "discriminator", sizes)
        self.attn_after = sizes.index(level) if level else -1
        self.blocks = nn.ModuleList(DBlock(cin, cout, down=d, optimized=i == 0)
                                    for i, (cin, cout, d) in enumerate(layout))
        self.attn = SelfAttention(layout[self.attn_after][1]) if level else None
        ch = layout[-1][1]
        self.linear = nn.Linear(ch, 1)
        self.embed = nn.Embedding(cfg.num_classes, ch)
        apply_init(self, "ortho")


@register("biggan")
def build(cfg: ModelConfig, build_d: bool = True) -> tuple[nn.Module, nn.Module | None]:
    return Generator(cfg), Discriminator(cfg) if build_d else None
