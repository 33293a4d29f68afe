"""The optimizer step as a backend: one object per strategy, chosen at build time by
``train.backend``. A backend wraps a family's named networks (a dict: the GAN's G and D), owns
zero_grad/backward/unscale/clip/step, tells the trainer what happened to each update
(:class:`Update`), and saves/loads whatever its engines keep outside Accelerate's ``save_state``.
The non-finite *policy* (skip or stop, counts, messages) is :mod:`gan.guard`'s, in one place, for every backend.

- :class:`DDPBackend`: Accelerate's DDP, AMP (fp16 GradScaler / bf16 autocast), fused Adam whose
  non-finite updates are skipped on the device without a host sync.
- :class:`DeepSpeedBackend`: one ZeRO-1/2 engine per network, built with ``deepspeed.initialize``.

Why ``deepspeed.initialize`` and not Accelerate's multiple-plugin API: two engines are first class
there (each keeps its own backward/step), the plain Accelerator keeps doing what it does for DDP
(process group, device, RNG and custom-object checkpointing) and is identical for both backends,
the CPU (gloo) keeps working for CPU tests, and neither ``transformers`` (Accelerate's
plugin selection imports it) nor an API Accelerate marks experimental is needed; ``accelerator.backward``
would drive only the last prepared engine anyway.

``frozen(name)`` serves a phase that trains one network through another (the GAN's G phase through D).
The G phase under DeepSpeed runs D's plain module, frozen, not D's engine: an engine's forward
registers backward hooks that start *its* ZeRO gradient reduction, so ``G_engine.backward(D_engine(G(z)))``
would run D's reduction machinery inside G's backward (the cross-engine trouble of deepspeed #4923).
D's weights need no gradient there; its input gradient is all G needs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from pathlib import Path

import torch

from gan.config import Config, ConfigError
from gan.optim import build_optimizer, is_fused


@dataclasses.dataclass
class Update:
    """What one optimizer update did. ``nonfinite`` is 1 when a non-finite gradient kept the update
    from being applied: a device tensor (DDP with fused Adam: read once per log interval) or an int.
    ``fp16_skipped`` is None unless fp16 loss scaling is on; then True when the scaler skipped it."""
    gnorm: torch.Tensor | float
    nonfinite: torch.Tensor | int = 0
    too_large: torch.Tensor | int = 0  # skipped for a gradient norm above train.max_grad_norm
    fp16_skipped: bool | None = None
    diverged: bool = False  # above train.max_grad_norm and already applied or not skippable: stop


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """D's weights need no gradients in the G phase (its input gradient is all G needs)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


