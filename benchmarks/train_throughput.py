#!/usr/bin/env python
"""Images/s of the full training step (n_dis D updates + one G update + EMA) for each recipe:
our Trainer (bf16 autocast, channels_last, torch.compile, fused Adam on a GPU) against a plain
eager fp32 loop of the same networks and losses, side by side in one run. Also reports the model
FLOPs per real image (torch.utils.flop_counter, fp32 eager step), the achieved fraction of the
GPU's dense bf16 peak, and whether one of our steps makes the host wait for the GPU anywhere
(torch.cuda.set_sync_debug_mode("error")).

Batches come from memory (one fixed batch on the device) so the figure is the step, not the
loader; the loader has its own benchmark (benchmarks/data_loader.py).

    python benchmarks/train_throughput.py                       # all recipes, GPU if present
    python benchmarks/train_throughput.py --recipes cdcgan --steps 5 --batch-size 16 --no-compile  # CPU smoke

Families mode: img/s of one training step of each model family (gan, vae, pix2pix) through our Trainer on
1 process and on 2 processes (gloo on a CPU, started with torchrun), each family's CPU recipe
(FAMILY_RECIPES) from a batch of its real shards held in memory, every (family, ranks) cell in its own
process, all in one run so they share the machine's state. With 1 process the plain loop of the same
family runs beside ours (the GAN: the eager loop above; the VAE and pix2pix: benchmarks/reference_loops.py).
img/s counts the real images (pairs, for pix2pix) the step consumes on all ranks.

    python benchmarks/train_throughput.py --families gan,vae,pix2pix --ranks 1,2 \
        --threads 1 --shards CIFAR10_TRAIN --paired-shards SKETCH_TRAIN --steps 5 --warmup 1 --batch-size 32
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gan.config import load_config  # noqa: E402
from gan.families.gan.losses import build_loss  # noqa: E402
from gan.families.gan.models import build_models  # noqa: E402

RECIPES = {"cdcgan": "configs/cifar10_cdcgan.yaml", "sngan": "configs/cifar10_sngan.yaml",
           "biggan": "configs/cifar10_biggan.yaml", "biggan_diffaug": "configs/cifar10_biggan_diffaug.yaml"}
# Each family's CPU recipe (families mode): small but real networks.
FAMILY_RECIPES = {"gan": "configs/debug_cpu.yaml", "vae": "configs/cifar10_vae.yaml",
                  "pix2pix": "configs/cifar10_sketch_pix2pix.yaml"}
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets.
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362.05e12}


def peak_for(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((v for k, v in PEAK_BF16.items() if k in name), None)


def tiny_shards(cfg, where: Path) -> str:
    """A small real shard set of the recipe's image shape (the Trainer wants one)."""
    from data_shards import array_source, build_shards

    m = cfg.model
    rng = np.random.default_rng(0)
    n = 4 * m.num_classes
    imgs = rng.integers(0, 256, size=(n, m.img_channels, m.img_size, m.img_size), dtype=np.uint8)
    src = array_source("bench", [f"c{k}" for k in range(m.num_classes)], imgs, np.arange(n) % m.num_classes)
    build_shards(src, where, "train", "bench", log=None)
    return str(where)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - t0


def baseline_step_fn(cfg, device, batch):
    """The obvious loop: eager fp32, NCHW, Adam (non-fused), the same nets and loss objects."""
    torch.manual_seed(0)
    G, D = build_models(cfg.model)
    G, D = G.to(device), D.to(device)
    o = cfg.optim
    opt_G = torch.optim.Adam(G.parameters(), lr=o.lr_g, betas=tuple(o.betas_g), foreach=False)
    opt_D = torch.optim.Adam(D.parameters(), lr=o.lr_d, betas=tuple(o.betas_d), foreach=False)
    loss = build_loss(cfg.loss)
    real, y_real = batch
    B, m = real.shape[0], cfg.model

    def step():
        for _ in range(o.n_dis):
            z = torch.randn(B, m.z_dim, device=device)
            yf = torch.randint(0, m.num_classes, (B,), device=device)
            with torch.no_grad():
                fake = G(z, yf)
            opt_D.zero_grad()
            d, _ = loss.d_loss(D, real, y_real, fake, yf)
            d.backward()
            opt_D.step()
        z = torch.randn(B, m.z_dim, device=device)
        yf = torch.randint(0, m.num_classes, (B,), device=device)
        opt_G.zero_grad()
        g, _ = loss.g_loss(D, G(z, yf), yf)
        g.backward()
        opt_G.step()

    return step


