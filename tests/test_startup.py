"""The start-up banner and where the mixed precision comes from (gan/startup.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, train_debug as train
from gan.startup import resolve_precision_source as resolve

FILE = ("fp16", "/home/u/.cache/huggingface/accelerate/default_config.yaml")


def test_precision_sources_and_who_wins():
    assert resolve("auto", env={}, gpu_bf16=True, config_file=(None, None)) == (
        "bf16", "train.mixed_precision=auto: bf16 on a GPU that supports it")
    assert resolve("auto", env={}, gpu_bf16=False, config_file=(None, None))[0] == "no"
    value, source = resolve("auto", env={"ACCELERATE_MIXED_PRECISION": "fp16"}, gpu_bf16=True, config_file=FILE)
    assert value == "fp16" and source.startswith(f"accelerate config ({FILE[1]})")
    value, source = resolve("auto", env={"ACCELERATE_MIXED_PRECISION": "bf16"}, gpu_bf16=False, config_file=FILE)
    assert value == "bf16" and source.startswith("accelerate launch --mixed_precision bf16")
    # the launcher's "no" is also its default: auto still picks bf16 on a GPU that has it
    assert resolve("auto", env={"ACCELERATE_MIXED_PRECISION": "no"}, gpu_bf16=True, config_file=(None, None))[0] == "bf16"
    value, source = resolve("no", env={"ACCELERATE_MIXED_PRECISION": "bf16"}, gpu_bf16=True, config_file=(None, None))
    assert value == "no" and "accelerate launch --mixed_precision bf16 asked for bf16, train.mixed_precision wins" in source
    value, source = resolve("fp16", env={"ACCELERATE_MIXED_PRECISION": "fp16"}, gpu_bf16=True, config_file=FILE)
    assert (value, source) == ("fp16", "train.mixed_precision=fp16")  # they agree: nothing to say


def test_banner_and_resolved_precision_in_config(tmp_path, tiny_shards):
    run = tmp_path / "run"
    r = train(run, tiny_shards, "train.max_steps=2", "checkpoint.every=2", "train.mixed_precision=auto",
              env={"ACCELERATE_MIXED_PRECISION": "bf16"})
    out = r.stdout
    assert f"run directory: {run} (fresh start)" in out
    assert "devices: 1 x " in out and "world size 1 (single process" in out
    assert "precision: bf16 (accelerate launch --mixed_precision bf16" in out
    assert "models: cdcgan G " in out and ", D " in out and " parameters; 3x32x32" in out
    assert f"data: tiny10 train, 240 images of 3x32x32, 10 classes, from {tiny_shards}" in out
    assert "trackers: tensorboard" in out
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["mixed_precision"] == "bf16"
    # "auto" again: resolved the same way (bf16), so the checkpoint's precision matches and it resumes
    r = train(run, tiny_shards, "train.max_steps=3", "train.mixed_precision=auto", resume="auto",
              env={"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert "(resuming from " in r.stdout and "step-00000002" in r.stdout
    assert "precision: bf16 (accelerate launch --mixed_precision bf16" in r.stdout
    # an explicit value that differs from the checkpoint's resolved one is refused (checkpoint.FIXED_ON_RESUME)
    r = train(run, tiny_shards, "train.max_steps=4", "train.mixed_precision=no", resume="auto", check=False)
    assert r.returncode == 2 and "train.mixed_precision: checkpoint 'bf16', now 'no'" in r.stderr


def test_a_short_run_names_its_models_and_warns_of_nothing(tmp_path, tiny_shards):
    """The VAE's banner names its one network once ("VAE", not "vae vae"); on one CPU core with 2 loader
    workers the banner says so, and stderr has neither torch's DataLoader warning about the worker count
    nor DeepSpeed's guess of the device (Accelerate imports it wherever it is installed)."""
    one_core = min(os.sched_getaffinity(0))
    cmd = [sys.executable, "launch/train.py", "--config", "configs/cifar10_vae.yaml", "--run-dir",
           str(tmp_path / "run"),
           f"data.shards={tiny_shards}", f"val.shards={tiny_shards}", "data.dataset=", "data.num_workers=2",
           "model.channels=8", "model.latent_dim=16", "train.batch_size=8", "train.max_steps=2", "log.with=",
           "log.progress=false", "train.mixed_precision=no"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       preexec_fn=lambda: os.sched_setaffinity(0, {one_core}),
                       env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "models: VAE 55,891 parameters; 3x32x32" in r.stdout
    assert "2 worker(s) per rank (more than the 1 CPU core(s) here; torch suggests at most 1)" in r.stdout
    assert "worker processes in total" not in r.stderr, r.stderr
    assert "Setting accelerator to CPU" not in r.stderr, r.stderr


def test_banner_of_a_paired_family(tiny_pairs):
    """pix2pix's banner: its networks without an architecture name they do not have, and its data as pairs
    (input -> target shapes), whatever the dataset's name in the manifest."""
    from types import SimpleNamespace

    from gan.config import load_config
    from gan.data import read_manifest
    from gan.family import build_family
    from gan.startup import banner

    cfg = load_config(None, ["family=pix2pix", f"data.shards={tiny_pairs}", "model.img_size=64", "data.num_workers=0"])
    nets = build_family(cfg).build_networks()
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1, mixed_precision="no", trackers=[],
                          unwrap_model=lambda net: net)
    trainer = SimpleNamespace(accelerator=acc, cfg=cfg, stream=SimpleNamespace(manifest=read_manifest(tiny_pairs)),
                              nets=nets, device_source=None, precision_source="train.mixed_precision=no",
                              run_dir="R", resume_from=None, state=SimpleNamespace(step=0))
    lines = banner(trainer)
    assert any(line.startswith("models: G ") and ", D " in line and "pix2pix" not in line for line in lines), lines
    assert any(line.startswith("data: ") and ", 48 pairs 3x64x64 -> 3x64x64, 3 classes, from " in line
               for line in lines), lines


