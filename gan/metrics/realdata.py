"""Real images from a shard set, as uint8, read once per process (evaluation during training reuses them)."""
from __future__ import annotations

from pathlib import Path

import torch

from gan.data import eval_batches, read_manifest

_memo: dict = {}


def load_shard_images(shards_dir: str | Path, max_real: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, C, H, W) images and int64 labels of a shard set in manifest order (the first
    ``max_real`` when > 0). Kept in memory for the process, keyed by the manifest's content."""
    from gan.metrics.cache import manifest_fingerprint

    key = (manifest_fingerprint(shards_dir), int(max_real))
    if key not in _memo:
        xs, ys, have = [], [], 0
        for x, y in eval_batches(shards_dir, 1000):
            xs.append(((x + 1) * 127.5).round_().to(torch.uint8))
            ys.append(y)
            have += len(y)
            if max_real and have >= max_real:
                break
        x, y = torch.cat(xs), torch.cat(ys)
        if max_real:
            x, y = x[:max_real], y[:max_real]
        _memo.clear()  # one real set at a time (CIFAR-10 train is 150 MB as uint8)
        _memo[key] = (x, y)
    return _memo[key]


def real_count(shards_dir: str | Path, max_real: int = 0) -> int:
    total = read_manifest(shards_dir).total
    return min(total, max_real) if max_real else total
