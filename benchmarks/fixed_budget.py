#!/usr/bin/env python
"""Quality at a fixed budget: train each recipe for the same budget on this machine, evaluate every
result with the same metrics, and put them side by side (a markdown table and a picture).

Two budgets:

- ``--minutes M`` (the GAN recipes): the same training time for each recipe; every EMA generator is
  evaluated with launch/evaluate.py (one run per recipe).
- ``--steps N`` (any recipe; made for the VAE and pix2pix): N optimizer steps at the recipe's batch size
  (``train.batch_size`` may be set), so the result does not depend on the machine's load; wall time is
  reported beside it. Each seed of ``--seeds`` trains once through our trainer and, for the VAE and
  pix2pix, once through the plain reference loop of benchmarks/reference_loops.py (same networks, same
  batches, no spine). The VAE and pix2pix are measured on held-out shards (``--val RECIPE=DIR``;
  pix2pix defaults to its ``val.shards``) with their families' measures (gan/families/*/evaluation.py):
  ours from the final checkpoint's network and from its EMA export, the reference's from its network.
  The table gives the mean and spread (sample standard deviation) over the seeds.

    python benchmarks/fixed_budget.py --minutes 10 --out runs/budget                  # every GAN recipe
    python benchmarks/fixed_budget.py --minutes 10 --out runs/budget --recipes sngan  # one per command
    python benchmarks/fixed_budget.py --out runs/budget --report-only                 # table + picture
    python benchmarks/fixed_budget.py ... --metrics cls_acc,cls_fd,fid,kid --inception-weights W.pth
    python benchmarks/fixed_budget.py --steps 100 --seeds 0,1,2 --recipes vae,pix2pix --out runs/steps \
        --set vae:data.shards=DIR --val vae=TEST_DIR --set pix2pix:data.shards=PAIRS --val pix2pix=TEST_PAIRS

``--set KEY=VALUE`` applies to every recipe, ``--set RECIPE:KEY=VALUE`` to one.

Minutes: each recipe runs ``launch/train.py --resume auto train.max_minutes=M`` in OUT/<recipe>. The budget
is training-loop time summed over resumes (start-up excluded; compilation, samples and checkpoints
included), so the work may be split over several commands: with ``--deadline S`` this script sends
the training process SIGUSR2 in time for it to checkpoint, and the next call goes on from there.
A finished run is evaluated once (OUT/<recipe>/budget_eval.json, redone only if the run moved on).
Written: OUT/fixed_budget.md, OUT/fixed_budget.json, OUT/fixed_budget.png.

Steps: runs in OUT/<recipe>/seed-<S>/{ours,reference}; a finished run is not trained again, so a second
call goes on where the first stopped. Written: OUT/fixed_budget.md, OUT/fixed_budget.json and, per family,
OUT/fixed_budget_<recipe>.png (held-out reconstructions or translations of the first seed).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from gan.rundir import RunDir  # noqa: E402

GAN_RECIPES = {"cdcgan": "configs/cifar10_cdcgan.yaml", "sngan": "configs/cifar10_sngan.yaml",
               "biggan": "configs/cifar10_biggan.yaml", "biggan_diffaug": "configs/cifar10_biggan_diffaug.yaml"}
# evaluated here on held-out shards, beside the plain loop of benchmarks/reference_loops.py (--steps only)
FAMILY_RECIPES = {"vae": "configs/cifar10_vae.yaml", "pix2pix": "configs/cifar10_sketch_pix2pix.yaml"}
RECIPES = {**GAN_RECIPES, **FAMILY_RECIPES}
EVALUATED_NET = {"vae": "vae", "pix2pix": "G"}  # the network each family's measures read
EVAL_FILE = "budget_eval.json"
PROCESS_FILE = "budget_process.json"  # steps mode: wall-clock seconds of the training process(es)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def training(run: Path, since: float) -> bool:
    """Has the process started after ``since`` reached its training loop? Only then is its signal
    handler surely installed (a USR2 before it would kill the process instead of stopping it)."""
    status = RunDir(run).status_file
    try:
        fresh = status.stat().st_mtime >= since - 1
    except OSError:
        return False
    return fresh and (read_json(status) or {}).get("state") == "running"


def overrides(recipe: str, args) -> list[str]:
    """The ``--set`` values for ``recipe``: unprefixed ones, then ``recipe:``-prefixed ones (prefix removed)."""
    out = []
    for item in args.set:
        target, sep, rest = item.partition(":") if ":" in item.split("=", 1)[0] else ("", "", item)
        if not sep or target == recipe:
            out.append(rest)
    return out


def add_seconds(run: Path, seconds: float) -> None:
    """Steps mode: add one training process's wall-clock seconds to the run's total (start-up included)."""
    total = (read_json(run / PROCESS_FILE) or {}).get("process_seconds", 0.0) + seconds
    (run / PROCESS_FILE).write_text(json.dumps({"process_seconds": total}))


def train(recipe: str, run: Path, args, deadline: float | None, budget: list[str]) -> str:
    """Train (or resume) one recipe with our trainer up to the budget (``train.max_minutes=M``, or
    ``train.max_steps=N train.seed=S``). Returns the run's state: finished | preempted | failed."""
    cmd = [sys.executable, "launch/train.py", "--config", RECIPES[recipe], "--run-dir", str(run), "--resume", "auto",
           *budget, *overrides(recipe, args)]
    print(f"[{recipe}] {' '.join(cmd)}", flush=True)
    launched, t0 = time.time(), time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    signalled = False
    while proc.poll() is None:
        if deadline is not None and not signalled and time.monotonic() > deadline and training(run, launched):
            print(f"[{recipe}] deadline: SIGUSR2 (checkpoint and stop; the next call resumes)", flush=True)
            proc.send_signal(signal.SIGUSR2)
            signalled = True
        time.sleep(0.2)
    if args.steps:
        add_seconds(run, time.perf_counter() - t0)
    status = RunDir(run).read_status() or {}
    if proc.returncode != 0:
        print(f"[{recipe}] training exited with {proc.returncode}: {status.get('error')}", flush=True)
        return "failed"
    return status.get("state", "failed")