def test_cpu_choice_and_why():
    from gan.startup import choose_cpu

    assert choose_cpu({"ACCELERATE_USE_CPU": "1"}, accelerator=True) == (True, "ACCELERATE_USE_CPU=1 asks for the CPU")
    assert choose_cpu({"ACCELERATE_USE_CPU": "False"}, accelerator=True) == (False, None)  # accelerate launch's default
    assert choose_cpu({"WORLD_SIZE": "2"}, accelerator=False) == (
        True, "no GPU or other accelerator found; 2 processes with gloo")


@pytest.mark.slow
@pytest.mark.skipif(torch.accelerator.is_available(), reason="a GPU or other accelerator is present: these "
                    "launches would use it; the CPU fallback is for machines without one")
@pytest.mark.parametrize("launcher", [
    ["torchrun", "--standalone", "--nproc_per_node", "2"],
    ["accelerate", "launch", "--num_processes", "2"],
], ids=["torchrun", "accelerate-launch"])
def test_multiprocess_launch_on_cpu_as_written(tmp_path, tiny_shards, launcher):
    """torchrun / accelerate launch with 2 processes on a machine without an accelerator train on the CPU with
    gloo, with no ACCELERATE_USE_CPU in the environment, and the banner says why."""
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    cmd = [str(Path(sys.executable).parent / launcher[0]), *launcher[1:], "launch/train.py", "--config", "configs/debug_cpu.yaml", "--run-dir",
           str(tmp_path / "run"), f"data.shards={tiny_shards}", "train.max_steps=2"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**env, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")})  # no accelerate config file
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    assert ("devices: 2 x cpu, world size 2 (multi_cpu; no GPU or other accelerator found; 2 processes with gloo)"
            in r.stdout)
    assert "replica check: G, D and G_ema identical on all 2 ranks" in r.stdout
    assert "finished at step 2" in r.stdout
    if launcher[0] == "accelerate":  # it starts one process on a machine without GPUs: the trainer starts two
        assert "accelerate launch started 1 process of 2 (no GPU or other accelerator found)" in r.stdout
