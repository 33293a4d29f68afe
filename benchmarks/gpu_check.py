#!/usr/bin/env python
"""Everything worth knowing about one GPU, in one command within a time budget.

    python benchmarks/gpu_check.py --out DIR [--shards DIR] [--budget-minutes M]   # M default 8

Writes DIR/report.md, DIR/report.json and the pictures (throughput.png, loader.png, samples.png):

1. environment: GPU, driver, torch / CUDA versions, the precision used;
2. training-step throughput of every recipe, ours vs the eager fp32 loop in the same run
   (benchmarks/train_throughput.py), FLOPs per image, fraction of the bf16 peak, host-sync check;
3. the loader's delivery rate (gan.data.TrainStream on --shards, 8 and 16 workers) against what the
   GPU consumes for each recipe: the loader must never be the bottleneck;
4. a short bf16 training run of the default recipe (configs/cifar10_cdcgan.yaml, about half the
   budget): img/s, sec/kimg, the sample grid, cls_acc/cls_fd at its end, peak GPU memory;
5. FID of 10k samples timed (whole launch/evaluate.py command, real features cold and cached), with
   torch-fidelity's weights where torch.hub's cache has them, else a stand-in of the same network;
6. one DeepSpeed ZeRO-2 row, only where this checkout has DeepSpeed support (config key
   train.backend); otherwise skipped with a note.

Budget: every part has a share of M minutes and starts only if its minimum fits in what is left;
a part that doesn't fit is listed as skipped with the reason (nothing is silently left out).
On a CPU it degrades to a smoke run of the same parts (one recipe, tiny steps, 2 workers,
a few training steps): the report's structure, not figures.

What a GPU machine without a package index may lack, and how to bring it (assumed there: Python
3.12 with torch 2.11, torchvision 0.26, accelerate 1.15, safetensors, pyyaml, numpy, pillow,
matplotlib, tensorboard, tqdm already installed):
  - webdataset, braceexpand, torch-fidelity (+ its own small needs): wheels, downloaded here by
    `bash benchmarks/prepare_gpu.sh` into local/gpu/wheels (pip download --python-version 3.12);
  - the CIFAR-10 images: local/gpu/cifar10-jpeg.tar.gz (19 MB, copied by the same script from
    ../shared/data); the 50k raw shards are 150 MB, so they are built there instead
    (python -m data_shards ensure-cifar10, about a minute on 16 cores).
On a GPU machine, `make gpu-bundle`, then `bash benchmarks/gpu_check.sh OUT` does all of it (install the
wheels into /tmp/site, build the shards, run this script); see docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

DEFAULT_RECIPE = "configs/cifar10_cdcgan.yaml"
NEEDED = {"webdataset": "webdataset", "braceexpand": "braceexpand", "torch_fidelity": "torch-fidelity",
          "yaml": "pyyaml", "safetensors": "safetensors", "matplotlib": "matplotlib"}
FIX_PACKAGES = ("bring them as wheels: `make gpu-bundle` where pip works (writes local/gpu/wheels), then "
                "there `python3 -m pip install --no-index --no-deps --target /tmp/site local/gpu/wheels/*.whl` "
                "and PYTHONPATH=/tmp/site (benchmarks/gpu_check.sh does both)")
FIX_SHARDS = ("build them: `python -m data_shards ensure-cifar10 --out DIR --root /nonexistent --shared "
              "local/gpu/cifar10-jpeg.tar.gz` (benchmarks/gpu_check.sh does it)")


def synthetic_shards(where: Path, n: int = 512) -> Path:
    """Random CIFAR-shaped images under CIFAR-10's class names (so every part runs without the data)."""
    import numpy as np

    from data_loader import CLASSES
    from data_shards import array_source, build_shards

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    build_shards(array_source("cifar10", list(CLASSES), imgs, np.arange(n) % 10), where, "train", "cifar10", log=None)
    return where


class Budget:
    def __init__(self, minutes: float):
        self.total = minutes * 60.0
        self.t0 = time.perf_counter()

    def left(self) -> float:
        return self.total - (time.perf_counter() - self.t0)

    def fits(self, need: float) -> bool:
        return self.left() >= need


