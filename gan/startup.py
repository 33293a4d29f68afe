"""How a run starts: the Accelerator (process group, precision, trackers), the resolved mixed
precision and where it came from, and the rank-0 banner (devices, world size, precision, model sizes, data, run directory, resume point).

Precision sources, in order of precedence:

1. ``train.mixed_precision`` = no | fp16 | bf16 (config or command line): always wins; if the
   launcher asked for something else, the banner says so.
2. ``train.mixed_precision=auto`` (default) takes fp16/bf16 from the launcher, i.e. the
   ``ACCELERATE_MIXED_PRECISION`` that ``accelerate launch --mixed_precision X`` sets, or that it
   fills in from ``accelerate config``'s file when the flag is absent (told apart by comparing with
   that file). "no" from the launcher is also its default, so it is not taken as a request:
3. otherwise bf16 on a GPU that supports it, else full precision.

The resolved value is what ``config.yaml`` and the checkpoints store.
"""
from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch

ENV = "ACCELERATE_MIXED_PRECISION"


def accelerate_config_precision() -> tuple[str | None, str | None]:
    """(mixed_precision, file) from ``accelerate config``'s default file, or (None, None)."""
    try:
        from accelerate.commands.config import default_config_file
    except ImportError:
        return None, None
    path = Path(default_config_file)
    if not path.is_file():
        return None, None
    try:
        import yaml

        value = (yaml.safe_load(path.read_text()) or {}).get("mixed_precision")
    except Exception:
        return None, str(path)
    return (str(value) if value else None), str(path)


def resolve_precision_source(name: str, env: dict | None = None, gpu_bf16: bool | None = None,
                             config_file: tuple[str | None, str | None] | None = None) -> tuple[str, str]:
    """(precision, where it came from, with any disagreement spelled out)."""
    env = os.environ if env is None else env
    launched = env.get(ENV, "").strip().lower() or None
    file_value, file_path = accelerate_config_precision() if config_file is None else config_file
    if launched is not None:
        origin = (f"accelerate config ({file_path})" if file_value == launched
                  else f"accelerate launch --mixed_precision {launched}")
    if name != "auto":
        note = ""
        if launched not in (None, "no", name):
            note = f"; {origin} asked for {launched}, train.mixed_precision wins"
        return name, f"train.mixed_precision={name}{note}"
    if launched in ("fp16", "bf16", "fp8"):
        return launched, f"{origin} (train.mixed_precision=auto takes the launcher's choice)"
    if gpu_bf16 is None:
        gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if gpu_bf16:
        return "bf16", "train.mixed_precision=auto: bf16 on a GPU that supports it"
    return "no", "train.mixed_precision=auto: full precision (no GPU with bf16)"


