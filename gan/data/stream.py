"""The training stream: webdataset shards -> endless, rank-equal, resumable batches.

Per rank and epoch ``e`` (one epoch = ``batches_per_epoch`` batches on every rank):

    ResampledShards(seed=f(seed, e))          one shard sequence, drawn with replacement, same on all ranks
    -> split by rank  (islice(rank, world))   each rank takes its own positions of that sequence
    -> wds.split_by_worker                    each DataLoader worker takes its own positions again
    -> tar_samples (fast ustar reader) -> wds.shuffle(rng seeded by (seed, rank, e, worker))
    -> wds.batched(B) -> with_epoch(batches of this worker)
    -> decode + augment in the worker, augmentation RNG seeded by (seed, rank, e, batch index)

The batches of an epoch are cut into chunks of ``k ~ 256 / B`` consecutive batches; worker ``w``
of ``W`` makes chunks ``w, w+W, ...`` and sends each as one uint8 message, and the DataLoader returns
messages round-robin in order. So batch ``j`` of epoch ``e`` is the same for a given (seed, rank,
world_size, batch_size, num_workers) whether the stream started at 0 or was resumed. Shards are
resampled, so no rank or worker ever runs dry: every rank yields exactly ``batches_per_epoch`` batches
per epoch whatever the numbers of shards, ranks and workers, and DDP never waits on a rank that ran out.

The node split uses the ``rank``/``world_size`` given to :class:`TrainStream` (the same islice as
``wds.split_by_node``, which instead reads RANK/WORLD_SIZE from the environment), so the data of a rank
does not depend on how the process was launched and a rank's stream can be rebuilt in a test.
"""
from __future__ import annotations

import pickle
import random
import traceback
import warnings
import weakref
from functools import partial
from itertools import islice

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from gan.data.augment import augment_together
from gan.data.codec import (SampleDecodeError, decode_images, decode_label, derive_seed, image_members,
                            to_unit_range)
from gan.data.manifest import Manifest, ShardError, read_manifest
from gan.data.tario import tar_samples

_TAG_SHARDS, _TAG_SHUFFLE, _TAG_AUG, _TAG_LOADER = 11, 12, 13, 14
CHUNK_IMAGES = 256  # images per worker -> consumer message (see chunk_batches)


def split_by_rank(src, rank: int, world_size: int):
    """``wds.split_by_node`` with an explicit rank and world size."""
    yield from islice(src, rank, None, world_size) if world_size > 1 else src


def _zero() -> int:
    return 0


class WorkerLoader(torch.utils.data.DataLoader):
    """torch's DataLoader (what webdataset's WebLoader wraps) without its warning, at every epoch, that there
    are more workers than CPU cores: the run's banner says it once (gan.startup), and data.num_workers is
    the user's to choose (it is part of the data order, so it is not capped behind their back)."""

    def check_worker_number_rationality(self):
        pass


def _identity(x):
    return x


def decode_batch(samples: list[dict], m: Manifest) -> tuple[tuple[torch.Tensor, ...], list[int]]:
    """List of raw webdataset samples -> (images, list of B int labels): ``images`` holds one uint8
    (B, C, H, W) tensor per image of a sample (:func:`~gan.data.codec.image_members`: the image, or
    the input and the target of a pair). Errors name the sample."""
    exts = image_members(m.encoding, m.paired)
    bad, why = None, None
    for s in samples:
        if any(ext not in s for ext in exts) or "cls" not in s:
            want = ", ".join(f".{e}" for e in (*exts, "cls"))
            bad, why = s, f"missing one of its {want} members (has {sorted(k for k in s if not k.startswith('__'))})"
            break
        try:
            decode_label(s["cls"], m.num_classes)
        except ValueError as e:
            bad, why = s, str(e)
            break
    images = []
    for ext, shape in zip(exts, m.image_shapes) if bad is None else ():
        try:
            images.append(decode_images([s[ext] for s in samples], m.encoding, shape))
        except SampleDecodeError as e:
            bad, why = samples[e.index], f".{ext}: {e.reason}" if m.paired else e.reason
            break
    if bad is not None:
        raise ShardError(f"{bad.get('__url__')} sample {bad.get('__key__')}: {why}. Check the shards with "
                         f"`python -m data_shards verify {m.dir}` and rebuild them.")
    return tuple(images), [int(s["cls"]) for s in samples]


