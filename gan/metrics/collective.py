"""Evaluation across ranks: generation split over ranks and gathered to rank 0, work done on rank 0
while the others wait, and the outcome (or rank 0's error) handed to every rank.

Every function here is a collective when ``torch.distributed`` is initialised with more than one
process: every rank must call it, in the same order. Nothing here may sit in a rank-0-only branch.
"""
from __future__ import annotations

import datetime as _dt
import os
import pickle

import torch
import torch.distributed as dist

from gan.dist import world_size
from gan.viz import to_uint8

# How long the other ranks wait for rank 0's metric computation (real-data features on a CPU can take
# hours the first time). They wait in a gloo group of their own, so NCCL's watchdog is not involved.
WAIT_S = float(os.environ.get("GAN_METRICS_WAIT_S", 6 * 3600))
_groups: dict = {}


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def _wait_group():
    world = dist.group.WORLD
    key = id(world)
    if key not in _groups:  # collective: every rank creates it at the same call
        _groups.clear()
        _groups[key] = dist.new_group(backend="gloo", timeout=_dt.timedelta(seconds=WAIT_S))
    return _groups[key]


def on_rank0(fn, *args, **kwargs):
    """Collective. Run ``fn`` on rank 0 only; every rank returns its result (which must pickle),
    or raises rank 0's exception (the same type where it can be sent, else RuntimeError)."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    group = _wait_group()
    payload = [None]
    error = None
    if dist.get_rank() == 0:
        try:
            payload[0] = ("ok", fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - handed to every rank, then re-raised
            error = e
            try:
                pickle.dumps(e)
                payload[0] = ("error", e)
            except Exception:  # noqa: BLE001
                payload[0] = ("error", RuntimeError(f"{type(e).__name__}: {e}"))
    dist.broadcast_object_list(payload, src=0, group=group)
    kind, value = payload[0]
    if kind == "error":
        if error is not None:
            raise error
        raise value
    return value


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """0, 1, ..., C-1, 0, 1, ...: every class gets n // C or n // C + 1 samples."""
    return torch.arange(n) % num_classes


def eval_noise(n: int, z_dim: int, seed: int) -> torch.Tensor:
    """The same (n, z_dim) noise on every rank and for every world size."""
    return torch.randn(n, z_dim, generator=torch.Generator().manual_seed(seed))


def rank_range(n: int, r: int, w: int) -> tuple[int, int]:
    per = -(-n // w)
    return min(r * per, n), min((r + 1) * per, n)


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


@torch.no_grad()
def generate_gathered(G: torch.nn.Module, n: int, z_dim: int, num_classes: int, seed: int, batch_size: int,
                      device, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Collective. ``n`` class-balanced samples of G, split over the ranks in contiguous slices and
    gathered (in chunks of ``batch_size``, so memory stays bounded) to rank 0, which gets
    ``(uint8 images (n, C, H, W), labels (n,))`` in index order; the other ranks get None.
    Sample i uses noise row i and class i % num_classes whatever the world size."""
    z, y = eval_noise(n, z_dim, seed), balanced_labels(n, num_classes)
    w = world_size()
    if w == 1:
        return generate(G, z, y, batch_size, device, progress), y
    from tqdm import tqdm

    r = dist.get_rank()
    lo, hi = rank_range(n, r, w)
    per = -(-n // w)
    chunks = -(-per // batch_size)
    out = None
    for k in tqdm(range(chunks), desc=f"generate ({w} ranks)", unit="batch", disable=not progress or r != 0,
                  dynamic_ncols=True):
        a, b = min(lo + k * batch_size, hi), min(lo + (k + 1) * batch_size, hi)
        part = G(z[a:b].to(device), y[a:b].to(device)).float() if b > a else None
        if part is None:  # keep the collective shape-uniform: a dummy forward gives C, H, W
            part = G(z[:1].to(device), y[:1].to(device)).float()[:0]
        img = ((part.clamp(-1, 1) + 1) * 127.5).round_().to(torch.uint8)
        buf = torch.zeros((batch_size, *img.shape[1:]), dtype=torch.uint8, device=img.device)
        buf[:len(img)] = img
        bufs = [torch.empty_like(buf) for _ in range(w)]
        dist.all_gather(bufs, buf)
        if r == 0:
            if out is None:
                out = torch.empty((n, *img.shape[1:]), dtype=torch.uint8)
            for src in range(w):
                slo, shi = rank_range(n, src, w)
                sa, sb = min(slo + k * batch_size, shi), min(slo + (k + 1) * batch_size, shi)
                if sb > sa:
                    out[sa:sb] = bufs[src][:sb - sa].cpu()
    return (out, y) if r == 0 else None
