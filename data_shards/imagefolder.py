"""Image folders of any size and mode -> a :class:`~data_shards.sources.Source` of equal-size images.

Layouts: ``ROOT/<class>/<image>`` (one class per sub-folder, sorted by name; images may sit deeper),
or a flat ``ROOT/<image>`` folder, which is one unconditional class (``num_classes: 1``).

Sizes (``--resolution N``, square output; the transforms follow stylegan2-ada's ``dataset_tool.py``):

- ``center-crop``: the largest centred square, resized to NxN.
- ``center-crop-wide``: the largest centred crop of aspect N:H (``--height H``, H <= N), resized to
  NxH and centred on a black NxN canvas (letterbox), for wide images such as LSUN. stylegan2-ada
  keeps the full width and skips images too short for the crop; here the wider side is cropped.
- ``resize``: the whole image resized to NxN (the aspect ratio is not kept).

Without ``--resolution`` every image must already have the same size. An image smaller than its crop
needs (``small``): ``refuse`` (default: an error naming the files, before anything is written),
``upscale`` (resize it up like the others) or ``skip`` (leave it out; stylegan2-ada's behaviour).

Modes (``mode``): ``auto`` gives grayscale shards if every image is grayscale and RGB shards if every
image is colour; a folder mixing the two is refused (naming one of each) unless ``rgb`` or ``gray``
says what to convert to. Transparency (RGBA, LA, palette with a transparent colour) is composited on
black; 16-bit grayscale is scaled to 8 bits; EXIF orientation (phone photos) is applied.

Everything that can be checked from the image headers (unreadable files, modes, sizes, an empty
folder) is checked before any shard is written. :func:`read_headers` and :func:`images_source` do this
for any list of images (files here; tar members for data_shards/webdataset_in.py, through ``opener``).
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np

from data_shards.sources import IMG_EXTENSIONS, InputError, Source

TRANSFORMS = ("center-crop", "center-crop-wide", "resize")
SMALL_POLICIES = ("refuse", "upscale", "skip")
MODES = ("auto", "rgb", "gray")
FILTERS = ("lanczos", "box", "bicubic")
SUBSET_SEED = 0
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that turn the image by 90 degrees
_EXIF_ORIENTATION = 0x0112


def pick_subset(n: int, k: int) -> list[int]:
    """``k`` of ``n`` indices (all if ``k`` is 0 or >= n), a fixed pseudo-random choice kept in source
    order: every class is represented in proportion, and the same folder gives the same subset."""
    if not k or k >= n:
        return list(range(n))
    return sorted(random.Random(SUBSET_SEED).sample(range(n), k))


def _image_files(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in filenames
                   if not f.startswith(".") and f.lower().endswith(IMG_EXTENSIONS))
    return sorted(out)


def folder_layout(root: Path) -> tuple[tuple[str, ...], list[Path], list[int], bool]:
    """(class names, files, labels, flat)."""
    if not root.exists():
        raise InputError(f"image folder root {root} does not exist: point --root at a directory laid out as "
                         f"ROOT/<class>/<image>, or a flat folder of images (for ../shared/data/cifar10-jpeg.tar.gz: "
                         f"extract it and use cifar10-jpeg/train)")
    if not root.is_dir():
        raise InputError(f"image folder root {root} is not a directory: expected ROOT/<class>/<image> or ROOT/<image>")
    class_dirs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                        key=lambda d: d.name)
    loose = sorted(p for p in root.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(IMG_EXTENSIONS))
    if class_dirs and loose:
        raise InputError(f"{root} holds both class sub-folders ({', '.join(d.name for d in class_dirs[:3])}"
                         f"{', ...' if len(class_dirs) > 3 else ''}) and {len(loose)} loose image(s) such as "
                         f"{loose[0]}: it is unclear which class those belong to. Move them into a class "
                         f"sub-folder, or point --root at a folder of one kind")
    if loose:
        return (root.resolve().name or "images",), loose, [0] * len(loose), True
    if not class_dirs:
        raise InputError(f"image folder {root} is empty: it holds no images ({'/'.join(IMG_EXTENSIONS)}) and no "
                         f"class sub-folders. Put images in it (flat: one unconditional class) or in "
                         f"ROOT/<class>/ sub-folders")
    files, labels = [], []
    for k, d in enumerate(class_dirs):
        found = _image_files(d)
        if not found:
            raise InputError(f"class folder {d} holds no images ({'/'.join(IMG_EXTENSIONS)}): add images "
                             f"or remove the folder")
        files.extend(found)
        labels.extend([k] * len(found))
    return tuple(d.name for d in class_dirs), files, labels, False


def crop_box(w: int, h: int, transform: str, out_w: int, out_h: int) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) region of a w x h image that ``transform`` resizes to out_w x out_h."""
    if transform == "resize":
        return 0, 0, w, h
    if w * out_h > h * out_w:  # wider than the target aspect: crop the width
        cw, ch = max(1, round(h * out_w / out_h)), h
    else:
        cw, ch = w, max(1, round(w * out_h / out_w))
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def _too_small(size: tuple[int, int], transform: str, n: int, height: int) -> bool:
    left, top, right, bottom = crop_box(size[0], size[1], transform, n, height)
    return right - left < n or bottom - top < height


