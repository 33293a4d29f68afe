"""``data.on_device=true``: the whole uint8 data set on the training device, batches made there.

A GPU consumes images faster than CPU workers decode them (docs/benchmarks.md, "On-device loader").
For a data set that fits in device memory (CIFAR-10 is 150 MB as uint8), :class:`DeviceStream` reads
every shard once, keeps the images as one uint8 (N, C, H, W) tensor on the device, and per batch does
an index_select, the train augmentation (flip, translation, colour jitter: gan/data/augment.py, on
the device) and the scaling to [-1, 1] there. Nothing crosses the PCIe bus per batch but a few
hundred random numbers.

Its contract is :class:`~gan.data.stream.TrainStream`'s: per-rank batches, the same
``batches_per_epoch = max(1, total // (world_size * batch_size))`` on every rank, ``state_dict()`` =
``{"epoch", "batch"}``, and after ``load_state_dict`` the next batches are exactly those an
uninterrupted stream would have yielded. Epoch ``e`` is one seeded permutation of all N samples
(the same on every rank; several concatenated when an epoch needs more than N); sample ``i`` of it
goes to rank ``i % world_size`` (the shard stream splits its shard sequence the same way), so the ranks
see disjoint samples within an epoch. Batch ``j`` of epoch ``e`` is a function of (seed, rank,
world_size, batch_size, e, j) only. The batches differ from TrainStream's (that one shuffles shards
and a buffer, this one the whole set), so switching loaders on resume keeps the position, not the order.

A data set larger than ``data.on_device_budget`` of the device's free memory is refused with a
:class:`~gan.config.ConfigError` before anything is read (:func:`check_fits`).
"""
from __future__ import annotations

import os

import torch

from gan.data.augment import augment_together
from gan.data.codec import derive_seed, to_unit_range
from gan.data.manifest import Manifest, ShardError, read_manifest
from gan.data.stream import _TAG_AUG, decode_batch, parse_position
from gan.data.tario import tar_samples

_TAG_PERM = 15  # stream.py uses 11-14
_LOAD_CHUNK = 4096


def expected_device() -> torch.device:
    """The device an Accelerate process of this launch will train on (for checks before it exists)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: the CUDA allocator's view, or the host's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def dataset_bytes(m: Manifest) -> int:
    return m.total * (sum(c * h * w for c, h, w in m.image_shapes) + 8)  # uint8 pixels + an int64 label


def check_fits(m: Manifest, device, budget: float, free: int | None = None) -> int:
    """Raise ConfigError unless the uint8 data set fits in ``budget`` of ``device``'s free memory; return its bytes."""
    from gan.config import ConfigError

    need = dataset_bytes(m)
    free = free_memory(torch.device(device)) if free is None else free
    if need > budget * free:
        shapes = " + ".join("x".join(map(str, s)) for s in m.image_shapes)
        raise ConfigError(
            f"config key 'data.on_device': the data set in {m.dir} ({m.total:,} samples of {shapes}, "
            f"{need / 2**20:,.1f} MiB as uint8) does not fit in data.on_device_budget={budget:g} of the "
            f"{free / 2**20:,.1f} MiB free on {device}. Set data.on_device=false (the worker loader streams from "
            f"disk), build smaller shards (--max-images, a lower --resolution), or raise data.on_device_budget "
            f"if the model needs less memory")
    return need


def load_images(m: Manifest) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Every sample of the shard set in manifest order, on the CPU: one uint8 (N, C, H, W) tensor per image
    of a sample (the image, or a pair's input and target) and the int64 (N,) labels."""
    images = tuple(torch.empty((m.total, *shape), dtype=torch.uint8) for shape in m.image_shapes)
    labels = torch.empty(m.total, dtype=torch.int64)
    n, chunk = 0, []

    def flush():
        nonlocal n
        if n + len(chunk) > m.total:
            raise ShardError(f"shards in {m.dir} hold more samples than the manifest's total {m.total}: check them "
                             f"with `python -m data_shards verify {m.dir}` and rebuild")
        xs, y = decode_batch(chunk, m)
        for into, x in zip(images, xs):
            into[n:n + len(y)] = x
        labels[n:n + len(y)] = torch.tensor(y, dtype=torch.int64)
        n += len(y)
        chunk.clear()

    for sample in tar_samples({"url": p} for p in m.paths):
        chunk.append(sample)
        if len(chunk) == _LOAD_CHUNK:
            flush()
    if chunk:
        flush()
    if n != m.total:
        raise ShardError(f"shards in {m.dir} hold {n} samples, the manifest says {m.total}: check them with "
                         f"`python -m data_shards verify {m.dir}` and rebuild")
    return images, labels


class DeviceStream:
    """Endless training batches for one rank from a device-resident copy of the data set (see the
    module docstring): ``for x, y in stream`` gives x float32 (B, C, H, W) in [-1, 1] and y int64 (B,),
    both on ``device`` (paired shards: ``for a, b, y``, both halves augmented alike, as TrainStream's).
    Same constructor arguments as TrainStream plus ``device`` (no workers)."""

    def __init__(self, cfg, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.cfg, self.device = cfg, torch.device(device)
        self.manifest = read_manifest(cfg.shards)
        if cfg.dataset:
            self.manifest.check(dataset=cfg.dataset)
        self.nbytes = check_fits(self.manifest, self.device, cfg.on_device_budget)  # before reading anything
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.batches_per_epoch = max(1, self.manifest.total // (world_size * batch_size))
        images, labels = load_images(self.manifest)
        *inputs, images = (x.to(self.device) for x in images)
        self.inputs = inputs[0] if inputs else None  # paired shards: the inputs; self.images: the targets
        self.images, self.labels = images, labels.to(self.device)
        self._epoch, self._batch = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batch": self._batch}

    def load_state_dict(self, state: dict) -> None:
        self._epoch, self._batch = parse_position(state, self.batches_per_epoch)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for ``epoch``, batch after batch (batches_per_epoch * batch_size)."""
        n, need = self.manifest.total, self.world_size * self.batches_per_epoch * self.batch_size
        perms = [torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch, k, _TAG_PERM)))
                 for k in range(-(-need // n))]
        return torch.cat(perms)[:need][self.rank::self.world_size].to(self.device)

    def __iter__(self):
        b, cfg = self.batch_size, self.cfg
        order_epoch, order = None, None
        while True:
            epoch, j = self._epoch, self._batch
            if order_epoch != epoch:
                order_epoch, order = epoch, self.epoch_indices(epoch)
            idx = order[j * b:(j + 1) * b]
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.rank, epoch, j, _TAG_AUG))
            every = (self.images,) if self.inputs is None else (self.inputs, self.images)
            xs = augment_together(tuple(x.index_select(0, idx) for x in every), g, hflip=cfg.hflip,
                                  color_jitter_strength=cfg.color_jitter, translate_fraction=cfg.translate)
            y = self.labels.index_select(0, idx)
            self._batch += 1  # the position of the next batch, as TrainStream keeps it
            if self._batch == self.batches_per_epoch:
                self._epoch, self._batch = epoch + 1, 0
            yield (*(to_unit_range(x) for x in xs), y)

    def close(self) -> None:
        """Nothing to stop (no workers); the data stay on the device until the stream is dropped."""


def train_stream(cfg, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu"):
    """The training stream ``cfg`` asks for: DeviceStream with ``data.on_device``, else TrainStream."""
    if getattr(cfg, "on_device", False):
        return DeviceStream(cfg, batch_size, seed=seed, rank=rank, world_size=world_size, device=device)
    from gan.data.stream import TrainStream

    return TrainStream(cfg, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
