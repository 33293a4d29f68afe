"""The GPU benchmark scripts stay runnable: a CPU smoke run of benchmarks/train_throughput.py (no
figure is judged here, timings belong in docs/benchmarks.md; the FLOP count is exact and is)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

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
    # Training FLOPs per real image of the cDCGAN recipe (D on real+fake, G forward twice, backward): fixed.
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
