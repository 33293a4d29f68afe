"""benchmarks/fixed_budget.py end to end on CPU: real training under a time budget, a real
deadline signal and resume, real offline metrics, the table and the picture."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def budget(out, shards, classifier, *extra, timeout=600):
    cmd = [sys.executable, "benchmarks/fixed_budget.py", "--out", str(out), "--recipes", "cdcgan",
           "--classifier", str(classifier),
           "--metrics", "cls_acc,cls_fd", "--num-samples", "100", "--per-class", "2",
           "--set", f"data.shards={shards}", "--set", "data.dataset=", "--set", "data.num_workers=0",
           "--set", "train.batch_size=8", "--set", "log.progress=false", "--set", "checkpoint.every=1000000",
           *extra]
    env = {**os.environ, "GAN_METRICS_CACHE": str(Path(out).parent / "stats-cache"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_deadline_resume_evaluate_and_report(tmp_path, tiny_shards, tiny_classifier):
    out = tmp_path / "budget"
    # A deadline far inside the budget: the training run is signalled, checkpoints and stops; nothing is evaluated.
    r = budget(out, tiny_shards, tiny_classifier, "--minutes", "5", "--deadline", "8")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "not finished yet (call again to go on): cdcgan" in r.stdout
    first = json.loads((out / "cdcgan" / "status.json").read_text())
    assert first["state"] == "preempted" and first["step"] > 0
    assert not (out / "cdcgan" / "budget_eval.json").exists()

    # The next call resumes under a budget the first part already spent: no further step, then evaluation.
    r = budget(out, tiny_shards, tiny_classifier, "--minutes", "0.01")
    assert r.returncode == 0, r.stdout + r.stderr
    status = json.loads((out / "cdcgan" / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == first["step"]
    assert "time budget of 0.01 min" in status["note"]
    ev = json.loads((out / "cdcgan" / "budget_eval.json").read_text())
    assert ev["step"] == status["step"] and 0.0 <= ev["metrics"]["cls_acc"] <= 1.0 and ev["metrics"]["cls_fd"] > 0
    report = json.loads((out / "fixed_budget.json").read_text())
    (row,) = report["rows"]
    assert row["recipe"] == "cdcgan" and row["step"] == status["step"] and row["metrics"] == ev["metrics"]
    assert row["img_per_s"] > 0 and abs(row["train_minutes"] - status["train_seconds"] / 60) < 1e-6  # the same division
    table = (out / "fixed_budget.md").read_text()
    assert f"| cdcgan | finished | {status['step']} |" in table and "cls_acc" in table
    from PIL import Image
    with Image.open(out / "fixed_budget.png") as im:
        assert im.size[0] > 200 and im.size[1] > 200

    # Evaluated once: a report-only call reuses the result.
    mtime = (out / "cdcgan" / "budget_eval.json").stat().st_mtime_ns
    r = budget(out, tiny_shards, tiny_classifier, "--report-only", "--minutes", "0.01")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "cdcgan" / "budget_eval.json").stat().st_mtime_ns == mtime


def test_bad_arguments_fail_before_any_work(tmp_path, tiny_shards):
    r = budget(tmp_path / "b", tiny_shards, "unused.safetensors", "--recipes", "stylegan9")
    assert r.returncode == 2 and "unknown recipe(s) stylegan9; valid: cdcgan, sngan" in r.stderr
    r = budget(tmp_path / "b", tiny_shards, "unused.safetensors", "--metrics", "fidd")
    assert r.returncode == 2 and "fidd" in r.stderr
    assert not (tmp_path / "b").exists()
