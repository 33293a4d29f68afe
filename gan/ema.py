"""Exponential moving average of the generator's weights (samples and evaluation use it)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from gan.config import EMAConfig


class EMA:
    """Holds an eval-mode copy of G. Parameters follow ``decay``; buffers (BatchNorm statistics)
    are copied. During warm-up the decay ramps as ``min(decay, (1 + n) / (10 + n))`` so the early,
    random weights are forgotten quickly. It lives on every rank (identical there, since G's weights
    are), which keeps checkpoint loading symmetric and lets any rank sample without a broadcast."""

    def __init__(self, model: nn.Module, cfg: EMAConfig):
        self.cfg = cfg
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0

    def decay_now(self) -> float:
        if self.num_updates < self.cfg.warmup_steps:
            return min(self.cfg.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.cfg.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.decay_now()
        ema_p = [p for p in self.model.parameters()]
        src_p = [p.detach().to(e.dtype) for e, p in zip(ema_p, model.parameters())]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - decay)
        buffers = list(self.model.buffers())
        if buffers:
            torch._foreach_copy_(buffers, list(model.buffers()))
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
