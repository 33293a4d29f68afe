"""The VAE on the spine's distributed paths, as the GAN is tested on them: 2 gloo ranks (torchrun,
ACCELERATE_USE_CPU=1), loader workers 2, a debug-size conditional VAE (BatchNorm buffers included).

- DeepSpeed ZeRO-1 and ZeRO-2 give DDP's losses (same seed and data, fp32);
- SIGUSR2 to one rank, then kill -9 of the resumed run at an arbitrary moment, then --resume auto:
  the run ends bit for bit where an uninterrupted one does;
- the divergence guard (a learning rate of 1e30, train.max_loss) stops the run "failed", exit 1, and
  the last good checkpoint stays the newest, untouched.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import REPO, preempt_one_rank
from test_robustness import assert_same_run, ckpt, status, wait_for
from test_rundir import snapshot, steps_logged

ENV = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
RECIPE = """\
family: vae
model: {channels: 8, latent_dim: 16, conditional: true}
loss: {kl_warmup_steps: 4}
optim: {lr_g: 0.001, betas_g: [0.9, 0.999]}
data: {num_workers: 2, shuffle_buffer: 64, hflip: true}
checkpoint: {every: 4, keep: 3}
log: {every: 1, sample_every: 100, samples_per_class: 2, progress: false, with: ''}
train: {max_steps: 4, batch_size: 8, mixed_precision: 'no', stop_check_every: 1}
"""
LOSSES = ("Loss/VAE/total", "Loss/VAE/recon", "Loss/VAE/kl")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vae_recipe") / "vae.yaml"
    path.write_text(RECIPE)
    return path


def cmd(recipe, run_dir, shards, *overrides, resume=None) -> list[str]:
    out = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "launch/train.py",
           "--config", str(recipe), "--run-dir", str(run_dir)]
    return out + (["--resume", str(resume)] if resume else []) + [f"data.shards={shards}", *overrides]


def train2(recipe, run_dir, shards, *overrides, resume=None, code=0) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd(recipe, run_dir, shards, *overrides, resume=resume), cwd=REPO, capture_output=True,
                       text=True, timeout=600, env={**os.environ, **ENV})
    assert r.returncode == code, f"exit {r.returncode}, wanted {code}:\n{r.stdout}\n{r.stderr[-6000:]}"
    return r


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def newest(run_dir) -> str:
    return sorted(p.name for p in (Path(run_dir) / "checkpoints").glob("step-*"))[-1]


def last_logged(run_dir) -> int:
    try:
        return steps_logged(run_dir)[-1]
    except (ValueError, IndexError):  # a line being written
        return 0


# ---------------------------------------------------------------------------- DeepSpeed ZeRO-1 and ZeRO-2


@pytest.fixture(scope="module")
def fp32_runs(tmp_path_factory, recipe, tiny_shards):
    """The same 4-step fp32 VAE run under DDP, ZeRO-1 and ZeRO-2 (checkpoint at step 4)."""
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("vae_backends")
    out = {}
    for name, extra in (("ddp", []), ("zero1", ["train.backend=deepspeed", "deepspeed.stage=1"]),
                        ("zero2", ["train.backend=deepspeed", "deepspeed.stage=2",
                                   "deepspeed.config=configs/deepspeed/zero2.json"])):
        out[name] = (root / name, train2(recipe, root / name, tiny_shards, *extra))
    return out


@pytest.mark.slow
def test_vae_zero1_and_zero2_match_ddp(fp32_runs):
    """ZeRO's bucketed reduce(-scatter) sums the same gradients in another order than DDP's all-reduce:
    losses within a relative 1e-4 (they agreed to ~1e-7 here), the replicas identical, one optimizer
    partition per rank in the checkpoint, and the same exported EMA network as DDP's."""
    from safetensors.torch import load_file

    ddp = rows(fp32_runs["ddp"][0])
    assert [r["step"] for r in ddp] == [1, 2, 3, 4]
    for name in ("zero1", "zero2"):
        run, r = fp32_runs[name]
        assert "replica check: vae and vae_ema identical on all 2 ranks" in r.stdout
        got = rows(run)
        assert [x["step"] for x in got] == [1, 2, 3, 4]
        for a, b in zip(ddp, got):
            for k in LOSSES:
                assert b[k] == pytest.approx(a[k], rel=1e-4), (name, a["step"], k, a[k], b[k])
        meta = json.loads((ckpt(run, 4) / "meta.json").read_text())
        assert (meta["family"], meta["backend"], meta["world_size"]) == ("vae", "deepspeed", 2)
        assert {p.name for p in (ckpt(run, 4) / "deepspeed" / "vae").iterdir()} == {
            "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
        e_ddp = load_file(str(fp32_runs["ddp"][0] / "export" / "G_ema.safetensors"))
        e_ds = load_file(str(run / "export" / "G_ema.safetensors"))
        assert e_ddp.keys() == e_ds.keys()
        for k in e_ddp:
            assert e_ds[k].shape == e_ddp[k].shape and e_ds[k].dtype == e_ddp[k].dtype, k
            assert (e_ds[k].double() - e_ddp[k].double()).abs().max() <= 1e-3, (name, k)


# ---------------------------------------------------------------------------- the divergence guard


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "zero2"])
def test_vae_divergence_stops_failed_and_keeps_the_last_good_checkpoint(tmp_path, fp32_runs, recipe, tiny_shards,
                                                                       backend):
    """Resumed from a good step-4 checkpoint with optim.lr_g=1e30 (the resumed optimizer takes the
    config's learning rate), checkpointing every step: exit 1, status failed with the DivergenceError,
    and step 4 stays the newest checkpoint, byte for byte. Then train.max_loss below the VAE's loss
    stops it the same way."""
    extra = [] if backend == "ddp" else ["train.backend=deepspeed", "deepspeed.stage=2",
                                         "deepspeed.config=configs/deepspeed/zero2.json"]
    run = tmp_path / "run"
    shutil.copytree(fp32_runs[backend][0], run)
    good = snapshot(ckpt(run, 4))
    for why, override in (("train.max_abs_weight", "optim.lr_g=1e30"), ("train.max_loss", "train.max_loss=1")):
        r = train2(recipe, run, tiny_shards, *extra, "train.max_steps=8", "checkpoint.every=1", override,
                   resume="auto", code=1)
        st = status(run)
        assert st["state"] == "failed" and st["step"] == 5, st
        assert "DivergenceError" in st["error"] and why in st["error"], st
        assert "diverging" in r.stderr, r.stderr[-4000:]
        assert newest(run) == "step-00000004" and snapshot(ckpt(run, 4)) == good


