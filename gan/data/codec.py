"""How one sample is stored in a shard, and batch decoding.

A sample is two tar members sharing a key (the sample's index in the source, 8 digits, no dot):
``KEY.cls`` (the label as ASCII digits) and either ``KEY.raw`` (C*H*W uint8 bytes, channel-major,
i.e. exactly ``tensor.numpy().tobytes()`` of a (C, H, W) uint8 tensor) or ``KEY.png`` (8-bit grayscale
or RGB PNG). A paired sample (manifest format 2) holds two images instead of one: ``KEY.input.raw`` and
``KEY.target.raw`` (or ``.input.png``/``.target.png``), each as above, with the label in ``KEY.cls``
(:func:`image_members`). Raw is decoded for a whole batch with one ``join`` + ``frombuffer``; PNG needs one decode
call per image (see docs/benchmarks.md for the trade-off).
"""
from __future__ import annotations

import io

import numpy as np
import torch

KEY_DIGITS = 8


class SampleDecodeError(ValueError):
    """One sample of a batch could not be decoded; ``index`` is its position in the batch."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"sample {index}: {reason}")
        self.index, self.reason = index, reason


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def image_members(encoding: str, paired: bool) -> tuple[str, ...]:
    """The member extensions of a sample's images: ``(encoding,)``, or ``(input.E, target.E)`` for a pair."""
    return (f"input.{encoding}", f"target.{encoding}") if paired else (encoding,)


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (any sign); the same parts give the same seed everywhere."""
    words = [int(p) % (1 << 64) for p in parts]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 ^ int(state[1])) & ((1 << 63) - 1)


def encode_image(img_chw: np.ndarray, encoding: str) -> bytes:
    """uint8 (C, H, W) array -> bytes for the shard."""
    if encoding == "raw":
        return np.ascontiguousarray(img_chw, dtype=np.uint8).tobytes()
    from PIL import Image

    c = img_chw.shape[0]
    arr = np.ascontiguousarray(img_chw[0] if c == 1 else img_chw.transpose(1, 2, 0), dtype=np.uint8)
    buf = io.BytesIO()
    # Fixed settings, no metadata chunks: the same pixels give the same bytes (same Pillow/zlib).
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_images(blobs: list[bytes], encoding: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """Bytes of B samples -> uint8 tensor (B, C, H, W). Raises SampleDecodeError naming the bad index."""
    c, h, w = shape
    n = c * h * w
    if encoding == "raw":
        for i, b in enumerate(blobs):
            if len(b) != n:
                raise SampleDecodeError(i, f"raw image has {len(b)} bytes, expected {n} for shape {c}x{h}x{w}")
        buf = bytearray().join(blobs)
        return torch.frombuffer(buf, dtype=torch.uint8).view(len(blobs), c, h, w) if blobs else \
            torch.empty(0, c, h, w, dtype=torch.uint8)
    from torchvision.io import ImageReadMode, decode_png

    mode = ImageReadMode.GRAY if c == 1 else ImageReadMode.RGB
    out = torch.empty(len(blobs), c, h, w, dtype=torch.uint8)
    for i, b in enumerate(blobs):
        try:
            img = decode_png(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=mode)
        except Exception as e:  # torchvision raises RuntimeError on bad data
            raise SampleDecodeError(i, f"cannot decode PNG ({str(e).splitlines()[0] if str(e) else e!r})") from None
        if tuple(img.shape) != (c, h, w):
            raise SampleDecodeError(i, f"PNG is {tuple(img.shape)}, expected {(c, h, w)}")
        out[i] = img
    return out


def decode_label(b: bytes, num_classes: int) -> int:
    try:
        y = int(b.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"label {b[:20]!r} is not an integer") from None
    if not 0 <= y < num_classes:
        raise ValueError(f"label {y} is outside [0, {num_classes})")
    return y


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return x.to(torch.float32).mul_(2.0 / 255.0).sub_(1.0)