def choose_cpu(env: dict | None = None, accelerator: bool | None = None) -> tuple[bool, str | None]:
    """(train on the CPU, why) for this launch. ``ACCELERATE_USE_CPU=1`` (what ``accelerate launch --cpu``
    sets) asks for it; on a machine without a GPU or other accelerator the CPU is the only device, and a
    multi-process launch (``torchrun``, ``accelerate launch --num_processes N``) then runs with gloo, as
    written, instead of Accelerate seeing one process in each. (False, None): Accelerate's own choice."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes"):
        return True, "ACCELERATE_USE_CPU=1 asks for the CPU"
    if accelerator is None:
        accelerator = torch.accelerator.is_available()
    if accelerator:
        return False, None
    procs = int(env.get("WORLD_SIZE", "1"))
    return True, "no GPU or other accelerator found" + (f"; {procs} processes with gloo" if procs > 1 else "")


def accelerate_launch_processes(ppid: int | None = None) -> int:
    """How many processes ``accelerate launch`` was asked for when it started this one process itself
    (its simple launcher: on a machine without GPUs it ignores ``--num_processes N`` unless
    ``--multi_gpu`` is given); 1 when this process was not started that way. Read from the launcher's
    own command line, the only place the number is kept."""
    if os.environ.get("LOCAL_RANK") is not None or "ACCELERATE_USE_CPU" not in os.environ:
        return 1  # torchrun/elastic worker, or not under accelerate launch (which always sets it)
    try:
        argv = Path(f"/proc/{ppid or os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return 1
    if "launch" not in argv or not any(Path(a).name.startswith("accelerate") for a in argv[:3]):
        return 1
    for i, a in enumerate(argv):
        for flag in ("--num_processes", "--num-processes"):
            if a == flag and i + 1 < len(argv) and argv[i + 1].isdigit():
                return int(argv[i + 1])
            if a.startswith(flag + "=") and a.split("=", 1)[1].isdigit():
                return int(a.split("=", 1)[1])
    return 1


def cpu_relaunch(argv: list[str]) -> list[str] | None:
    """The torchrun command that runs ``argv`` (this script and its arguments) on N CPU processes with
    gloo, when ``accelerate launch --num_processes N`` (N > 1) started it as one process on a machine
    without an accelerator; None otherwise."""
    n = accelerate_launch_processes()
    if n < 2 or not choose_cpu()[0]:
        return None
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *argv]


def _params(module: torch.nn.Module) -> str:
    n = sum(p.numel() for p in module.parameters())
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def _workers_note(workers: int) -> str:
    """torch's advice on the worker count, said once here (gan.data.stream.WorkerLoader keeps the DataLoader
    from warning at every epoch): more workers per rank than the CPU cores this process may use."""
    cores = len(os.sched_getaffinity(0))
    return f" (more than the {cores} CPU core(s) here; torch suggests at most {cores})" if workers > cores else ""


def banner(trainer) -> list[str]:
    """The start-up lines rank 0 prints (the trainer's own state, nothing collective)."""
    acc, cfg, m = trainer.accelerator, trainer.cfg, trainer.stream.manifest
    dev = acc.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    why = f"; {trainer.device_source}" if trainer.device_source else ""
    c, h, w = m.image_shape
    loader = (f"on the device ({trainer.stream.nbytes / 2**20:,.1f} MiB, data.on_device)" if cfg.data.on_device
              else f"worker loader, {cfg.data.num_workers} worker(s) per rank{_workers_note(cfg.data.num_workers)}")
    classes = "1 class (unconditional)" if m.num_classes == 1 else f"{m.num_classes} classes"
    samples = (f"{m.total:,} pairs {'x'.join(map(str, m.input_shape))} -> {c}x{h}x{w}" if m.paired
               else f"{m.total:,} images of {c}x{h}x{w}")
    arch = getattr(cfg.model, "name", None)  # the GAN's architecture; the other families have one each
    nets = ", ".join(f"{n.upper()} {_params(acc.unwrap_model(net))}" for n, net in trainer.nets.items())
    resume = (f"resuming from {trainer.resume_from}" if trainer.resume_from is not None else "fresh start")
    trackers = ", ".join(t.name for t in acc.trackers) or "none"
    return [
        f"run directory: {trainer.run_dir} ({resume})",
        f"devices: {acc.num_processes} x {name}, world size {acc.num_processes} "
        f"({'single process' if acc.num_processes == 1 else acc.distributed_type.value.lower()}{why})",
        f"precision: {acc.mixed_precision} ({trainer.precision_source})",
        f"models: {f'{arch} ' if arch else ''}{nets} parameters; {c}x{h}x{w}, batch {cfg.train.batch_size} per rank",
        f"data: {m.dataset} {m.split}, {samples}, {classes}, from {m.dir} ({loader})",
        f"trackers: {trackers}; steps {trainer.state.step} -> {cfg.train.max_steps}",
    ]


def build_accelerator(cfg, run_dir: Path):
    """The run's Accelerator, with the process group's timeout (``train.collective_timeout``), the
    trackers, and the precision resolved into ``cfg.train.mixed_precision`` (what config.yaml and the
    checkpoints keep). Returns (accelerator, where the precision came from, why the CPU or None)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    from gan.config import ConfigError
    from gan.trackers import build_trackers, tracked_metrics, tracker_names

    t = cfg.train
    pg = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=t.collective_timeout))
    pg.to_kwargs = lambda: {"timeout": pg.timeout}  # Accelerate drops a value equal to its default (600 s), and
    # torch's own default for gloo is 30 min: pass it always
    t.mixed_precision, source = resolve_precision_source(t.mixed_precision)
    cpu, device_source = choose_cpu()
    if cpu:  # DeepSpeed, imported by Accelerate whenever it is installed, would guess the device and warn
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    acc = Accelerator(
        cpu=cpu,
        # DeepSpeed's engines do their own precision (gan.backends); Accelerate prepares nothing there
        mixed_precision=t.mixed_precision if t.backend == "ddp" else "no",
        dynamo_backend="inductor" if t.compile else "no",
        log_with=build_trackers(tracker_names(cfg.log.with_), run_dir, cfg.log.project, tracked_metrics(cfg)) or None,
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False), pg])
    if acc.mixed_precision == "fp16" and acc.scaler is None:  # e.g. on CPU: fp16 without loss scaling
        raise ConfigError(f"config key 'train.mixed_precision': fp16 needs a gradient scaler, and Accelerate "
                          f"provides none on this {acc.device.type} device (it would train without one). "
                          f"Use train.mixed_precision=bf16 or no here")
    torch.backends.cudnn.deterministic = t.deterministic
    torch.backends.cudnn.benchmark = not t.deterministic
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return acc, source, device_source