def parse_position(state: dict, batches_per_epoch: int) -> tuple[int, int]:
    """A stream's ``state_dict()`` ``{"epoch", "batch"}`` -> (epoch, batch), validated; a position past
    the end of an epoch (world or batch size changed) continues at the start of the next one."""
    try:
        epoch, batch = int(state["epoch"]), int(state["batch"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"data stream state must be {{'epoch': int, 'batch': int}}, got {state!r}") from None
    if epoch < 0 or batch < 0:
        raise ValueError(f"data stream state must be non-negative, got {state!r}")
    if batch >= batches_per_epoch:
        warnings.warn(f"data stream state {state!r} is past the end of an epoch of {batches_per_epoch} "
                      f"batches (was the world size or batch size changed?); continuing at epoch {epoch + 1}")
        epoch, batch = epoch + 1, 0
    return epoch, batch


def chunk_batches(batch_size: int, batches_per_epoch: int, workers: int) -> int:
    """Batches per worker message: about CHUNK_IMAGES images per message keeps the consumer's per-message
    cost (queue, pickling, shared-memory handles) small next to the images it carries; smaller when an
    epoch is too short to give every worker a chunk."""
    return max(1, min(-(-CHUNK_IMAGES // batch_size), batches_per_epoch // max(1, workers)))


class WorkerFailure:
    """An error raised in a loader worker, carried to the main process as a message and raised there as
    itself (its own type and message, e.g. a ShardError naming the shard), instead of torch's
    "Caught X in DataLoader worker process N ... Original Traceback" wrapper around it. The worker's
    traceback comes along as a note."""

    def __init__(self, error: Exception | None, text: str):
        self.error, self.text = error, text

    @classmethod
    def of(cls, e: Exception) -> "WorkerFailure":
        text = "".join(traceback.format_exception(e))
        try:
            pickle.loads(pickle.dumps(e))
        except Exception:  # an exception that can't travel: its type and message as text
            return cls(None, text)
        return cls(e, text)

    def reraise(self):
        info = f"raised in a data loader worker:\n{self.text}"
        if self.error is None:
            raise RuntimeError(f"data loader worker failed: {self.text.strip().splitlines()[-1]}")
        self.error.add_note(info)
        raise self.error


class _EpochChunks(IterableDataset):
    """One ``iter()`` = this worker's part of one epoch, as messages ``(epoch, j0, images, labels)``:
    ``images`` holds one uint8 (n*B, C, H, W) tensor per image of a sample (one, or a pair's input and
    target) with the augmented batches ``j0 .. j0+n-1``, ``labels`` a list of n*B ints.

    The epoch's batches are cut into chunks of ``k`` consecutive batches; worker ``w`` of ``W`` makes
    chunks ``w, w+W, ...`` from its own sample stream, and the in-order DataLoader hands the messages
    back round-robin, i.e. in batch order. The k-th ``iter()`` (in the main process, or in a persistent
    worker) is epoch ``start_epoch + k``; only the first one skips batches before ``start_batch``: they
    are read and shuffled but not decoded, and a chunk with nothing left comes out as
    ``(epoch, j, None, [])`` to keep the round-robin order.
    """

    def __init__(self, m: Manifest, cfg, batch_size: int, seed: int, rank: int, world_size: int,
                 batches_per_epoch: int, workers: int, start_epoch: int, start_batch: int):
        super().__init__()
        self.m, self.cfg, self.batch_size, self.seed = m, cfg, batch_size, seed
        self.rank, self.world_size, self.n = rank, world_size, batches_per_epoch
        self.start_epoch, self.start_batch = start_epoch, start_batch
        self.k = chunk_batches(batch_size, batches_per_epoch, workers)
        self._calls = 0

    def _pipeline(self, epoch: int, worker: int, n_batches: int):
        shuffle = None
        if self.cfg.shuffle_buffer > 1:
            rng = random.Random(derive_seed(self.seed, self.rank, epoch, worker, _TAG_SHUFFLE))
            shuffle = wds.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer, rng=rng)
        return wds.DataPipeline(
            wds.ResampledShards(self.m.paths, seed=derive_seed(self.seed, epoch, _TAG_SHARDS),
                                worker_seed=_zero, deterministic=True),
            partial(split_by_rank, rank=self.rank, world_size=self.world_size),
            wds.split_by_worker,
            tar_samples,
            shuffle,
            wds.batched(self.batch_size, collation_fn=None, partial=False),
        ).with_epoch(n_batches)

    def __iter__(self):
        if get_worker_info() is None:
            yield from self._messages()
            return
        try:
            yield from self._messages()
        except Exception as e:  # to the main process as a message, raised there as itself (WorkerFailure)
            yield WorkerFailure.of(e)

    def _messages(self):
        epoch = self.start_epoch + self._calls
        skip = self.start_batch if self._calls == 0 else 0
        self._calls += 1
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        chunks = [range(c * self.k, min((c + 1) * self.k, self.n))
                  for c in range(worker, -(-self.n // self.k), workers)]
        if not chunks:
            return
        batches = iter(self._pipeline(epoch, worker, sum(len(c) for c in chunks)))
        for chunk in chunks:
            parts, labels, j0 = [], [], None
            for j in chunk:
                samples = next(batches)
                if j < skip:
                    continue
                images, y = decode_batch(samples, self.m)
                g = torch.Generator().manual_seed(derive_seed(self.seed, self.rank, epoch, j, _TAG_AUG))
                parts.append(augment_together(images, g, hflip=self.cfg.hflip,
                                              color_jitter_strength=self.cfg.color_jitter,
                                              translate_fraction=self.cfg.translate))
                labels.extend(y)
                j0 = j if j0 is None else j0
            if j0 is None:
                yield epoch, chunk.start, None, []
            else:
                yield epoch, j0, tuple(p[0] if len(p) == 1 else torch.cat(p) for p in zip(*parts)), labels


class TrainStream:
    """Endless training batches for one rank: ``for x, y in stream`` (x float32 (B,C,H,W) in [-1, 1]
    with train augmentation from ``cfg``: ``hflip``, ``color_jitter``, ``translate``; y int64 (B,)).
    Paired shards (``stream.manifest.paired``) give ``for a, b, y in stream``: the input and target
    batches, each augmented with the same draws (the same flip, shift and jitter for both halves).

    Args:
        cfg: a ``DataConfig`` (``shards``, ``dataset``, ``num_workers``, ``shuffle_buffer``, augmentation).
        batch_size: per-rank batch size. seed: run seed. rank, world_size: this process's place.
        num_workers: overrides ``cfg.num_workers`` when given.

    Every rank yields the same ``batches_per_epoch = max(1, total // (world_size * batch_size))``
    batches per epoch. ``state_dict()`` is ``{"epoch", "batch"}`` (batches already yielded in that
    epoch); ``load_state_dict`` before iterating makes the next batches exactly those an uninterrupted
    stream would have yielded (same seed, rank, world_size, batch_size and num_workers).

    Do NOT pass the stream (or its loader) through ``accelerator.prepare``: it already splits the data
    by rank, and Accelerate would shard it a second time. Move batches to the device yourself.
    """

    def __init__(self, cfg, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int | None = None, prefetch_factor: int = 4):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.cfg = cfg
        self.manifest = read_manifest(cfg.shards)
        if cfg.dataset:
            self.manifest.check(dataset=cfg.dataset)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers = cfg.num_workers if num_workers is None else num_workers
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        self.prefetch_factor = prefetch_factor
        self.batches_per_epoch = max(1, self.manifest.total // (world_size * batch_size))
        self._epoch, self._batch = 0, 0
        self._gen = None

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batch": self._batch}

    def load_state_dict(self, state: dict) -> None:
        self._epoch, self._batch = parse_position(state, self.batches_per_epoch)

    def __iter__(self):
        self.close()
        gen = self._batches()
        self._gen = weakref.ref(gen)  # no reference cycle: dropping the iterator frees its workers at once
        return gen

    def close(self) -> None:
        """Stop the current iteration and its worker processes (dropping the iterator does the same)."""
        gen = self._gen() if self._gen is not None else None
        self._gen = None
        if gen is not None:
            gen.close()

    def _batches(self):
        ds = _EpochChunks(self.manifest, self.cfg, self.batch_size, self.seed, self.rank, self.world_size,
                          self.batches_per_epoch, self.num_workers, self._epoch, self._batch)
        if self.num_workers > 0:
            # A DataLoader draws its workers' base seed when its iterator is created: from the global
            # torch RNG unless given a generator. That draw would shift the noise of the training loop,
            # and differently in a resumed run (it creates the iterator after restoring the RNG state),
            # so exact resume needs a generator of the loader's own (every sample is seeded anyway).
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.rank, self._epoch, _TAG_LOADER))
            loader = WorkerLoader(ds, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                                  persistent_workers=True, prefetch_factor=self.prefetch_factor, generator=gen)
        else:
            loader = ds
        b = self.batch_size
        while True:
            got = 0
            for msg in loader:  # one epoch (the first one may start mid-way)
                if isinstance(msg, WorkerFailure):
                    msg.reraise()
                epoch, j0, images, labels = msg
                if images is None:
                    continue  # a chunk fast-forwarded after load_state_dict
                if (epoch, j0) != (self._epoch, self._batch):  # the round-robin contract was broken
                    raise RuntimeError(f"data stream out of order: got batch {j0} of epoch {epoch}, "
                                       f"expected {self._batch} of {self._epoch}")
                y = torch.tensor(labels, dtype=torch.int64)
                for i in range(len(labels) // b):
                    self._batch += 1
                    if self._batch == self.batches_per_epoch:
                        self._epoch, self._batch = self._epoch + 1, 0
                    got += 1
                    yield (*(to_unit_range(x[i * b:(i + 1) * b]) for x in images), y[i * b:(i + 1) * b])
            if got == 0:
                raise RuntimeError("data stream produced no batches in an epoch")
