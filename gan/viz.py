"""Image grids as uint8 tensors, and atomic PNG writing.

``make_grid_uint8`` for any batch, ``class_grid`` for one row per class (real-data previews and the
trainer's conditional samples), ``save_png`` to write either.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch

from gan.io import write_file_atomic


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] (values outside are clipped) or uint8 -> uint8, same shape, on the CPU."""
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        return images
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round_().to(torch.uint8)


def _grid(images: torch.Tensor, rows: int, cols: int, padding: int, pad_value: int) -> torch.Tensor:
    n, c, h, w = images.shape
    grid = torch.full((c, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value,
                      dtype=torch.uint8)
    for k in range(min(n, rows * cols)):
        r, q = divmod(k, cols)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, top:top + h, left:left + w] = images[k]
    return grid


def make_grid_uint8(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: int = 0) -> torch.Tensor:
    """(N, C, H, W) images in [-1, 1] (or uint8) -> uint8 (C, H', W') grid with ``nrow`` images per row."""
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, C, H, W) batch, got shape {tuple(images.shape)}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    n = images.shape[0]
    return _grid(to_uint8(images), (n + nrow - 1) // nrow, min(nrow, n), padding, pad_value)


def class_grid(images: torch.Tensor, labels: torch.Tensor, num_classes: int, per_class: int,
               padding: int = 2, pad_value: int = 0) -> torch.Tensor:
    """One row per class (row k = class k), the first ``per_class`` images of that class in order;
    slots without an image stay ``pad_value``. Images in [-1, 1] or uint8 -> uint8 (C, H', W').
    With one class (an unconditional data set) there are no class rows: the ``per_class`` images
    fill a near-square grid instead."""
    if images.dim() != 4 or len(images) != len(labels):
        raise ValueError(f"expected (N, C, H, W) images and N labels, got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    if num_classes < 1 or per_class < 1:
        raise ValueError("num_classes and per_class must be >= 1")
    imgs = to_uint8(images)
    labels = labels.detach().cpu()
    _, c, h, w = imgs.shape
    slots = torch.full((num_classes * per_class, c, h, w), pad_value, dtype=torch.uint8)
    for k in range(num_classes):
        idx = torch.nonzero(labels == k).flatten()[:per_class]
        slots[k * per_class:k * per_class + len(idx)] = imgs[idx]
    if num_classes == 1:
        cols = math.ceil(math.sqrt(per_class))
        return _grid(slots, math.ceil(per_class / cols), cols, padding, pad_value)
    return _grid(slots, num_classes, per_class, padding, pad_value)


def save_png(img: torch.Tensor, path: str | Path) -> Path:
    """Write a uint8 (C, H, W) with C in (1, 3), or (H, W), tensor as PNG, atomically (temp + rename)."""
    from PIL import Image

    img = to_uint8(img)
    if img.dim() == 3 and img.shape[0] == 1:
        img = img[0]
    if img.dim() == 3 and img.shape[0] == 3:
        arr = img.permute(1, 2, 0).contiguous().numpy()
    elif img.dim() == 2:
        arr = img.contiguous().numpy()
    else:
        raise ValueError(f"expected (3, H, W), (1, H, W) or (H, W), got {tuple(img.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return write_file_atomic(path, buf.getvalue())


def _font(size: int = 11):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def with_labels(img: torch.Tensor, rows: list[tuple[float, str]] = (), cols: list[tuple[float, str]] = ()) -> torch.Tensor:
    """A uint8 (C, H, W) picture with a white margin: ``rows`` texts on the left, each centred at its
    y (pixels of ``img``), ``cols`` texts on top, each centred at its x. Returns uint8 (C, H', W')."""
    from PIL import Image, ImageDraw

    if not rows and not cols:
        return img
    font = _font()
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    size = lambda t: probe.textbbox((0, 0), t, font=font)[2:]  # noqa: E731
    left = max((size(t)[0] for _, t in rows), default=0) + (8 if rows else 0)
    top = max((size(t)[1] for _, t in cols), default=0) + (8 if cols else 0)
    c, h, w = img.shape
    mode = "L" if c == 1 else "RGB"
    arr = img[0].numpy() if c == 1 else img.permute(1, 2, 0).contiguous().numpy()
    canvas = Image.new(mode, (w + left, h + top), 255 if c == 1 else (255, 255, 255))
    canvas.paste(Image.fromarray(arr, mode), (left, top))
    draw = ImageDraw.Draw(canvas)
    ink = 0 if c == 1 else (0, 0, 0)
    for y, text in rows:
        tw, th = size(text)
        draw.text((left - 4 - tw, top + y - th / 2), text, fill=ink, font=font)
    for x, text in cols:
        tw, th = size(text)
        draw.text((left + x - tw / 2, (top - th) / 2), text, fill=ink, font=font)
    out = torch.from_numpy(np.asarray(canvas).copy())
    return out[None] if c == 1 else out.permute(2, 0, 1).contiguous()


def cell_centres(n: int, size: int, padding: int = 2) -> list[float]:
    """Centre coordinates of the ``n`` cells of a grid axis whose images are ``size`` pixels."""
    return [padding + k * (size + padding) + size / 2 for k in range(n)]
