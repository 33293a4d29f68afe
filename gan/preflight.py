"""The checks a run makes before any work: the run directory (locked), every registered name, the
trackers, the shards against the model, the device budget, the metrics' files, and the checkpoint
to resume from. Every rank runs them; a failure is a clear error before anything is built."""
from __future__ import annotations

import os
from pathlib import Path

from gan import checkpoint
from gan.config import Config, ConfigError
from gan.data import read_manifest
from gan.family import build_family
from gan.rundir import RunDir
from gan.trackers import tracker_names


def _launch_rank() -> tuple[int, int]:
    """(rank, world size) as the launcher (torchrun, accelerate launch) sets them, before any process group."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def preflight(cfg: Config, run_dir: Path, resume: str | None) -> Path | None:
    """All checks that need no work: the run directory (locked by rank 0 from here on, leftovers of a
    crash cleaned), the shards against the model, and the checkpoint to resume from. Returns that
    checkpoint (or None for a fresh start)."""
    run, (rank, world_size) = RunDir(run_dir), _launch_rank()
    try:
        run.root.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            run.lock()  # raises RunDirError naming the holder
            for line in run.clean_leftovers():  # before the probe: a full disk may be full of them
                print(line, flush=True)
        probe = run.root / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run directory {run_dir} is not writable ({e.strerror}); pass --run-dir "
                          f"with a directory you can write to") from None
    check_names(cfg)
    check_precision(cfg)
    tracker_names(cfg.log.with_)  # an unknown or uninstalled tracker fails here
    family = build_family(cfg)
    manifest = read_manifest(cfg.data.shards, "data.shards", family.paired)
    family.check(manifest)  # the shards against the family's model
    manifest.check_files()  # zero-filled or truncated shards fail here, not at step 0 (or never)
    if cfg.train.batch_size > manifest.total:
        raise ConfigError(f"config key 'train.batch_size': {cfg.train.batch_size} is larger than the data set "
                          f"({manifest.total} samples in {manifest.dir}); use a batch of at most {manifest.total}")
    if cfg.data.on_device:  # a data set too big for the device fails here, not after the models are built
        from gan.data.device import check_fits, expected_device
        check_fits(manifest, expected_device(), cfg.data.on_device_budget)
    if cfg.metrics.every:  # weights files, classifier, counts: fail now, not at the first evaluation
        from gan.metrics import check_setup
        check_setup(cfg)
    path, notes = checkpoint.resume_point(run, resume, cfg, world_size, writer=rank == 0)
    for line in notes if rank == 0 else ():
        print(line, flush=True)
    return path


def check_precision(cfg: Config) -> None:
    """Under DeepSpeed, the precision this launch resolves to is one DeepSpeed's accelerator supports on this
    device (asked the way ``deepspeed.initialize`` decides: e.g. its CPU accelerator has fp16 only where
    oneDNN has fp16 kernels). Otherwise both ranks would die inside ``deepspeed.initialize``."""
    if cfg.train.backend != "deepspeed":
        return
    from gan.startup import resolve_precision_source

    precision = resolve_precision_source(cfg.train.mixed_precision)[0]
    if precision not in ("fp16", "bf16"):
        return
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if not (acc.is_fp16_supported() if precision == "fp16" else acc.is_bf16_supported()):
        other = "bf16 or no" if precision == "fp16" and acc.is_bf16_supported() else "no"
        raise ConfigError(f"config key 'train.mixed_precision': {precision} is not supported by DeepSpeed's "
                          f"{acc.device_name()} accelerator on this machine; use train.mixed_precision={other}")


def check_names(cfg: Config) -> None:
    """The registered names of the config exist (ConfigError listing the valid ones): the family's
    (the GAN: loss and model) here; the family name and metric names are checked when the config is built."""
    build_family(cfg).check()


__all__ = ["preflight", "check_names", "check_precision"]
