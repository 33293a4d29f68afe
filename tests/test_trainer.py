"""The training spine on CPU: real shards, real Accelerate, real checkpoints and event files."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import train_cmd
from conftest import train_debug as train

ROOT = Path(__file__).resolve().parents[1]


def ckpt(run_dir, step):
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def tensors(path: Path) -> dict:
    out = {}
    for f in ("model.safetensors", "model_1.safetensors"):
        for k, v in load_file(str(path / f)).items():
            out[f"{f}:{k}"] = v
    for f in ("optimizer.bin", "optimizer_1.bin", "custom_checkpoint_0.pkl"):
        state = torch.load(path / f, map_location="cpu", weights_only=False)
        flat = state.get("state", state.get("model", {}))
        for k, v in flat.items():
            if isinstance(v, dict):
                for k2, v2 in v.items():
                    out[f"{f}:{k}:{k2}"] = v2
            else:
                out[f"{f}:{k}"] = v
    return out


def assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), f"{k} differs"


def test_run_directory_layout_and_events(tmp_path, tiny_shards):
    run = tmp_path / "run"
    r = train(run, tiny_shards, "train.max_steps=6", "checkpoint.every=3", "log.every=2", "log.sample_every=3")
    assert "finished at step 6" in r.stdout
    assert (run / "config.yaml").is_file()
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    assert {"model.safetensors", "model_1.safetensors", "optimizer.bin", "optimizer_1.bin", "meta.json",
            "random_states_0.pkl"} <= {p.name for p in ckpt(run, 6).iterdir()}
    meta = json.loads((ckpt(run, 6) / "meta.json").read_text())
    assert meta["step"] == 6 and meta["config"]["train"]["max_steps"] == 6
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-00000003.png", "step-00000006.png"]
    assert {p.name for p in (run / "export").iterdir()} == {"G_ema.safetensors", "model.json"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4, 6]
    assert all(row["Timing/img_per_s"] > 0 for row in rows)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    assert {"Loss/D/main", "Loss/G/main", "D/real", "D/fake", "GradNorm/D", "GradNorm/G", "LR/G", "LR/D",
            "Timing/img_per_s", "Timing/sec_per_kimg", "Progress/kimg"} <= scalars
    assert [e.step for e in ea.Scalars("Loss/G/main")] == [2, 4, 6]
    assert "Samples/ema" in ea.Tags()["images"]
    assert len(ea.Images("Samples/ema")) == 2


def test_export_rebuilds_generator(tmp_path, tiny_shards):
    from gan.config import ModelConfig
    from gan.families.gan.models import build_models

    run = tmp_path / "run"
    train(run, tiny_shards, "train.max_steps=2")
    spec = json.loads((run / "export" / "model.json").read_text())
    G, _ = build_models(ModelConfig(**spec["model"]))
    G.load_state_dict(load_file(str(run / "export" / "G_ema.safetensors")))
    x = G.eval()(torch.randn(3, spec["model"]["z_dim"]), torch.tensor([0, 1, 2]))
    assert x.shape == (3, 3, 32, 32) and torch.isfinite(x).all()


def test_keep_last_k(tmp_path, tiny_shards):
    run = tmp_path / "run"
    train(run, tiny_shards, "train.max_steps=8", "checkpoint.every=2", "checkpoint.keep=2")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000006", "step-00000008"]


def test_exact_resume_bit_for_bit(tmp_path, tiny_shards):
    """N steps + resume + N steps == 2N steps straight: weights, optimizers, EMA, bit for bit."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["checkpoint.every=4", "data.hflip=true", "data.translate=0.125"]
    train(straight, tiny_shards, "train.max_steps=8", *common)
    train(split, tiny_shards, "train.max_steps=4", *common)
    r = train(split, tiny_shards, "train.max_steps=8", *common, resume="auto")
    assert "resumed from" in r.stdout and "at step 4" in r.stdout
    assert_identical(tensors(ckpt(straight, 8)), tensors(ckpt(split, 8)))


