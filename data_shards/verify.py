"""``verify DIR``: re-hash every shard against the manifest and decode every sample."""
from __future__ import annotations

import re
import tarfile
from pathlib import Path

from gan.data.codec import SampleDecodeError, decode_images, decode_label, image_members
from gan.io import sha256_file
from gan.data.manifest import Manifest, read_manifest

_MEMBER = re.compile(r"(\d+)\.([a-z0-9.]+)")
MAX_PER_SHARD = 10  # problems listed per shard before "... and N more"


def _check_sample(m: Manifest, key: str, files: dict[str, bytes]) -> str | None:
    exts = image_members(m.encoding, m.paired)
    if set(files) != {"cls", *exts}:
        return f"has members {sorted(files)}, expected {sorted(['cls', *exts])}"
    ext = None
    try:
        decode_label(files["cls"], m.num_classes)
        for ext, shape in zip(exts, m.image_shapes):
            decode_images([files[ext]], m.encoding, shape)
    except SampleDecodeError as e:
        return f"undecodable: {f'.{ext}: ' if m.paired else ''}{e.reason}"
    except ValueError as e:  # the label
        return f"undecodable: {e}"
    return None


def _end_marker_ok(path: Path, offset: int) -> bool:
    """A complete tar has at least two zero blocks after its last member."""
    with open(path, "rb") as f:
        f.seek(offset)
        tail = f.read(1024)
    return len(tail) == 1024 and not any(tail)


def verify_shard(m: Manifest, name: str, count: int, sha256: str, seen: dict[str, str]) -> list[str]:
    """Problems of one shard, each a line starting with the shard name."""
    path = m.dir / name
    problems: list[str] = []
    actual = sha256_file(path)
    if actual != sha256:
        problems.append(f"{name}: checksum mismatch (manifest sha256 {sha256[:12]}..., file {actual[:12]}...): "
                        f"the shard changed or is damaged")
    n = 0
    key, files = None, {}

    def finish():
        nonlocal n
        if key is None:
            return
        n += 1
        why = _check_sample(m, key, files)
        if why:
            problems.append(f"{name}: sample {key} {why}")
        if key in seen:
            problems.append(f"{name}: sample {key} duplicates a sample in {seen[key]}")
        seen[key] = name

    try:
        with tarfile.open(path, mode="r:") as tf:
            for info in tf:
                match = _MEMBER.fullmatch(info.name)
                if not info.isreg() or not match:
                    problems.append(f"{name}: unexpected member {info.name!r}")
                    continue
                k, ext = match.groups()
                if k != key:
                    finish()
                    key, files = k, {}
                if ext in files:
                    problems.append(f"{name}: sample {k} has two .{ext} members")
                files[ext] = tf.extractfile(info).read()
            finish()
            key = None
            end = tf.offset
        if not _end_marker_ok(path, end):
            problems.append(f"{name}: truncated tar (no end-of-archive marker after {n} samples)")
    except (tarfile.TarError, EOFError, OSError) as e:
        where = f"in sample {key}" if key is not None else f"after {n} samples"
        problems.append(f"{name}: truncated or corrupt tar {where} ({type(e).__name__}: {e})")
    if n != count:
        problems.append(f"{name}: holds {n} readable samples, the manifest says {count}")
    return problems


def verify_dir(directory: str | Path) -> tuple[Manifest, list[str]]:
    """Return the manifest and all problems found (empty list: all good). ShardError if no usable manifest."""
    m = read_manifest(directory)
    problems: list[str] = []
    seen: dict[str, str] = {}
    for s in m.shards:
        found = verify_shard(m, s.name, s.count, s.sha256, seen)
        problems.extend(found[:MAX_PER_SHARD])
        if len(found) > MAX_PER_SHARD:
            problems.append(f"{s.name}: ... and {len(found) - MAX_PER_SHARD} more problem(s)")
    return m, problems


def summary(m: Manifest) -> str:
    return (f"OK {m.dir}: {len(m.shards)} shards, {m.total} samples ({m.describe()}, {m.encoding}); "
            f"checksums match, every {'pair' if m.paired else 'sample'} decodes")
