"""Evaluation across ranks: each rank generates and measures its own contiguous slice of the samples,
and only statistics cross ranks (float64 sums, or feature rows where a metric needs the samples
themselves). No rank computes while the others wait.

Every function here that says "collective" must be called by every rank, in the same order; nothing
here may sit in a rank-0-only branch. A rank that dies or stalls in one of them ends every other rank
with :class:`gan.dist.PeerError` (after the process group's timeout, ``train.collective_timeout``).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.distributed as dist

from gan.dist import PeerError, peer_failure, world_size
from gan.viz import to_uint8


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """0, 1, ..., C-1, 0, 1, ...: every class gets n // C or n // C + 1 samples."""
    return torch.arange(n) % num_classes


def eval_noise(n: int, z_dim: int, seed: int) -> torch.Tensor:
    """The same (n, z_dim) noise on every rank and for every world size."""
    return torch.randn(n, z_dim, generator=torch.Generator().manual_seed(seed))


def rank_range(n: int, r: int, w: int) -> tuple[int, int]:
    per = -(-n // w)
    return min(r * per, n), min((r + 1) * per, n)


def my_range(n: int) -> tuple[int, int]:
    """This rank's contiguous slice [lo, hi) of ``n`` items (rank order = index order)."""
    return rank_range(n, rank(), world_size())


@torch.no_grad()
def generate(G: torch.nn.Module, z: torch.Tensor, y: torch.Tensor, batch_size: int, device,
             progress: bool = False) -> torch.Tensor:
    """uint8 (N, C, H, W) on the CPU from G(z, y) (output in [-1, 1])."""
    from tqdm import tqdm

    out = []
    for zb, yb in tqdm(list(zip(z.split(batch_size), y.split(batch_size))), desc="generate", unit="batch",
                       disable=not progress, dynamic_ncols=True):
        out.append(to_uint8(G(zb.to(device), yb.to(device)).float()))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8)


def generate_slice(G: torch.nn.Module, n: int, z_dim: int, num_classes: int, seed: int, batch_size: int,
                   device, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Not a collective. This rank's slice of ``n`` class-balanced samples of G: ``(uint8 images, labels)``.
    Sample i uses noise row i and class i % num_classes whatever the world size, so the slices of all
    ranks, in rank order, are the samples one process would draw."""
    lo, hi = my_range(n)
    z, y = eval_noise(n, z_dim, seed)[lo:hi], balanced_labels(n, num_classes)[lo:hi]
    return generate(G, z, y, batch_size, device, progress and rank() == 0), y


# ---------------------------------------------------------------------------- exchanging statistics


def _device() -> torch.device:
    """Where a collective's tensors must live: the GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def peer_errors():
    """A collective that failed because another rank died or stalled raises :class:`PeerError`, in words."""
    try:
        yield
    except RuntimeError as e:
        why = peer_failure(e) if world_size() > 1 else None
        if why is None or isinstance(e, PeerError):
            raise
        raise PeerError(f"rank {rank()} during evaluation: {why}. The other rank's log says why. "
                        f"[{str(e).splitlines()[0]}]") from None


def everywhere(fn, *args, **kwargs):
    """Collective. Run ``fn`` on every rank; if it raised on any rank, raise on every rank: a rank's own
    exception where it failed, else a :class:`MetricError` naming the rank and its error. Local work
    (file checks, feature extraction) goes through here, so that no rank enters a collective that a
    failed rank will never join."""
    from gan.metrics.errors import MetricError

    error, out = None, None
    try:
        out = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - shared with every rank, then re-raised
        error = e
    if world_size() == 1:
        if error is not None:
            raise error
        return out
    mine = None if error is None else f"{type(error).__name__}: {error}"
    every = [None] * world_size()
    with peer_errors():
        dist.all_gather_object(every, mine)
    if error is not None:
        raise error
    failed = [(r, msg) for r, msg in enumerate(every) if msg is not None]
    if failed:
        r, msg = failed[0]
        raise MetricError(f"evaluation failed on rank {r}: {msg}")
    return out


def all_sum(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Collective. Every array summed over the ranks in float64, in one all-reduce. Every rank must pass
    the same keys and shapes; every rank gets the same sums."""
    keys = sorted(arrays)
    flat = [np.asarray(arrays[k], np.float64) for k in keys]
    if world_size() == 1:
        return dict(zip(keys, flat))
    buf = torch.from_numpy(np.concatenate([a.ravel() for a in flat]) if flat else np.zeros(0))
    buf = buf.to(_device())
    with peer_errors():
        dist.all_reduce(buf)
    buf = buf.cpu().numpy()
    out, at = {}, 0
    for k, a in zip(keys, flat):
        out[k] = buf[at:at + a.size].reshape(a.shape)
        at += a.size
    return out


def all_rows(x: np.ndarray) -> np.ndarray:
    """Collective. The rows of every rank's ``x`` (N_r, ...) concatenated in rank order (dtype kept;
    row counts may differ). For metrics that need the samples themselves (IS, KID, precision/recall)."""
    x = np.ascontiguousarray(x)
    w = world_size()
    if w == 1:
        return x
    dev = _device()
    with peer_errors():
        counts = torch.tensor([len(x)], dtype=torch.int64, device=dev)
        every = [torch.zeros_like(counts) for _ in range(w)]
        dist.all_gather(every, counts)
        counts = [int(c) for c in every]
        buf = torch.zeros((max(counts), *x.shape[1:]), dtype=torch.from_numpy(x[:0]).dtype, device=dev)
        buf[:len(x)] = torch.from_numpy(x).to(dev)
        bufs = [torch.empty_like(buf) for _ in range(w)]
        dist.all_gather(bufs, buf)
    return np.concatenate([b[:c].cpu().numpy() for b, c in zip(bufs, counts)])