def host_syncs(step, device) -> str:
    """One more step with CUDA's sync debug mode set to "error": "none" if nothing in it made the
    host wait for the GPU, else the first offender. On a CPU there is nothing to check: "n/a"."""
    if device.type != "cuda":
        return "n/a"
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        return "none"
    except RuntimeError as e:
        return str(e).strip().splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def flops_per_step(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def run_recipe(name: str, args, device) -> dict:
    from gan.trainer import Trainer

    base = load_config(ROOT / RECIPES[name], [f"train.batch_size={args.batch_size}"])
    m = base.model
    real = (torch.rand(args.batch_size, m.img_channels, m.img_size, m.img_size, device=device) * 2 - 1)
    y = torch.randint(0, m.num_classes, (args.batch_size,), device=device)
    images_per_step = base.optim.n_dis * args.batch_size

    step = baseline_step_fn(base, device, (real, y))
    flops = flops_per_step(step)
    t_base = time_steps(step, device, args.warmup, args.steps)

    with tempfile.TemporaryDirectory() as tmp:
        shards = tiny_shards(base, Path(tmp) / "shards")
        precision = "bf16" if device.type == "cuda" else "no"
        cfg = load_config(ROOT / RECIPES[name], [
            f"train.batch_size={args.batch_size}", f"data.shards={shards}", "data.dataset=", "log.progress=false",
            f"train.mixed_precision={precision}", "train.channels_last=true",
            f"train.compile={'true' if args.compile else 'false'}"])
        trainer = Trainer(cfg, Path(tmp) / "run")
        trainer._batches = itertools.repeat((real.cpu() if device.type == "cpu" else real, y))
        t_ours = time_steps(trainer.train_step, device, args.warmup + (3 if args.compile else 0), args.steps)
        syncs = host_syncs(trainer.train_step, device)

    ips_base = images_per_step * args.steps / t_base
    ips_ours = images_per_step * args.steps / t_ours
    _, peak = peak_for(device)
    flops_per_image = flops / images_per_step
    return {"recipe": name, "batch_size": args.batch_size, "n_dis": base.optim.n_dis,
            "img_per_s_baseline": ips_base, "img_per_s_ours": ips_ours, "speedup": ips_ours / ips_base,
            "gflops_per_image": flops_per_image / 1e9,
            "peak_fraction_ours": (flops_per_image * ips_ours / peak) if peak else None,
            "precision": precision, "compile": args.compile, "host_syncs": syncs}


# ---------------------------------------------------------------------------- families mode
def family_config(family: str, args):
    """The family's CPU recipe on the given shards: fp32, no loader workers (the batch is in memory), no trackers."""
    shards = args.paired_shards if family == "pix2pix" else args.shards
    sets = [f"data.shards={shards}", "data.dataset=", "data.num_workers=0", "log.progress=false", "log.with=",
            "train.mixed_precision=no", f"train.max_steps={args.warmup + args.steps + 1}"]
    if family == "pix2pix":
        sets.append(f"val.shards={shards}")
    if args.batch_size:
        sets.append(f"train.batch_size={args.batch_size}")
    return load_config(ROOT / FAMILY_RECIPES[family], sets)


def plain_step_fn(cfg, batch):
    """The family's plain loop (no spine) on the same in-memory batch: -> (step, real images per step)."""
    if cfg.family == "gan":
        return baseline_step_fn(cfg, torch.device("cpu"), batch[:2]), cfg.optim.n_dis * len(batch[0])
    from benchmarks.reference_loops import build_loop

    loop, count = build_loop(cfg), itertools.count()
    return (lambda: loop.step(batch, next(count))), len(batch[0])


def family_worker(args) -> int:
    """One (family, world size) cell, on every rank of a torchrun launch (or in one process): our step's
    img/s over all ranks and, in one process, the plain loop's; rank 0 writes them to --json."""
    import torch.distributed as dist

    from gan.trainer import Trainer

    cfg = family_config(args.family_worker, args)
    trainer = Trainer(cfg, args.run_dir)
    acc = trainer.accelerator
    batch = next(iter(trainer.stream))  # one real batch of this rank's stream, then held in memory
    trainer.stream.close()
    trainer._batches = itertools.repeat(batch)

    def barrier():
        if dist.is_initialized():
            dist.barrier()

    for _ in range(args.warmup):
        trainer.train_step()
    barrier()
    seen, t0 = trainer.state.images_seen, time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
    barrier()
    ours = (trainer.state.images_seen - seen) / (time.perf_counter() - t0)
    row = {"family": args.family_worker, "recipe": FAMILY_RECIPES[args.family_worker],
           "world_size": acc.num_processes, "threads_per_rank": torch.get_num_threads(),
           "batch_size": cfg.train.batch_size, "steps": args.steps, "img_per_s_ours": ours, "img_per_s_plain": None}
    trainer.close()
    if row["world_size"] == 1:
        step, images = plain_step_fn(cfg, batch)
        row["img_per_s_plain"] = images * args.steps / time_steps(step, torch.device("cpu"), args.warmup, args.steps)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.json).write_text(json.dumps(row))
    return 0


