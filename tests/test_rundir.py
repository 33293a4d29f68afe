"""The run directory is owned by one run and never loses it: reuse without --resume, a second trainer,
a stale lock, damaged checkpoints, non-finite weights, changed settings on resume, a full disk.
Real runs of configs/debug_cpu.yaml on tiny shards."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import train_cmd
from conftest import train_debug as train
from gan.rundir import CheckpointError, RunDir, part_file, rng_file, seal, verify

ROOT = Path(__file__).resolve().parents[1]


def ckpt(run, step) -> Path:
    return Path(run) / "checkpoints" / f"step-{step:08d}"


def steps_logged(run) -> list[int]:
    return [json.loads(line)["step"] for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def snapshot(run) -> dict:
    """Every file's bytes under ``run`` except the lock (which names whoever tried last)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(Path(run).rglob("*"))
            if p.is_file() and p.name != ".lock"}


def status(run) -> dict:
    return json.loads((Path(run) / "status.json").read_text())


# ---------------------------------------------------------------------------- item 2: reuse


def test_rerun_without_resume_is_refused_and_resume_continues_one_history(tmp_path, tiny_shards):
    run = tmp_path / "run"
    train(run, tiny_shards, "train.max_steps=4", "checkpoint.every=2", "checkpoint.keep=3")
    before = snapshot(run)
    r = train(run, tiny_shards, "train.max_steps=2", check=False)  # the same command again, by mistake
    assert r.returncode == 2, r.stdout + r.stderr
    assert "already holds checkpoints" in r.stderr and "step-00000004, step 4" in r.stderr
    assert "--resume auto" in r.stderr and "new --run-dir" in r.stderr
    assert snapshot(run) == before  # nothing pruned, appended or exported
    r = train(run, tiny_shards, "train.max_steps=4", resume=ckpt(run, 2), check=False)  # would fork the run
    assert r.returncode == 2 and "newer checkpoints (step-00000004)" in r.stderr, r.stderr
    assert snapshot(run) == before
    # A crash after step 4's rows were logged but before its checkpoint: they are written once, not twice.
    shutil.rmtree(ckpt(run, 4))
    train(run, tiny_shards, "train.max_steps=6", "checkpoint.every=2", "checkpoint.keep=3", resume="auto")
    assert steps_logged(run) == [2, 4, 6]
    assert [p.name for p in RunDir(run).list_checkpoints()] == ["step-00000002", "step-00000004", "step-00000006"]


def _fake_checkpoint(run: RunDir, step: int) -> Path:
    p = run.checkpoint(step)
    p.mkdir(parents=True)
    for name in ("G", "D", "opt_G", "opt_D", "ema", "train_state", "sched_G", "sched_D"):
        (p / part_file(name)).write_bytes(os.urandom(64 * 1024))
    (p / rng_file(0)).write_bytes(b"rng")
    seal(p, {"step": step, "world_size": 1, "config": {}})
    return p


