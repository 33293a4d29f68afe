"""The VAE and pix2pix on the spine's distributed paths, as the GAN is tested on them: 2 gloo ranks
(torchrun, ACCELERATE_USE_CPU=1), loader workers 2, one body per promise, parametrized over the
family. The VAE: a debug-size conditional VAE (BatchNorm buffers included). pix2pix: a 64 px U-Net of
6 down and 6 up blocks, 4 channels wide (dropout in its innermost up block, so the per-rank RNG
matters), and its PatchGAN, on paired shards; its G update runs through D frozen (ctx.frozen).

- DeepSpeed ZeRO-1 and ZeRO-2 give DDP's losses (same seed and data, fp32);
- SIGUSR2 to one rank, then kill -9 of the resumed run at an arbitrary moment, then --resume auto:
  the run ends bit for bit where an uninterrupted one does;
- the divergence guard (a learning rate of 1e30, train.max_loss) stops the run "failed", exit 1, and
  the last good checkpoint stays the newest, untouched;
- a damaged newest checkpoint is named, set aside and skipped: --resume auto continues from the one
  before and ends bit for bit where the undamaged run does.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import BACKENDS, REPO, TWO_RANKS_ENV, assert_zero_matches_ddp, preempt_one_rank, train_2ranks, train_cmd
from test_robustness import assert_same_run, ckpt, status, wait_for
from test_rundir import snapshot, steps_logged

COMMON = {  # every family's recipe, under its own keys
    "data": {"num_workers": 2, "shuffle_buffer": 16, "hflip": True},
    "checkpoint": {"every": 4, "keep": 3},
    "log": {"every": 1, "sample_every": 100, "progress": False, "with": ""},
    "train": {"max_steps": 4, "batch_size": 8, "mixed_precision": "no", "stop_check_every": 1},
}


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    recipe: dict  # config sections, each merged over COMMON's
    shards: str  # the conftest fixture of its shards
    nets: tuple[str, ...]
    ema: str  # the network with an EMA copy
    losses: tuple[str, ...]  # compared between backends

    def config(self) -> dict:
        return {k: {**COMMON.get(k, {}), **v} if isinstance(v, dict) else v
                for k, v in {**COMMON, "family": self.name, **self.recipe}.items()}


FAMILIES = {f.name: f for f in (
    Family("vae", {"model": {"channels": 8, "latent_dim": 16, "conditional": True}, "loss": {"kl_warmup_steps": 4},
                   "optim": {"lr_g": 0.001, "betas_g": [0.9, 0.999]}, "data": {"shuffle_buffer": 64},
                   "log": {"samples_per_class": 2}},
           "tiny_shards", ("vae",), "vae", ("Loss/VAE/total", "Loss/VAE/recon", "Loss/VAE/kl")),
    Family("pix2pix", {"model": {"img_size": 64, "g_channels": 4, "d_channels": 4, "d_layers": 3},
                       "val": {"pictures": 2}, "train": {"batch_size": 4}},
           "tiny_pairs", ("G", "D"), "G", ("Loss/D/main", "Loss/G/main", "Loss/G/l1", "Loss/G/total")),
)}


@dataclasses.dataclass(frozen=True)
class Case:
    family: Family
    recipe: Path  # the family's config, written
    shards: Path

    def cmd(self, run_dir, *overrides, resume=None) -> list[str]:
        return train_cmd(run_dir, self.shards, *overrides, resume=resume, config=self.recipe, ranks=2)

    def train(self, run_dir, *overrides, resume=None, code=0) -> subprocess.CompletedProcess:
        return train_2ranks(run_dir, self.shards, *overrides, resume=resume, config=self.recipe, code=code)


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request, tmp_path_factory) -> Case:
    family = FAMILIES[request.param]
    recipe = tmp_path_factory.mktemp(f"{family.name}_recipe") / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(family.config(), sort_keys=False))
    return Case(family, recipe, request.getfixturevalue(family.shards))


def newest(run_dir) -> str:
    return sorted(p.name for p in (Path(run_dir) / "checkpoints").glob("step-*"))[-1]


def last_logged(run_dir) -> int:
    try:
        return steps_logged(run_dir)[-1]
    except (ValueError, IndexError):  # a line being written
        return 0


# ---------------------------------------------------------------------------- DeepSpeed ZeRO-1 and ZeRO-2


@pytest.fixture(scope="module")
def fp32_runs(tmp_path_factory, case):
    """The same 4-step fp32 run of the family under DDP, ZeRO-1 and ZeRO-2 (checkpoint at step 4)."""
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp(f"{case.family.name}_backends")
    return {name: (root / name, case.train(root / name, *extra)) for name, extra in BACKENDS.items()}


@pytest.mark.numerics
@pytest.mark.slow
def test_zero1_and_zero2_match_ddp(case, fp32_runs):
    """Losses within conftest.ZERO_LOSS_REL, the replicas identical, one optimizer partition per rank per
    network in the checkpoint, and the same exported EMA network as DDP's within conftest.adam_drift_bound.
    pix2pix's G update runs through D's plain module, frozen: no gradient of D's, no ZeRO reduction of
    D's inside G's backward."""
    f = case.family
    assert_zero_matches_ddp(fp32_runs, f.losses, f.nets, f.ema, f.name)


# ---------------------------------------------------------------------------- the divergence guard


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "zero2"])
def test_divergence_stops_failed_and_keeps_the_last_good_checkpoint(tmp_path, case, fp32_runs, backend):
    """Resumed from a good step-4 checkpoint with optim.lr_g=1e30 (the resumed optimizer takes the
    config's learning rate), checkpointing every step: exit 1, status failed with the DivergenceError,
    and step 4 stays the newest checkpoint, byte for byte. Then train.max_loss=1, below every family's
    loss, stops it the same way."""
    run = tmp_path / "run"
    shutil.copytree(fp32_runs[backend][0], run)
    good = snapshot(ckpt(run, 4))
    for why, override in (("train.max_abs_weight", "optim.lr_g=1e30"), ("train.max_loss", "train.max_loss=1")):
        r = case.train(run, *BACKENDS[backend], "train.max_steps=8", "checkpoint.every=1", override, resume="auto",
                       code=1)
        st = status(run)
        assert st["state"] == "failed" and st["step"] == 5, st
        assert "DivergenceError" in st["error"] and why in st["error"], st
        assert "diverging" in r.stderr, r.stderr[-4000:]
        assert newest(run) == "step-00000004" and snapshot(ckpt(run, 4)) == good


# ---------------------------------------------------------------------------- a damaged checkpoint


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_skipped_and_the_run_ends_exactly(tmp_path, case, fp32_runs):
    """Checkpoints at steps 2 and 4; the step-4 weights of the family's last network truncated. --resume
    auto names the damaged file, sets the checkpoint aside (never used, never deleted), resumes from step 2
    and ends at step 4 with every checkpointed tensor and the export equal to the undamaged DDP run's."""
    run = tmp_path / "run"
    case.train(run, "checkpoint.every=2")
    part = json.loads((ckpt(run, 4) / "meta.json").read_text())["parts"][case.family.nets[-1]]
    damaged = ckpt(run, 4) / part
    damaged.write_bytes(damaged.read_bytes()[:1000])
    r = case.train(run, "checkpoint.every=2", resume="auto")
    assert f"skipped a damaged checkpoint: {damaged} is damaged" in r.stdout + r.stderr, r.stderr[-4000:]
    assert f"resumed from {ckpt(run, 2)} at step 2" in r.stdout, r.stdout
    assert (run / "checkpoints" / "damaged-step-00000004" / part).is_file()
    assert_same_run(fp32_runs["ddp"][0], run, 4)


# ---------------------------------------------------------------------------- SIGUSR2, kill -9, exact resume


@pytest.mark.slow
def test_preempt_then_kill9_then_resume_is_exact(tmp_path, case):
    """SIGUSR2 to one rank: both ranks agree, checkpoint (each its RNG state) and exit 0, "preempted".
    The resumed run is killed with -9 (launcher, ranks and loader workers) a few steps later, at no
    particular point. --resume auto then ends 8 steps past its newest checkpoint with every
    checkpointed tensor and the export equal, bit for bit, to a run never interrupted, and
    metrics.jsonl holds each step once."""
    straight, run = tmp_path / "straight", tmp_path / "run"
    # the interrupted runs aim far ahead so that neither can finish before it is stopped, however slow
    # the machine; the end is chosen after the kill
    proc = subprocess.Popen(case.cmd(run, "train.max_steps=1000"), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **TWO_RANKS_ENV})
    out, err = preempt_one_rank(proc, run)
    assert proc.returncode == 0, err[-6000:]
    st = status(run)
    assert st["state"] == "preempted" and 0 < st["step"] < 1000, (st, out)
    at = st["step"]
    assert newest(run) == f"step-{at:08d}"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in ckpt(run, at).iterdir()}

    proc = subprocess.Popen(case.cmd(run, "train.max_steps=1000", resume="auto"), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **TWO_RANKS_ENV})
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

    case.train(straight, f"train.max_steps={end}")
    r = case.train(run, f"train.max_steps={end}", resume="auto")
    assert f"at step {resume_at}" in r.stdout and f"finished at step {end}" in r.stdout, r.stdout
    assert steps_logged(run) == list(range(1, end + 1))
    assert_same_run(straight, run, end)