# ---------------------------------------------------------------------------- SIGUSR2, kill -9, exact resume


@pytest.mark.slow
def test_vae_preempt_then_kill9_then_resume_is_exact(tmp_path, recipe, tiny_shards):
    """SIGUSR2 to one rank: both ranks agree, checkpoint (each its RNG state) and exit 0, "preempted".
    The resumed run is killed with -9 (launcher, ranks and loader workers) a few steps later, at no
    particular point. --resume auto then ends 8 steps past its newest checkpoint with every
    checkpointed tensor and the export equal, bit for bit, to a run never interrupted, and
    metrics.jsonl holds each step once."""
    straight, run = tmp_path / "straight", tmp_path / "run"
    # the interrupted runs aim far ahead so that neither can finish before it is stopped, however slow
    # the machine; the end is chosen after the kill
    proc = subprocess.Popen(cmd(recipe, run, tiny_shards, "train.max_steps=1000"), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV})
    out, err = preempt_one_rank(proc, run)
    assert proc.returncode == 0, err[-6000:]
    st = status(run)
    assert st["state"] == "preempted" and 0 < st["step"] < 1000, (st, out)
    at = st["step"]
    assert newest(run) == f"step-{at:08d}"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in ckpt(run, at).iterdir()}

    proc = subprocess.Popen(cmd(recipe, run, tiny_shards, "train.max_steps=1000", resume="auto"), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **ENV})
    try:
        wait_for(lambda: last_logged(run) >= at + 3, 300, f"step {at + 3}", proc)
    finally:
        # every process at once: torchrun starts each rank in its own session, and a rank that outlives
        # torchrun is told to stop (SIGTERM) and would checkpoint on its way out
        everyone = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in everyone:
            p.kill()
        psutil.wait_procs(everyone, timeout=60)
        proc.wait(timeout=60)
    assert status(run)["state"] == "running"  # killed, never told
    resume_at = int(newest(run)[5:])
    end = resume_at + 8

    train2(recipe, straight, tiny_shards, f"train.max_steps={end}")
    r = train2(recipe, run, tiny_shards, f"train.max_steps={end}", resume="auto")
    assert f"at step {resume_at}" in r.stdout and f"finished at step {end}" in r.stdout, r.stdout
    assert steps_logged(run) == list(range(1, end + 1))
    assert_same_run(straight, run, end)