def test_prune_keeps_the_new_checkpoint_and_an_interrupted_prune_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    for s in (2, 4, 6, 8):
        _fake_checkpoint(run, s)
    real_rmtree = shutil.rmtree

    def interrupted(path, *a, **k):  # dies after deleting one file, like a kill during the prune
        files = sorted(Path(path).iterdir()) if Path(path).is_dir() else []
        if files:
            files[0].unlink()
            raise KeyboardInterrupt
        real_rmtree(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run.prune(2, run.checkpoint(8))
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    listed = run.list_checkpoints()
    for p in listed:
        verify(p)  # every checkpoint still listed is whole
    assert run.checkpoint(8) in listed and run.checkpoint(6) in listed
    assert any(p.name.startswith(".trash-") for p in run.checkpoints.iterdir())
    done = run.clean_leftovers()  # what the next start does
    assert done and not any(p.name.startswith(".") for p in run.checkpoints.iterdir())
    # Keep-K never deletes the checkpoint just written, even if others sort newer.
    run.prune(1, run.checkpoint(6))
    assert [p.name for p in run.list_checkpoints()] == ["step-00000006", "step-00000008"]


# ---------------------------------------------------------------------------- item 3: one trainer


def test_second_trainer_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, tiny_shards):
    run = tmp_path / "run"
    first = subprocess.Popen(train_cmd(run, tiny_shards, "train.max_steps=100000", "checkpoint.every=2"),
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while RunDir(run).latest_checkpoint() is None:  # training, with a checkpoint on disk
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else "timeout"
            time.sleep(0.2)
        r = train(run, tiny_shards, "train.max_steps=100000", resume="auto", check=False)
        assert r.returncode == 2, r.stdout + r.stderr
        assert f"in use by PID {first.pid} on host {socket.gethostname()}" in r.stderr
        assert first.poll() is None  # the first run goes on, untouched
    finally:
        first.kill()  # kill -9: its lock is released by the OS, its .lock file still names it
        first.wait()
    newest = RunDir(run).latest_checkpoint()
    assert str(first.pid) in (run / ".lock").read_text()
    step = int(newest.name.split("-")[1])
    r = train(run, tiny_shards, f"train.max_steps={step + 1}", "checkpoint.every=2", resume="auto")
    assert f"resumed from {newest} at step {step}" in r.stdout
    assert status(run)["state"] == "finished" and json.loads((run / ".lock").read_text())["pid"] != first.pid
    verify(ckpt(run, step + 1))


def test_a_start_refused_after_taking_the_lock_leaves_no_lock(tmp_path, tiny_shards):
    run = tmp_path / "run"
    r = train(run, tiny_shards, "train.batch_size=1000", check=False)  # refused after the lock: 240 samples
    assert r.returncode == 2 and "larger than the data set" in r.stderr, r.stdout + r.stderr
    assert run.is_dir() and not (run / ".lock").exists()


# ---------------------------------------------------------------------------- item 6: damage


def test_damaged_checkpoints_are_named_skipped_and_set_aside(tmp_path, tiny_shards):
    run = tmp_path / "run"
    train(run, tiny_shards, "train.max_steps=6", "checkpoint.every=2", "checkpoint.keep=3")
    meta = json.loads((ckpt(run, 6) / "meta.json").read_text())
    assert set(meta["files"]) >= {"model.safetensors", "optimizer_1.bin", "random_states_0.pkl"}
    assert meta["parts"]["ema"] == "custom_checkpoint_0.pkl"
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in meta["files"].values())

    # Each kind of damage, on copies of step 2: verify names the file.
    cases = {"truncated": ("model.safetensors", lambda f: f.write_bytes(f.read_bytes()[:100])),
             "garbled": ("model_1.safetensors", lambda f: f.write_bytes(_flip(f.read_bytes()))),
             "no optimizer": ("optimizer.bin", Path.unlink),
             "no EMA": ("custom_checkpoint_0.pkl", Path.unlink),
             "no RNG": ("random_states_0.pkl", Path.unlink),
             "broken meta": ("meta.json", lambda f: f.write_text('{"step": 2, "files": {')),
             "meta of an older version": ("meta.json", lambda f: f.write_text('{"step": 2, "world_size": 1}'))}
    for what, (name, damage) in cases.items():
        copy = tmp_path / "copies" / what.replace(" ", "_") / "step-00000002"
        shutil.copytree(ckpt(run, 2), copy)
        damage(copy / name)
        with pytest.raises(CheckpointError, match=str(copy / name) if name != "meta.json" else "meta.json"):
            verify(copy)

    truncate = ckpt(run, 6) / "model.safetensors"
    truncate.write_bytes(truncate.read_bytes()[:1000])
    garble = ckpt(run, 4) / "optimizer_1.bin"
    garble.write_bytes(_flip(garble.read_bytes()))
    r = train(run, tiny_shards, "train.max_steps=6", resume=ckpt(run, 6), check=False)
    assert r.returncode == 2 and f"{truncate} is damaged" in r.stderr, r.stderr
    r = train(run, tiny_shards, "train.max_steps=6", "checkpoint.every=2", "checkpoint.keep=3", resume="auto")
    out = r.stdout + r.stderr
    assert f"skipped a damaged checkpoint: {truncate} is damaged" in out
    assert f"skipped a damaged checkpoint: {garble} is damaged" in out
    assert f"resumed from {ckpt(run, 2)} at step 2" in r.stdout
    assert (run / "checkpoints" / "damaged-step-00000006" / "model.safetensors").is_file()  # kept, never used
    verify(ckpt(run, 6))
    assert steps_logged(run) == [2, 4, 6]


def _flip(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]


def test_nonfinite_weights_are_never_checkpointed(tmp_path, tiny_shards):
    from gan.config import load_config
    from gan.trainer import NonFiniteError, Trainer, preflight

    cfg = load_config(ROOT / "configs/debug_cpu.yaml", [f"data.shards={tiny_shards}", "train.max_steps=2",
                                                        "checkpoint.every=2", "train.on_nonfinite=skip",
                                                        "train.max_skipped=1000", "log.every=1"])
    run = tmp_path / "run"
    t = Trainer(cfg, run, preflight(cfg, run, None))
    t.fit()
    good = (ckpt(run, 2) / "model_1.safetensors").read_bytes()
    t.cfg.train.max_steps = 4
    with torch.no_grad():
        next(t.nets["D"].parameters()).fill_(float("inf"))  # the skip policy skips its updates; the weights stay inf
    with pytest.raises(NonFiniteError, match=r"non-finite weights in D"):  # caught before step 4 is saved
        t.fit()
    assert RunDir(run).latest_checkpoint() == ckpt(run, 2)
    assert (ckpt(run, 2) / "model_1.safetensors").read_bytes() == good
    assert json.loads((run / "export" / "model.json").read_text())["step"] == 2
    assert status(run)["state"] == "failed" and "non-finite weights" in status(run)["error"]


