"""Deterministic, crash-safe shard writing.

Order of work: (1) the caller has checked the source; (2) the output directory is checked for
writability; (3) every shard is written to a hidden temp file ``.tmp-<split>-NNNNNN.tar.<pid>`` and
fsync'ed; (4) only when all are written: the old ``manifest.json`` is removed, old shards of the split
are removed, the temp files are renamed to ``<split>-NNNNNN.tar``, and the new manifest is written to a
temp file and ``os.replace``'d into place. A crash or error before (4) leaves the previous shard set as
it was (its temp files are removed); a crash during (4) leaves no manifest. So a manifest never names
a partial shard.

Same input gives byte-identical shards: samples go in a fixed pseudo-random order (``random.Random(0)``
over the source order, so every shard mixes all classes), tar headers carry fixed metadata
(mtime 0, uid/gid 0, no user names, mode 0444, ustar format).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_shards.sources import InputError, Source
from gan.data.codec import encode_image, sample_key
from gan.io import fsync_dir as _fsync_dir
from gan.io import write_file_atomic
from gan.data.manifest import ENCODINGS, MANIFEST, Manifest, ShardInfo, parse_manifest

ORDER_SEED = 0


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A ustar archive of (name, data) members with fixed metadata: same members, same bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True




def prepare_output(out: str | Path) -> Path:
    """Create ``out`` if needed and prove it is writable; raise InputError naming the path otherwise."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a directory: choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"cannot write to output directory {out} ({e.strerror or e}): choose a writable --out "
                         f"or fix its permissions") from None
    return out


def build_shards(src: Source, out: str | Path, split: str, dataset: str, encoding: str = "raw",
                 shard_size: int = 1000, log=print) -> Manifest:
    """Write ``src`` as ``out/<split>-NNNNNN.tar`` + ``out/manifest.json``; return the manifest."""
    if encoding not in ENCODINGS:
        raise InputError(f"unknown encoding '{encoding}': use one of {', '.join(ENCODINGS)}")
    if shard_size < 1:
        raise InputError(f"--shard-size must be >= 1, got {shard_size}")
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise InputError(f"split '{split}' must be letters, digits or '_' (it names the shard files)")
    if len(src) == 0:
        raise InputError("the source holds no samples")
    out = prepare_output(out)
    order = list(range(len(src)))
    random.Random(ORDER_SEED).shuffle(order)
    n_shards = (len(order) + shard_size - 1) // shard_size
    temps: list[Path] = []
    infos: list[ShardInfo] = []
    bar = tqdm(total=len(order), desc=f"build {dataset} {split}", unit="img", disable=log is None,
               dynamic_ncols=True)  # on stderr; log=None (tests, library calls) shows none
    try:
        for s in range(n_shards):
            members = []
            chunk = order[s * shard_size:(s + 1) * shard_size]
            for i in chunk:
                img = src.load(i)
                if img.shape != src.shape or img.dtype != np.uint8:
                    raise InputError(f"{src.describe(i)}: image is {img.shape} {img.dtype}, expected {src.shape} "
                                     f"uint8 like the others; make all images the same size and format")
                key = sample_key(i)
                members.append((f"{key}.cls", str(int(src.labels[i])).encode("ascii")))
                members.append((f"{key}.{encoding}", encode_image(img, encoding)))
                bar.update()
            data = tar_bytes(members)
            tmp = out / f".tmp-{shard_name(split, s)}.{os.getpid()}"
            temps.append(tmp)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            infos.append(ShardInfo(shard_name(split, s), len(chunk), hashlib.sha256(data).hexdigest()))
            bar.set_postfix_str(f"{s + 1}/{n_shards} shards", refresh=False)
        bar.close()
        counts = np.bincount(src.labels, minlength=len(src.classes)).tolist()
        manifest = Manifest(dir=out, dataset=dataset, split=split, classes=src.classes, image_shape=src.shape,
                            encoding=encoding, shards=tuple(infos), total=len(order),
                            build={**src.meta, "class_counts": counts})
        _commit(out, split, temps, manifest)
    except BaseException:
        bar.close()
        for t in temps:
            try:
                t.unlink()
            except FileNotFoundError:
                pass
        raise
    return manifest


def manifest_text(manifest: Manifest) -> str:
    """Pretty JSON with one line per shard."""
    d = manifest.to_json()
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in d.items() if k != "shards"]
    shards = ",\n".join(f"  {json.dumps(s)}" for s in d["shards"])
    lines.insert(len(lines) - 1, f' "shards": [\n{shards}\n ]')
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _commit(out: Path, split: str, temps: list[Path], manifest: Manifest) -> None:
    """Swap the new shard set in: no manifest exists from the first change until the last."""
    try:
        (out / MANIFEST).unlink()
    except FileNotFoundError:
        pass
    _fsync_dir(out)
    keep = {s.name for s in manifest.shards}
    for old in out.iterdir():
        if re.fullmatch(rf"{re.escape(split)}-\d{{6}}\.tar", old.name) and old.name not in keep:
            old.unlink()
    for stale in out.glob(f".tmp-{split}-*.tar.*"):  # left by an earlier build that crashed
        pid = stale.name.rsplit(".", 1)[-1]
        if stale not in temps and pid.isdigit() and not _alive(int(pid)):
            stale.unlink()
    for tmp, info in zip(temps, manifest.shards):
        os.replace(tmp, out / info.name)
    _fsync_dir(out)
    text = manifest_text(manifest)
    parse_manifest(json.loads(text), out)  # never write a manifest this code could not read back
    write_file_atomic(out / MANIFEST, text.encode())


__all__ = ["build_shards", "manifest_text", "prepare_output", "shard_name", "tar_bytes", "write_file_atomic"]