def train_reference(recipe: str, run: Path, args, budget: list[str]) -> str:
    """The same budget through the plain loop of benchmarks/reference_loops.py. -> finished | failed."""
    cmd = [sys.executable, "benchmarks/reference_loops.py", "--config", RECIPES[recipe], "--out", str(run),
           *budget, *overrides(recipe, args)]
    print(f"[{recipe}] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT)
    run.mkdir(parents=True, exist_ok=True)
    add_seconds(run, time.perf_counter() - t0)
    return "finished" if r.returncode == 0 and (run / "result.json").is_file() else "failed"


def evaluate(recipe: str, run: Path, args) -> dict | None:
    """Offline (and, with Inception weights, torch-fidelity) metrics of the run's newest checkpoint."""
    status = RunDir(run).read_status() or {}
    done = read_json(run / EVAL_FILE)
    if done and done.get("step") == status.get("step") and set(done.get("metrics", {})) >= set(_keys(args.metrics)):
        return done
    cmd = [sys.executable, "launch/evaluate.py", "--run", str(run), "--metrics", args.metrics,
           "--num-samples", str(args.num_samples), "--out", str(run / EVAL_FILE)]
    if args.inception_weights:
        cmd += ["--inception-weights", args.inception_weights]
    if args.classifier:
        cmd += ["--classifier", args.classifier]
    if args.max_real:
        cmd += ["--max-real", str(args.max_real)]
    print(f"[{recipe}] {' '.join(cmd)}", flush=True)
    r = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    return read_json(run / EVAL_FILE) if r.returncode == 0 else None


def _keys(metrics: str) -> list[str]:
    from gan.metrics.names import keys_of, parse_metrics
    return keys_of(parse_metrics(metrics))


# ---------------------------------------------------------------------------- the VAE and pix2pix: held-out measures
def family_network(cfg):
    """The network a family's held-out measures read, freshly built from ``cfg.model``."""
    if cfg.family == "vae":
        from gan.families.vae.networks import VAE
        return VAE(cfg.model)
    from gan.families.pix2pix.networks import UNet
    return UNet(cfg.model)


def weights_of(run: Path, which: str) -> tuple[object, dict]:
    """(resolved config, state dict) of the evaluated network of a steps-mode run: ``which`` is ``ours``
    (the final checkpoint's network), ``ours_ema`` (the EMA export) or ``reference``."""
    from safetensors.torch import load_file

    from gan.config import load_config
    from gan.rundir import part_file

    cfg = load_config(run / "config.yaml")
    net = EVALUATED_NET[cfg.family]
    if which == "reference":
        return cfg, load_file(str(run / f"{net}.safetensors"))
    rd = RunDir(run)
    if which == "ours_ema":
        return cfg, load_file(str(rd.export_weights))
    ckpt, _ = rd.newest_valid()
    meta = read_json(ckpt / "meta.json")
    return cfg, load_file(str(ckpt / part_file(net, meta["nets"], meta["ema"])))


def held_out_measures(cfg, state: dict, val_dir: str, batch_size: int = 250) -> tuple[dict[str, float], int]:
    """Means over every sample of the held-out shards ``val_dir`` of the family's per-sample measures
    (gan/families/*/evaluation.py) of the network with weights ``state``, in eval mode. The VAE's ELBO
    draws each image's latent from noise seeded by the image and seed 0, as evaluation does, so a re-run
    gives the same values. -> (means, count)."""
    from gan.data import eval_batches

    net = family_network(cfg)
    net.load_state_dict(state)
    net.eval()
    if cfg.family == "vae":
        from gan.families.vae.evaluation import per_sample_measures

        def measure(x, y):
            return per_sample_measures(net, x, y, cfg.loss.obs_std, seed=0)
    else:
        from gan.families.pix2pix.evaluation import per_sample_measures

        def measure(a, b, y):
            return per_sample_measures(net, a, b)[0]
    sums, n = {}, 0
    for batch in eval_batches(val_dir, batch_size):
        for k, v in measure(*batch).items():
            sums[k] = sums.get(k, 0.0) + v.sum().item()
        n += len(batch[0])
    return {k: v / n for k, v in sums.items()}, n


def val_dir_of(recipe: str, args) -> str:
    """The held-out shards of a family recipe: ``--val RECIPE=DIR``, else (pix2pix) its ``val.shards``."""
    given = dict(v.split("=", 1) for v in args.val)
    if recipe in given:
        return given[recipe]
    if recipe == "pix2pix":
        from gan.config import load_config
        return load_config(ROOT / RECIPES[recipe], overrides(recipe, args)).val.shards
    return ""


def evaluate_family(recipe: str, run: Path, which: list[str], args) -> dict | None:
    """Held-out measures of each of ``which`` for a finished steps-mode run, once (RUN/budget_eval.json)."""
    done = read_json(run / EVAL_FILE)
    if done and set(done.get("measures", {})) >= set(which):
        return done
    val = val_dir_of(recipe, args)
    measures, count = {}, 0
    for w in which:
        cfg, state = weights_of(run, w)
        measures[w], count = held_out_measures(cfg, state, val)
    result = {"val": str(val), "samples": count, "measures": measures}
    (run / EVAL_FILE).write_text(json.dumps(result, indent=2))
    print(f"[{recipe}] {run}: " + "; ".join(f"{w} " + ", ".join(f"{k} {v:.4g}" for k, v in m.items())
                                          for w, m in measures.items()), flush=True)
    return result


# ---------------------------------------------------------------------------- steps mode
def trainers_of(recipe: str) -> tuple[str, ...]:
    return ("ours", "reference") if recipe in FAMILY_RECIPES else ("ours",)


def finished(run: Path, trainer: str, steps: int) -> bool:
    if trainer == "reference":
        return (read_json(run / "result.json") or {}).get("steps") == steps
    status = RunDir(run).read_status() or {}
    return status.get("state") == "finished" and status.get("step") == steps


def run_steps(recipe: str, seed: int, args) -> list[str]:
    """Train and evaluate one recipe and seed at the step budget, ours and (VAE, pix2pix) the reference.
    Returns the trainers that failed."""
    budget = [f"train.max_steps={args.steps}", f"train.seed={seed}"]
    failed = []
    for trainer in trainers_of(recipe):
        run = Path(args.out) / recipe / f"seed-{seed}" / trainer
        if not finished(run, trainer, args.steps):
            state = train(recipe, run, args, None, budget) if trainer == "ours" else \
                train_reference(recipe, run, args, budget)
            if state != "finished":
                failed.append(f"{recipe} seed {seed} {trainer}")
                continue
        if recipe in FAMILY_RECIPES:
            ok = evaluate_family(recipe, run, ["ours", "ours_ema"] if trainer == "ours" else ["reference"], args)
        else:
            ok = evaluate(recipe, run, args)
        if ok is None:
            failed.append(f"{recipe} seed {seed} {trainer} (evaluation)")
    return failed


def steps_rows(out: Path, recipes: list[str], seeds: list[int]) -> list[dict]:
    """One row per recipe, seed and evaluated network: ours, ours (EMA), reference."""
    rows = []
    for r in recipes:
        for seed in seeds:
            for trainer in trainers_of(r):
                run = out / r / f"seed-{seed}" / trainer
                ev = read_json(run / EVAL_FILE) or {}
                if trainer == "reference":
                    res = read_json(run / "result.json") or {}
                    steps, loop = res.get("steps"), res.get("loop_seconds")
                else:
                    status = RunDir(run).read_status() or {}
                    steps, loop = status.get("step"), status.get("train_seconds")
                if steps is None:
                    continue
                batch = yaml.safe_load((run / "config.yaml").read_text())["train"]["batch_size"]
                process = (read_json(run / PROCESS_FILE) or {}).get("process_seconds")
                measures = ev.get("measures") or ({"ours": ev["metrics"]} if "metrics" in ev else {})
                for which, metrics in measures.items():
                    rows.append({"recipe": r, "trainer": which, "seed": seed, "steps": steps,
                                 "batch_size": batch, "loop_seconds": loop,
                                 "process_seconds": process, "val_samples": ev.get("samples"), "metrics": metrics})
    return rows


def mean_sd(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def steps_summary(rows: list[dict]) -> list[dict]:
    """Mean and sample standard deviation over seeds per recipe and evaluated network."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["recipe"], row["trainer"]), []).append(row)
    out = []
    for (recipe, trainer), rs in groups.items():
        names = [n for n in rs[0]["metrics"] if all(n in r["metrics"] for r in rs)]  # the family's order
        cols = {n: mean_sd([r["metrics"][n] for r in rs]) for n in names}
        for k in ("loop_seconds", "process_seconds"):
            vals = [r[k] for r in rs if r[k] is not None]
            cols[k] = mean_sd(vals) if vals else None
        out.append({"recipe": recipe, "trainer": trainer, "seeds": [r["seed"] for r in rs], "steps": rs[0]["steps"],
                    "batch_size": rs[0]["batch_size"], "val_samples": rs[0]["val_samples"], "metrics": names,
                    "mean_sd": cols})
    return out


LABELS = {"ours": "ours", "ours_ema": "ours (EMA)", "reference": "reference loop"}


def steps_markdown(summary: list[dict], device: str) -> str:
    lines = [f"Budget: a fixed number of optimizer steps per run; mean ± sample sd over the seeds; device: {device}.", ""]
    for recipe in dict.fromkeys(s["recipe"] for s in summary):
        rs = [s for s in summary if s["recipe"] == recipe]
        names = rs[0]["metrics"]
        head = ["trainer", "seeds", "steps", "batch", "loop s", "process s", *names]
        lines += [f"{recipe} (held-out samples: {rs[0]['val_samples']})", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in rs:
            def cell(v):
                return "-" if v is None else f"{v[0]:.4g} ± {v[1]:.2g}"
            vals = [LABELS.get(s["trainer"], s["trainer"]), ",".join(map(str, s["seeds"])), str(s["steps"]),
                    str(s["batch_size"]), cell(s["mean_sd"]["loop_seconds"]), cell(s["mean_sd"]["process_seconds"])]
            lines.append("| " + " | ".join(vals + [cell(s["mean_sd"].get(n)) for n in names]) + " |")
        lines.append("")
    return "\n".join(lines)


def family_picture(out: Path, recipe: str, seed: int, args, n: int = 8) -> Path | None:
    """Held-out pictures of one seed, one panel per evaluated network: the VAE's inputs over their
    reconstructions, pix2pix's input | output | target rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from gan.data import eval_batches

    panels = []
    for trainer, which in (("reference", "reference"), ("ours", "ours"), ("ours", "ours_ema")):
        run = out / recipe / f"seed-{seed}" / trainer
        if not (run / EVAL_FILE).is_file():  # not trained and evaluated (yet)
            continue
        cfg, state = weights_of(run, which)
        net = family_network(cfg)
        net.load_state_dict(state)
        net.eval()
        batch = next(iter(eval_batches(val_dir_of(recipe, args), n)))
        with torch.no_grad():
            if cfg.family == "vae":
                from gan.families.vae.pictures import reconstruction_grid
                x, y = batch
                img = reconstruction_grid(x, net.reconstruct(x, y if cfg.model.conditional else None), n)
            else:
                from gan.families.pix2pix.pictures import triplet_grid
                a, b, _ = batch
                img = triplet_grid(a, net(a), b, n)
        panels.append((LABELS[which], img))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 4.6) if recipe == "pix2pix" else (3.6 * len(panels), 1.6),
                             squeeze=False)
    for ax, (label, img) in zip(axes[0], panels):
        ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_title(f"{recipe} {label}, seed {seed}, {args.steps} steps", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    path = out / f"fixed_budget_{recipe}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- minutes mode (GAN recipes)
def rows_of(out: Path, recipes: list[str]) -> list[dict]:
    rows = []
    for r in recipes:
        status = RunDir(out / r).read_status()
        if not status:
            continue
        ev = read_json(out / r / EVAL_FILE) or {}
        secs = status.get("train_seconds") or 0.0
        kimg = status.get("kimg") or 0.0
        rows.append({"recipe": r, "state": status.get("state"), "step": status.get("step"), "kimg": kimg,
                     "train_minutes": secs / 60, "img_per_s": 1000 * kimg / secs if secs else None,
                     "eval_step": ev.get("step"), "metrics": ev.get("metrics", {}), "note": status.get("note")})
    return rows


def markdown(rows: list[dict], minutes: float | None, device: str) -> str:
    names = sorted({k for row in rows for k in row["metrics"] if "/" not in k})  # per-class ones: the JSON
    head = ["recipe", "state", "G steps", "kimg", "train min", "img/s", *names]
    lines = [f"Budget: {minutes:g} min of training per recipe; device: {device}." if minutes else f"Device: {device}.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        vals = [row["recipe"], row["state"], str(row["step"]), f"{row['kimg']:.1f}", f"{row['train_minutes']:.2f}",
                f"{row['img_per_s']:.0f}" if row["img_per_s"] else "-"]
        vals += [f"{row['metrics'][n]:.4g}" if n in row["metrics"] else "-" for n in names]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def picture(out: Path, rows: list[dict], per_class: int, device) -> Path | None:
    """One panel per evaluated recipe: its EMA generator's per-class grid (the same noise for all)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gan.metrics import load_generator
    from gan.sampling import grid

    rows = [row for row in rows if row["metrics"]]
    if not rows:
        return None
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.9), squeeze=False)
    for ax, row in zip(axes[0], rows):
        g = load_generator(out / row["recipe"], None, device)
        m = g.cfg.model
        img = grid(g.G, m.z_dim, m.num_classes, per_class, device, seed=0)
        ax.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if img.shape[0] == 1 else None)
        score = ", ".join(f"{k} {v:.3g}" for k, v in sorted(row["metrics"].items()) if "/" not in k)
        ax.set_title(f"{row['recipe']}\n{row['step']} steps, {row['train_minutes']:.1f} min\n{score}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    path = out / "fixed_budget.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def check_steps_args(p, args, recipes: list[str]) -> list[int]:
    """Steps mode: every input checked before any work. -> the seeds."""
    if args.deadline is not None:
        p.error("--deadline works with --minutes only (a step budget has no clock to stop by)")
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [0]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2")
    bad = [v for v in args.val if "=" not in v or v.split("=", 1)[0] not in FAMILY_RECIPES]
    if bad:
        p.error(f"--val {bad[0]!r}: expected RECIPE=DIR with RECIPE one of {', '.join(FAMILY_RECIPES)}")
    from gan.data import ShardError, read_manifest

    for r in recipes:
        if r not in FAMILY_RECIPES:
            continue
        val = val_dir_of(r, args)
        if not val:
            p.error(f"{r}: no held-out shards; pass --val {r}=DIR (e.g. python -m data_shards build --source "
                    f"cifar10 ... --split test --out DIR)")
        try:
            read_manifest(val)
        except ShardError as e:
            p.error(f"{r}: held-out shards {val}: {e}")
    return seeds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory of the runs (OUT/<recipe>) and the report")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget per recipe (default: %(default)s)")
    p.add_argument("--steps", type=int, default=0, help="a step budget instead: N optimizer steps per run")
    p.add_argument("--seeds", default="", help="with --steps: comma-separated train.seed values (default: 0)")
    p.add_argument("--recipes", default="", help="comma-separated, of: " + ", ".join(RECIPES) +
                   f" (default: {', '.join(GAN_RECIPES)}; with --steps: {', '.join(FAMILY_RECIPES)})")
    p.add_argument("--val", action="append", default=[], metavar="RECIPE=DIR",
                   help="with --steps: held-out shards of a VAE or pix2pix recipe (pix2pix default: its val.shards)")
    p.add_argument("--metrics", default="cls_acc,cls_fd", help="as launch/evaluate.py (default: %(default)s)")
    p.add_argument("--num-samples", type=int, default=10000, help="generated images per evaluation")
    p.add_argument("--inception-weights", default="", help="for fid/isc/kid/prc")
    p.add_argument("--classifier", default="", help="for cls_acc/cls_fd (default: the committed CIFAR-10 one)")
    p.add_argument("--max-real", type=int, default=0, help="first N real images only (quick checks)")
    p.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                   help="stop starting work and checkpoint running training after this many seconds")
    p.add_argument("--per-class", type=int, default=6, help="samples per class in the picture")
    p.add_argument("--set", action="append", default=[], metavar="[RECIPE:]KEY=VALUE",
                   help="training override, repeatable; RECIPE: applies it to that recipe only")
    p.add_argument("--report-only", action="store_true", help="only the table and picture from OUT")
    args = p.parse_args(argv)
    recipes = args.recipes.split(",") if args.recipes else list(FAMILY_RECIPES if args.steps else GAN_RECIPES)
    bad = [r for r in recipes if r not in RECIPES]
    if bad:
        p.error(f"unknown recipe(s) {', '.join(bad)}; valid: {', '.join(RECIPES)}")
    prefixes = {item.split(":", 1)[0] for item in args.set if ":" in item.split("=", 1)[0]}
    if prefixes - set(RECIPES):
        p.error(f"--set {sorted(prefixes - set(RECIPES))[0]}:...: not a recipe; valid: {', '.join(RECIPES)}")
    if args.steps < 0 or args.minutes <= 0:
        p.error("--steps and --minutes must be > 0")
    if not args.steps and set(recipes) & set(FAMILY_RECIPES):
        p.error(f"{', '.join(r for r in recipes if r in FAMILY_RECIPES)}: measured at a step budget against the "
                f"reference loop; pass --steps N")
    try:
        _keys(args.metrics)  # unknown metric names fail now, listing the valid ones
    except ValueError as e:
        p.error(str(e))
    seeds = check_steps_args(p, args, recipes) if args.steps else []

    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if args.steps:
        return steps_main(out, recipes, seeds, args, device_name)
    deadline = time.monotonic() + args.deadline if args.deadline else None
    pending, failed = [], []
    if not args.report_only:
        for r in recipes:
            if deadline is not None and time.monotonic() > deadline:
                pending.append(r)
                continue
            state = train(r, out / r, args, deadline, [f"train.max_minutes={args.minutes}"])
            if state == "finished" and not (deadline is not None and time.monotonic() > deadline):
                if evaluate(r, out / r, args) is None:
                    print(f"[{r}] evaluation failed (its error is above)", flush=True)
                    failed.append(r)
            elif state == "failed":
                failed.append(r)
            else:
                pending.append(r)
    rows = rows_of(out, recipes)
    table = markdown(rows, args.minutes, device_name)
    (out / "fixed_budget.md").write_text(table)
    (out / "fixed_budget.json").write_text(json.dumps({"device": device_name, "minutes": args.minutes,
                                                       "rows": rows}, indent=2))
    pic = picture(out, rows, args.per_class, device)
    print(table + (f"picture: {pic}\n" if pic else ""), end="", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}")
        return 1
    if pending:
        print(f"not finished yet (call again to go on): {', '.join(pending)}")
        return 3
    return 0


def steps_main(out: Path, recipes: list[str], seeds: list[int], args, device_name: str) -> int:
    failed = []
    if not args.report_only:
        for r in recipes:
            for seed in seeds:
                failed += run_steps(r, seed, args)
    rows = steps_rows(out, recipes, seeds)
    summary = steps_summary(rows)
    table = steps_markdown(summary, device_name)
    (out / "fixed_budget.md").write_text(table)
    (out / "fixed_budget.json").write_text(json.dumps({"device": device_name, "steps": args.steps, "seeds": seeds,
                                                       "rows": rows, "summary": summary}, indent=2))
    pics = [family_picture(out, r, seeds[0], args) for r in recipes if r in FAMILY_RECIPES]
    print(table + "".join(f"picture: {pic}\n" for pic in pics if pic), end="", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