def skipped(why: str) -> dict:
    print(f"  skipped: {why}", flush=True)
    return {"skipped": why}


# ---------------------------------------------------------------------------- 1. environment
def environment(device, precision: str) -> dict:
    import torch

    env = {"device": "cpu", "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "precision": precision, "cpu_cores": os.cpu_count(),
           "host": platform.node()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(device=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count,
                   capability=f"{p.major}.{p.minor}", cudnn=torch.backends.cudnn.version())
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            env["driver"] = "unknown (no nvidia-smi)"
    for mod in ("accelerate", "webdataset", "torch_fidelity", "deepspeed"):
        spec = importlib.util.find_spec(mod)
        if spec is None:
            env[mod] = None
        else:
            try:
                env[mod] = __import__(mod).__version__
            except Exception as e:  # noqa: BLE001 - a broken optional package is reported, not fatal
                env[mod] = f"import failed: {type(e).__name__}"
    return env


# ---------------------------------------------------------------------------- 2. throughput
def throughput(device, budget: Budget, share: float, gpu: bool) -> dict:
    import train_throughput as tt

    args = argparse.Namespace(batch_size=64 if gpu else 8, steps=30 if gpu else 2, warmup=5 if gpu else 1,
                              compile=gpu)
    recipes = list(tt.RECIPES) if gpu else ["cdcgan"]
    end = budget.left() - share
    need, rows, notes = (40.0 if gpu else 5.0), [], []
    for name in recipes:
        if budget.left() - end < need:
            notes.append(f"{name}: skipped, budget (needs ~{need:.0f} s, {max(0, budget.left() - end):.0f} s of this "
                         "part left)")
            print(f"  {notes[-1]}", flush=True)
            continue
        t = time.perf_counter()
        row = tt.run_recipe(name, args, device)
        need = max(need, time.perf_counter() - t)
        rows.append(row)
        pk = f"{100 * row['peak_fraction_ours']:.1f}%" if row["peak_fraction_ours"] is not None else "n/a"
        print(f"  {name}: eager fp32 {row['img_per_s_baseline']:.0f} img/s, ours {row['img_per_s_ours']:.0f} img/s "
              f"({row['speedup']:.2f}x), {row['gflops_per_image']:.3f} GFLOP/img, peak {pk}, "
              f"host syncs: {row['host_syncs']}", flush=True)
    _, peak = tt.peak_for(device)
    return {"batch_size": args.batch_size, "steps": args.steps, "compile": args.compile,
            "bf16_peak_tflops": peak / 1e12 if peak else None, "rows": rows, "notes": notes}


# ---------------------------------------------------------------------------- 3. loader
def loader(shards: Path, budget: Budget, share: float, gpu: bool, consumers: list[dict]) -> dict:
    import data_loader as dl

    workers = [8, 16] if gpu else [2]
    batch, batches = 64, (150 if gpu else 10)
    end = budget.left() - share
    rates, notes = {}, []
    for w in workers:
        if budget.left() - end < (20 if gpu else 3):
            notes.append(f"{w} workers: skipped, budget")
            continue
        rates[w] = dl.run_stream(shards, w, batch, batches)
        print(f"  {w} workers: {rates[w]:,.0f} img/s", flush=True)
    best = max(rates.values()) if rates else None
    verdicts = []
    for r in consumers:
        need = r["img_per_s_ours"]
        verdicts.append({"recipe": r["recipe"], "gpu_consumes_img_per_s": need,
                         "loader_img_per_s": best, "headroom": (best / need) if best else None,
                         "bottleneck": (best < need) if best else None})
    return {"batch_size": batch, "batches": batches, "img_per_s": rates, "vs_gpu": verdicts, "notes": notes}


# ---------------------------------------------------------------------------- 4. short run
def train_run(out: Path, shards: Path, seconds: float, gpu: bool, precision: str, extra=(), name="default") -> dict:
    import torch

    from gan.config import load_config
    from gan.trainer import Trainer

    run = out / f"run_{name}"
    shutil.rmtree(run, ignore_errors=True)
    overrides = [f"data.shards={shards}", "data.dataset=", f"train.mixed_precision={precision}",
                 "log.progress=false", "checkpoint.every=100000000", f"train.max_minutes={seconds / 60:.4f}",
                 "metrics.every=0", *extra]
    if gpu:
        overrides += ["data.num_workers=8", "log.every=100", "log.sample_every=100000000"]
    else:
        overrides += ["train.batch_size=8", "train.max_steps=4", "train.compile=false", "data.num_workers=2",
                      "log.every=2", "log.sample_every=100000000"]
    cfg = load_config(ROOT / DEFAULT_RECIPE, overrides)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(cfg, run)
    try:
        outcome = trainer.fit()
    finally:
        trainer.accelerator.end_training()
    status = json.loads((run / "status.json").read_text())
    kimg, secs = status.get("kimg") or 0.0, status.get("train_seconds") or 0.0
    result = {"recipe": DEFAULT_RECIPE, "outcome": outcome, "steps": status["step"], "kimg": kimg,
              "train_seconds": secs, "batch_size": cfg.train.batch_size, "precision": precision,
              "compile": cfg.train.compile, "img_per_s": kimg * 1000 / secs if secs else None,
              "sec_per_kimg": secs / kimg if kimg else None, "run_dir": str(run),
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None}
    grids = sorted((run / "samples").glob("step-*.png"))
    if grids:
        shutil.copy(grids[-1], out / f"samples{'' if name == 'default' else '_' + name}.png")
        result["samples"] = f"samples{'' if name == 'default' else '_' + name}.png"
    return result


def evaluate(out: Path, run: dict, gpu: bool) -> dict:
    res = out / "eval.json"
    cmd = [sys.executable, "launch/evaluate.py", "--run", run["run_dir"], "--metrics", "cls_acc,cls_fd",
           "--num-samples", "10000" if gpu else "100", "--no-tensorboard", "--out", str(res),
           "--cache-dir", str(out / "metrics-cache")]
    if not gpu:
        cmd += ["--max-real", "200", "--batch-size", "50"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        return {"error": (r.stderr or r.stdout).strip()[-600:]}
    data = json.loads(res.read_text())
    return {"num_samples": 10000 if gpu else 100, **data["metrics"]}


def standin_inception(path: Path) -> Path:
    """torch-fidelity's Inception-v3 with random values: the same computation as the real weights (so the
    same time), none of its knowledge (so the FID value means nothing)."""
    from unittest import mock

    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    torch.manual_seed(0)
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(model.state_dict(), path)
    return path


def fid_timing(out: Path, run: dict, gpu: bool, tmp: Path) -> dict:
    """FID of 10k samples (CPU: 20) against the real shards, timed as the whole launch/evaluate.py command:
    cold (each rank extracts its real features and caches them) and warm (cached). Uses torch-fidelity's
    official weights where torch.hub's cache holds them, else a stand-in of the same architecture."""
    from gan.metrics.fidelity import hub_cache_path

    n = 10000 if gpu else 20
    weights, official = hub_cache_path(), True
    if not weights.is_file():
        weights, official = standin_inception(tmp / "standin-inception.pth"), False
    res = out / "fid.json"
    cmd = [sys.executable, "launch/evaluate.py", "--run", run["run_dir"], "--metrics", "fid", "--num-samples", str(n),
           "--no-tensorboard", "--no-progress", "--out", str(res), "--cache-dir", str(out / "metrics-cache"),
           "--inception-weights", str(weights)]
    if not gpu:
        cmd += ["--max-real", "30", "--batch-size", "10"]
    times = []
    for _ in ("cold", "warm"):
        t = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        times.append(time.perf_counter() - t)
        if r.returncode != 0:
            return {"error": (r.stderr or r.stdout).strip()[-600:]}
    data = json.loads(res.read_text())
    return {"num_samples": n, "real": data["details"]["real"]["count"], "cold_s": round(times[0], 1),
            "warm_s": round(times[1], 1), "official_weights": official, "fid": data["metrics"]["fid"]}


# ---------------------------------------------------------------------------- 5. DeepSpeed
def deepspeed_support() -> str | None:
    """Why there is no ZeRO-2 row, or None where this checkout supports DeepSpeed."""
    from gan.config import TrainConfig

    if "backend" not in TrainConfig.__dataclass_fields__:
        return "this checkout has no DeepSpeed support (no train.backend key)"
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install deepspeed, or bring its wheel)"
    return None


# ---------------------------------------------------------------------------- report
def pictures(out: Path, report: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    rows = report["throughput"].get("rows", [])
    if rows:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["img_per_s_baseline"] for r in rows], 0.4, label="eager fp32")
        ax.bar([x + 0.2 for x in xs], [r["img_per_s_ours"] for r in rows], 0.4, label=f"ours ({rows[0]['precision']})")
        ax.set_xticks(list(xs), [r["recipe"] for r in rows])
        ax.set_ylabel("real images / s (training step)")
        ax.set_title(f"Training-step throughput, {report['environment']['device']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=120)
        plt.close(fig)
        made.append("throughput.png")
    ld = report["loader"]
    if ld.get("img_per_s"):
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ws = list(ld["img_per_s"])
        ax.bar([str(w) for w in ws], [ld["img_per_s"][w] for w in ws], color="tab:green", label="loader delivers")
        for i, v in enumerate(ld["vs_gpu"]):
            ax.axhline(v["gpu_consumes_img_per_s"], color=f"C{i}", ls="--", label=f"{v['recipe']} consumes")
        ax.set_xlabel("loader workers")
        ax.set_ylabel("images / s")
        ax.set_title("Loader delivery vs training consumption")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "loader.png", dpi=120)
        plt.close(fig)
        made.append("loader.png")
    return made


