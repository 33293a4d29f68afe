#!/usr/bin/env python
"""Train a GAN.

    accelerate launch launch/train.py --config configs/cifar10_cdcgan.yaml [key=value ...]
    python launch/train.py --config configs/debug_cpu.yaml --run-dir runs/debug [key=value ...]

Parse, check every input, build, fit, close. The library lives in gan/.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gan.checkpoint import CheckpointError, SaveError  # noqa: E402
from gan.config import ConfigError, load_config  # noqa: E402
from gan.data import ShardError  # noqa: E402
from gan.rundir import RunDirError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/cifar10_cdcgan.yaml", help="experiment YAML (default: %(default)s)")
    p.add_argument("--run-dir", default=None, help="output directory (default: runs/<config name>)")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="'auto': newest complete checkpoint in the run directory (fresh start if none); "
                        "or a checkpoints/step-XXXXXXXX directory")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr_d=1e-4")
    return p.parse_intermixed_args(argv)  # overrides may come before, between or after the flags


def main(argv=None) -> int:
    args = parse_args(argv)
    from gan.startup import choose_cpu, cpu_relaunch

    relaunch = cpu_relaunch(sys.argv) if argv is None else None
    if relaunch:  # `accelerate launch --num_processes N` on a machine without GPUs started one process: start N
        print(f"accelerate launch started 1 process of {relaunch[5]} ({choose_cpu()[1]}): running them with "
              f"torchrun on the CPU with gloo", flush=True)
        os.execv(relaunch[0], relaunch)
    from gan.dist import end_with_launcher
    from gan.stopping import StopRequest

    StopRequest.install()  # first: a preemption signal during start-up must not be lost
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # a torchrun / accelerate-launch worker: end with the launcher
        end_with_launcher()
    run_dir = None
    try:
        cfg = load_config(args.config, args.overrides)
        from gan.preflight import check_names, preflight
        from gan.trainer import Trainer

        if args.dry_run:
            check_names(cfg)  # every registered name (model, loss, metrics), as a real run would
            print(cfg.to_yaml(), end="")
            return 0
        run_dir = Path(args.run_dir or Path("runs") / Path(args.config).stem)
        resume_from = preflight(cfg, run_dir, args.resume)
        trainer = Trainer(cfg, run_dir, resume_from)  # may refuse the device (fp16 without a scaler)
    except BaseException as e:
        if run_dir is not None:
            from gan.rundir import RunDir
            RunDir(run_dir).unlock()  # a refused start leaves no .lock behind (nothing if another run holds it)
        if not isinstance(e, (ConfigError, ShardError, CheckpointError, RunDirError)):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    from gan.dist import PeerError
    from gan.guard import NonFiniteError

    try:
        outcome = trainer.fit()
    except (NonFiniteError, SaveError, ShardError, PeerError) as e:  # divergence, a full disk, a shard damaged
        print(f"error: {e}", file=sys.stderr)  # since the start-up checks, a stalled or dead rank: the message says it all
        return 1
    finally:
        trainer.close()  # every rank: process group destroyed, signal handlers restored
    trainer.rank0.print(f"{outcome} at step {trainer.state.step}; run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