# ---------------------------------------------------------------------------- item 8: changed settings


def test_resume_refuses_changes_it_cant_honour_and_applies_the_rest(tmp_path, tiny_shards):
    run = tmp_path / "run"
    common = ["checkpoint.every=2", "data.num_workers=2", "log.every=1"]
    train(run, tiny_shards, "train.max_steps=2", *common)
    before = snapshot(run)
    r = train(run, tiny_shards, "train.max_steps=4", *common, "train.batch_size=4", "train.seed=1",
              "data.num_workers=0", resume="auto", check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    for key in ("train.batch_size: checkpoint 8, now 4", "train.seed: checkpoint 0, now 1",
                "data.num_workers: checkpoint 2, now 0"):
        assert key in r.stderr
    assert snapshot(run) == before
    r = train(run, tiny_shards, "train.max_steps=4", *common, "optim.lr_d=1e-5", "optim.betas_d=[0.0,0.9]",
              resume="auto")
    assert "changed settings" in r.stdout and "optim.lr_d: 0.0002 -> 1e-05" in r.stdout
    groups = torch.load(ckpt(run, 4) / "optimizer_1.bin", weights_only=False)["param_groups"]
    assert all(g["lr"] == 1e-5 and tuple(g["betas"]) == (0.0, 0.9) for g in groups)
    rows = {row["step"]: row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert rows[2]["LR/D"] == 2e-4 and rows[3]["LR/D"] == rows[4]["LR/D"] == 1e-5 and rows[4]["LR/G"] == 2e-4


@pytest.mark.slow
def test_two_ranks_checkpoint_every_rng_state_and_world_size_changes_are_refused(tmp_path, tiny_shards):
    run = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = torchrun + train_cmd(run, tiny_shards, "train.max_steps=2", "checkpoint.every=2")[1:]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    cmd = torchrun + train_cmd(run, tiny_shards, "train.max_steps=4", "checkpoint.every=2", resume="auto")[1:]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and f"resumed from {ckpt(run, 2)} at step 2" in r.stdout, r.stdout + r.stderr
    meta = verify(ckpt(run, 4))
    assert meta["world_size"] == 2 and "random_states_1.pkl" in meta["files"]
    r = train(run, tiny_shards, "train.max_steps=6", resume="auto", check=False)  # one process
    assert r.returncode == 2 and "world size (processes): checkpoint 2, now 1" in r.stderr, r.stderr
    (ckpt(run, 4) / "random_states_1.pkl").unlink()  # rank 1's RNG state lost: refused, naming it
    cmd = torchrun + train_cmd(run, tiny_shards, "train.max_steps=6", resume=ckpt(run, 4))[1:]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0 and f"{ckpt(run, 4) / 'random_states_1.pkl'} is missing" in r.stderr, r.stderr


# ---------------------------------------------------------------------------- item 9: full disk


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"can't mount a tmpfs here ({r.stderr.strip()}): the full-disk test needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _resize(mnt: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)


def test_full_disk_while_checkpointing_fails_clearly_and_next_start_cleans_up(small_tmpfs, tiny_shards):
    run = small_tmpfs / "run"
    common = ["checkpoint.every=2", "checkpoint.keep=1", "log.sample_every=1000"]
    train(run, tiny_shards, "train.max_steps=2", *common)
    size = sum(f.stat().st_size for f in ckpt(run, 2).iterdir())
    used = shutil.disk_usage(small_tmpfs).used
    _resize(small_tmpfs, used + size // 2)  # the next checkpoint can't fit
    r = train(run, tiny_shards, "train.max_steps=4", *common, resume="auto", check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    st = status(run)
    assert st["state"] == "failed" and "no space left on device" in st["error"], st
    assert str(run / "checkpoints" / ".tmp-step-00000004") in st["error"] and "no space left on device" in r.stderr
    assert RunDir(run).latest_checkpoint() == ckpt(run, 2) and verify(ckpt(run, 2))
    # A save killed on a full disk leaves its partial files: the next start removes them first.
    _resize(small_tmpfs, shutil.disk_usage(small_tmpfs).used + 3 * size)
    partial = run / "checkpoints" / ".tmp-step-00000004"
    partial.mkdir()
    with pytest.raises(OSError), open(partial / "model.safetensors", "wb") as f:
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    r = train(run, tiny_shards, "train.max_steps=4", *common, resume="auto")
    assert f"removed {partial} (partial save)" in r.stdout and status(run)["state"] == "finished"
    verify(ckpt(run, 4))
