"""Eval/test reading: every sample exactly once across ranks, no augmentation."""
from __future__ import annotations

from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from gan.data.codec import to_unit_range
from gan.data.manifest import Manifest, ShardError, read_manifest
from gan.data.stream import WorkerLoader, _identity, decode_batch
from gan.data.tario import tar_samples


class _EvalChunks(IterableDataset):
    """Shards in manifest order (split among workers), samples whose index % world_size == rank; with
    ``limit``, only the first ``limit`` samples in shard order (the shards that hold them, and of the last
    one its first samples)."""

    def __init__(self, m: Manifest, rank: int, world_size: int, chunk: int, limit: int = 0):
        super().__init__()
        self.m, self.rank, self.world_size, self.chunk = m, rank, world_size, chunk
        self.allowed, before = {}, 0  # shard path -> how many of its first samples are read
        for path, s in zip(m.paths, m.shards):
            if limit and before >= limit:
                break
            self.allowed[path] = min(s.count, limit - before) if limit else s.count
            before += s.count

    def _first(self, samples):
        seen: dict[str, int] = {}
        for sample in samples:
            url = sample.get("__url__")
            seen[url] = seen.get(url, 0) + 1
            if seen[url] <= self.allowed[url]:
                yield sample

    def _mine(self, sample: dict) -> bool:
        key = sample.get("__key__", "")
        if not key.isdigit():
            raise ShardError(f"{sample.get('__url__')}: sample key {key!r} is not a sample index; these shards "
                             f"were not written by data_shards. Rebuild {self.m.dir} with `python -m data_shards build`.")
        return int(key) % self.world_size == self.rank

    def __iter__(self):
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(list(self.allowed)),
            wds.split_by_worker,
            tar_samples,
            self._first,
            wds.select(self._mine),
            wds.batched(self.chunk, collation_fn=None, partial=True),
        )
        for samples in pipeline:
            images, labels = decode_batch(samples, self.m)
            yield (*images, torch.tensor(labels, dtype=torch.int64))


def eval_batches(shards_dir: str | Path, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, key: str = "data.shards", paired: bool = False, limit: int = 0):
    """Yield ``(x, y)`` over the shard set once: x float32 (B, C, H, W) in [-1, 1] (scaling only, no
    augmentation), y int64 (B,); paired shards give ``(a, b, y)``, the inputs and targets. Rank ``r`` gets the samples whose index is ``r`` modulo ``world_size``,
    so every sample is read exactly once across ranks (rank counts differ by at most one sample).
    All batches hold ``batch_size`` samples except possibly the last. Do not pass through
    ``accelerator.prepare`` (the split by rank is already done here). ``limit`` > 0: only the first
    ``limit`` samples in shard order. ``key``, ``paired``: what a shard error names (:func:`gan.data.read_manifest`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    m = read_manifest(shards_dir, key, paired)
    ds = _EvalChunks(m, rank, world_size, batch_size, limit)
    source = WorkerLoader(ds, batch_size=None, num_workers=num_workers, collate_fn=_identity) \
        if num_workers > 0 else ds
    return _rebatch(source, batch_size)


def _rebatch(chunks, batch_size: int):
    """Chunks of tensors (images..., labels) -> the same tensors in batches of ``batch_size`` (the last may be short)."""
    parts, have = None, 0
    for chunk in chunks:
        parts = [[t] for t in chunk] if parts is None else [p + [t] for p, t in zip(parts, chunk)]
        have += len(chunk[-1])
        while have >= batch_size:
            whole = [torch.cat(p) for p in parts]
            yield (*(to_unit_range(t[:batch_size]) for t in whole[:-1]), whole[-1][:batch_size])
            parts, have = [[t[batch_size:]] for t in whole], have - batch_size
    if have:
        whole = [torch.cat(p) for p in parts]
        yield (*(to_unit_range(t) for t in whole[:-1]), whole[-1])