class DDPBackend:
    """Accelerate's DDP with AMP. Fused Adam/AdamW skip a non-finite update on the device (no host
    sync); RMSprop checks on the host; under fp16 Accelerate's shared GradScaler skips overflows."""

    name = "ddp"

    def __init__(self, cfg: Config, accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        self.nets: dict[str, torch.nn.Module] = {}  # prepared (DDP-wrapped)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}  # plain torch optimizers (schedules)
        self.specs: dict = {}  # name -> gan.family.OptimSpec (re-applied on resume)
        self._prepared: dict[str, tuple] = {}

    def prepare(self, nets: dict[str, torch.nn.Module], specs: dict) -> dict[str, torch.nn.Module]:
        """Wrap every network and build its optimizer from ``specs[name]`` (gan.family.OptimSpec).
        One ``accelerator.prepare`` call, networks then optimizers in ``nets``' order: that order
        numbers Accelerate's checkpoint files (model.safetensors, model_1.safetensors, optimizer.bin, ...)."""
        names = list(nets)
        opts = [build_optimizer(nets[n].parameters(), self.cfg.optim, specs[n].lr, specs[n].betas) for n in names]
        prepared = self.accelerator.prepare(*(nets[n] for n in names), *opts)
        self.nets, self.specs = dict(zip(names, prepared[:len(names)])), dict(specs)
        self.optimizers = dict(zip(names, opts))
        self._prepared = {n: (self.nets[n], p) for n, p in zip(names, prepared[len(names):])}
        return self.nets

    def frozen(self, net: str):
        """Network ``net``, frozen and without DDP's gradient sync, for a phase that trains another
        network through it (the GAN's G phase through D)."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.accelerator.no_sync(self.nets[net]))
        stack.enter_context(frozen(self.nets[net]))
        return _Yield(stack, self.nets[net])

    def update(self, net: str, loss: torch.Tensor, max_grad_norm: float = 0.0) -> Update:
        model, opt = self._prepared[net]
        acc = self.accelerator
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.unscale_gradients(opt)  # no-op unless fp16
        params = [p for p in model.parameters() if p.grad is not None]
        if self.cfg.optim.grad_clip:
            gnorm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
        else:
            gnorm = torch.nn.utils.get_total_norm([p.grad for p in params])
        # gnorm is identical on every rank (gradients are all-reduced), so every rank decides alike.
        too_large = (gnorm > max_grad_norm) & torch.isfinite(gnorm) if max_grad_norm else None
        if acc.mixed_precision == "fp16":
            if too_large is not None and bool(too_large):  # the fp16 path syncs anyway; the scaler can't skip it
                return Update(gnorm, diverged=True)
            opt.step()  # the shared GradScaler skips overflowing steps and lowers the scale (it syncs)
            return Update(gnorm, fp16_skipped=bool(opt.step_was_skipped))
        if is_fused(opt.optimizer):
            nonfinite = ~torch.isfinite(gnorm)
            bad = nonfinite if too_large is None else nonfinite | too_large
            # GradScaler's protocol with the fused kernels: where found_inf is 1 the step changes nothing.
            opt.optimizer.found_inf = bad.float()
            try:
                opt.step()
            finally:
                del opt.optimizer.found_inf
            return Update(gnorm, nonfinite=nonfinite.float(), too_large=0 if too_large is None else too_large.float())
        finite, large = bool(torch.isfinite(gnorm)), too_large is not None and bool(too_large)  # RMSprop: one sync
        if finite and not large:
            opt.step()
        return Update(gnorm, nonfinite=int(not finite), too_large=int(large))

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    save = load = None  # nothing beyond Accelerate's save_state/load_state (they hold the models and optimizers)


class _Yield(contextlib.AbstractContextManager):
    def __init__(self, stack: contextlib.ExitStack, value):
        self.stack, self.value = stack, value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)


def _cast_floating_inputs(dtype: torch.dtype):
    """A forward pre-hook: floating inputs in the engine's weight dtype (bf16/fp16 modules get fp32
    images and noise from the data and the trainer). The cast is differentiable, so R1's input
    gradient still reaches the fp32 tensor."""
    def hook(_module, args):
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    return hook


def deepspeed_config(cfg: Config, precision: str) -> dict:
    """The engine config: deepspeed.config's settings plus what our own keys decide (batch size,
    ZeRO stage and offload, precision, clipping). Our keys are refused in the file (gan.config)."""
    ds = cfg.deepspeed
    values = ds.settings()
    # DeepSpeed's default buckets (5e8 elements, double-buffered: 3.7 GiB in fp32 per rank) dwarf a GAN;
    # 5e6 elements (19 MiB) is of the order of DDP's 25 MB buckets. The JSON file may set others.
    zero = {"reduce_bucket_size": 5_000_000, "allgather_bucket_size": 5_000_000,
            **values.get("zero_optimization", {}), "stage": ds.stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    out = {**values, "zero_optimization": zero,
           "train_micro_batch_size_per_gpu": cfg.train.batch_size, "gradient_accumulation_steps": 1,
           "gradient_clipping": float(cfg.optim.grad_clip),
           # our fused torch Adam runs the offloaded step too (DeepSpeedCPUAdam would need a C++ build)
           "zero_force_ds_cpu_optimizer": False}
    out.setdefault("steps_per_print", 2 ** 31 - 1)  # the trainer logs; DeepSpeed's own print is noise
    if precision == "fp16":  # dynamic loss scaling: overflowing steps are skipped and the scale lowered
        out["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                       "hysteresis": 1, "min_loss_scale": 1}
    elif precision == "bf16":
        out["bf16"] = {"enabled": True}
    if precision in ("fp16", "bf16"):  # DeepSpeed casts the weights, not the buffers: BatchNorm needs both alike
        out["data_types"] = {**out.get("data_types", {}), "buffer_dtype": precision}
    return out


def _init_process_group(accelerator) -> None:
    """DeepSpeed needs torch.distributed even in one process; Accelerate starts it only for several."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):  # what a launcher would set
        os.environ.setdefault(key, value)
    backend = "nccl" if accelerator.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