def test_preempt_signal_checkpoints_and_resumes_exactly(tmp_path, tiny_shards):
    straight, pre = tmp_path / "straight", tmp_path / "pre"
    steps = ["train.max_steps=40", "checkpoint.every=100"]
    train(straight, tiny_shards, *steps)
    proc = subprocess.Popen(train_cmd(pre, tiny_shards, *steps), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until training is under way
        if (pre / "metrics.jsonl").exists():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    status = json.loads((pre / "status.json").read_text())
    assert status["state"] == "preempted" and 0 < status["step"] < 40, (status, out)
    assert ckpt(pre, status["step"]).is_dir()
    train(pre, tiny_shards, *steps, resume="auto")
    assert json.loads((pre / "status.json").read_text())["state"] == "finished"
    assert_identical(tensors(ckpt(straight, 40)), tensors(ckpt(pre, 40)))


@pytest.mark.slow
@pytest.mark.parametrize("penalties", [[], ["loss.name=wgan_gp", "loss.r1_gamma=1", "loss.r1_every=2"]],
                         ids=["plain", "wgan_gp+lazy_r1"])
def test_two_process_gloo_ddp(tmp_path, tiny_shards, penalties):
    """A real 2-process DDP run (torchrun + gloo): replicas stay identical and checkpoints are whole.
    With the penalties that take an input gradient (WGAN-GP in the D loss, lazy R1 as its own update):
    R1's backward reaches only part of D's weights, which DDP refused before ("Expected to have
    finished reduction"); its gradients must be all-reduced like any other, or the replicas differ."""
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "launch/train.py", "--config", "configs/debug_cpu.yaml", "--run-dir", str(run),
           f"data.shards={tiny_shards}", "train.max_steps=6", "checkpoint.every=3", *penalties]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "replica check: G, D and G_ema identical on all 2 ranks" in r.stdout
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in ckpt(run, 6).iterdir()}
    meta = json.loads((ckpt(run, 6) / "meta.json").read_text())
    assert meta["world_size"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["Progress/kimg"] == pytest.approx(6 * 8 * 2 / 1000)  # both ranks' images counted
    if penalties:  # R1 ran (steps 0, 2, 4 with r1_every=2) and was finite
        r1 = [r["Loss/D/r1"] for r in rows if "Loss/D/r1" in r]
        assert r1 and all(isinstance(v, float) and v >= 0 for v in r1), rows


def test_mixed_precision_runs(tmp_path, tiny_shards):
    run = tmp_path / "bf16"
    train(run, tiny_shards, "train.max_steps=2", "log.every=1", "train.mixed_precision=bf16")
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(r["Loss/G/main"], float) for r in rows)


# ------------------------------------------------------------------ bad input, before any work


def test_manifest_mismatch_is_clear(tmp_path, tiny_shards):
    for override, words in [("model.img_channels=1", "channels"), ("model.num_classes=7", "classes"),
                            ("model.img_size=64", "size"), ("data.dataset=fashion-mnist", "dataset")]:
        r = train(tmp_path / "run", tiny_shards, override, check=False)
        assert r.returncode == 2, r.stderr
        assert words in r.stderr.lower() and "error:" in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_shards_dir(tmp_path):
    r = train(tmp_path / "run", tmp_path / "nope", check=False)
    assert r.returncode == 2 and str(tmp_path / "nope") in r.stderr


def test_checkpoint_of_other_architecture(tmp_path, tiny_shards):
    run = tmp_path / "run"
    train(run, tiny_shards, "train.max_steps=2")
    before = (ckpt(run, 2) / "model.safetensors").read_bytes()
    r = train(run, tiny_shards, "train.max_steps=4", "model.g_channels=16", resume="auto", check=False)
    assert r.returncode == 2 and "different architecture" in r.stderr and "model.g_channels" in r.stderr
    assert (ckpt(run, 2) / "model.safetensors").read_bytes() == before


def test_resume_path_missing(tmp_path, tiny_shards):
    r = train(tmp_path / "run", tiny_shards, resume=tmp_path / "no-such-ckpt", check=False)
    assert r.returncode == 2 and "checkpoint not found" in r.stderr


