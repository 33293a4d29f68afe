"""The GPU benchmark scripts stay runnable: a CPU smoke run of benchmarks/train_throughput.py (no
figure is judged here, timings belong in docs/benchmarks.md; the FLOP count is exact and is)."""
from __future__ import annotations

import json
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