def run_cell(family: str, world: int, args, tmp: Path) -> dict:
    """One (family, world size) cell in fresh processes: ``python`` for 1, ``torchrun`` (gloo) for more."""
    out, run = tmp / f"{family}-{world}.json", tmp / f"run-{family}-{world}"
    worker = [str(Path(__file__).resolve()), "--family-worker", family, "--run-dir", str(run), "--json", str(out),
              "--shards", args.shards, "--paired-shards", args.paired_shards, "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]
    launcher = [sys.executable] if world == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT)}
    if args.threads:  # else: torch's default for one process, torchrun's 1 per rank for several
        env["OMP_NUM_THREADS"] = str(args.threads)
    r = subprocess.run(launcher + worker, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{family} on {world} rank(s) failed (exit {r.returncode}):\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    shutil.rmtree(run, ignore_errors=True)
    return json.loads(out.read_text())


def families_main(args) -> int:
    """Every (family, ranks) cell, ``--repeats`` rounds interleaved; the median (and range) of the rounds."""
    families, ranks = args.families.split(","), [int(r) for r in args.ranks.split(",")]
    bad = [f for f in families if f not in FAMILY_RECIPES]
    if bad:
        raise SystemExit(f"error: unknown family {bad[0]!r}; valid: {', '.join(FAMILY_RECIPES)}")
    for key, path in (("--shards", args.shards), ("--paired-shards", args.paired_shards)):
        if not (Path(path) / "manifest.json").is_file():
            raise SystemExit(f"error: {key} {path!r} holds no manifest.json; build shards with python -m data_shards "
                             f"build (single images for --shards, --source paired for --paired-shards)")
    load = {"start": os.getloadavg()}
    cells: dict[tuple, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for world in ranks:
                for family in families:
                    row = run_cell(family, world, args, Path(tmp))
                    print(f"{family:8} ranks {world}: ours {row['img_per_s_ours']:.1f} img/s"
                          + (f", plain loop {row['img_per_s_plain']:.1f}" if row["img_per_s_plain"] else ""), flush=True)
                    cells.setdefault((family, world), []).append(row)
    load["end"] = os.getloadavg()
    rows = []
    for (family, world), rs in cells.items():
        ours, plain = [r["img_per_s_ours"] for r in rs], [r["img_per_s_plain"] for r in rs if r["img_per_s_plain"]]
        rows.append({**{k: rs[0][k] for k in ("family", "recipe", "world_size", "threads_per_rank", "batch_size", "steps")},
                     "img_per_s_ours": statistics.median(ours), "ours_range": [min(ours), max(ours)],
                     "img_per_s_plain": statistics.median(plain) if plain else None,
                     "plain_range": [min(plain), max(plain)] if plain else None, "repeats": len(rs)})
    print(f"\nload average (1, 5, 15 min): start {load['start']}, end {load['end']}")
    print(f"{'family':8} {'recipe':38} {'batch/rank':>10} {'ranks':>5} {'threads/rank':>12} {'ours img/s':>18} "
          f"{'plain loop img/s':>18}")
    for r in rows:
        rng = f"{r['img_per_s_ours']:.1f} ({r['ours_range'][0]:.0f}-{r['ours_range'][1]:.0f})"
        plain = f"{r['img_per_s_plain']:.1f} ({r['plain_range'][0]:.0f}-{r['plain_range'][1]:.0f})" \
            if r["img_per_s_plain"] else "-"
        print(f"{r['family']:8} {r['recipe']:38} {r['batch_size']:10d} {r['world_size']:5d} {r['threads_per_rank']:12d} "
              f"{rng:>18} {plain:>18}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": "cpu", "load_average": load, "rows": rows}, indent=2))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--json", default=None, help="also write the results here")
    fam = p.add_argument_group("families mode")
    fam.add_argument("--families", default="", help="comma-separated, of: " + ", ".join(FAMILY_RECIPES))
    fam.add_argument("--ranks", default="1,2", help="process counts to measure (default: %(default)s)")
    fam.add_argument("--shards", default="data/shards/cifar10-train", help="single-image shards (gan, vae)")
    fam.add_argument("--paired-shards", default="data/shards/cifar10-sketch-train", help="paired shards (pix2pix)")
    fam.add_argument("--repeats", type=int, default=1, help="rounds over every cell; the median is reported")
    fam.add_argument("--threads", type=int, default=0, help="torch threads per rank (default: 1 process takes "
                     "torch's default, torchrun gives each of several ranks 1)")
    fam.add_argument("--family-worker", default="", help=argparse.SUPPRESS)
    fam.add_argument("--run-dir", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.family_worker:
        return family_worker(args)
    if args.families:
        return families_main(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    name, peak = peak_for(device)
    print(f"device: {name}; bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else f"device: {name}")
    rows = []
    print(f"{'recipe':16} {'batch':>5} {'n_dis':>5} {'eager fp32 img/s':>17} {'ours img/s':>11} {'speedup':>8} "
          f"{'GFLOP/img':>10} {'peak %':>7}  host syncs in the step")
    for r in args.recipes.split(","):
        if r not in RECIPES:
            p.error(f"unknown recipe {r!r}; valid: {', '.join(RECIPES)}")
        row = run_recipe(r, args, device)
        rows.append(row)
        pk = f"{100 * row['peak_fraction_ours']:.1f}" if row["peak_fraction_ours"] is not None else "n/a"
        print(f"{r:16} {row['batch_size']:5d} {row['n_dis']:5d} {row['img_per_s_baseline']:17.0f} "
              f"{row['img_per_s_ours']:11.0f} {row['speedup']:7.2f}x {row['gflops_per_image']:10.3f} {pk:>7}  "
              f"{row['host_syncs']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