def test_resume_auto_without_checkpoints_starts_fresh(tmp_path, tiny_shards):
    r = train(tmp_path / "run", tiny_shards, "train.max_steps=1", resume="auto")
    assert "resumed" not in r.stdout and "finished at step 1" in r.stdout


def test_run_dir_not_writable(tmp_path, tiny_shards):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = train(blocker / "run", tiny_shards, check=False)
    assert r.returncode == 2 and "not writable" in r.stderr


def test_interrupted_save_never_becomes_newest(tmp_path, tiny_shards):
    from gan.rundir import RunDir
    run = tmp_path / "run"
    train(run, tiny_shards, "train.max_steps=2")
    # a save that crashed half-way leaves only a hidden temp dir behind
    partial = run / "checkpoints" / ".tmp-step-00000004"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    assert RunDir(run).latest_checkpoint() == ckpt(run, 2)
    r = train(run, tiny_shards, "train.max_steps=4", resume="auto")
    assert "at step 2" in r.stdout
    assert RunDir(run).latest_checkpoint() == ckpt(run, 4)
    assert not partial.exists()


# ------------------------------------------------------------------ in-process


def _trainer(tmp_path, shards, *overrides):
    from gan.config import load_config
    from gan.trainer import Trainer, preflight

    cfg = load_config(ROOT / "configs/debug_cpu.yaml", [f"data.shards={shards}", *overrides])
    run = tmp_path / "run"
    return Trainer(cfg, run, preflight(cfg, run, None))