def _f(v, fmt="{:,.0f}"):
    return "n/a" if v is None else fmt.format(v)


def markdown(report: dict) -> str:
    e, tp, ld, tr = report["environment"], report["throughput"], report["loader"], report["train"]
    lines = [f"# GPU check: {e['device']}", "",
             f"Command: `{report['command']}`  ", f"Budget {report['budget_minutes']:g} min, used "
             f"{report['elapsed_s'] / 60:.1f} min; {report['date']}", "",
             "## Environment", "", "| key | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in e.items()]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    lines += ["", "## Training-step throughput (ours vs eager fp32, same run)", ""]
    if "skipped" in tp:
        lines.append(f"Skipped: {tp['skipped']}")
    else:
        lines += [f"Batch {tp['batch_size']}, {tp['steps']} timed steps, compile {tp['compile']}; "
                  f"bf16 peak {_f(tp['bf16_peak_tflops'], '{:.0f}')} TFLOP/s.", "",
                  "| recipe | n_dis | eager fp32 img/s | ours img/s | speedup | GFLOP/img | peak % | host syncs |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in tp["rows"]:
            pk = _f(None if r["peak_fraction_ours"] is None else 100 * r["peak_fraction_ours"], "{:.1f}")
            lines.append(f"| {r['recipe']} | {r['n_dis']} | {r['img_per_s_baseline']:,.0f} | {r['img_per_s_ours']:,.0f} "
                         f"| {r['speedup']:.2f}x | {r['gflops_per_image']:.3f} | {pk} | {r['host_syncs']} |")
        lines += [f"- {n}" for n in tp["notes"]]
        if tp["rows"]:
            lines += ["", "![throughput](throughput.png)"]
    lines += ["", "## Loader vs GPU consumption", ""]
    if "skipped" in ld:
        lines.append(f"Skipped: {ld['skipped']}")
    else:
        lines.append(f"TrainStream on {report['shards']}, batch {ld['batch_size']}: " + ", ".join(
            f"{w} workers {v:,.0f} img/s" for w, v in ld["img_per_s"].items()) + ".")
        lines += ["", "| recipe | GPU consumes img/s | loader delivers img/s | headroom | bottleneck |",
                  "| --- | --- | --- | --- | --- |"]
        for v in ld["vs_gpu"]:
            lines.append(f"| {v['recipe']} | {v['gpu_consumes_img_per_s']:,.0f} | {_f(v['loader_img_per_s'])} | "
                         f"{_f(v['headroom'], '{:.1f}x')} | {'YES' if v['bottleneck'] else 'no'} |")
        lines += [f"- {n}" for n in ld["notes"]]
        if ld["img_per_s"]:
            lines += ["", "![loader](loader.png)"]
    prec = {"no": "fp32"}.get(report["environment"]["precision"], report["environment"]["precision"])
    lines += ["", f"## Short {prec} training run of the default recipe", ""]
    if "skipped" in tr:
        lines.append(f"Skipped: {tr['skipped']}")
    else:
        ev = report["eval"]
        metrics = ("skipped: " + ev["skipped"]) if "skipped" in ev else ("error: " + ev["error"]) if "error" in ev \
            else f"cls_acc {ev['cls_acc']:.4f}, cls_fd {ev['cls_fd']:.2f} ({ev['num_samples']} samples)"
        lines += [f"{tr['recipe']}, batch {tr['batch_size']}, compile {tr['compile']}: {tr['steps']} steps, "
                  f"{tr['kimg']:.1f} kimg in {tr['train_seconds']:.0f} s ({tr['outcome']}).", "",
                  "| img/s | sec/kimg | peak GPU memory | end of run |", "| --- | --- | --- | --- |",
                  f"| {_f(tr['img_per_s'])} | {_f(tr['sec_per_kimg'], '{:.2f}')} | "
                  f"{_f(tr['peak_memory_gib'], '{:.2f} GiB')} | {metrics} |"]
        if tr.get("samples"):
            lines += ["", f"![samples]({tr['samples']})"]
    fid = report["fid"]
    lines += ["", "## FID-10k timing (launch/evaluate.py --metrics fid, whole command)", ""]
    if "skipped" in fid:
        lines.append(f"Skipped: {fid['skipped']}")
    elif "error" in fid:
        lines.append(f"Failed: {fid['error']}")
    else:
        w = "official weights" if fid["official_weights"] else "stand-in weights (same network, random values: the " \
                                                               "time is FID's, the value means nothing)"
        lines += [f"{fid['num_samples']:,} samples against {fid['real']:,} real images; {w}.", "",
                  "| samples | cold s (real features extracted) | warm s (real features cached) | fid |",
                  "| --- | --- | --- | --- |",
                  f"| {fid['num_samples']:,} | {fid['cold_s']:.1f} | {fid['warm_s']:.1f} | {fid['fid']:.3g} |"]
    ds = report["deepspeed"]
    lines += ["", "## DeepSpeed ZeRO-2", ""]
    if "skipped" in ds:
        lines.append(f"Skipped: {ds['skipped']}")
    elif "error" in ds:
        lines.append(f"Failed: {ds['error']}")
    else:
        lines += ["| img/s | sec/kimg | peak GPU memory |", "| --- | --- | --- |",
                  f"| {_f(ds['img_per_s'])} | {_f(ds['sec_per_kimg'], '{:.2f}')} | {_f(ds['peak_memory_gib'], '{:.2f} GiB')} |"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="report directory")
    p.add_argument("--shards", type=Path, default=None,
                   help="CIFAR-10 train shards (default: data/shards/cifar10-train, else synthetic shards)")
    p.add_argument("--budget-minutes", type=float, default=8.0)
    a = p.parse_args(argv)
    command = "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])

    missing = [pkg for mod, pkg in NEEDED.items() if importlib.util.find_spec(mod) is None]
    if missing:
        print(f"error: missing Python packages: {', '.join(missing)}; {FIX_PACKAGES}", file=sys.stderr)
        return 2
    notes = []
    if a.shards is not None:
        if not (a.shards / "manifest.json").is_file():
            print(f"error: --shards {a.shards} is not a shard directory (no manifest.json); {FIX_SHARDS}",
                  file=sys.stderr)
            return 2
        shards = a.shards
    elif (ROOT / "data/shards/cifar10-train/manifest.json").is_file():
        shards = ROOT / "data/shards/cifar10-train"
    else:
        shards = None
    budget = Budget(a.budget_minutes)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)

    import torch

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    precision = "bf16" if gpu and torch.cuda.is_bf16_supported() else "no"
    if not gpu:
        notes.append("no GPU: a CPU smoke run of every part (tiny sizes); its timings are not results")
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    if shards is None:
        shards = synthetic_shards(tmp / "shards")
        notes.append(f"no CIFAR-10 shards (--shards): synthetic random shards used; loader and training figures "
                     f"are not CIFAR-10's and cls metrics mean nothing. To fix: {FIX_SHARDS}")
    for n in notes:
        print(f"note: {n}", flush=True)

    report = {"command": command, "budget_minutes": a.budget_minutes, "shards": str(shards), "notes": notes,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    B = budget.total
    try:
        print("[1/5] environment", flush=True)
        report["environment"] = environment(device, precision)
        print("[2/5] training-step throughput per recipe", flush=True)
        report["throughput"] = throughput(device, budget, 0.30 * B, gpu) if budget.fits(10 if gpu else 1) \
            else skipped(f"budget: {budget.left():.0f} s left")
        print("[3/5] loader delivery rate", flush=True)
        consumers = report["throughput"].get("rows", [])
        report["loader"] = loader(shards, budget, 0.12 * B, gpu, consumers) if budget.fits(20 if gpu else 2) \
            else skipped(f"budget: {budget.left():.0f} s left")
        print("[4/5] short training run of the default recipe", flush=True)
        ds_why = deepspeed_support()
        eval_reserve = 75.0 if gpu else 20.0
        ds_reserve = 0.0 if ds_why else (90.0 if gpu else 20.0)
        fid_reserve = 90.0 if gpu else 20.0
        seconds = min(240.0, budget.left() - eval_reserve - fid_reserve - ds_reserve - (30 if gpu else 5))
        if seconds >= (60 if gpu else 2):
            report["train"] = train_run(out, shards, seconds, gpu, precision)
            print(f"  {report['train']['steps']} steps, {_f(report['train']['img_per_s'])} img/s", flush=True)
            report["eval"] = evaluate(out, report["train"], gpu) if budget.fits(eval_reserve / 2) \
                else skipped(f"budget: {budget.left():.0f} s left for cls_acc/cls_fd")
        else:
            report["train"] = skipped(f"budget: {budget.left():.0f} s left, the run needs "
                                      f"{(60 if gpu else 2) + eval_reserve + ds_reserve:.0f}")
            report["eval"] = skipped("no training run")
        print("  FID-10k timing", flush=True)
        if "skipped" in report["train"]:
            report["fid"] = skipped("no training run")
        elif not budget.fits(fid_reserve):
            report["fid"] = skipped(f"budget: {budget.left():.0f} s left, FID-10k needs about {fid_reserve:.0f}")
        else:
            report["fid"] = fid_timing(out, report["train"], gpu, tmp)
        print("[5/5] DeepSpeed ZeRO-2", flush=True)
        if ds_why:
            report["deepspeed"] = skipped(ds_why)
        elif not budget.fits(ds_reserve):
            report["deepspeed"] = skipped(f"budget: {budget.left():.0f} s left")
        else:
            try:
                report["deepspeed"] = train_run(out, shards, max(10.0, budget.left() - 30), gpu, precision,
                                                extra=["train.backend=deepspeed"], name="zero2")
            except Exception as e:  # noqa: BLE001 - one optional row failing must not lose the report
                report["deepspeed"] = {"error": f"{type(e).__name__}: {e}"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        report["elapsed_s"] = round(time.perf_counter() - budget.t0, 1)
        for k in ("environment", "throughput", "loader", "train", "eval", "fid", "deepspeed"):
            report.setdefault(k, {"skipped": "not reached (an earlier part failed)"})
        report["pictures"] = pictures(out, report) + ([report["train"]["samples"]] if report["train"].get("samples") else [])
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
        (out / "report.md").write_text(markdown(report))
        print(f"report: {out / 'report.md'} ({report['elapsed_s'] / 60:.1f} min)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
