"""Crash-safe file writes: a temp file in the same directory, fsync, ``os.replace``, fsync of the
directory. A reader sees either the old file or the complete new one, never a partial write. And the
one file checksum every on-disk format records (shards, checkpoints, artifacts, weights files)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes (hex), read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(d: str | Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | Path):
    """``with atomic_writer(path) as f: f.write(...)``: ``path`` appears, complete, when the block
    ends; if the block raises, nothing appears and the temp file is gone (permissions from the umask)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def write_file_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_writer(path) as f:
        f.write(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_file_atomic(path, text.encode())


def write_json_atomic(path: str | Path, obj, indent: int = 2) -> Path:
    return write_file_atomic(path, (json.dumps(obj, indent=indent) + "\n").encode())
