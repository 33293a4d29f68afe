#!/usr/bin/env python
"""Quality at a fixed wall-clock budget: train each recipe for the same training time on this
machine, evaluate every EMA generator with the same metrics, and put them side by side (a markdown
table and one picture of per-class samples).

    python benchmarks/fixed_budget.py --minutes 10 --out runs/budget                  # every recipe
    python benchmarks/fixed_budget.py --minutes 10 --out runs/budget --recipes sngan  # one per command
    python benchmarks/fixed_budget.py --out runs/budget --report-only                 # table + picture
    python benchmarks/fixed_budget.py ... --metrics cls_acc,cls_fd,fid,kid --inception-weights W.pth

Each recipe runs ``launch/train.py --resume auto train.max_minutes=M`` in OUT/<recipe>. The budget
is training-loop time summed over resumes (start-up excluded; compilation, samples and checkpoints
included), so the work may be split over several commands: with ``--deadline S`` this script sends
the training process SIGUSR2 in time for it to checkpoint, and the next call goes on from there.
A finished run is evaluated once (OUT/<recipe>/budget_eval.json, redone only if the run moved on).
Written: OUT/fixed_budget.md, OUT/fixed_budget.json, OUT/fixed_budget.png.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gan.rundir import RunDir  # noqa: E402

RECIPES = {"cdcgan": "configs/cifar10_cdcgan.yaml", "sngan": "configs/cifar10_sngan.yaml",
           "biggan": "configs/cifar10_biggan.yaml", "biggan_diffaug": "configs/cifar10_biggan_diffaug.yaml"}
EVAL_FILE = "budget_eval.json"


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


def train(recipe: str, run: Path, args, deadline: float | None) -> str:
    """Train (or resume) one recipe up to the budget. Returns the run's state: finished | preempted | failed."""
    cmd = [sys.executable, "launch/train.py", "--config", RECIPES[recipe], "--run-dir", str(run), "--resume", "auto",
           f"train.max_minutes={args.minutes}", *args.set]
    print(f"[{recipe}] {' '.join(cmd)}", flush=True)
    launched = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    signalled = False
    while proc.poll() is None:
        if deadline is not None and not signalled and time.monotonic() > deadline and training(run, launched):
            print(f"[{recipe}] deadline: SIGUSR2 (checkpoint and stop; the next call resumes)", flush=True)
            proc.send_signal(signal.SIGUSR2)
            signalled = True
        time.sleep(0.2)
    status = RunDir(run).read_status() or {}
    if proc.returncode != 0:
        print(f"[{recipe}] training exited with {proc.returncode}: {status.get('error')}", flush=True)
        return "failed"
    return status.get("state", "failed")


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory of the runs (OUT/<recipe>) and the report")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget per recipe (default: %(default)s)")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated, of: " + ", ".join(RECIPES))
    p.add_argument("--metrics", default="cls_acc,cls_fd", help="as launch/evaluate.py (default: %(default)s)")
    p.add_argument("--num-samples", type=int, default=10000, help="generated images per evaluation")
    p.add_argument("--inception-weights", default="", help="for fid/isc/kid/prc")
    p.add_argument("--classifier", default="", help="for cls_acc/cls_fd (default: the committed CIFAR-10 one)")
    p.add_argument("--max-real", type=int, default=0, help="first N real images only (quick checks)")
    p.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                   help="stop starting work and checkpoint running training after this many seconds")
    p.add_argument("--per-class", type=int, default=6, help="samples per class in the picture")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training override, repeatable")
    p.add_argument("--report-only", action="store_true", help="only the table and picture from OUT")
    args = p.parse_args(argv)
    recipes = args.recipes.split(",")
    bad = [r for r in recipes if r not in RECIPES]
    if bad:
        p.error(f"unknown recipe(s) {', '.join(bad)}; valid: {', '.join(RECIPES)}")
    if args.minutes <= 0:
        p.error("--minutes must be > 0")
    try:
        _keys(args.metrics)  # unknown metric names fail now, listing the valid ones
    except ValueError as e:
        p.error(str(e))

    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.deadline if args.deadline else None
    pending, failed = [], []
    if not args.report_only:
        for r in recipes:
            if deadline is not None and time.monotonic() > deadline:
                pending.append(r)
                continue
            state = train(r, out / r, args, deadline)
            if state == "finished" and not (deadline is not None and time.monotonic() > deadline):
                if evaluate(r, out / r, args) is None:
                    print(f"[{r}] evaluation failed (its error is above)", flush=True)
                    failed.append(r)
            elif state == "failed":
                failed.append(r)
            else:
                pending.append(r)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
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


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
