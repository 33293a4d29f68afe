"""``ensure-cifar10``: make sure CIFAR-10 train shards exist (used by ``make shards`` / ``make train``).

1. ``OUT`` already has a readable manifest of cifar10 train: nothing to do.
2. ``ROOT`` holds torchvision's ``cifar-10-batches-py``: build from it.
3. ``SHARED`` (../shared/data/cifar10-jpeg.tar.gz: ``cifar10-jpeg/train/<class>/*.jpg``) exists: extract the
   train folders to a temp dir beside OUT and build them as an image folder named "cifar10".
4. Otherwise: an error listing the three ways to provide the data.
"""
from __future__ import annotations

import shutil
import tarfile
import tempfile
from pathlib import Path

from data_shards.imagefolder import imagefolder
from data_shards.sources import CIFAR10_CLASSES, InputError, cifar10
from data_shards.writer import build_shards, prepare_output
from gan.data.manifest import Manifest, ShardError, read_manifest

TRAIN_PREFIX = "cifar10-jpeg/train/"


def _existing(out: Path) -> Manifest | None:
    if not (out / "manifest.json").exists():
        return None
    try:
        m = read_manifest(out)
    except ShardError as e:
        raise InputError(f"{e}\n(ensure-cifar10 will not overwrite a damaged shard directory by itself: "
                         f"remove {out} to rebuild it)") from None
    if m.dataset != "cifar10" or m.split != "train":
        raise InputError(f"{out} already holds shards of {m.dataset} {m.split}, not cifar10 train: point --out "
                         f"(SHARDS=... for make) at another directory or remove {out}")
    return m


def _extract_train(targz: Path, dest: Path) -> Path:
    try:
        with tarfile.open(targz, "r:gz") as tf:
            members = [m for m in tf.getmembers() if m.name.startswith(TRAIN_PREFIX) and (m.isfile() or m.isdir())]
            if not members:
                raise InputError(f"{targz} holds no {TRAIN_PREFIX} folder: expected the layout described in "
                                 f"../shared/data/README.md (cifar10-jpeg/train/<class>/NNNN.jpg)")
            tf.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise InputError(f"cannot extract {targz} ({type(e).__name__}: {e}): the archive is damaged; "
                         f"re-copy it") from None
    return dest / TRAIN_PREFIX


def ensure_cifar10(out: str | Path, root: str | Path, shared: str | Path, encoding: str = "raw",
                   shard_size: int = 1000, log=print) -> Manifest:
    out, root, shared = Path(out), Path(root), Path(shared)
    m = _existing(out)
    if m is not None:
        log(f"shards ready: {out} ({m.dataset} {m.split}, {m.total} samples in {len(m.shards)} shards; "
            f"`python -m data_shards verify {out}` re-checks them)")
        return m
    if (root / "cifar-10-batches-py").is_dir():
        log(f"building CIFAR-10 train shards in {out} from torchvision's copy in {root}")
        src = cifar10(root, "train")
        return build_shards(src, out, "train", "cifar10", encoding, shard_size, log=log)
    if shared.is_file():
        log(f"building CIFAR-10 train shards in {out} from the JPEG copy {shared}")
        parent = prepare_output(out).parent
        tmp = Path(tempfile.mkdtemp(prefix=".cifar10-jpeg-", dir=parent))
        try:
            folder = _extract_train(shared, tmp)
            src = imagefolder(folder)
            if src.classes != CIFAR10_CLASSES:
                raise InputError(f"{shared}: class folders {list(src.classes)} are not the ten CIFAR-10 classes")
            return build_shards(src, out, "train", "cifar10", encoding, shard_size, log=log)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raise InputError(
        f"no CIFAR-10 shards in {out} and no data to build them from. Give one of:\n"
        f"  1. torchvision's CIFAR-10 copy: {root}/cifar-10-batches-py (set CIFAR10_ROOT=DIR for make, "
        f"or --root DIR)\n"
        f"  2. the JPEG tarball {shared} (../shared/data/cifar10-jpeg.tar.gz; set SHARED_CIFAR=PATH for make, "
        f"or --shared PATH)\n"
        f"  3. a download (needs internet): python -m data_shards build --source cifar10 --root {root} --download "
        f"--split train --out {out}")
