"""The benchmark scripts stay runnable: CPU smoke runs of benchmarks/train_throughput.py (the GAN recipes, and
every family on 1 and 2 ranks), benchmarks/gpu_check.py and benchmarks/fixed_budget.py's step budget (ours
vs the plain reference loops). No figure is judged here, timings belong in docs/benchmarks.md; the FLOP
count is exact and is, and the produced numbers' structure and finiteness are."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_throughput_smoke(tmp_path):
    out = tmp_path / "tp.json"
    r = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--recipes", "cdcgan", "--steps", "2",
                        "--warmup", "1", "--batch-size", "8", "--no-compile", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert report["device"] == "cpu" and row["recipe"] == "cdcgan" and row["peak_fraction_ours"] is None
    assert row["host_syncs"] == "n/a" and row["img_per_s_baseline"] > 0 and row["img_per_s_ours"] > 0
    # Training FLOPs per real image of the cDCGAN recipe (D on real+fake, G forward twice, backward): fixed,
    # here to three decimals.
    assert row["gflops_per_image"] == pytest.approx(0.876, abs=0.001)
    assert "cdcgan" in r.stdout and "speedup" in r.stdout


@pytest.mark.slow
def test_gpu_check_on_cpu_writes_the_whole_report(tmp_path):
    """benchmarks/gpu_check.py degrades to a CPU smoke run of every part: report.md, report.json and
    the pictures are there, every part measured or skipped with a note, ZeRO-2 skipped with the reason
    where this checkout has no DeepSpeed support. A generous budget: nothing here may be skipped."""
    out = tmp_path / "gc"
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(out), "--budget-minutes", "30"],
                       cwd=ROOT, capture_output=True, text=True, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["environment"]["device"] == "cpu" and rep["environment"]["torch"]
    assert any("no GPU" in n for n in rep["notes"]) and any("synthetic" in n for n in rep["notes"])
    (row,) = rep["throughput"]["rows"]
    assert row["recipe"] == "cdcgan" and row["gflops_per_image"] == pytest.approx(0.876, abs=0.001)
    assert row["img_per_s_ours"] > 0 and row["img_per_s_baseline"] > 0 and row["host_syncs"] == "n/a"
    (v,) = rep["loader"]["vs_gpu"]
    assert rep["loader"]["img_per_s"]["2"] > 0 and v["recipe"] == "cdcgan" and isinstance(v["bottleneck"], bool)
    tr = rep["train"]
    assert tr["outcome"] == "finished" and tr["steps"] == 4 and tr["img_per_s"] > 0 and tr["sec_per_kimg"] > 0
    assert 0 <= rep["eval"]["cls_acc"] <= 1 and rep["eval"]["cls_fd"] > 0
    fid = rep["fid"]  # the FID-10k row: 20 samples on a CPU, stand-in weights (no official file here)
    assert fid["num_samples"] == 20 and fid["real"] == 30 and fid["official_weights"] is False
    assert fid["cold_s"] > 0 and fid["warm_s"] > 0 and math.isfinite(fid["fid"])
    from gan.config import TrainConfig

    if "backend" not in TrainConfig.__dataclass_fields__:
        assert "no DeepSpeed support" in rep["deepspeed"]["skipped"]
    for pic in ("throughput.png", "loader.png", "samples.png"):
        assert pic in rep["pictures"] and (out / pic).stat().st_size > 1000
    md = (out / "report.md").read_text()
    for heading in ("## Environment", "## Training-step throughput", "## Loader vs GPU consumption",
                    "## Short fp32 training run of the default recipe", "## FID-10k timing", "## DeepSpeed ZeRO-2"):
        assert heading in md
    assert "| cdcgan | 1 |" in md and "cls_acc" in md and "![samples](samples.png)" in md


def test_gpu_check_bad_input_and_a_spent_budget(tmp_path):
    """Missing shards give the fix; a budget too small for any part says which parts it skipped."""
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path / "a"), "--shards",
                        str(tmp_path / "nope")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no manifest.json" in r.stderr and "ensure-cifar10" in r.stderr
    out = tmp_path / "b"
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(out), "--budget-minutes", "0.001"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((out / "report.json").read_text())
    parts = ["throughput", "loader", "train"]
    if importlib.util.find_spec("deepspeed") is not None:
        parts.append("deepspeed")  # with DeepSpeed installed, the ZeRO-2 row is a budgeted part too
    for part in parts:
        assert rep[part]["skipped"].startswith("budget"), (part, rep[part])
    assert rep["environment"]["device"] == "cpu"
    md = (out / "report.md").read_text()
    assert md.count("Skipped: budget") == len(parts)


# ---------------------------------------------------------------------------- the model families' benchmarks
@pytest.fixture(scope="module")
def families_data(tmp_path_factory, tiny_shards) -> dict[str, Path]:
    """Real shards for every family's recipe: tiny10 images (gan, vae) and gray -> colour pairs of the same
    kind of images, 1x32x32 inputs as the sketch recipe's (pix2pix), a training and a held-out set of each."""
    from conftest import build_tiny, tiny_images
    from data_shards import Source, build_shards

    root = tmp_path_factory.mktemp("families")

    def pairs(out: Path, n: int, seed: int) -> Path:
        imgs, labels = tiny_images(n, 3, 32, seed=seed)
        gray = imgs.mean(axis=1, keepdims=True).astype(np.uint8)
        src = Source("tiny-pairs", tuple(f"class{k}" for k in range(10)), (3, 32, 32), labels,
                     load=lambda i: (gray[i], imgs[i]), describe=str, input_shape=(1, 32, 32))
        build_shards(src, out, "train", "tiny-pairs", shard_size=40, log=None)
        return out

    return {"images": tiny_shards, "images_val": build_tiny(root / "val", 40, 3, 32, 40, "tiny10", split="test"),
            "pairs": pairs(root / "pairs", 80, 0), "pairs_val": pairs(root / "pairs_val", 24, 1)}


