#!/usr/bin/env python
"""Evaluation wall time on 1 and on 2 ranks, in one run: ``launch/evaluate.py --metrics cls_acc,cls_fd``
(the committed CIFAR-10 classifier) on N generated samples of the default cDCGAN recipe against the
CIFAR-10 train shards, the whole command under torchrun (gloo, CPU ranks).

Each rank measures its own slice; only float64 sums cross ranks. By default the comparison uses the same
cores on both sides: 1 rank with T threads against 2 ranks with T/2 threads each (T = --threads, default
every core of this machine), so it measures splitting the work over processes rather than threads, not
more cores. ``--threads-per-rank K`` gives every rank K threads on both sides instead (1 rank uses K cores,
2 ranks 2K): the speed-up of adding a rank with its own cores. Each world size runs once first (first_s:
it fills the real-statistics cache, kept per slice, so 1 rank and 2 ranks each have their own, unless
--work already holds it), then --repeats timed runs; wall_s is their median (the whole command), eval_s
the evaluation inside it (generation included).

    python -m data_shards ensure-cifar10 --out data/shards/cifar10-train
    python benchmarks/eval_ranks.py --shards data/shards/cifar10-train --num-samples 10000
    python benchmarks/eval_ranks.py --shards data/shards/cifar10-train --num-samples 10000 --threads-per-rank 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_run(run: Path, shards: Path) -> None:
    """A 1-step run of the default recipe: its checkpoint is the generator under evaluation (the time
    evaluation takes does not depend on how trained G is)."""
    cmd = [sys.executable, "launch/train.py", "--config", "configs/cifar10_cdcgan.yaml", "--run-dir", str(run),
           f"data.shards={shards}", "data.num_workers=0", "train.max_steps=1", "train.batch_size=16",
           "train.mixed_precision=no", "log.progress=false", "log.sample_every=1000", "checkpoint.every=1"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    if r.returncode:
        sys.exit(f"error: training the generator failed:\n{r.stdout}\n{r.stderr}")


def evaluate(run: Path, ranks: int, threads: int, n: int, batch: int, cache: Path, out: Path,
             max_real: int = 0) -> tuple[float, dict]:
    """Wall seconds of the whole command, and its result JSON."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           "launch/evaluate.py", "--run-dir", str(run), "--metrics", "cls_acc,cls_fd", "--num-samples", str(n),
           "--batch-size", str(batch), "--cache-dir", str(cache), "--no-tensorboard", "--no-progress",
           "--max-real", str(max_real), "--out", str(out)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"error: evaluation on {ranks} rank(s) failed:\n{r.stdout}\n{r.stderr}")
    return wall, json.loads(out.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, default=ROOT / "data/shards/cifar10-train",
                   help="CIFAR-10 train shards (python -m data_shards ensure-cifar10 --out DIR)")
    p.add_argument("--num-samples", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="cores in use on each side (default: all)")
    p.add_argument("--threads-per-rank", type=int, default=0, help="K threads for every rank on both sides "
                   "(1 rank: K cores, 2 ranks: 2K) instead of splitting --threads (default: split)")
    p.add_argument("--max-real", type=int, default=0, help="only the first N real images (default: all)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", type=Path, default=None, help="keep the run and the caches here (default: a temp dir)")
    a = p.parse_args(argv)
    if not (a.shards / "manifest.json").is_file():
        print(f"error: {a.shards} is not a shard directory (no manifest.json); build it with "
              f"`python -m data_shards ensure-cifar10 --out {a.shards}`", file=sys.stderr)
        return 2
    if (a.threads < 2 and not a.threads_per_rank) or a.threads_per_rank < 0 or a.repeats < 1:
        print("error: --threads must be >= 2 (split over 2 ranks), --threads-per-rank >= 1 (or 0: split) "
              "and --repeats >= 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        run = work / "run"
        if not (run / "checkpoints").is_dir():
            train_run(run, a.shards)
        rows, results = [], {}
        for ranks in (1, 2):
            threads = a.threads_per_rank or a.threads // ranks
            first, _ = evaluate(run, ranks, threads, a.num_samples, a.batch_size, work / "cache", work / "out.json",
                                a.max_real)
            walls, inside = [], []
            for _ in range(a.repeats):
                wall, res = evaluate(run, ranks, threads, a.num_samples, a.batch_size, work / "cache",
                                     work / "out.json", a.max_real)
                walls.append(wall)
                inside.append(res["details"]["seconds"])
            results[ranks] = res["metrics"]
            rows.append({"ranks": ranks, "threads_per_rank": threads, "first_s": round(first, 2),
                         "wall_s": round(statistics.median(walls), 2), "eval_s": round(statistics.median(inside), 2)})
            print(json.dumps(rows[-1]), flush=True)
    same = all(abs(results[1][k] - results[2][k]) <= 1e-5 * max(abs(results[1][k]), 1e-12) for k in results[1])
    cores = {"threads_per_rank": a.threads_per_rank} if a.threads_per_rank else {"threads": a.threads}
    report = {"num_samples": a.num_samples, "max_real": a.max_real, **cores, "rows": rows,
              "speedup_wall": round(rows[0]["wall_s"] / rows[1]["wall_s"], 2),
              "speedup_eval": round(rows[0]["eval_s"] / rows[1]["eval_s"], 2),
              "same_values": same, "cls_fd": results[2]["cls_fd"], "cls_acc": results[2]["cls_acc"]}
    print(json.dumps(report, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
