"""Building blocks shared by the architectures: spectral norm and init switches, conditional
BatchNorm, SAGAN self-attention, residual up/down blocks, and where attention goes.

Two class attributes steer the switches (set them on a module and they cover its whole subtree):
``keep_init = True``: :func:`apply_init` leaves it alone (SNGAN's per-class gains start at 1;
a pretrained backbone keeps its weights). ``no_spectral_norm = True``: :func:`apply_spectral_norm`
leaves it alone (gains and the BigGAN shared embedding, which BigGAN also leaves unnormalised).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from gan.config import ConfigError
from gan.families.gan.config import ModelConfig

SN_EPS = 1e-6  # BigGAN's SN epsilon; torch's 1e-12 default is below bf16/fp16 resolution
_WEIGHTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)
INIT_SCHEMES = ("dcgan", "ortho", "xavier", "normal")


def base_and_ups(img_size: int) -> tuple[int, int]:
    """Spatial size of G's first feature map (4, or 7 for 28x28 images) and the number of 2x ups."""
    base = 7 if img_size == 28 else 4
    return base, int(round(math.log2(img_size // base)))


def _covered(module: nn.Module, flag: str) -> set[int]:
    """ids of every module inside a module whose class or instance sets ``flag``."""
    out: set[int] = set()
    for m in module.modules():
        if getattr(m, flag, False):
            out.update(id(s) for s in m.modules())
    return out


def _weight(m: nn.Module) -> torch.Tensor:
    """The trainable weight tensor (the original under a parametrization)."""
    if parametrize.is_parametrized(m, "weight"):
        return m.parametrizations.weight.original
    return m.weight


# ------------------------------------------------------------------ switches


def apply_spectral_norm(module: nn.Module, eps: float = SN_EPS) -> nn.Module:
    """Wrap every Conv2d/ConvTranspose2d/Linear/Embedding in ``module`` with spectral norm
    (one power iteration per train-mode forward), except those already wrapped and those under a
    ``no_spectral_norm`` module. Call it after any init: it normalises the weights it finds."""
    skip = _covered(module, "no_spectral_norm")
    for m in list(module.modules()):
        if id(m) in skip or not isinstance(m, _WEIGHTED):
            continue
        if parametrize.is_parametrized(m, "weight") or hasattr(m, "weight_orig"):  # new or legacy SN
            continue
        spectral_norm(m, eps=eps)
    return module


@torch.no_grad()
def apply_init(module: nn.Module, scheme: str) -> nn.Module:
    """Re-initialise conv/linear/embedding weights (biases to 0), skipping ``keep_init`` subtrees.

    dcgan: N(0, 0.02) and affine BatchNorm gains ~ N(1, 0.02) (Radford et al.);
    normal: N(0, 0.02) (BigGAN-PyTorch's N02); ortho: orthogonal rows of the weight reshaped to
    (out, -1) (BigGAN); xavier: Glorot uniform (SNGAN)."""
    if scheme not in INIT_SCHEMES:
        raise ConfigError(f"config key 'model.init': '{scheme}' is not one of: default, {', '.join(INIT_SCHEMES)}")
    skip = _covered(module, "keep_init")
    for m in module.modules():
        if id(m) in skip:
            continue
        if isinstance(m, _WEIGHTED):
            w = _weight(m)
            if scheme == "ortho":
                nn.init.orthogonal_(w)
            elif scheme == "xavier":
                nn.init.xavier_uniform_(w)
            else:
                nn.init.normal_(w, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif scheme == "dcgan" and isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return module


# ------------------------------------------------------------------ conditional BatchNorm


class ClassConditionalBatchNorm2d(nn.Module):
    """SNGAN-style: BatchNorm without affine, then a per-class gain and bias looked up from two
    embeddings (gain starts at 1, bias at 0; neither is re-initialised nor spectrally normalised)."""
    keep_init = True
    no_spectral_norm = True

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, affine=False)
        self.gain = nn.Embedding(num_classes, num_features)
        self.bias = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * self.gain(y)[:, :, None, None] + self.bias(y)[:, :, None, None]


class ConditionalBatchNorm2d(nn.Module):
    """BigGAN-style: BatchNorm without affine; gain = 1 + W_g c and bias = W_b c from a
    conditioning vector c (shared class embedding, with a z chunk under hierarchical z)."""

    def __init__(self, num_features: int, cond_dim: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, affine=False)
        self.gain = nn.Linear(cond_dim, num_features, bias=False)
        self.bias = nn.Linear(cond_dim, num_features, bias=False)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * (1 + self.gain(c))[:, :, None, None] + self.bias(c)[:, :, None, None]


# ------------------------------------------------------------------ attention


class SelfAttention(nn.Module):
    """SAGAN self-attention (Zhang et al. 2019) as BigGAN uses it: 1x1 query/key (C/8) and
    value (C/2) projections, keys and values max-pooled 2x2, out = x + gamma * o(attention),
    gamma starting at 0. Plain matmul + softmax (fused attention kernels lack the double backward
    that R1 and gradient penalties need)."""

    def __init__(self, ch: int):
        super().__init__()
        self.ch_qk, self.ch_v = max(1, ch // 8), max(1, ch // 2)
        self.theta = nn.Conv2d(ch, self.ch_qk, 1, bias=False)
        self.phi = nn.Conv2d(ch, self.ch_qk, 1, bias=False)
        self.g = nn.Conv2d(ch, self.ch_v, 1, bias=False)
        self.o = nn.Conv2d(self.ch_v, ch, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q = self.theta(x).flatten(2)  # B, k, HW
        k = F.max_pool2d(self.phi(x), 2).flatten(2)  # B, k, HW/4
        v = F.max_pool2d(self.g(x), 2).flatten(2)  # B, v, HW/4
        attn = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # B, HW, HW/4
        out = (v @ attn.transpose(1, 2)).view(b, self.ch_v, h, w)
        return x + self.gamma * self.o(out)


def attention_level(cfg: ModelConfig) -> int:
    """The spatial size where ``cfg.attn_res`` puts attention (0 = none). For 28x28 images the
    pyramid is 7/14/28 in place of 8/16/32, so attn_res 8 and 16 mean 7 and 14 there."""
    if cfg.attn_res == 0:
        return 0
    if cfg.img_size == 28:
        return cfg.attn_res * 7 // 8 if cfg.attn_res * 7 % 8 == 0 else -1
    return cfg.attn_res


def check_attention(cfg: ModelConfig, net: str, sizes: list[int]) -> int:
    """The attention level if ``net`` has a feature map there (``sizes``), else a ConfigError."""
    level = attention_level(cfg)
    if level == 0 or level in sizes:
        return level
    as_res = sorted({s * 8 // 7 if cfg.img_size == 28 else s for s in sizes})
    raise ConfigError(f"config key 'model.attn_res': the {cfg.name} {net} has no feature map at "
                      f"{cfg.attn_res}x{cfg.attn_res} for img_size {cfg.img_size}; valid: "
                      f"0 (off) or {', '.join(map(str, as_res))}")


# ------------------------------------------------------------------ residual blocks


def up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


class GBlock(nn.Module):
    """Pre-activation residual up block (SNGAN/BigGAN G): cBN-ReLU-up-conv3x3-cBN-ReLU-conv3x3,
    shortcut up + conv1x1 (computed as conv1x1 then up: the two commute, 4x fewer FLOPs).
    ``bn(num_features)`` makes the conditional BatchNorm, called as ``bn(x, cond)``."""

    def __init__(self, in_ch: int, out_ch: int, bn):
        super().__init__()
        self.bn1, self.bn2 = bn(in_ch), bn(out_ch)
        self.c1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1)
        self.c2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        self.c_sc = nn.Conv2d(in_ch, out_ch, 1, 1, 0)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.c1(up2(F.relu(self.bn1(x, cond))))
        h = self.c2(F.relu(self.bn2(h, cond)))
        return h + up2(self.c_sc(x))


class DBlock(nn.Module):
    """Residual D block: [ReLU]-conv3x3-ReLU-conv3x3-[avgpool2]; shortcut identity, or a 1x1 conv
    (after the pool, which commutes with it) when channels change or the block downsamples.
    ``optimized=True`` is SNGAN's first block: no leading ReLU (it would act on the image)."""

    def __init__(self, in_ch: int, out_ch: int, down: bool = True, optimized: bool = False):
        super().__init__()
        self.down, self.optimized = down, optimized
        self.c1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1)
        self.c2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        self.c_sc = nn.Conv2d(in_ch, out_ch, 1, 1, 0) if (in_ch != out_ch or down or optimized) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.optimized else F.relu(x)
        h = self.c2(F.relu(self.c1(h)))
        sc = x
        if self.down:
            h, sc = F.avg_pool2d(h, 2), F.avg_pool2d(sc, 2)
        if self.c_sc is not None:
            sc = self.c_sc(sc)
        return h + sc


class ResidualG(nn.Module):
    """The synthesis shared by the residual generators (SNGAN, BigGAN): the up ``blocks``, each
    with its own condition, self-attention after block ``attn_after`` (0 = right after the input
    linear), then BN-ReLU-conv3x3-Tanh. Subclasses build the modules and map (z, y) to the first
    feature map and the per-block conditions."""

    blocks: nn.ModuleList
    attn: nn.Module | None
    attn_after: int
    bn: nn.BatchNorm2d
    out: nn.Conv2d

    def synthesize(self, h: torch.Tensor, conds: list[torch.Tensor]) -> torch.Tensor:
        for i in range(len(self.blocks) + 1):
            if i > 0:
                h = self.blocks[i - 1](h, conds[i - 1])
            if i == self.attn_after:
                h = self.attn(h)
        return torch.tanh(self.out(F.relu(self.bn(h))))


def d_down_schedule(img_size: int) -> list[bool]:
    """SNGAN-style D: which blocks halve the map. Halve until it is 8x8 (7x7 for 28, at least
    once), then plain blocks so there are at least 4: 32 -> [T, T, F, F], 64 -> [T, T, T, F]."""
    size, n_down = img_size, 0
    while n_down == 0 or (size > 8 and size % 2 == 0):
        size, n_down = size // 2, n_down + 1
    return [True] * n_down + [False] * max(4 - n_down, 1)


def map_sizes(img_size: int, downs: list[bool]) -> list[int]:
    """The feature-map size after each D block of a down schedule."""
    sizes = []
    for d in downs:
        img_size //= 2 if d else 1
        sizes.append(img_size)
    return sizes


class ResidualProjectionD(nn.Module):
    """The forward shared by the residual discriminators (SNGAN, BigGAN): ``blocks`` (with optional
    self-attention after block ``attn_after``), ReLU, global sum pooling, then a linear logit plus the
    projection <embed(y), h> (Miyato & Koyama 2018). Subclasses build the modules."""

    blocks: nn.ModuleList
    attn: nn.Module | None
    attn_after: int
    linear: nn.Linear
    embed: nn.Embedding

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = x
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i == self.attn_after:
                h = self.attn(h)
        h = F.relu(h).sum(dim=(2, 3))
        return self.linear(h).squeeze(1) + (self.embed(y) * h).sum(1)