@pytest.mark.slow
def test_family_throughput_on_1_and_2_ranks(tmp_path, families_data):
    """--families: one row per family and process count, ours measured everywhere, the plain loop beside it
    in one process; 2 ranks run as 2 gloo processes (world size and threads reported as they ran)."""
    out = tmp_path / "families.json"
    r = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--families", "gan,vae,pix2pix",
                        "--ranks", "1,2", "--shards", str(families_data["images"]), "--paired-shards",
                        str(families_data["pairs"]), "--steps", "1", "--warmup", "1", "--batch-size", "4",
                        "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(out.read_text())
    rows = {(row["family"], row["world_size"]): row for row in report["rows"]}
    assert set(rows) == {(f, w) for f in ("gan", "vae", "pix2pix") for w in (1, 2)}
    for (family, world), row in rows.items():
        assert row["batch_size"] == 4 and row["steps"] == 1 and row["repeats"] == 1 and row["threads_per_rank"] >= 1
        assert math.isfinite(row["img_per_s_ours"]) and row["img_per_s_ours"] > 0
        assert row["ours_range"][0] <= row["img_per_s_ours"] <= row["ours_range"][1]
        if world == 1:
            assert math.isfinite(row["img_per_s_plain"]) and row["img_per_s_plain"] > 0
        else:
            assert row["img_per_s_plain"] is None
    assert rows[("gan", 1)]["recipe"] == "configs/debug_cpu.yaml" and rows[("pix2pix", 2)]["recipe"].endswith("pix2pix.yaml")
    assert len(report["load_average"]["start"]) == 3 and "plain loop img/s" in r.stdout


