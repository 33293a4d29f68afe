"""Optimizers and learning-rate schedules, built from ``OptimConfig``; the same objects serve every
backend (DDP wraps them with Accelerate, DeepSpeed's ZeRO partitions their state).

Schedules are ``torch.optim.lr_scheduler.LambdaLR`` objects stepped once per training step (the GAN:
both networks follow the G step count, whatever ``optim.n_dis`` is). LambdaLR computes the rate in closed form from
the step count alone; the chained classes (StepLR, ExponentialLR) multiply the optimizer's current
rate, which a resume would have to restore bit for bit from each backend's optimizer format.
"""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler


def build_optimizer(params, o, lr: float, betas) -> torch.optim.Optimizer:
    """Adam and AdamW use the fused kernels (CUDA and CPU): one launch per step, and a non-finite
    update can be skipped on the device (see gan.backends). RMSprop has no fused kernel: foreach."""
    if o.name in ("adam", "adamw"):
        cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, betas=tuple(betas), eps=o.eps, weight_decay=o.weight_decay, fused=True)
    return torch.optim.RMSprop(params, lr=lr, eps=o.eps, weight_decay=o.weight_decay, foreach=True)


def is_fused(opt: torch.optim.Optimizer) -> bool:
    """True for the fused Adam/AdamW kernels, which honour ``found_inf`` on the device (a step with
    found_inf=1 changes neither the weights nor the moments nor the step count)."""
    return isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)) and bool(opt.defaults.get("fused"))


def lr_factor(o, max_steps: int):
    """The LR multiplier as a function of the G step, for ``optim.lr_schedule``."""
    start, span = o.lr_decay_start, max(1, max_steps - o.lr_decay_start)
    if o.lr_schedule == "linear":
        return lambda s: 1.0 if s < start else max(0.0, 1.0 - (s - start) / span)
    if o.lr_schedule == "cosine":
        return lambda s: 1.0 if s < start else 0.5 * (1.0 + math.cos(math.pi * min(1.0, (s - start) / span)))
    if o.lr_schedule == "step":
        return lambda s: o.lr_gamma ** (s // o.lr_step_every)
    if o.lr_schedule == "exponential":
        return lambda s: o.lr_gamma ** (s / o.lr_step_every)
    return lambda s: 1.0


def build_scheduler(opt: torch.optim.Optimizer, o, max_steps: int) -> LRScheduler:
    """The schedule for ``opt`` (the plain torch optimizer, not a wrapper: Accelerate would step a
    prepared scheduler once per process, DeepSpeed once per engine step, i.e. n_dis times per G step)."""
    return LambdaLR(opt, lr_factor(o, max_steps))


def apply_config(optimizers: dict, schedulers: dict, o, specs: dict) -> None:
    """After a resume: the config's learning rates, betas, eps and weight decay replace those restored
    with the optimizers and schedules (the schedule's factor comes from the config already), so a value
    given on resume takes effect, as config.yaml says. Unchanged values give the same floats.
    ``optimizers``: the plain torch optimizers by net (under ZeRO their groups are the engines');
    ``specs``: each net's learning rate and betas from the config (gan.family.OptimSpec)."""
    for net, opt in optimizers.items():
        sched, lr, betas = schedulers[net], specs[net].lr, specs[net].betas
        sched.base_lrs = [lr] * len(opt.param_groups)
        for group, factor in zip(opt.param_groups, sched.lr_lambdas):
            group.update(initial_lr=lr, lr=lr * factor(sched.last_epoch), eps=o.eps, weight_decay=o.weight_decay)
            if "betas" in group:
                group["betas"] = tuple(betas)
        sched._last_lr = [group["lr"] for group in opt.param_groups]