def test_one_step_changes_both_nets(tmp_path, tiny_shards):
    t = _trainer(tmp_path, tiny_shards, "train.max_steps=1")
    g0 = [p.detach().clone() for p in t.nets["G"].parameters()]
    d0 = [p.detach().clone() for p in t.nets["D"].parameters()]
    e0 = [p.detach().clone() for p in t.ema.model.parameters()]
    assert t.fit() == "finished"
    assert all(not torch.equal(a, b) for a, b in zip(g0, t.nets["G"].parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(d0, t.nets["D"].parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(e0, t.ema.model.parameters()))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_shards):
    from gan.trainer import NonFiniteError

    t = _trainer(tmp_path, tiny_shards, "train.max_steps=4", "checkpoint.every=2", "log.every=10")
    t.cfg.train.max_steps = 2
    t.fit()
    good = (ckpt(tmp_path / "run", 2) / "model.safetensors").read_bytes()
    t.cfg.train.max_steps = 4
    with torch.no_grad():
        next(t.nets["D"].parameters()).fill_(float("nan"))  # D diverges from step 2 on
    # Counted on the device, read at the next checkpoint (step 4), before anything is written.
    with pytest.raises(NonFiniteError, match=r"non-finite loss/gradient in 4 update\(s\) \(D 2, G 2\) in steps 2-3"):
        t.fit()
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and "non-finite" in status["error"]
    from gan.rundir import RunDir
    assert RunDir(tmp_path / "run").latest_checkpoint() == ckpt(tmp_path / "run", 2)
    assert (ckpt(tmp_path / "run", 2) / "model.safetensors").read_bytes() == good


def test_nonfinite_skip_policy_counts(tmp_path, tiny_shards):
    from gan.trainer import NonFiniteError

    t = _trainer(tmp_path, tiny_shards, "train.max_steps=6", "train.on_nonfinite=skip", "train.max_skipped=2",
                 "log.every=1")
    d_loss = t.family.loss.d_loss
    t.family.loss.d_loss = lambda *a: (lambda loss, stats: (loss * float("nan"), stats))(*d_loss(*a))  # every D update
    with pytest.raises(NonFiniteError, match="3 in this run"):  # skipped twice, stopped at the third
        t.fit()
    assert t.state.skipped_nonfinite == 3 and t.state.step == 3
    assert all(torch.isfinite(p).all() for p in t.nets["D"].parameters())


def _tensors_of(opt) -> dict:
    return {f"{i}:{k}": v.clone() for i, st in enumerate(opt.state.values()) for k, v in st.items() if torch.is_tensor(v)}


@pytest.mark.parametrize("optim", ["adam", "adamw", "rmsprop"])
def test_nonfinite_update_is_skipped_exactly(tmp_path, tiny_shards, optim):
    """One D update with a NaN loss, policy skip: D's weights and optimizer state come out as if that
    update never ran (fused Adam/AdamW skip it on the device, RMSprop on the host), and the run goes on."""
    t = _trainer(tmp_path, tiny_shards, "train.max_steps=3", "train.on_nonfinite=skip", "log.every=1",
                 f"optim.name={optim}")
    d_loss, step, seen = t.family.loss.d_loss, t.train_step, {}

    def poisoned(D, *args):  # the second step's D update gets a NaN loss
        loss, stats = d_loss(D, *args)
        if t.state.step == 1:
            seen["before"] = ([p.detach().clone() for p in t.nets["D"].parameters()], _tensors_of(t.backend.optimizers["D"]))
            loss = loss * float("nan")
        return loss, stats

    def train_step():
        step()
        if t.state.step == 2:
            seen["after"] = ([p.detach().clone() for p in t.nets["D"].parameters()], _tensors_of(t.backend.optimizers["D"]))

    t.family.loss.d_loss, t.train_step = poisoned, train_step
    from gan.optim import is_fused
    assert is_fused(t.backend.optimizers["D"]) == (optim != "rmsprop")  # the path under test
    assert t.fit() == "finished"
    assert t.state.skipped_nonfinite == 1 and t.state.step == 3
    (p0, o0), (p1, o1) = seen["before"], seen["after"]
    assert all(torch.equal(a, b) for a, b in zip(p0, p1)) and o0.keys() == o1.keys() and o0
    assert all(torch.equal(o0[k], o1[k]) for k in o0), [k for k in o0 if not torch.equal(o0[k], o1[k])]
    assert all(torch.isfinite(p).all() for p in t.nets["D"].parameters())



def test_time_budget_stops_checkpoints_and_holds_across_resumes(tmp_path, tiny_shards):
    """train.max_minutes: the run stops at the budget as "finished" with a checkpoint; the time is
    kept in the checkpoint, so a resumed run with the budget spent trains no further step, and a
    larger budget goes on from there."""
    run = tmp_path / "run"
    train(run, tiny_shards, "train.max_steps=100000", "train.max_minutes=0.002", "checkpoint.every=100000")
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and "time budget of 0.002 min" in status["note"]
    assert 0.12 <= status["train_seconds"] < 60 and 0 < status["step"] < 100000 and status["kimg"] > 0
    assert ckpt(run, status["step"]).is_dir()
    r = train(run, tiny_shards, "train.max_steps=100000", "train.max_minutes=0.002", resume="auto")
    again = json.loads((run / "status.json").read_text())
    assert again["step"] == status["step"] and "reached at step" in r.stdout + r.stderr
    # A larger budget, relative to what the first run spent (one step can take longer than 0.12 s under
    # load): the resumed run trains until the new budget is spent too.
    budget_s = 2 * status["train_seconds"] + 0.1
    train(run, tiny_shards, "train.max_steps=100000", f"train.max_minutes={budget_s / 60}", resume="auto")
    more = json.loads((run / "status.json").read_text())
    assert more["step"] > status["step"] and more["train_seconds"] >= budget_s - 0.001


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_training_with_gradient_penalties(tmp_path, tiny_shards):
    """train.compile=true with both penalties that need double backward (WGAN-GP in the D loss, lazy
    R1 as its own update): compiled graphs can't do it, so the penalties run D eagerly."""
    run = tmp_path / "run"
    train(run, tiny_shards, "train.max_steps=2", "train.compile=true", "log.every=1", "loss.name=wgan_gp",
          "loss.r1_gamma=1", "loss.r1_every=1", timeout=900)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor([r["Loss/D/gp"], r["Loss/D/r1"], r["Loss/G/main"]])).all()
                                  for r in rows)
