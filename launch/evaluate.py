#!/usr/bin/env python
"""Evaluate a run's EMA network (--net trained: the checkpoint's trained network) with its family's metrics.
The GAN: FID/IS/KID/precision-recall (torch-fidelity, Inception weights needed) and the offline
cls_acc/cls_fd (committed CIFAR-10 classifier), against the real images of the run's shards (data.shards;
never a download). The VAE: bits_per_dim, recon_mse, psnr, ssim, kl on the held-out split (val.shards)
and fid of prior samples against it. pix2pix: l1, psnr, ssim and fid of outputs against targets on the
validation pairs (val.shards).

    python launch/evaluate.py --run runs/cdcgan --metrics cls_acc,cls_fd --num-samples 10000
    python launch/evaluate.py --run runs/cifar10_vae                 # the family's default metrics
    python launch/evaluate.py --run runs/cifar10_vae --net trained   # the VAE as trained, not its EMA
    python launch/evaluate.py --run runs/sketch --metrics l1,psnr,ssim,fid --inception-weights W.pth
    python launch/evaluate.py --run runs/cdcgan --metrics fid,isc,kid,prc --num-samples 50000 \
        --inception-weights weights-inception-2015-12-05-6726825d.pth
    accelerate launch --num_processes 8 launch/evaluate.py --run runs/cdcgan --metrics fid ...
    # real data as the "generator" (the floor): test split against train split
    python launch/evaluate.py --fake-shards data/shards/cifar10-test --real-shards data/shards/cifar10-train \
        --metrics cls_acc,cls_fd --out floor.json

Writes RUN/metrics.json (merged with earlier evaluations, atomically) and TensorBoard scalars
Eval/<name> at the checkpoint's step; prints the values as JSON. Each entry says which network it measured
("net": "ema" or "trained"); the trained network's are kept apart (step-X-trained, Eval/trained/<name>) and
never count as an export's metrics (an export holds the EMA). Several processes split the work:
each generates and measures its own slice, and only statistics cross processes. A process that dies
ends the others with an error after the run's train.collective_timeout.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gan.checkpoint import CheckpointError  # noqa: E402
from gan.config import ConfigError  # noqa: E402
from gan.data import ShardError  # noqa: E402
from gan.dist import PeerError  # noqa: E402
from gan.metrics.names import valid_list  # noqa: E402
from gan.metrics.run import NETS  # noqa: E402
from gan.rundir import RunDir  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", "--run-dir", dest="run", help="run directory written by launch/train.py "
                   "(--run-dir is the same flag; use it under torchrun, whose parser claims --run)")
    p.add_argument("--checkpoint", help="checkpoints/step-XXXXXXXX dir or a G_ema.safetensors export "
                                        "(default: the run's newest complete checkpoint)")
    p.add_argument("--net", choices=NETS, default="ema", help="ema: the EMA network (what export and serving use); "
                   "trained: the trained network's own weights, from the checkpoint (default: %(default)s)")
    p.add_argument("--metrics", help=f"comma-separated metrics of the run's family; the GAN's: {valid_list()}; "
                   f"the VAE's: bits_per_dim, recon_mse, psnr, ssim, kl, fid; pix2pix's: l1, psnr, ssim, fid "
                   f"(default: the family's: cls_fd,cls_acc for the GAN)")
    p.add_argument("--num-samples", type=int, default=10000, help="generated images (the VAE: prior samples for "
                   "fid) (default: %(default)s; 50000 for FIDs comparable with the literature)")
    p.add_argument("--batch-size", type=int, default=100, help="generation/feature batch (default: %(default)s)")
    p.add_argument("--inception-weights", default="", help="torch-fidelity's Inception-v3 weights file "
                   "(weights-inception-2015-12-05-6726825d.pth), needed by fid/isc/kid/prc")
    p.add_argument("--classifier", default="", help="classifier for cls_acc/cls_fd (default: the committed "
                   "gan/metrics/assets/cifar10_classifier.safetensors)")
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--isc-splits", type=int, default=10)
    p.add_argument("--real-shards", help="real images (the GAN; default: data.shards) or the held-out split "
                                         "(the VAE, pix2pix; default: val.shards, else data.shards)")
    p.add_argument("--max-real", type=int, default=0, help="use only the first N real images (the GAN) or held-out "
                   "images or pairs (the VAE, pix2pix) in shard order (0 = all; for quick checks only)")
    p.add_argument("--cache-dir", default="", help="real-statistics cache (default: $GAN_METRICS_CACHE or "
                   "~/.cache/gan-metrics)")
    p.add_argument("--fake-shards", help="evaluate this shard set's images instead of a generator "
                   "(conditioning class = label); needs --real-shards, writes only --out")
    p.add_argument("--out", help="also write the result JSON here")
    p.add_argument("--no-tensorboard", action="store_true")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they go to stderr, rank 0)")
    return p.parse_args(argv)


def _request(args, real_shards: str, family: str = "gan", metrics: str = "cls_acc,cls_fd", num_workers: int = 0,
             real_key: str = "--real-shards"):
    from gan.metrics import EvalRequest
    return EvalRequest(names=args.metrics or metrics, num_samples=args.num_samples, real_shards=str(real_shards),
                       real_key=real_key,
                       batch_size=args.batch_size, inception_weights=args.inception_weights,
                       classifier=args.classifier, kid_subset_size=args.kid_subset_size,
                       isc_splits=args.isc_splits, max_real=args.max_real, cache_dir=args.cache_dir,
                       verbose=args.verbose, progress=not args.no_progress, family=family, num_workers=num_workers)


def _write_out(path: str | None, result: dict) -> None:
    if path:
        import os
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)


def main(argv=None) -> int:
    args = parse_args(argv)
    if bool(args.run) == bool(args.fake_shards):
        print("error: pass exactly one of --run DIR or --fake-shards DIR", file=sys.stderr)
        return 2
    try:
        import torch

        if args.fake_shards:
            from gan.metrics import evaluate_images
            from gan.metrics.realdata import load_shard_images
            if not args.real_shards:
                raise ConfigError("--fake-shards needs --real-shards (the reference images)")
            req = _request(args, args.real_shards)
            images, labels = load_shard_images(args.fake_shards)
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            values, details = evaluate_images(images, labels, req, device)
            result = {"fake_shards": args.fake_shards, "metrics": values, "details": details}
            print(json.dumps(result, indent=2))
            _write_out(args.out, result)
            return 0

        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        from gan.metrics import load_generator, log_tensorboard, merge_metrics_json

        from gan.metrics.run import run_config

        run = Path(args.run)
        # a rank that dies or stalls ends every rank after the run's train.collective_timeout (PeerError)
        pg = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=run_config(run).train.collective_timeout))
        pg.to_kwargs = lambda: {"timeout": pg.timeout}  # Accelerate drops a value equal to its default
        acc = Accelerator(kwargs_handlers=[pg])
        loaded = load_generator(run, args.checkpoint, acc.device, args.net)
        cfg, family = loaded.cfg, loaded.family
        real = args.real_shards or family.eval_shards()
        req = _request(args, real, cfg.family, family.default_metrics(cfg), cfg.data.num_workers,
                       "--real-shards" if args.real_shards else family.shards_key(real, "--real-shards"))
        values, details = family.evaluate(loaded.G, req, acc.device)  # collective: every rank
        details["processes"] = acc.num_processes
        if acc.is_main_process:
            step = loaded.step if loaded.step is not None else 0
            merge_metrics_json(RunDir(run).metrics_json, loaded.label, loaded.step, str(loaded.source), values, details,
                               loaded.net)
            if not args.no_tensorboard:
                log_tensorboard(run, step, values, loaded.net)
            result = {"run": str(run), "checkpoint": str(loaded.source), "step": loaded.step, "net": loaded.net,
                      "metrics": values}
            print(json.dumps(result, indent=2))
            _write_out(args.out, {**result, "details": details})
        acc.wait_for_everyone()
        acc.end_training()
        return 0
    except (ConfigError, ShardError, CheckpointError) as e:  # MetricError is a ConfigError
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PeerError as e:  # another rank died or stalled during evaluation
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