def _steps_budget(out, data, *extra, seeds="0,1"):
    cmd = [sys.executable, "benchmarks/fixed_budget.py", "--out", str(out), "--steps", "2", "--seeds", seeds,
           "--recipes", "vae,pix2pix", "--set", "data.num_workers=0", "--set", "train.batch_size=4",
           "--set", "data.dataset=", "--set", "log.progress=false", "--set", "log.with=",
           "--set", f"vae:data.shards={data['images']}", "--val", f"vae={data['images_val']}",
           "--set", f"pix2pix:data.shards={data['pairs']}", "--set", f"pix2pix:val.shards={data['pairs_val']}", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_fixed_step_budget_ours_vs_reference(tmp_path, families_data):
    """--steps: each seed trains through our trainer and the plain reference loop; the held-out measures of
    ours, ours' EMA and the reference are finite, per seed and as mean and spread; a second call trains
    nothing again."""
    out = tmp_path / "steps"
    r = _steps_budget(out, families_data)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((out / "fixed_budget.json").read_text())
    assert report["steps"] == 2 and report["seeds"] == [0, 1]
    measures = {"vae": ["recon_mse", "psnr", "ssim", "kl", "bits_per_dim"], "pix2pix": ["l1", "mse", "psnr", "ssim"]}
    rows = report["rows"]
    assert len(rows) == 2 * 2 * 3  # recipes x seeds x (ours, ours_ema, reference)
    for row in rows:
        assert row["steps"] == 2 and row["batch_size"] == 4 and row["loop_seconds"] > 0 and row["process_seconds"] > 0
        assert list(row["metrics"]) == measures[row["recipe"]], row
        assert all(math.isfinite(v) for v in row["metrics"].values()), row
        assert row["val_samples"] == (40 if row["recipe"] == "vae" else 24)
    summary = {(s["recipe"], s["trainer"]): s for s in report["summary"]}
    assert set(summary) == {(r, t) for r in measures for t in ("ours", "ours_ema", "reference")}
    for (recipe, _), s in summary.items():
        assert s["seeds"] == [0, 1] and s["metrics"] == measures[recipe]
        for name in measures[recipe]:
            mean, sd = s["mean_sd"][name]
            assert math.isfinite(mean) and math.isfinite(sd) and sd >= 0
    table = (out / "fixed_budget.md").read_text()
    assert "| reference loop | 0,1 | 2 | 4 |" in table and "| ours (EMA) | 0,1 | 2 | 4 |" in table and "bits_per_dim" in table
    for recipe in measures:
        assert (out / f"fixed_budget_{recipe}.png").stat().st_size > 1000
    stamp = (out / "vae" / "seed-0" / "reference" / "result.json").stat().st_mtime_ns
    r = _steps_budget(out, families_data)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "reference_loops.py" not in r.stdout and "launch/train.py" not in r.stdout  # nothing trained again
    assert (out / "vae" / "seed-0" / "reference" / "result.json").stat().st_mtime_ns == stamp


def test_fixed_step_budget_bad_input_fails_before_any_work(tmp_path, families_data):
    out = tmp_path / "bad"
    cases = [
        (["--recipes", "vae", "--steps", "2", "--out", str(out)], "pass --val vae=DIR"),
        (["--recipes", "vae", "--out", str(out)], "vae: measured at a step budget"),
        (["--recipes", "pix2pix", "--steps", "2", "--deadline", "5", "--out", str(out)], "--deadline works with --minutes"),
        (["--recipes", "vae", "--steps", "2", "--set", "vea:train.seed=1", "--out", str(out)], "--set vea:...: not a recipe"),
        (["--recipes", "vae", "--steps", "2", "--seeds", "a,b", "--val", f"vae={families_data['images_val']}",
          "--out", str(out)], "--seeds 'a,b'"),
        (["--recipes", "vae", "--steps", "2", "--val", f"vae={tmp_path / 'nope'}", "--out", str(out)], "held-out shards"),
    ]
    for args, message in cases:
        r = subprocess.run([sys.executable, "benchmarks/fixed_budget.py", *args], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
    assert not out.exists()


@pytest.mark.slow
def test_ema_schedule_smoke(tmp_path, tiny_shards, tiny_classifier):
    """benchmarks/ema_schedule.py: --prepare caches the real statistics that the runs then read (no second
    cache file); every generator is evaluated on each noise draw, the recorded FD is the draws' mean, and
    the report has the table per step and the per-draw table."""
    out = tmp_path / "ema"
    common = ["--config", "configs/debug_cpu.yaml", "--shards", str(tiny_shards), "--classifier", str(tiny_classifier),
              "--max-real", "40", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "benchmarks/ema_schedule.py", "--prepare", *common], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    (cached,) = (out / "cache").iterdir()
    r = subprocess.run([sys.executable, "benchmarks/ema_schedule.py", *common, "--seeds", "0,1", "--at", "1,2",
                        "--num-samples", "20", "--eval-draws", "2", "--batch-size", "4", "--warmup", "--rampups", "0.01",
                        "data.num_workers=0", "log.with="], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert list((out / "cache").iterdir()) == [cached]
    for seed in (0, 1):
        rec = json.loads((out / f"seed-{seed}.json").read_text())
        assert rec["eval_draws"] == 2 and set(rec["fd"]) == set(rec["fd_draws"]) == {"1", "2"}
        for step, draws in rec["fd_draws"].items():
            assert list(draws) == ["raw G", "EMA", "EMA, G's statistics", "EMA, rampup 0.01",
                                   "EMA warmup, G's statistics"]
            for name, values in draws.items():
                assert len(values) == 2 and all(math.isfinite(v) and v >= 0 for v in values)
                assert rec["fd"][step][name] == pytest.approx(sum(values) / 2)  # a float64 mean: rounding only
    table = (out / "ema_schedule.md").read_text()
    assert "| 2 | 1 |" in table and "draws |" in table and "EMA ≤ raw G" in table and "EMA, rampup 0.01 − raw G" in table
