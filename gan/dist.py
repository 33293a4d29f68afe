"""Rank helpers and cross-rank statistics.

Statistics are reported anywhere during a step, accumulated on the device without host syncs,
and reduced once per log interval with a single all-reduce that every rank joins.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_(t: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce that is a no-op in a single process. Every rank must call it."""
    if world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (a collective: call on every rank)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_(t, dist.ReduceOp.MAX).item() > 0) if world_size() > 1 else flag


class Stats:
    """``report(name, value)`` anywhere; ``reduce()`` on every rank returns the mean per name
    over all reports on all ranks since the last reduce, then starts over."""

    def __init__(self, device: torch.device):
        self.device = device
        self._sum: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device, dtype=torch.float64))
        self._count: dict[str, int] = defaultdict(int)

    def report(self, name: str, value) -> None:
        v = value.detach().to(self.device, torch.float64) if torch.is_tensor(value) else torch.tensor(
            float(value), device=self.device, dtype=torch.float64)
        self._sum[name] += v.mean() if v.ndim else v
        self._count[name] += 1

    def reduce(self) -> dict[str, float]:
        names = sorted(self._sum)
        if not names and world_size() == 1:
            return {}
        packed = torch.stack([torch.stack([self._sum[n] for n in names]) if names else torch.zeros(0, device=self.device, dtype=torch.float64),
                              torch.tensor([float(self._count[n]) for n in names], device=self.device, dtype=torch.float64)])
        all_reduce_(packed)
        packed = packed.cpu()
        self._sum.clear()
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
        raise RuntimeError(f"DDP replicas diverged: {', '.join(bad)} differ between ranks")


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
