"""Exponential moving average of the generator's weights (samples, evaluation and exports use it)."""
from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

from gan.config import EMAConfig

BN_BATCH = 256  # samples per forward pass when the EMA's BatchNorm statistics are recomputed


def _bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


class EMA:
    """Holds an eval-mode copy of G. Parameters follow ``ema = decay * ema + (1 - decay) * G`` after every
    G update. The decay comes from ``cfg.schedule``:

    - ``rampup`` (stylegan2-ada): a half-life of ``min(half_life_kimg * 1000, rampup * images_seen)``
      images, i.e. ``decay = 0.5 ** (images / half_life)`` for an update of ``images`` G images. The
      first update copies G, an early EMA trails G by a small fraction of training, and a late one
      averages over ``half_life_kimg``; the same settings mean the same thing at any batch size.
    - ``warmup``: ``min(decay, (1 + n) / (10 + n))`` for the first ``warmup_steps`` updates, then ``decay``.

    BatchNorm running statistics: with ``bn_inputs`` (argument tuples of the network, one per batch;
    the family's :meth:`gan.family.Family.bn_inputs`) they belong to the EMA's own weights: after
    updates, the first read of :attr:`model` or :meth:`state_dict` recomputes them exactly over those
    inputs (:func:`recompute_bn`), so they are a function of the averaged weights alone: no global
    RNG is drawn, every rank computes the same ones without a collective, and a resumed run reads what
    an uninterrupted one does. Statistics copied from G belong to G's current weights, and an early
    EMA sampled with them is worse than G (docs/benchmarks.md). Without ``bn_inputs`` they are copied
    from G after every update. Other buffers (spectral norm's power-iteration vectors) are always copied.

    It lives on every rank (identical there, since G's weights are), which keeps checkpoint loading
    symmetric and lets any rank sample without a broadcast. Its state (weights, updates, images seen)
    is checkpointed, so a resumed run continues the same schedule."""

    def __init__(self, model: nn.Module, cfg: EMAConfig, bn_inputs: Sequence[tuple] | None = None):
        self.cfg = cfg
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)  # weights as they stand (see model)
        self.num_updates = 0
        self.images_seen: int | None = 0  # G images before this update, all ranks; None: from an old checkpoint
        self.bn_inputs = list(bn_inputs) if bn_inputs is not None and _bn_layers(self.shadow) else None
        own = {id(b) for m in _bn_layers(self.shadow) for b in m.buffers(recurse=False)} if self.bn_inputs else set()
        self._copied = [i for i, b in enumerate(self.shadow.buffers()) if id(b) not in own]  # buffers taken from G
        self.stale = self.bn_inputs is not None  # the statistics do not (yet) belong to the weights

    @property
    def model(self) -> nn.Module:
        """The EMA network as every reader sees it (samples, evaluation, checkpoints, exports): its
        BatchNorm statistics recomputed for its current weights first if they changed since."""
        self.refresh()
        return self.shadow

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the BatchNorm statistics for the current weights, if updates made them stale. Not a
        collective; deterministic (fixed inputs, no RNG drawn, full precision wherever it is called from)."""
        if not self.stale:
            return
        device = next(self.shadow.parameters()).device
        with torch.autocast(device.type, enabled=False):
            recompute_bn(self.shadow, (tuple(a.to(device) for a in args) for args in self.bn_inputs))
        self.stale = False

    def half_life(self) -> float:
        """``rampup``: the half-life, in images, of the next update."""
        cap = self.cfg.half_life_kimg * 1000
        seen = self.images_seen or 0
        return min(cap, self.cfg.rampup * seen) if self.cfg.rampup > 0 else cap

    def decay_now(self, images: int) -> float:
        """The decay of the next update, which averages in ``images`` G images (the global batch)."""
        if self.cfg.schedule == "rampup":
            h = self.half_life()
            return 0.5 ** (images / h) if h > 0 else 0.0
        if self.num_updates < self.cfg.warmup_steps:
            return min(self.cfg.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.cfg.decay

    @torch.no_grad()
    def update(self, model: nn.Module, images: int) -> None:
        """One EMA step after a G update on ``images`` generated images (batch size x ranks)."""
        if images < 1:
            raise ValueError(f"images must be >= 1 (the G batch of this update, all ranks), got {images}")
        if self.images_seen is None:  # an old checkpoint counted updates only; the batch is fixed over a run
            self.images_seen = self.num_updates * images
        decay = self.decay_now(images)
        ema_p = [p for p in self.shadow.parameters()]
        src_p = [p.detach().to(e.dtype) for e, p in zip(ema_p, model.parameters())]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - decay)
        if self._copied:
            mine, src = list(self.shadow.buffers()), list(model.buffers())
            torch._foreach_copy_([mine[i] for i in self._copied], [src[i] for i in self._copied])
        self.stale = self.bn_inputs is not None
        self.num_updates += 1
        self.images_seen += images

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates, "images_seen": self.images_seen}

    def load_state_dict(self, state: dict) -> None:
        self.shadow.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
        seen = state.get("images_seen")  # absent in checkpoints written before the count was kept
        self.images_seen = None if seen is None else int(seen)
        self.stale = self.bn_inputs is not None  # recomputed on the next read: older checkpoints hold G's


@torch.no_grad()
def recompute_bn(model: nn.Module, inputs: Iterable[tuple]) -> bool:
    """Replace the BatchNorm running statistics of ``model`` by the exact (cumulative) mean and variance
    over forward passes on ``inputs`` (each an argument tuple), as torch.optim.swa_utils.update_bn does:
    statistics that belong to ``model``'s own weights, e.g. averaged ones. Only the BatchNorm layers run
    in train mode; the model's modes and momenta are restored. Returns False (and runs nothing) when the
    model has no BatchNorm with running statistics."""
    bns = _bn_layers(model)
    if not bns:
        return False
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in bns}
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches
        bn.train()
    try:
        for args in inputs:
            model(*args)
    finally:
        for m, training in modes.items():
            m.train(training)
        for bn, momentum in momenta.items():
            bn.momentum = momentum
    return True