def _header(path, opener=None, fix: str = "fix or remove the file") -> tuple[tuple[int, int], str]:
    """(width, height) as displayed (EXIF orientation applied) and PIL mode, from the header only."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(opener(path) if opener else path) as im:
            (w, h), mode = im.size, im.mode
            try:
                orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
            except Exception:  # a damaged EXIF block: the pixels may still be fine
                orientation = 1
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read image {path} ({type(e).__name__}: {e}): {fix}") from None
    return ((h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)), mode


def to_mode(im, mode: str):
    """A PIL image in any mode -> "RGB" or "L": alpha composited on black, 16-bit gray scaled to 8 bits."""
    from PIL import Image

    if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit integer or float grayscale
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257.0
        im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    has_alpha = im.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return im.convert(mode)


def imagefolder_defaults() -> dict:
    """The default of each option of :func:`imagefolder` (other sources refuse any other value)."""
    import inspect

    return {k: p.default for k, p in inspect.signature(imagefolder).parameters.items()
            if p.default is not inspect.Parameter.empty}


def check_options(resolution: int = 0, transform: str = "center-crop", height: int = 0, small: str = "refuse",
                  mode: str = "auto", max_images: int = 0, resize_filter: str = "lanczos") -> None:
    """Refuse bad option values (named as the command-line flags) before anything is read."""
    if transform not in TRANSFORMS:
        raise InputError(f"--transform {transform!r} is not one of {', '.join(TRANSFORMS)}")
    if small not in SMALL_POLICIES:
        raise InputError(f"--small {small!r} is not one of {', '.join(SMALL_POLICIES)}")
    if mode not in MODES:
        raise InputError(f"--mode {mode!r} is not one of {', '.join(MODES)}")
    if resize_filter not in FILTERS:
        raise InputError(f"--resize-filter {resize_filter!r} is not one of {', '.join(FILTERS)}")
    if resolution < 0 or max_images < 0:
        raise InputError("--resolution and --max-images must be >= 0")
    if height and transform != "center-crop-wide":
        raise InputError("--height is only used by --transform center-crop-wide (the content height inside the "
                         "NxN canvas); drop it, or add --transform center-crop-wide")
    if resolution and transform == "center-crop-wide":
        if not height:
            raise InputError(f"--transform center-crop-wide needs --height H: the height of the image inside the "
                             f"{resolution}x{resolution} canvas (stylegan2-ada's --width/--height; e.g. --height "
                             f"{resolution * 3 // 4} for 4:3 images)")
        if not 1 <= height <= resolution:
            raise InputError(f"--height {height} must be in [1, --resolution {resolution}]")
    if resolution and resolution < 4:
        raise InputError(f"--resolution {resolution} is too small: use at least 4 (e.g. 32, 64, 128)")


def read_headers(files: list[Path], log=None, opener=None,
                 fix: str = "fix or remove the file") -> list[tuple[tuple[int, int], str]]:
    """(width, height) as displayed and PIL mode of every file, from the headers only (InputError names a bad file).
    ``opener`` turns an item of ``files`` that is not a path (a tar member) into what ``Image.open`` takes."""
    out = []
    for i, p in enumerate(files):
        out.append(_header(p, opener, fix))
        if log and (i + 1) % 10000 == 0:
            log(f"  checked {i + 1}/{len(files)} image headers")
    return out


def imagefolder(root: str | Path, resolution: int = 0, transform: str = "center-crop", height: int = 0,
                small: str = "refuse", mode: str = "auto", max_images: int = 0, resize_filter: str = "lanczos",
                log=None) -> Source:
    """Check the folder (layout, every image header, modes, sizes) and return its Source."""
    options = dict(resolution=resolution, transform=transform, height=height, small=small, mode=mode,
                   resize_filter=resize_filter)
    check_options(max_images=max_images, **options)
    root = Path(root)
    classes, files, labels, flat = folder_layout(root)
    keep = pick_subset(len(files), max_images)
    files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    name = root.name if root.name not in ("train", "test", "val", "valid") else root.resolve().parent.name
    meta = {"source": "imagefolder", "root": str(root.resolve()), "layout": "flat" if flat else "class folders"}
    src = images_source(name, classes, files, labels, read_headers(files, log), meta, log=log, **options)
    if max_images:
        src.meta["max_images"] = max_images
    return src


def images_source(name: str, classes: tuple[str, ...], files: list[Path], labels: list[int],
                  headers: list[tuple[tuple[int, int], str]], meta: dict, resolution: int = 0,
                  transform: str = "center-crop", height: int = 0, small: str = "refuse", mode: str = "auto",
                  resize_filter: str = "lanczos", half: str = "", log=None, opener=None,
                  fix: str = "fix or remove the file") -> Source:
    """The Source of image ``files`` (options already checked by :func:`check_options`, ``headers`` from
    :func:`read_headers`): modes and sizes are checked here, before anything is written. ``half``
    ("left" or "right") takes that half of each file (an A|B image, whose header size must be its half).
    ``opener`` and ``fix`` as for :func:`read_headers`."""
    from PIL import Image, ImageOps

    out_h = height if transform == "center-crop-wide" else resolution
    # Every problem that can be seen without decoding, before anything is written.
    sizes: dict[tuple[int, int], Path] = {}
    first_gray = first_color = None
    small_files: list[tuple[Path, tuple[int, int]]] = []
    for p, (size, m) in zip(files, headers):
        if m in _GRAY_MODES:
            first_gray = first_gray or p
        else:
            first_color = first_color or p
        if resolution:
            if _too_small(size, transform, resolution, out_h):
                small_files.append((p, size))
        else:
            sizes.setdefault(size, p)
            if len(sizes) > 1:
                (s0, p0), (s1, p1) = list(sizes.items())[:2]
                what = f"the {half} halves of " if half else ""
                raise InputError(f"images differ in size: {what}{p0} is {s0[0]}x{s0[1]} but {what}{p1} is "
                                 f"{s1[0]}x{s1[1]}. Pass --resolution N (e.g. 64) to crop and resize every image to "
                                 f"NxN (--transform {'|'.join(TRANSFORMS)}, default center-crop)")
    if mode == "auto" and first_gray and first_color:
        raise InputError(f"the images mix grayscale and colour ({first_gray} is grayscale, {first_color} "
                         f"is colour): pass --mode rgb to convert every image to RGB, or --mode gray for "
                         f"grayscale shards")
    channels = 1 if mode == "gray" or (mode == "auto" and first_color is None) else 3
    pil_mode = "L" if channels == 1 else "RGB"
    need = f"{resolution}x{out_h}" if transform == "center-crop-wide" else f"{resolution}x{resolution}"
    if small_files and small == "refuse":
        shown = "; ".join(f"{p} ({s[0]}x{s[1]})" for p, s in small_files[:3])
        raise InputError(f"{len(small_files)} of {len(files)} image(s) are smaller than the {need} crop that "
                         f"--resolution {resolution} --transform {transform} needs: {shown}"
                         f"{' ...' if len(small_files) > 3 else ''}. Choose: --small upscale (resize them up), "
                         f"--small skip (leave them out), or a smaller --resolution")
    skipped = 0
    if small_files and small == "skip":
        drop = {p for p, _ in small_files}
        kept = [(p, y) for p, y in zip(files, labels) if p not in drop]
        skipped = len(files) - len(kept)
        if not kept:
            raise InputError(f"every image is smaller than the {need} crop (--small skip left none): use a smaller "
                             f"--resolution or --small upscale")
        files, labels = [p for p, _ in kept], [y for _, y in kept]
        missing = [classes[k] for k in range(len(classes)) if k not in set(labels)]
        if missing:
            raise InputError(f"--small skip left class(es) {', '.join(missing)} without images: use a smaller "
                             f"--resolution or --small upscale")
    if log and small_files:
        log(f"  {len(small_files)} image(s) smaller than {need}: "
            f"{'left out' if small == 'skip' else 'upscaled'} (--small {small})")

    if resolution:
        shape = (channels, resolution, resolution)
    else:
        (w, h), = sizes.keys()
        shape = (channels, h, w)
    resample = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX,
                "bicubic": Image.Resampling.BICUBIC}[resize_filter]

    def load(i: int) -> np.ndarray:
        try:
            with Image.open(opener(files[i]) if opener else files[i]) as im:
                im = ImageOps.exif_transpose(im)
                if half:
                    w = im.width // 2
                    im = im.crop((0, 0, w, im.height) if half == "left" else (w, 0, 2 * w, im.height))
                im = to_mode(im, pil_mode)
                if resolution:
                    box = crop_box(im.width, im.height, transform, resolution, out_h)
                    if box != (0, 0, resolution, out_h) or im.size != (resolution, out_h):
                        im = im.resize((resolution, out_h), resample, box=box)
                    if transform == "center-crop-wide":
                        canvas = Image.new(pil_mode, (resolution, resolution), 0)
                        canvas.paste(im, (0, (resolution - out_h) // 2))
                        im = canvas
                a = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise InputError(f"cannot decode image {files[i]} ({type(e).__name__}: {e}): {fix}") from None
        return a[None] if channels == 1 else a.transpose(2, 0, 1)

    meta = {**meta, "mode": pil_mode}
    if resolution:
        meta.update(resolution=resolution, transform=transform, resize_filter=resize_filter, small=small,
                    small_images=len(small_files), skipped=skipped)
        if transform == "center-crop-wide":
            meta["height"] = out_h
    return Source(name, classes, shape, np.asarray(labels, dtype=np.int64), load=load,
                  describe=lambda i: str(files[i]), meta=meta)
