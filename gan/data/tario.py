"""A fast reader for the plain ustar shards that ``data_shards`` writes.

``wds.tarfile_to_samples`` goes through Python's ``tarfile`` (about 30 us per member here, two members
per sample); our shards only hold regular files with short names, so their 512-byte headers can be
parsed directly from a memory map (a few us per member). The stage has the same shape as
``wds.tarfile_to_samples``: a stream of ``{"url": path}`` in, samples ``{"__key__", "__url__", ext: bytes}``
out. A shard with any other kind of member (pax/GNU headers, links, directories) is read with
``tarfile`` instead, so foreign but valid tars still work.
"""
from __future__ import annotations

import io
import mmap
import os
import tarfile

from gan.data.manifest import ShardError, tar_header_ok

_BLOCK = 512
_REGULAR = (b"0", b"\0")


def _hint(url) -> str:
    return f"run `python -m data_shards verify {os.path.dirname(url) or '.'}` and rebuild the damaged shards"


def _members_fast(buf, url: str):
    """(name, data) of each member, or None if the archive needs the general reader."""
    out = []
    off, end = 0, len(buf)
    while off + _BLOCK <= end:
        header = buf[off:off + _BLOCK]
        if header[0] == 0 and not any(header):
            return out
        if not tar_header_ok(header):  # flipped bytes: name them, never read garbage as a member
            raise ShardError(f"{url}: corrupt tar header at byte {off} (checksum mismatch): " + _hint(url))
        if header[156:157] not in _REGULAR or header[345] != 0:  # other member types, or a ustar name prefix
            return None
        try:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
        except UnicodeDecodeError:
            raise ShardError(f"{url}: corrupt tar header at byte {off} (member name is not UTF-8): " + _hint(url)) from None
        try:
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        except ValueError:
            raise ShardError(f"{url}: corrupt tar header at byte {off}: " + _hint(url)) from None
        start = off + _BLOCK
        if start + size > end:
            raise ShardError(f"{url}: truncated tar (member {name} runs past the end of the file): "
                             + _hint(url))
        out.append((name, buf[start:start + size]))
        off = start + (size + _BLOCK - 1) // _BLOCK * _BLOCK
    if off == end and end > 0:  # tarfile tolerates a missing end marker only if nothing follows
        return out
    raise ShardError(f"{url}: truncated tar (ends inside a header at byte {off}): " + _hint(url))


def _members_tarfile(buf: bytes, url: str):
    try:
        with tarfile.open(fileobj=io.BytesIO(buf), mode="r:") as tf:
            return [(m.name, tf.extractfile(m).read()) for m in tf if m.isreg()]
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(f"{url}: unreadable tar ({e}): " + _hint(url)) from None


def shard_members(path: str):
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            raise ShardError(f"{path}: empty shard file: " + _hint(path))
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            members = _members_fast(mm, path)
            if members is None:
                members = _members_tarfile(mm[:], path)
    return members


def tar_samples(src):
    """webdataset stage: ``{"url": path}`` dicts -> samples grouped by key (the part before the first dot)."""
    for item in src:
        url = item["url"]
        sample = None
        for name, data in shard_members(url):
            key, dot, ext = name.partition(".")
            if not dot or "/" in key:
                continue
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            sample[ext.lower()] = data
        if sample is None:  # a zero-filled or empty shard: never skip it silently (or spin on it for ever)
            raise ShardError(f"{url}: no samples in this shard (zero-filled or empty?): " + _hint(url))
        yield sample
