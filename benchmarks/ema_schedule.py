#!/usr/bin/env python
"""The product's EMA generator against the raw G, on one training trajectory: the classifier-feature
Frechet distance (``cls_fd``, gan.metrics) of the raw G, of the trainer's own EMA G (the recipe's
``ema`` section: the ``rampup`` schedule, BatchNorm statistics recomputed for its own weights over
``ema.bn_samples`` inputs, as samples, evaluation and exports read it) and, as the alternative, a shadow
EMA with the same schedule that copies G's BatchNorm statistics (the product before it had its own),
at given steps, for several seeds. ``--warmup`` adds a shadow under the older ``warmup`` schedule
(decay ramped as (1+n)/(10+n) for 1,000 updates, then 0.999; G's statistics copied); ``--rampups``
adds shadows like the product's EMA (statistics of their own) with other ``ema.rampup`` fractions.

    python benchmarks/ema_schedule.py --seeds 0,1,2 --at 500,1500,5000 --out runs/ema_schedule
    # or one process per seed, then the table:
    python benchmarks/ema_schedule.py --seeds 1 ... &  ...;  python benchmarks/ema_schedule.py --report-only ...

Each seed is ONE run of the recipe (gan.trainer.Trainer.train_step); the shadows follow that same G,
updated after every G step, so the generators differ only in the averaging and the statistics.
Evaluation (``--num-samples`` class-balanced samples on the fixed evaluation noise, the offline
classifier) is not training: it does not touch G, D, their optimizers or the global RNG. Writes
OUT/seed-S.json after every evaluation and OUT/ema_schedule.md at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from gan.config import load_config  # noqa: E402
from gan.ema import EMA  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/cifar10_cdcgan.yaml")
    p.add_argument("--shards", default="data/shards/cifar10-train")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--at", default="500,1500,5000", help="steps at which to evaluate (the run ends at the last)")
    p.add_argument("--batch-size", type=int, default=0, help="train.batch_size (0 = the recipe's)")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--eval-draws", type=int, default=1,
                   help="evaluate every generator on this many evaluation noise draws (the fixed evaluation noise, "
                        "then other seeds) and record their mean; the spread between draws is the FD's resolution")
    p.add_argument("--classifier", default="", help="the offline classifier for cls_fd (default: the shipped one)")
    p.add_argument("--max-real", type=int, default=10000, help="real images for the reference statistics (0 = all)")
    p.add_argument("--prepare", action="store_true", help="only compute (and cache) the real statistics")
    p.add_argument("--warmup", action="store_true", help="also a shadow EMA under the warmup schedule")
    p.add_argument("--rampups", default="",
                   help="also shadow EMAs with these ema.rampup fractions (comma-separated), statistics of their own")
    p.add_argument("--warmup-decay", type=float, default=0.999)
    p.add_argument("--warmup-steps", type=int, default=1000)
    p.add_argument("--time-steps", type=int, default=0, help="only time this many training steps and exit")
    p.add_argument("--out", default="runs/ema_schedule")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--report-only", action="store_true", help="only the table, from OUT/seed-*.json")
    p.add_argument("set", nargs="*", help="more config overrides, key=value")
    return p.parse_args(argv)


def build(args, seed: int, run_dir: Path):
    """The trainer (its EMA is the product's) and the shadow EMAs, all following the trainer's G."""
    from gan.trainer import Trainer

    over = [f"data.shards={args.shards}", f"train.seed={seed}", "log.progress=false", "metrics.every=0",
            *([f"train.batch_size={args.batch_size}"] if args.batch_size else []), *args.set]
    cfg = load_config(ROOT / args.config, over)
    trainer = Trainer(cfg, run_dir)
    G = trainer.backend.unwrap(trainer.nets["G"])
    shadows = {"EMA, G's statistics": EMA(G, cfg.ema)}  # no inputs: copies G's statistics
    for r in filter(None, args.rampups.split(",")):  # the product's EMA (its inputs) with another ramp-up fraction
        shadows[f"EMA, rampup {float(r):g}"] = EMA(G, dataclasses.replace(cfg.ema, rampup=float(r)),
                                                    trainer.ema.bn_inputs)
    if args.warmup:
        warm = dataclasses.replace(cfg.ema, schedule="warmup", decay=args.warmup_decay, warmup_steps=args.warmup_steps)
        shadows["EMA warmup, G's statistics"] = EMA(G, warm)
    return cfg, trainer, G, shadows, cfg.train.batch_size * trainer.accelerator.num_processes


def cls_fd(G, cfg, args, device) -> list[float]:
    """``cls_fd`` of G on ``--eval-draws`` evaluation noise draws: the fixed evaluation noise, then
    EVAL_SEED + 1, + 2, ... (the same draws for every generator, so differences are paired)."""
    from gan.metrics.core import EVAL_SEED, EvalRequest, evaluate_generator

    m, out = cfg.model, []
    for k in range(args.eval_draws):
        req = EvalRequest(names=["cls_fd"], num_samples=args.num_samples, real_shards=args.shards, batch_size=200,
                          max_real=args.max_real, cache_dir=str(ROOT / args.out / "cache"), seed=EVAL_SEED + k,
                          classifier=args.classifier)
        values, _ = evaluate_generator(G, m.z_dim, m.num_classes, m.img_channels, m.img_size, req, device)
        out.append(float(values["cls_fd"]))
    return out


def run_seed(args, seed: int, at: list[int]) -> dict:
    out = ROOT / args.out
    cfg, trainer, G, shadows, images = build(args, seed, out / f"run-seed-{seed}")
    record = {"seed": seed, "config": args.config, "set": args.set, "batch_size": cfg.train.batch_size,
              "images_per_step": images, "ema": dataclasses.asdict(cfg.ema), "num_samples": args.num_samples,
              "eval_draws": args.eval_draws, "fd": {}, "fd_draws": {}, "train_seconds": 0.0}
    step, t_train = 0, 0.0
    for target in at:
        t0 = time.perf_counter()
        while step < target:
            trainer.train_step()
            for shadow in shadows.values():
                shadow.update(G, images)
            step += 1
        t_train += time.perf_counter() - t0
        nets = {"raw G": G, "EMA": trainer.ema.model, **{k: e.model for k, e in shadows.items()}}
        draws = {name: cls_fd(g, cfg, args, trainer.device) for name, g in nets.items()}
        fds = {name: statistics.mean(v) for name, v in draws.items()}
        record["fd"][str(step)], record["fd_draws"][str(step)] = fds, draws
        record["train_seconds"] = round(t_train, 1)
        print(f"seed {seed} step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in fds.items())
              + f" ({t_train / step:.3f} s/step)", flush=True)
        (out / f"seed-{seed}.json").write_text(json.dumps(record, indent=1))
    trainer.stream.close()
    return record


def _cell(v: list[float]) -> str:
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.mean(v):.1f} ± {sd:.1f} ({min(v):.1f} to {max(v):.1f})"


def report(records: list[dict], at: list[int]) -> str:
    """Mean ± sample std (min to max) over seeds, then paired differences, per seed on the same
    trajectory: each other generator minus the raw G (negative: it is better), and on how many seeds the
    EMA is not worse than the raw G. Generators missing from a record are left out."""
    first = next(iter(records[0]["fd"].values()))
    names = [n for n in first if all(n in r["fd"][s] for r in records for s in r["fd"])]
    diffs = [n for n in names if n != "raw G"]
    lines = ["| step | " + " | ".join(names + [f"{n} − raw G" for n in diffs]) + " | EMA ≤ raw G |",
             "|---" * (len(names) + len(diffs) + 2) + "|"]
    for s in at:
        rows = [r["fd"][str(s)] for r in records if str(s) in r["fd"]]
        if not rows:
            continue
        cells = [_cell([r[name] for r in rows]) for name in names]
        cells += [_cell([r[n] - r["raw G"] for r in rows]) for n in diffs]
        wins = sum(r["EMA"] <= r["raw G"] for r in rows)
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {wins}/{len(rows)} seeds |")
    return "\n".join(lines)


def draws_report(records: list[dict], at: list[int]) -> str:
    """With several evaluation noise draws: per step and seed, the EMA minus the raw G on each draw (paired:
    the same z), and the raw G's own spread between draws (sample std), which is what one FD resolves."""
    records = [r for r in records if r.get("eval_draws", 1) > 1]
    if not records:
        return ""
    lines = ["| step | seed | raw G, mean of draws | raw G, std between draws | EMA − raw G, per draw | "
             "EMA ≤ raw G |", "|---" * 6 + "|"]
    for s in at:
        for r in records:
            d = r["fd_draws"].get(str(s))
            if d is None:
                continue
            diff = [e - g for e, g in zip(d["EMA"], d["raw G"])]
            lines.append(f"| {s} | {r['seed']} | {statistics.mean(d['raw G']):.1f} | "
                         f"{statistics.stdev(d['raw G']):.2f} | {', '.join(f'{x:+.1f}' for x in diff)} | "
                         f"{sum(x <= 0 for x in diff)}/{len(diff)} draws |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.prepare:  # before one process per seed, so that they do not all compute the same statistics
        from gan.metrics.offline import classifier_path, real_sums

        classes = load_config(ROOT / args.config, [f"data.shards={args.shards}", *args.set]).model.num_classes
        real_sums(args.shards, classifier_path(args.classifier), classes, torch.device("cpu"), 200, args.max_real,
                  str(out / "cache"))
        return 0
    if args.time_steps:
        cfg, trainer, G, shadows, images = build(args, 0, out / "run-timing")
        trainer.train_step()  # start-up: loader workers, first allocations
        t0 = time.perf_counter()
        for _ in range(args.time_steps):
            trainer.train_step()
            for shadow in shadows.values():
                shadow.update(G, images)
        dt = (time.perf_counter() - t0) / args.time_steps
        t0 = time.perf_counter()
        trainer.ema.model  # noqa: B018 - one recomputation of the EMA's statistics
        print(f"{dt:.3f} s/step at batch {cfg.train.batch_size}; the EMA's statistics recomputed in "
              f"{time.perf_counter() - t0:.3f} s ({cfg.ema.bn_samples} inputs)")
        trainer.stream.close()
        return 0
    at = sorted(int(s) for s in args.at.split(","))
    if args.report_only:  # e.g. after one process per seed
        records = [json.loads((out / f"seed-{s}.json").read_text()) for s in args.seeds.split(",")]
    else:
        records = [run_seed(args, int(s), at) for s in args.seeds.split(",")]
    table = "\n\n".join(t for t in (report(records, at), draws_report(records, at)) if t)
    (out / "ema_schedule.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
