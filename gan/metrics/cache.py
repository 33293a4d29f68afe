"""Real-data statistics cached on disk, keyed by what they were computed from.

The key is a hash of the shard manifest's content (dataset, split, classes, shape, and every shard's
sha256; not its directory, so a copy of the same shards hits the cache) plus the feature extractor's
identity (name, weights file hash, feature layer) and the statistic's own parameters. A cache entry
is an ``.npz`` written atomically; a damaged entry is recomputed.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from gan.data import read_manifest
from gan.io import sha256_file

DEFAULT_CACHE = Path(os.environ.get("GAN_METRICS_CACHE", Path.home() / ".cache" / "gan-metrics"))


def manifest_fingerprint(shards_dir: str | Path) -> str:
    """sha256 of the manifest's content (shard sha256s included, directory excluded)."""
    m = read_manifest(shards_dir)
    blob = json.dumps(m.to_json(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def file_sha256(path: str | Path, _memo: dict = {}) -> str:  # noqa: B006 - a deliberate per-process memo
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _memo:
        _memo[key] = sha256_file(path)
    return _memo[key]


def cache_key(shards_dir: str | Path, extractor: dict, **params) -> str:
    blob = json.dumps({"data": manifest_fingerprint(shards_dir), "extractor": extractor, "params": params},
                      sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def announce(what: str, count: int, shards_dir: str | Path, cache: "StatsCache") -> None:
    """Rank 0, before real-data statistics are computed (a cache miss; minutes for 50,000 images on a CPU):
    one line on stderr saying what, of how many images, and where the result is kept for next time."""
    from gan.metrics.collective import rank

    if rank() == 0:
        print(f"evaluation: computing the {what} of {count:,} images of {shards_dir} (once: cached for next "
              f"time under {cache.root})", file=sys.stderr, flush=True)


class StatsCache:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else DEFAULT_CACHE

    def path(self, kind: str, key: str) -> Path:
        return self.root / f"{kind}-{key}.npz"

    def load(self, kind: str, key: str) -> dict | None:
        p = self.path(kind, key)
        if not p.is_file():
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception:  # noqa: BLE001 - damaged entry: recompute
            return None

    def save(self, kind: str, key: str, arrays: dict, info: dict | None = None) -> Path:
        p = self.path(kind, key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".tmp-{os.getpid()}-{p.name}")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays, _info=np.array(json.dumps(info or {})))
        os.replace(tmp, p)
        return p
