"""Train-time augmentation on whole batches (vectorized torch, no per-sample PIL).

All randomness comes from the ``torch.Generator`` passed in, which the loader seeds from
(seed, rank, epoch, batch index): a resumed run reproduces the same augmented batches without
saving any RNG state. The batch may live on any device (``data.on_device`` keeps it on the GPU);
the few random numbers per batch are always drawn from that CPU generator and moved to the batch's
device, so the same generator gives the same augmented batch on every device.
"""
from __future__ import annotations

import torch


_GRAY = (0.299, 0.587, 0.114)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 1, H, W) luminance."""
    w = torch.tensor(_GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _uniform(n: int, strength: float, g: torch.Generator, device) -> torch.Tensor:
    return (1.0 + strength * (2.0 * torch.rand(n, generator=g) - 1.0)).view(n, 1, 1, 1).to(device)


def color_jitter(x: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and (RGB only) saturation, each a per-image factor in [1-s, 1+s].
    ``x`` is float in [0, 1]; the result is clamped to [0, 1] after each step."""
    n = x.shape[0]
    fb, fc, fs = (_uniform(n, strength, g, x.device) for _ in range(3))
    x = (x * fb).clamp_(0, 1)
    lum = _gray(x) if x.shape[1] == 3 else x
    mean = lum.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * fc + mean).clamp_(0, 1)
    if x.shape[1] == 3:
        lum = _gray(x)
        x = ((x - lum) * fs + lum).clamp_(0, 1)
    return x


def _reflect(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Map indices in [-(n-1), 2(n-1)] into [0, n) by reflection at the borders (edge not repeated)."""
    idx = idx.abs()
    return torch.where(idx > n - 1, 2 * (n - 1) - idx, idx)


def translate(x: torch.Tensor, fraction: float, g: torch.Generator) -> torch.Tensor:
    """Shift each image by an integer number of pixels in [-m, m] per axis (m = round(fraction*size)),
    filling the border by reflection. Works on any dtype (pure indexing), (B, C, H, W)."""
    b, c, h, w = x.shape
    my, mx = min(int(round(fraction * h)), h - 1), min(int(round(fraction * w)), w - 1)
    if my == 0 and mx == 0:
        return x
    dy = torch.randint(-my, my + 1, (b,), generator=g)
    dx = torch.randint(-mx, mx + 1, (b,), generator=g)
    rows = _reflect(torch.arange(h).view(1, h) - dy.view(b, 1), h).to(x.device)  # out[i] = in[i - dy]
    cols = _reflect(torch.arange(w).view(1, w) - dx.view(b, 1), w).to(x.device)
    x = x.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w))
    return x.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))


def augment_batch(x: torch.Tensor, g: torch.Generator, hflip: bool = True, color_jitter_strength: float = 0.0,
                  translate_fraction: float = 0.0) -> torch.Tensor:
    """uint8 (B, C, H, W) -> augmented uint8 (B, C, H, W). Flip and translation only move pixels;
    color jitter works in float and is rounded back to 8 bits (the data are 8-bit to begin with), so
    batches cross process boundaries as uint8 and become float in [-1, 1] in the consumer.

    Draw order (fixed): flip mask, translation offsets, jitter factors.
    """
    if hflip:
        flip = (torch.rand(x.shape[0], generator=g) < 0.5).to(x.device)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    if translate_fraction > 0:
        x = translate(x, translate_fraction, g)
    if color_jitter_strength > 0:
        xf = color_jitter(x.to(torch.float32).div_(255.0), color_jitter_strength, g)
        x = xf.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return x


def augment_together(images: tuple[torch.Tensor, ...], g: torch.Generator, **options) -> tuple[torch.Tensor, ...]:
    """:func:`augment_batch` with ``options`` on each tensor of ``images`` (one batch, or a pair's input and
    target batches: the same B, H and W; channels may differ), each from the same generator state: the
    draws depend on B, H and W only, so every tensor gets the same flips, shifts and jitter factors. ``g`` ends
    where one :func:`augment_batch` call leaves it."""
    start = g.get_state()
    out = []
    for x in images:
        g.set_state(start)
        out.append(augment_batch(x, g, **options))
    return tuple(out)
