"""The pix2pix family on the spine: it trains on real paired shards with loader workers (D then G, both
through the backend), its pictures are input | output | target rows of held-out pairs, it resumes bit for
bit, it runs on 2 gloo ranks, and it refuses single-image shards and a GAN's checkpoint before any work."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO, fit_in_process, train_debug
from test_paired import inverted_pairs

SMALL = ["model.img_size=32", "model.g_channels=4", "model.d_channels=4", "val.pictures=3", "train.batch_size=8",
         "train.mixed_precision=no", "data.num_workers=2", "data.shuffle_buffer=16", "log.progress=false",
         "log.with=", "log.every=1", "log.sample_every=2", "checkpoint.every=2", "ema.warmup_steps=0"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """48 pairs (x, 255 - x) of 3x32x32 noise images in 5 shards (and 16 held-out ones)."""
    root = tmp_path_factory.mktemp("pix2pix")
    inverted_pairs(root / "val", n=16, size=32)
    return inverted_pairs(root / "train", size=32)


def _config(shards, *overrides):
    from gan.config import load_config

    return load_config(None, ["family=pix2pix", f"data.shards={shards}", *SMALL, *overrides])


def _checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def test_pix2pix_trains_on_the_spine(tmp_path, pairs):
    """4 steps in one process, 2 loader workers: D and G updated each step with finite losses, G's output
    changed, parts named after G and D, the picture is 3 held-out rows of input | output | target."""
    from accelerate.utils import set_seed

    from gan.checkpoint import read_meta
    from gan.family import build_family

    cfg = _config(pairs, "train.max_steps=4", f"val.shards={pairs.parent / 'val'}")
    rows = [r for r in fit_in_process(cfg, tmp_path) if "Loss/G/l1" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        for k in ("Loss/G/l1", "Loss/G/total", "GradNorm/G", "GradNorm/D", "LR/G", "LR/D"):
            assert k in r and torch.isfinite(torch.tensor(r[k])), (k, r)
        assert r["LR/G"] == r["LR/D"] == 2e-4
    assert any(k.startswith("Loss/D/") for k in rows[0])

    meta = read_meta(_checkpoint(tmp_path, 4))
    assert (meta["family"], meta["nets"], meta["ema"]) == ("pix2pix", ["G", "D"], True)
    assert {"G", "D", "opt_G", "opt_D", "ema", "sched_G", "sched_D"} <= set(meta["parts"])

    set_seed(cfg.train.seed)  # the trainer's initial weights
    G = build_family(cfg).build_networks()["G"].eval()
    a = torch.rand(2, 3, 32, 32) * 2 - 1
    before = G(a)
    G.load_state_dict(load_file(_checkpoint(tmp_path, 4) / "model.safetensors"))
    assert not torch.allclose(before, G(a)), "G's output did not change in training"

    png = Image.open(sorted((tmp_path / "samples").glob("*.png"))[-1])
    assert png.size == (3 * 32 + 4 * 2, 3 * 32 + 4 * 2)  # 3 rows of input | output | target, 2 px padding
    grid = torch.from_numpy(np.array(png)).permute(2, 0, 1)
    from gan.data import eval_batches

    va, vb, _ = next(iter(eval_batches(pairs.parent / "val", 3)))
    u8 = lambda t: ((t + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    assert torch.equal(grid[:, 2:34, 2:34], u8(va[0])) and torch.equal(grid[:, 2:34, 70:102], u8(vb[0]))


def test_exact_resume_with_workers(tmp_path, pairs):
    """2 + 2 steps (resumed from the checkpoint at 2) give the same G, D, optimizers and EMA as 4 straight."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    fit_in_process(_config(pairs, "train.max_steps=4"), straight)
    fit_in_process(_config(pairs, "train.max_steps=2"), resumed)
    fit_in_process(_config(pairs, "train.max_steps=4"), resumed, resume="auto")
    a, b = _checkpoint(straight, 4), _checkpoint(resumed, 4)
    files = sorted(p.name for p in a.iterdir() if p.suffix in (".safetensors", ".bin"))
    assert {"model.safetensors", "model_1.safetensors", "optimizer.bin", "optimizer_1.bin"} <= set(files)
    for name in files:
        if name.endswith(".safetensors"):
            x, y = load_file(a / name), load_file(b / name)
        else:
            x, y = (torch.load(p / name, weights_only=False)["state"] for p in (a, b))
            x = {f"{k}.{n}": v for k, s in x.items() for n, v in s.items() if torch.is_tensor(v)}
            y = {f"{k}.{n}": v for k, s in y.items() for n, v in s.items() if torch.is_tensor(v)}
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    ema = [torch.load(p / "custom_checkpoint_0.pkl", weights_only=False)["model"] for p in (a, b)]
    assert all(torch.equal(ema[0][k], ema[1][k]) for k in ema[0])


def test_shards_that_do_not_fit_the_model_are_refused_before_any_work(tmp_path, pairs, tiny_shards):
    from gan.data import ShardError

    run = tmp_path / "run"
    with pytest.raises(ShardError, match=r"data.shards: .* 3-channel inputs, but the config expects 1 "
                                         r"\(model.in_channels\)\. Set model.in_channels=3"):
        fit_in_process(_config(pairs, "model.in_channels=1", "train.max_steps=1"), run)
    with pytest.raises(ShardError, match=r"model.img_size"):
        fit_in_process(_config(pairs, "model.img_size=64", "model.d_layers=2", "train.max_steps=1"), run)
    with pytest.raises(ShardError, match=r"pix2pix \(family: pix2pix\) trains on \(input, target\) pairs.*"
                                         r"data_shards build --source paired"):
        fit_in_process(_config(pairs, f"val.shards={tiny_shards}", "train.max_steps=1"), run)
    assert not (run / "checkpoints").exists()


def _train_cli(run, shards, *overrides, resume=None, ranks=1, timeout=300):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] \
        if ranks > 1 else [sys.executable]
    cmd = [*launcher, "launch/train.py", "--config", "configs/cifar10_sketch_pix2pix.yaml", "--run-dir", str(run),
           f"data.shards={shards}", "val.shards=", *SMALL, "model.in_channels=3", *overrides]
    if resume:
        cmd += ["--resume", str(resume)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})


def test_single_image_shards_and_a_gan_checkpoint_are_refused(tmp_path, pairs, tiny_shards):
    """Exit 2 before any work: single-image shards (the message names `data_shards build --source paired`),
    and a resume from a GAN's checkpoint."""
    r = _train_cli(tmp_path / "run", tiny_shards, "train.max_steps=1")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "pix2pix (family: pix2pix) trains on (input, target) pairs" in r.stderr
    assert "python -m data_shards build --source paired" in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()

    train_debug(tmp_path / "gan", tiny_shards, "train.max_steps=1")
    r = _train_cli(tmp_path / "run", pairs, "train.max_steps=1", resume=_checkpoint(tmp_path / "gan", 1))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "holds a gan model and this run trains family=pix2pix" in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_pix2pix_on_two_gloo_ranks(tmp_path, pairs):
    """launch/train.py under torchrun on 2 gloo ranks: G, D and the EMA G identical on both ranks, both
    ranks' pairs counted."""
    run = tmp_path / "run"
    r = _train_cli(run, pairs, "train.max_steps=3", "train.batch_size=4", ranks=2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "replica check: G, D and G_ema identical on all 2 ranks" in r.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["Progress/kimg"] == pytest.approx(3 * 4 * 2 / 1000)
    assert [r["step"] for r in rows if "Loss/G/l1" in r] == [1, 2, 3]
