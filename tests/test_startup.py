"""The start-up banner and where the mixed precision comes from (gan/startup.py)."""
from __future__ import annotations

import yaml

from conftest import train_debug as train
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
    assert "devices: 1 x cpu, world size 1 (single process)" in out
    assert "precision: bf16 (accelerate launch --mixed_precision bf16" in out
    assert "models: G cdcgan " in out and " parameters, D " in out
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
