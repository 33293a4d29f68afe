"""Uploaded images for the modes that take one (the VAE's reconstruct, pix2pix's translate): checked
before any model work, each refusal a 4xx naming the reason and the fix.

- :class:`UploadLimit` (ASGI middleware, on the image modes' paths only): a body that is not
  ``multipart/form-data`` is 415; one over ``max_bytes`` is 413 naming the limit (``Content-Length`` is
  checked first; a body without one is read only up to the limit). The accepted body is replayed to the app.
- :func:`read_image`: bytes that are not an image PIL reads: 415; a pixel format other than 8-bit grey or
  colour, or another channel count than the model's: 422 naming expected and got and how to convert;
  another size than the model's: 422 unless the request asks ``resize=true`` (then stretched to the
  model's size with a bicubic filter, the aspect ratio not kept, and said in ``X-Resized-From``); more
  than :data:`MAX_PIXELS` pixels: 413. Palette images count as colour, 1-bit ones as grey.
"""
from __future__ import annotations

import io
import json

import torch

MAX_PIXELS = 4096 * 4096  # an upload that decodes to more pixels is refused (413) before decoding
CONVERT = {1: ("L", "-colorspace Gray"), 3: ("RGB", "-colorspace sRGB -type TrueColor"),
           4: ("RGBA", "-type TrueColorAlpha")}
NAMES = {1: "grey", 2: "grey + alpha", 3: "RGB", 4: "RGBA"}


class UploadError(ValueError):
    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status, self.field = status, field


def _channels_hint(want: int) -> str:
    pil, magick = CONVERT.get(want, (None, None))
    if pil is None:
        return f"save it with {want} channels"
    return (f"convert it, e.g. with Pillow: Image.open('in.png').convert('{pil}').save('out.png'), or ImageMagick: "
            f"convert in.png {magick} out.png")


def read_image(data: bytes, channels: int, size: int, resize: bool = False) -> tuple[torch.Tensor, tuple | None]:
    """The upload as float (1, C, H, W) in [-1, 1] and its original (width, height) when it was resized;
    :class:`UploadError` otherwise (see the module docstring)."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))  # reads the header only: size and pixel format
    except (UnidentifiedImageError, OSError, ValueError):
        raise UploadError(415, "file", "file: the upload is not an image Pillow can read (PNG, JPEG, WebP, BMP, "
                                       "GIF, TIFF, ...); send the image file itself") from None
    mode = {"1": "L", "P": "RGBA" if "transparency" in im.info else "RGB", "PA": "RGBA"}.get(im.mode, im.mode)
    if mode not in ("L", "LA", "RGB", "RGBA"):
        raise UploadError(422, "file", f"file: pixel format {im.mode} is not 8-bit grey or colour; the model takes "
                                       f"{channels}-channel ({NAMES.get(channels, channels)}) 8-bit images: "
                                       f"{_channels_hint(channels)}")
    got = len(mode)  # L, LA, RGB, RGBA: one letter per channel
    if got != channels:
        raise UploadError(422, "file", f"file: the model takes {channels}-channel ({NAMES.get(channels, channels)}) "
                                       f"images; this one has {got} ({NAMES[got]}, {im.mode}): "
                                       f"{_channels_hint(channels)}")
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise UploadError(413, "file", f"file: {w}x{h} is {w * h} pixels, over the limit of {MAX_PIXELS} "
                                       f"(4096x4096); the model takes {size}x{size}: resize it first")
    resized = None
    if (w, h) != (size, size):
        if not resize:
            raise UploadError(422, "file", f"file: the model takes {size}x{size} images; this one is {w}x{h}. "
                                           f"Resize it first, or send resize=true to have the server stretch it "
                                           f"to {size}x{size} (bicubic, aspect ratio not kept)")
        resized = (w, h)
    try:
        im = im.convert(mode)
        if resized:
            im = im.resize((size, size), Image.Resampling.BICUBIC)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UploadError(415, "file", f"file: the image could not be decoded (damaged or truncated?): {e}") from None
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, channels)
    return (x.permute(2, 0, 1).float() / 127.5 - 1).unsqueeze(0), resized


class UploadLimit:
    """ASGI middleware: on POST to ``paths``, refuse a body that is not multipart/form-data (415) or is over
    ``max_bytes`` (413) before the app parses it; otherwise replay the body read to the app."""

    def __init__(self, app, paths: set[str], max_bytes: int):
        self.app, self.paths, self.max_bytes = app, paths, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        ctype = headers.get(b"content-type", b"").decode("latin-1")
        if not ctype.lower().startswith("multipart/form-data"):
            return await _answer(send, 415, "body", f"send the image as multipart/form-data in a field named file "
                                                    f"(curl -F file=@image.png ...); got Content-Type "
                                                    f"{ctype or 'none'}")
        too_large = (f"the upload is over the server's limit of {self.max_bytes} bytes (--max-upload-bytes); "
                     f"send a smaller image")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _answer(send, 413, "file", too_large)
        body, more = [], True
        size = 0
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            size += len(msg.get("body", b""))
            if size > self.max_bytes:
                return await _answer(send, 413, "file", too_large)
            body.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        replay = [{"type": "http.request", "body": b"".join(body), "more_body": False}]

        async def receive_again():
            return replay.pop() if replay else await receive()

        await self.app(scope, receive_again, send)


async def _answer(send, status: int, field: str, message: str) -> None:
    allowed = "an image (PNG, JPEG, ...) in a multipart/form-data field named file"
    body = json.dumps({"detail": [{"field": field, "message": message, "allowed": allowed}]}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
