"""Rank helpers and cross-rank statistics.

Statistics are reported anywhere during a step, accumulated on the device without host syncs,
and reduced once per log interval with a single all-reduce that every rank joins.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections import defaultdict

import torch
import torch.distributed as dist

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_(t: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce that is a no-op in a single process. Every rank must call it."""
    if world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """For each flag: True on every rank if it is true on any rank (a collective: call on every rank)."""
    if world_size() == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    return [v > 0 for v in all_reduce_(t, dist.ReduceOp.MAX).tolist()]


def same_on_all_ranks(value: int, device: torch.device) -> bool:
    """True on every rank if ``value`` is the same on all ranks (a collective: call on every rank)."""
    if world_size() == 1:
        return True
    t = torch.tensor([float(value), -float(value)], device=device, dtype=torch.float64)
    all_reduce_(t, dist.ReduceOp.MAX)
    return t[0].item() == -t[1].item()


class Stats:
    """``report(name, value)`` anywhere; ``reduce()`` on every rank returns the mean per name
    over all reports on all ranks since the last reduce, then starts over. A report launches no
    GPU work and never waits: tensors are kept as they are and summed in ``reduce`` (a few kernels
    per name per log interval), Python numbers are summed on the host."""

    def __init__(self, device: torch.device):
        self.device = device
        self._dev: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._host: dict[str, float] = defaultdict(float)
        self._count: dict[str, int] = defaultdict(int)

    def report(self, name: str, value) -> None:
        if torch.is_tensor(value):
            self._dev[name].append(value.detach())
        else:
            self._host[name] += float(value)
        self._count[name] += 1

    def _device_sum(self, name: str) -> torch.Tensor:
        values = [t if t.ndim == 0 else t.float().mean() for t in self._dev.get(name, ())]
        if not values:
            return torch.zeros((), device=self.device, dtype=torch.float64)
        return torch.stack([t.to(self.device, torch.float64) for t in values]).sum()

    def reduce(self) -> dict[str, float]:
        names = sorted(self._count)
        if not names and world_size() == 1:
            return {}
        dev = torch.stack([self._device_sum(n) for n in names]) if names else \
            torch.zeros(0, device=self.device, dtype=torch.float64)
        host = torch.tensor([[self._host.get(n, 0.0) for n in names], [float(self._count[n]) for n in names]],
                            dtype=torch.float64).reshape(2, len(names))
        packed = torch.stack([dev, torch.zeros_like(dev)]) + host.to(self.device)
        all_reduce_(packed)
        packed = packed.cpu()
        self._dev.clear()
        self._host.clear()
        self._count.clear()
        return {n: float(packed[0, i] / packed[1, i]) for i, n in enumerate(names) if packed[1, i] > 0}


def checksum(module: torch.nn.Module) -> torch.Tensor:
    """Exact integer checksum of every parameter and buffer's bytes (any bit flip changes it)."""
    total = torch.zeros((), dtype=torch.int64)
    for t in list(module.parameters()) + list(module.buffers()):
        data = t.detach().contiguous().cpu().view(-1)
        if data.element_size() % 4 == 0:
            words = data.view(torch.int32).to(torch.int64)
        else:
            words = data.view(torch.uint8).to(torch.int64)
        total += (words * torch.arange(1, words.numel() + 1, dtype=torch.int64) % 1_000_003).sum()
    return total


def check_replicas(modules: dict[str, torch.nn.Module], device: torch.device) -> None:
    """Collective. Raise on every rank if any module's weights differ between ranks."""
    if world_size() == 1:
        return
    local = torch.stack([checksum(m) for m in modules.values()]).to(device)
    lo, hi = local.clone(), local.clone()
    dist.all_reduce(lo, dist.ReduceOp.MIN)
    dist.all_reduce(hi, dist.ReduceOp.MAX)
    bad = [name for name, a, b in zip(modules, lo.tolist(), hi.tolist()) if a != b]
    if bad:
        raise RuntimeError(f"replicas diverged: {', '.join(bad)} differ between ranks")


def broadcast_buffers(modules: list[torch.nn.Module]) -> None:
    """Collective. Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP runs with ``broadcast_buffers=False`` (D sees real and fake batches in two forwards before
    one backward; a broadcast in between would rewrite statistics autograd saved). Running statistics
    matter only in eval mode, so they are made identical here, before checkpoints and evaluation."""
    if world_size() == 1:
        return
    for m in modules:
        for b in m.buffers():
            dist.broadcast(b.data, src=0)


def end_with_launcher(sig: int = signal.SIGTERM) -> bool:
    """Linux, in a process started by a launcher (torchrun, ``accelerate launch``): have the kernel send
    ``sig`` to this process when the launcher dies (``prctl(PR_SET_PDEATHSIG)``), so a ``kill -9`` of the
    launcher can't leave its workers training as orphans. SIGTERM makes the trainer checkpoint and exit
    (gan.stopping.StopRequest). Returns whether it is armed."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os.kill(os.getpid(), sig)
    return True


class PeerError(RuntimeError):
    """A collective failed because another rank stalled or died: the message says which and what next."""


def as_peer_error(e: BaseException, rank: int, step: int, timeout: float) -> PeerError | None:
    """A failed collective in words for every rank's log (and status.json), not as a gloo/NCCL trace;
    None for any other error."""
    why = peer_failure(e) if world_size() > 1 else None
    if why is None:
        return None
    return PeerError(f"rank {rank} at step {step}: {why} (train.collective_timeout={timeout:g} s). The other "
                     f"rank's log says why; then --resume auto continues from the last checkpoint. "
                     f"[{str(e).splitlines()[0]}]")


def peer_failure(e: BaseException) -> str | None:
    """What a failed collective says about the other ranks (gloo and NCCL raise RuntimeErrors that say it
    in words), or None for any other error."""
    text = str(e).lower()
    if not isinstance(e, RuntimeError):
        return None
    if "timed out" in text or "timeout" in text:
        return "another rank stalled (a collective timed out after train.collective_timeout)"
    if "connection closed by peer" in text or "connection reset by peer" in text or "broken pipe" in text:
        return "another rank died (its connection closed)"
    return None
