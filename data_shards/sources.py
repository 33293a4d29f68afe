"""Readers for the supported sources. Each checks its input up front and returns a :class:`Source`.

- ``cifar10``: torchvision's CIFAR-10 python format (``ROOT/cifar-10-batches-py/data_batch_1..5``,
  ``test_batch``, ``batches.meta``); ``download=True`` uses torchvision's downloader.
- ``imagefolder``: ``ROOT/<class>/<image>`` or a flat folder, any sizes and modes (data_shards/imagefolder.py).
- ``paired``: (input, target) pairs from A|B files, two folders or a derivation (data_shards/paired.py).
- ``webdataset``: standard webdataset ``.tar`` shards (ShardWriter, img2dataset; data_shards/webdataset_in.py).
- ``fashion-mnist`` / ``mnist``: idx files (``train-images-idx3-ubyte[.gz]``, ``t10k-...``) in ROOT or
  in torchvision's ``ROOT/FashionMNIST/raw`` / ``ROOT/MNIST/raw``.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
MNIST_CLASSES = tuple(str(i) for i in range(10))
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp")
SOURCES = ("cifar10", "imagefolder", "fashion-mnist", "mnist", "paired", "webdataset")


class InputError(Exception):
    """Bad input for a data_shards command: the message names the path and the fix (exit code 2)."""


@dataclass
class Source:
    name: str  # default dataset name for the manifest
    classes: tuple[str, ...]
    shape: tuple[int, int, int]  # (C, H, W)
    labels: np.ndarray  # int64 (N,)
    load: Callable[[int], np.ndarray]  # index -> uint8 (C, H, W); raises InputError naming the file
    describe: Callable[[int], str]  # index -> where the sample comes from (for messages)
    meta: dict = field(default_factory=dict)  # how it was read (written to the manifest's "build")
    input_shape: tuple[int, int, int] | None = None  # pairs: load gives (input, target), ``shape`` the target's

    def __len__(self) -> int:
        return len(self.labels)


def array_source(name: str, classes, images: np.ndarray, labels, where: str = "array") -> Source:
    """A source from in-memory uint8 images (N, C, H, W) and labels (used by the readers and tests)."""
    labels = np.asarray(labels, dtype=np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= len(classes)))
    if bad.size:
        raise InputError(f"{where}: label {labels[bad[0]]} of sample {bad[0]} is outside [0, {len(classes)}); "
                         f"the files are damaged or not {name} data")
    return Source(name, tuple(classes), tuple(int(v) for v in images.shape[1:]), labels,
                  load=lambda i: images[i], describe=lambda i: f"{where}[{i}]")


# ---------------------------------------------------------------------------------------------- CIFAR-10

OFFLINE_HINT = ("Without internet, point --root at a directory holding torchvision's cifar-10-batches-py "
                "(e.g. copied from another machine), or build from the ImageFolder copy: "
                "`tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C data/` then `python -m data_shards build "
                "--source imagefolder --root data/cifar10-jpeg/train --name cifar10 --split train --out DIR` "
                "(or just `python -m data_shards ensure-cifar10 --out DIR`)")


def _cifar_dir(root: Path) -> Path | None:
    if (root / "cifar-10-batches-py").is_dir():
        return root / "cifar-10-batches-py"
    if (root / "batches.meta").is_file() or (root / "test_batch").is_file():
        return root
    return None


def _torchvision_download(cls_name: str, root: Path, train: bool) -> None:
    import torchvision.datasets as tvd

    try:
        root.mkdir(parents=True, exist_ok=True)
        getattr(tvd, cls_name)(root=str(root), train=train, download=True)
    except Exception as e:  # URLError, socket errors, RuntimeError on bad archives
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"could not download {cls_name} into {root} with torchvision ({type(e).__name__}: {msg}). "
                         f"This machine may be offline. " + (OFFLINE_HINT if cls_name == "CIFAR10" else
                         "Copy the idx files (e.g. Debian's dataset-fashion-mnist package puts them in "
                         "/usr/share/datasets/fashion-mnist) and point --root at them.")) from None


def cifar10(root: str | Path, split: str, download: bool = False) -> Source:
    root = Path(root)
    base = _cifar_dir(root) if root.is_dir() else None
    if base is None and download:
        _torchvision_download("CIFAR10", root, train=split == "train")
        base = _cifar_dir(root)
    if base is None:
        what = "does not exist" if not root.exists() else "holds no cifar-10-batches-py (torchvision's CIFAR-10 layout)"
        raise InputError(f"CIFAR-10 root {root} {what}. Add --download to fetch it with torchvision (needs "
                         f"internet). " + OFFLINE_HINT)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (base / n).is_file()]
    if missing:
        raise InputError(f"{base} lacks {', '.join(missing)}: an incomplete CIFAR-10 copy. Re-copy "
                         f"cifar-10-batches-py or use --download. " + OFFLINE_HINT)
    images, labels = [], []
    for n in names:
        path = base / n
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="latin1")
            data = np.asarray(d["data"], dtype=np.uint8)
            lab = d["labels"] if "labels" in d else d["fine_labels"]
            data = data.reshape(len(data), 3, 32, 32)
            if len(lab) != len(data):
                raise ValueError(f"{len(lab)} labels for {len(data)} images")
        except Exception as e:
            raise InputError(f"cannot read CIFAR-10 batch {path} ({type(e).__name__}: {e}): the file is damaged or "
                             f"not in torchvision's CIFAR-10 python format. Re-copy it or use --download.") from None
        images.append(data)
        labels.extend(lab)
    classes = CIFAR10_CLASSES
    meta = base / "batches.meta"
    if meta.is_file():
        try:
            with open(meta, "rb") as f:
                classes = tuple(pickle.load(f, encoding="latin1")["label_names"])
        except Exception as e:
            raise InputError(f"cannot read {meta} ({e}): re-copy cifar-10-batches-py") from None
    return array_source("cifar10", classes, np.concatenate(images), labels, str(base / split))


# ---------------------------------------------------------------------------------------------- idx (MNIST)

def _open_maybe_gz(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return f.read()


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    try:
        data = _open_maybe_gz(path)
        if len(data) < 4:
            raise ValueError("file too short")
        zero, dtype, nd = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype != 0x08 or nd != ndim:
            raise ValueError(f"header says dtype 0x{dtype:02x} with {nd} dims, expected unsigned bytes with {ndim}")
        dims = struct.unpack(f">{nd}I", data[4:4 + 4 * nd])
        body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * nd)
        if body.size != int(np.prod(dims)):
            raise ValueError(f"{body.size} data bytes for dims {dims}")
        return body.reshape(dims)
    except (OSError, EOFError, ValueError, struct.error) as e:
        raise InputError(f"cannot read idx file {path} ({type(e).__name__}: {e}): the file is damaged or not an "
                         f"idx{ndim} file. Re-copy it.") from None


def _find_idx(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def idx(root: str | Path, split: str, kind: str, download: bool = False) -> Source:
    """kind: 'fashion-mnist' or 'mnist'."""
    root = Path(root)
    tv = "FashionMNIST" if kind == "fashion-mnist" else "MNIST"
    prefix = "train" if split == "train" else "t10k"
    dirs = [root, root / tv / "raw"]
    img_path = _find_idx(dirs, f"{prefix}-images-idx3-ubyte")
    if img_path is None and download:
        _torchvision_download(tv, root, train=split == "train")
        img_path = _find_idx(dirs, f"{prefix}-images-idx3-ubyte")
    lab_path = _find_idx(dirs, f"{prefix}-labels-idx1-ubyte")
    if img_path is None or lab_path is None:
        what = "does not exist" if not root.exists() else (
            f"holds no {prefix}-images-idx3-ubyte[.gz] / {prefix}-labels-idx1-ubyte[.gz] (looked in {root} "
            f"and {root / tv / 'raw'})")
        raise InputError(f"{kind} root {root} {what}. Point --root at the idx files (Debian: `apt-get install "
                         f"dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist) or add --download "
                         f"(needs internet).")
    images, labels = _read_idx(img_path, 3), _read_idx(lab_path, 1)
    if len(images) != len(labels):
        raise InputError(f"{img_path} holds {len(images)} images but {lab_path} holds {len(labels)} labels: "
                         f"the two files do not belong together")
    classes = FASHION_CLASSES if kind == "fashion-mnist" else MNIST_CLASSES
    return array_source(kind, classes, images[:, None], labels, str(img_path))


def subset(src: Source, max_images: int) -> Source:
    """The ``max_images`` samples of :func:`~data_shards.imagefolder.pick_subset` (all if 0)."""
    from data_shards.imagefolder import pick_subset

    keep = pick_subset(len(src), max_images)
    if len(keep) == len(src):
        return src
    return Source(src.name, src.classes, src.shape, src.labels[keep], load=lambda i: src.load(keep[i]),
                  describe=lambda i: src.describe(keep[i]), meta={**src.meta, "max_images": max_images},
                  input_shape=src.input_shape)


def open_source(source: str, root: str | Path, split: str, download: bool = False, max_images: int = 0,
                root_b: str = "", derive: str = "", direction: str = "AtoB", label_key: str = "auto",
                classes_file: str = "", skip_bad: bool = False, **folder_options) -> Source:
    """``folder_options`` (resolution, transform, height, small, mode, resize_filter, log) are
    :func:`data_shards.imagefolder.imagefolder`'s; other sources take none but ``log``. ``root_b``,
    ``derive`` and ``direction`` are :func:`data_shards.paired.paired`'s; ``label_key``,
    ``classes_file`` and ``skip_bad`` are :func:`data_shards.webdataset_in.webdataset_source`'s."""
    if max_images < 0:
        raise InputError(f"--max-images must be >= 0 (0 = all), got {max_images}")
    if source != "paired" and (root_b or derive or direction != "AtoB"):
        raise InputError("--root-b, --derive and --direction only work with --source paired")
    if source == "paired":
        from data_shards.paired import paired

        if download:
            raise InputError("--download works only with --source cifar10, fashion-mnist or mnist")
        return paired(root, root_b=root_b, derive=derive, direction=direction, max_images=max_images,
                      **folder_options)
    if source != "webdataset" and (label_key != "auto" or classes_file or skip_bad):
        raise InputError("--label-key, --classes and --skip-bad only work with --source webdataset")
    if source == "webdataset":
        from data_shards.webdataset_in import webdataset_source

        if download:
            raise InputError("--download does not work with --source webdataset: point --root at local .tar shards")
        return webdataset_source(str(root), label_key=label_key, classes_file=classes_file, skip_bad=skip_bad,
                                 max_images=max_images, **folder_options)
    if source == "imagefolder":
        from data_shards.imagefolder import imagefolder

        if download:
            raise InputError("--download works only with --source cifar10, fashion-mnist or mnist")
        return imagefolder(root, max_images=max_images, **folder_options)
    from data_shards.imagefolder import imagefolder_defaults

    defaults = imagefolder_defaults()
    given = [k for k, v in folder_options.items() if k != "log" and v != defaults[k]]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise InputError(f"{flags} only work with --source imagefolder or paired ({source} has one fixed image size)")
    if source == "cifar10":
        src = cifar10(root, split, download)
    elif source in ("fashion-mnist", "mnist"):
        src = idx(root, split, source, download)
    else:
        raise InputError(f"unknown source '{source}': use one of {', '.join(SOURCES)}")
    return subset(src, max_images)