class DeepSpeedBackend:
    """One DeepSpeed ZeRO-1/2 engine per network (the GAN: G and D); each engine's own backward/step.
    Non-finite gradients: ZeRO checks every update's gradient norm and skips a non-finite one (fp16:
    and lowers the loss scale); ``was_step_applied`` tells which, already on the host (ZeRO's check
    syncs)."""

    name = "deepspeed"

    def __init__(self, cfg: Config, accelerator, precision: str):
        from accelerate.utils import DistributedType

        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise ConfigError("train.backend=deepspeed builds its own engines: launch with torchrun or plain "
                              "'accelerate launch' (no --use_deepspeed / DeepSpeed accelerate config)")
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        deepspeed.utils.logger.setLevel(logging.WARNING)
        self.cfg, self.accelerator, self.precision = cfg, accelerator, precision
        self.config = deepspeed_config(cfg, precision)
        self.engines: dict[str, object] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.specs: dict = {}  # name -> gan.family.OptimSpec (re-applied on resume)
        self._scalars: dict[str, list] = {}

    def _restore_scalars(self, net: str) -> None:
        for p in self._scalars[net]:  # still views of ZeRO's flat weight buffer
            p.data = p.data.reshape(())

    def prepare(self, nets: dict[str, torch.nn.Module], specs: dict) -> dict[str, torch.nn.Module]:
        """One engine per network, in ``nets``' order, each with its optimizer from ``specs[name]``."""
        import deepspeed

        _init_process_group(self.accelerator)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        for net, model in nets.items():
            if dtype is not None:
                model.register_forward_pre_hook(_cast_floating_inputs(dtype))
            opt = build_optimizer(model.parameters(), self.cfg.optim, specs[net].lr, specs[net].betas)
            # DeepSpeed's initial weight broadcast views each weight as bytes, which a 0-dim tensor
            # (self-attention's gamma) can't do: those get a shape of (1,) for DeepSpeed, which keeps
            # it (its step re-points the weights into its flat buffer), and () back for everyone else.
            self._scalars[net] = [p for p in model.parameters() if p.dim() == 0]
            for p in self._scalars[net]:
                p.data = p.data.reshape(1)
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=self.config)
            self.engines[net], self.optimizers[net] = engine, opt
            self._restore_scalars(net)
        self.specs = dict(specs)
        return dict(self.engines)

    def frozen(self, net: str):
        """The network's plain module, frozen: see the module docstring (deepspeed #4923)."""
        return frozen(self.engines[net].module)

    def update(self, net: str, loss: torch.Tensor, max_grad_norm: float = 0.0) -> Update:
        """ZeRO computes the gradient norm inside its step, so an update above ``max_grad_norm`` is
        already applied when it is known: it stops the run (Update.diverged), it can't be skipped."""
        engine = self.engines[net]
        engine.backward(loss)
        engine.step()  # clips (gradient_clipping), skips a non-finite update, zeroes the gradients
        self._restore_scalars(net)
        gnorm = engine.get_global_grad_norm()
        gnorm = float("nan") if gnorm is None else float(gnorm)
        applied = engine.was_step_applied()
        if max_grad_norm and applied and math.isfinite(gnorm) and gnorm > max_grad_norm:
            return Update(gnorm, diverged=True)
        if self.precision == "fp16":
            return Update(gnorm, fp16_skipped=not applied)
        return Update(gnorm, nonfinite=0 if applied else 1)

    def unwrap(self, model):
        return model.module

    def save(self, path: Path) -> None:
        """Collective. Each engine's weights and (partitioned) optimizer state, under path/deepspeed/<net>/:
        one model file (rank 0) and one optimizer-state file per rank."""
        for net, engine in self.engines.items():
            engine.save_checkpoint(str(Path(path) / "deepspeed"), tag=net, save_latest=False)

    def load(self, path: Path) -> None:
        """Collective. Restores what :meth:`save` wrote (the same world size: ZeRO files are per rank)."""
        for net, engine in self.engines.items():
            load_path, _ = engine.load_checkpoint(str(Path(path) / "deepspeed"), tag=net,
                                                  load_optimizer_states=True, load_lr_scheduler_states=False)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed found no {net} engine state under {Path(path) / 'deepspeed' / net}")
            self._restore_scalars(net)


def build_backend(cfg: Config, accelerator, precision: str):
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() != accelerator.num_processes:
        # gan.startup.choose_cpu keeps this from happening on a machine without an accelerator; should a device
        # Accelerate doesn't know start the process group anyway, every rank would train alone: refuse.
        raise ConfigError(f"torch.distributed has {dist.get_world_size()} processes but Accelerate sees "
                          f"{accelerator.num_processes} ({accelerator.distributed_type}); to train on the CPU "
                          f"set ACCELERATE_USE_CPU=1 (or use accelerate launch --cpu)")
    if cfg.train.backend == "deepspeed":
        return DeepSpeedBackend(cfg, accelerator, precision)
    return DDPBackend(cfg, accelerator)


__all__ = ["Update", "DDPBackend", "DeepSpeedBackend", "build_backend", "deepspeed_config", "frozen"]
