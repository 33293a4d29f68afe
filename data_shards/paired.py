"""(input, target) pairs for image-to-image translation (pix2pix): ``build --source paired``.

Three ways to get the pairs; each names an A and a B image per sample, and ``--direction AtoB``
(default) makes A the input and B the target (``BtoA`` swaps them):

- **aligned** (``--root DIR``): pix2pix's A|B files, A on the left half and B on the right, so every
  file is twice as wide as it is high (e.g. facades' 512x256); split at width/2.
- **two folders** (``--root A --root-b B``): files matched by their path without the extension
  (``A/cat/001.png`` pairs with ``B/cat/001.jpg``); both images of a pair must have the same size.
- **derived** (``--root DIR --derive sketch|edges|gray``): A is drawn from each image of any image
  folder, B is the image itself: a real paired task (sketch to photo, edges to photo, colourisation)
  with nothing downloaded. Deterministic (Pillow and numpy), computed after the resize.

Layouts are :mod:`data_shards.imagefolder`'s (``ROOT/<class>/<image>`` gives labels, a flat folder one
class), and so are ``--resolution/--transform/--height/--small/--mode/--max-images/--resize-filter``:
the same crop and resize go to both images of a pair. Every problem the headers show (a file that is
not A|B, halves or pairs of different sizes, unmatched names) is refused before anything is written.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data_shards.imagefolder import (check_options, folder_layout, imagefolder, images_source, pick_subset,
                                     read_headers)
from data_shards.sources import InputError, Source

DIRECTIONS = ("AtoB", "BtoA")
DERIVATIONS = ("sketch", "edges", "gray")
EDGE_SHARE = 0.12  # edges: the strongest 12% of gradient magnitudes are lines...
EDGE_FLOOR = 32.0  # ...but never a gradient weaker than this (Sobel units): flat images stay blank
SHOWN = 3  # files named per problem


def _luma(img: np.ndarray):
    """uint8 (C, H, W) -> PIL "L" image (ITU-R 601 luma for RGB, as Pillow's convert("L"))."""
    from PIL import Image

    return Image.fromarray(img[0]) if img.shape[0] == 1 else Image.fromarray(img.transpose(1, 2, 0), "RGB").convert("L")


def _blur(im, radius: float) -> np.ndarray:
    from PIL import ImageFilter

    return np.asarray(im.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float64)


def gray(img: np.ndarray) -> np.ndarray:
    """The luma of an image: (1, H, W) uint8 (a colourisation task's input)."""
    return np.asarray(_luma(img))[None]


def edges(img: np.ndarray) -> np.ndarray:
    """Black lines on white where the (lightly blurred) luma changes most: Sobel magnitude, the strongest
    ``EDGE_SHARE`` of pixels, at least ``EDGE_FLOOR``. (1, H, W) uint8, like pix2pix's edges2* inputs."""
    g = np.pad(_blur(_luma(img), max(0.5, min(img.shape[1:]) / 128)), 1, mode="edge")
    gx = (g[:-2, 2:] + 2 * g[1:-1, 2:] + g[2:, 2:]) - (g[:-2, :-2] + 2 * g[1:-1, :-2] + g[2:, :-2])
    gy = (g[2:, :-2] + 2 * g[2:, 1:-1] + g[2:, 2:]) - (g[:-2, :-2] + 2 * g[:-2, 1:-1] + g[:-2, 2:])
    mag = np.hypot(gx, gy)
    line = mag > max(EDGE_FLOOR, float(np.quantile(mag, 1 - EDGE_SHARE)))
    return np.where(line, 0, 255).astype(np.uint8)[None]


def sketch(img: np.ndarray) -> np.ndarray:
    """A pencil sketch: the luma colour-dodged with its blurred negative (dark where it changes, white where
    it is flat). (1, H, W) uint8; the blur radius follows the size (1 px at 32x32, 8 px at 256x256)."""
    from PIL import ImageOps

    im = _luma(img)
    g = np.asarray(im, dtype=np.float64)
    blurred = _blur(ImageOps.invert(im), max(1.0, min(img.shape[1:]) / 32))
    return np.clip(np.round(g * 255.0 / np.maximum(1.0, 255.0 - blurred)), 0, 255).astype(np.uint8)[None]


DERIVE = {"sketch": sketch, "edges": edges, "gray": gray}


def _dataset_name(root: Path) -> str:
    return root.name if root.name not in ("train", "test", "val", "valid") else root.resolve().parent.name


def _shown(items: list[str]) -> str:
    return ", ".join(items[:SHOWN]) + (f", ... ({len(items) - SHOWN} more)" if len(items) > SHOWN else "")


def _pairs(a: Source, b: Source, direction: str, meta: dict) -> Source:
    """One Source of (input, target) from the A and B sources (same samples, same order)."""
    # The header checks make this unreachable; it stays so that no change could write mismatched pairs.
    if a.shape[1:] != b.shape[1:] or not np.array_equal(a.labels, b.labels):
        raise InputError(f"A images are {a.shape[2]}x{a.shape[1]} but B images {b.shape[2]}x{b.shape[1]}, or "
                         f"--small skip left out different files: the two images of a pair must have the same size")
    inp, tgt = (a, b) if direction == "AtoB" else (b, a)
    return Source(a.name, a.classes, tgt.shape, a.labels, load=lambda i: (inp.load(i), tgt.load(i)),
                  describe=lambda i: f"the pair {a.describe(i)} | {b.describe(i)}", input_shape=inp.shape,
                  meta={**meta, **{k: v for k, v in tgt.meta.items() if k not in meta}, "input_mode": inp.meta["mode"]})


def aligned(root: Path, direction: str, max_images: int, log, **options) -> Source:
    classes, files, labels, flat = folder_layout(root)
    keep = pick_subset(len(files), max_images)
    files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    headers = read_headers(files, log)
    wrong = [f"{p} is {w}x{h}" for p, ((w, h), _) in zip(files, headers) if w != 2 * h]
    if wrong:
        raise InputError(f"{len(wrong)} of {len(files)} file(s) in {root} are not aligned A|B pairs, which are twice "
                         f"as wide as they are high (A the left half, B the right, e.g. 512x256): {_shown(wrong)}. "
                         f"Fix or remove them; for A and B images in two folders use --root A --root-b B, and to "
                         f"make pairs from single images use --derive sketch|edges|gray")
    halves = [((w // 2, h), mode) for (w, h), mode in headers]
    meta = {"source": "paired", "pairs": "aligned A|B", "direction": direction, "root": str(root.resolve()),
            "layout": "flat" if flat else "class folders"}
    a, b = (images_source(_dataset_name(root), classes, files, labels, halves, meta, half=half, log=log, **options)
            for half in ("left", "right"))
    return _pairs(a, b, direction, meta)


def _by_name(root: Path, files: list[Path]) -> dict[str, Path]:
    """Each file under its path relative to ``root`` without the extension; two files with one name are refused."""
    out: dict[str, Path] = {}
    for p in files:
        key = p.relative_to(root).with_suffix("").as_posix()
        if key in out:
            raise InputError(f"{out[key]} and {p} have the same name but for the extension, so neither can be "
                             f"matched to its pair by name: rename or remove one")
        out[key] = p
    return out


def two_folders(root: Path, root_b: Path, direction: str, max_images: int, log, **options) -> Source:
    classes, files_a, labels, flat = folder_layout(root)
    _, files_b, _, _ = folder_layout(root_b)
    names_a, names_b = _by_name(root, files_a), _by_name(root_b, files_b)
    only_a, only_b = sorted(names_a.keys() - names_b.keys()), sorted(names_b.keys() - names_a.keys())
    if only_a or only_b:
        raise InputError(
            f"{root} (A) and {root_b} (B) do not match by file name: "
            + "; ".join(f"{len(only)} only in {where} ({_shown([str(names[k]) for k in only])})"
                        for only, where, names in ((only_a, root, names_a), (only_b, root_b, names_b)) if only)
            + ". Pairs are matched by their path without the extension (A/cat/001.png with B/cat/001.jpg): "
              "rename or remove the unmatched files")
    keep = pick_subset(len(files_a), max_images)
    files_a, labels = [files_a[i] for i in keep], [labels[i] for i in keep]
    files_b = [names_b[p.relative_to(root).with_suffix("").as_posix()] for p in files_a]
    headers_a, headers_b = read_headers(files_a, log), read_headers(files_b, log)
    differ = [f"{pa} is {sa[0]}x{sa[1]} but {pb} is {sb[0]}x{sb[1]}"
              for pa, pb, (sa, _), (sb, _) in zip(files_a, files_b, headers_a, headers_b) if sa != sb]
    if differ:
        raise InputError(f"{len(differ)} of {len(files_a)} pair(s) differ in size: {_shown(differ)}. The two images "
                         f"of a pair must show the same scene at the same size: resize one of each such pair to "
                         f"the size of the other (or remove the pair)")
    meta = {"source": "paired", "pairs": "two folders", "direction": direction, "root": str(root.resolve()),
            "root_b": str(root_b.resolve()), "layout": "flat" if flat else "class folders"}
    a, b = (images_source(_dataset_name(root), classes, files, labels, headers, meta, log=log, **options)
            for files, headers in ((files_a, headers_a), (files_b, headers_b)))
    return _pairs(a, b, direction, meta)


def derived(root: Path, derive: str, direction: str, max_images: int, log, **options) -> Source:
    src = imagefolder(root, max_images=max_images, log=log, **options)
    if derive == "gray" and src.shape[0] == 1:
        raise InputError(f"--derive gray on {root}, whose images are grayscale, would pair each image with itself: "
                         f"use --derive sketch|edges, or a colour folder (--mode rgb keeps gray images gray)")
    draw, (_, h, w) = DERIVE[derive], src.shape
    drawn = (1, h, w)

    def load(i: int):
        b = src.load(i)
        return (draw(b), b) if direction == "AtoB" else (b, draw(b))

    a, b = (drawn, "L"), (src.shape, src.meta["mode"])  # (shape, mode) of the A and B images
    (input_shape, input_mode), (shape, mode) = (a, b) if direction == "AtoB" else (b, a)
    meta = {"source": "paired", "pairs": f"derived: {derive}", "derive": derive, "direction": direction,
            **{k: v for k, v in src.meta.items() if k != "source"}, "mode": mode, "input_mode": input_mode}
    return Source(src.name, src.classes, shape, src.labels, load=load, describe=src.describe, meta=meta,
                  input_shape=input_shape)


def paired(root: str | Path, root_b: str | Path = "", derive: str = "", direction: str = "AtoB",
           max_images: int = 0, log=None, **options) -> Source:
    """The pairs of ``root`` (see the module docstring); ``options`` are imagefolder's resolution, transform,
    height, small, mode and resize_filter. Load gives (input, target) uint8 arrays."""
    check_options(max_images=max_images, **options)
    if direction not in DIRECTIONS:
        raise InputError(f"--direction {direction!r} is not one of {', '.join(DIRECTIONS)}")
    if derive and derive not in DERIVATIONS:
        raise InputError(f"--derive {derive!r} is not one of {', '.join(DERIVATIONS)}")
    if derive and root_b:
        raise InputError("--derive draws the A images from the --root images themselves: drop --root-b (or drop "
                         "--derive to pair the images of --root with those of --root-b by name)")
    root = Path(root)
    if derive:
        return derived(root, derive, direction, max_images, log, **options)
    if root_b:
        return two_folders(root, Path(root_b), direction, max_images, log, **options)
    return aligned(root, direction, max_images, log, **options)
