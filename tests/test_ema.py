"""The EMA generator's schedules (gan.ema): the rampup half-life follows the images seen and is capped,
the first update copies G, the batch size does not change what the settings mean, and the state
(weights, updates, images seen) resumes exactly, also from a checkpoint that predates the count; BatchNorm
statistics recomputed for a model's own weights are the exact ones, deterministic and side-effect free.
The product's EMA G has its own statistics (never G's): every reader (pictures, evaluation, checkpoints,
exports) sees the ones recomputed for its weights, the global RNG plays no part, and two ranks agree
without exchanging them."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from gan.config import ConfigError, EMAConfig, load_config
from gan.ema import EMA, recompute_bn

from conftest import train_debug

ROOT = Path(__file__).resolve().parents[1]


def net(value: float) -> nn.Module:
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(value)
    return m


def param(ema: EMA) -> float:
    return ema.model[0].weight[0, 0].item()


def test_rampup_half_life_is_a_fraction_of_the_images_seen_up_to_the_cap():
    ema = EMA(net(0.0), EMAConfig(schedule="rampup", half_life_kimg=1.0, rampup=0.05))
    assert ema.decay_now(64) == 0.0  # nothing seen yet: the first update copies G
    for seen in (64, 6400, 19_968):  # 5% of these is below the 1,000-image cap
        ema.images_seen = seen
        assert ema.half_life() == pytest.approx(0.05 * seen)
        assert ema.decay_now(64) == pytest.approx(0.5 ** (64 / (0.05 * seen)))
    for seen in (20_000, 10**6, 10**9):  # at and past the cap
        ema.images_seen = seen
        assert ema.half_life() == 1000.0 and ema.decay_now(64) == pytest.approx(0.5 ** (64 / 1000))
    assert EMA(net(0.0), EMAConfig(half_life_kimg=0.0)).decay_now(64) == 0.0  # no half-life: a copy of G


def test_first_update_copies_g_and_buffers_follow_g():
    src = net(0.3)
    src[1].running_mean.fill_(7.0)
    ema = EMA(net(-1.0), EMAConfig(schedule="rampup"))
    ema.update(src, images=64)
    assert all(torch.equal(a, b) for a, b in zip(ema.model.state_dict().values(), src.state_dict().values()))
    assert (ema.num_updates, ema.images_seen) == (1, 64)


@pytest.mark.parametrize("batch", [16, 64, 320])
def test_at_the_cap_the_distance_to_g_halves_every_half_life_of_images_at_any_batch(batch):
    """rampup=0: always the cap. 640 images at any batch size halve the gap to a fixed G."""
    ema = EMA(net(1.0), EMAConfig(schedule="rampup", half_life_kimg=0.64, rampup=0.0))
    target = net(0.0)
    for _ in range(640 // batch * 2):  # two half-lives
        ema.update(target, images=batch)
    assert param(ema) == pytest.approx(0.25, rel=1e-5)  # <= 80 float32 lerps of ~2^-24 each: <= 5e-6
    assert ema.images_seen == 1280


def test_rampup_tracks_g_closely_early_where_the_warmup_lags():
    """G moves at a constant rate; after 1,500 updates of 64 images the rampup EMA trails it by 5% of
    training, the warmup one (decay 0.999 since update 1,000) by far more."""
    rampup = EMA(net(0.0), EMAConfig(schedule="rampup", half_life_kimg=44.3, rampup=0.05))
    warmup = EMA(net(0.0), EMAConfig(schedule="warmup", decay=0.999, warmup_steps=1000))
    g = net(0.0)
    for step in range(1, 1501):
        with torch.no_grad():
            g[0].weight.fill_(float(step))
        rampup.update(g, images=64)
        warmup.update(g, images=64)
    lag_rampup, lag_warmup = 1500 - param(rampup), 1500 - param(warmup)
    assert 0 < lag_rampup < 0.1 * 1500 < lag_warmup


def test_warmup_schedule_is_unchanged():
    ema = EMA(net(0.0), EMAConfig(schedule="warmup", decay=0.999, warmup_steps=1000))
    for n in (0, 1, 10, 999):
        ema.num_updates = n
        assert ema.decay_now(64) == min(0.999, (1 + n) / (10 + n))
    ema.num_updates = 1000
    assert ema.decay_now(64) == 0.999


@pytest.mark.parametrize("schedule", ["rampup", "warmup"])
def test_state_dict_resumes_the_same_averages(schedule):
    cfg = EMAConfig(schedule=schedule, half_life_kimg=0.5, rampup=0.2, decay=0.9, warmup_steps=3)
    torch.manual_seed(0)
    g = net(0.0)
    straight = EMA(g, cfg)
    steps = [copy.deepcopy(g) for _ in range(8)]
    for i, s in enumerate(steps):
        with torch.no_grad():
            for p in s.parameters():
                p.add_(torch.randn_like(p) * (i + 1))
    for s in steps:
        straight.update(s, images=32)
    first = EMA(g, cfg)
    for s in steps[:4]:
        first.update(s, images=32)
    state = copy.deepcopy(first.state_dict())
    assert (state["num_updates"], state["images_seen"]) == (4, 128)
    resumed = EMA(net(5.0), cfg)
    resumed.load_state_dict(state)
    for s in steps[4:]:
        resumed.update(s, images=32)
    assert (resumed.num_updates, resumed.images_seen) == (8, 256)
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    # a checkpoint written before the images were counted: the count is num_updates x the batch
    old = {k: v for k, v in state.items() if k != "images_seen"}
    legacy = EMA(net(5.0), cfg)
    legacy.load_state_dict(old)
    for s in steps[4:]:
        legacy.update(s, images=32)
    assert legacy.images_seen == 256
    for a, b in zip(straight.model.state_dict().values(), legacy.model.state_dict().values()):
        assert torch.equal(a, b)


def test_update_needs_the_images_of_the_step():
    with pytest.raises(ValueError, match="images must be >= 1"):
        EMA(net(0.0), EMAConfig()).update(net(1.0), images=0)


@pytest.mark.parametrize("override, key", [
    ("ema.schedule=linear", "ema.schedule"), ("ema.half_life_kimg=-1", "ema.half_life_kimg"),
    ("ema.half_life_kimg=.inf", "ema.half_life_kimg"), ("ema.rampup=1.5", "ema.rampup"),
    ("ema.rampup=-0.1", "ema.rampup"), ("ema.decay=1.0", "ema.decay"), ("ema.bn_samples=-1", "ema.bn_samples"),
    ("ema.bn_samples=0.5", "ema.bn_samples")])
def test_bad_ema_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config("configs/debug_cpu.yaml", [override])


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.3), nn.Dropout(0.5), nn.Linear(4, 2))


def test_recompute_bn_gives_the_exact_statistics_of_the_models_own_weights():
    m = bn_net().eval()
    m[1].running_mean.fill_(7.0)  # stale statistics, e.g. copied from other weights
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, generator=gen) * 3 + 1,) for _ in range(3)]
    rng = torch.get_rng_state()
    assert recompute_bn(m, batches)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG (training's) is untouched
    with torch.no_grad():
        h = [m[0](x) for (x,) in batches]
    torch.testing.assert_close(m[1].running_mean, torch.stack([b.mean(0) for b in h]).mean(0))
    torch.testing.assert_close(m[1].running_var, torch.stack([b.var(0) for b in h]).mean(0))  # unbiased, as BN
    assert not any(mod.training for mod in m.modules()) and m[1].momentum == 0.3  # modes and momentum restored
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m[1].running_var.fill_(5.0)
    recompute_bn(m, batches)  # deterministic: the same inputs give the same statistics
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_recompute_bn_keeps_a_training_model_training_and_skips_models_without_batchnorm():
    m = bn_net().train()
    assert recompute_bn(m, [(torch.randn(8, 3),)]) and all(mod.training for mod in m.modules())
    plain = nn.Linear(3, 2)
    assert not recompute_bn(plain, [(torch.randn(8, 3),)])


# ---------------------------------------------------------------------------- the EMA G's own statistics


def gan_family(*overrides):
    from gan.family import build_family

    return build_family(load_config(ROOT / "configs/debug_cpu.yaml", ["ema.schedule=rampup", *overrides]))


def trained_g(family, seed: int, steps: int = 3):
    """G after a few "training steps": weights moved and running statistics of its own (train-mode forwards)."""
    torch.manual_seed(0)
    G = family.build_networks()["G"]
    gen = torch.Generator().manual_seed(seed)
    snapshots = []
    for _ in range(steps):
        with torch.no_grad():
            for p in G.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
            G.train()(torch.randn(16, family.cfg.model.z_dim, generator=gen) * 2 + 1, torch.arange(16) % 10)
        snapshots.append(copy.deepcopy(G))
    return snapshots


def bn_state(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


def test_ema_g_has_the_statistics_of_its_own_weights_never_gs():
    """After updates, reading the EMA G recomputes its BatchNorm statistics over the family's inputs for
    its averaged weights: the same as recompute_bn on those weights, not G's (which training moved)."""
    family = gan_family()
    snaps = trained_g(family, seed=1)
    ema = EMA(snaps[0], family.cfg.ema, family.bn_inputs(family.cfg.train.seed))
    for g in snaps:
        ema.update(g, images=8)
    got = bn_state(ema.model)
    expected = copy.deepcopy(ema.shadow)
    for k, v in bn_state(expected).items():
        v.fill_(3.0)  # stale values: recompute_bn must replace every one
    recompute_bn(expected, family.bn_inputs(family.cfg.train.seed))
    assert got.keys() == bn_state(expected).keys() and len(got) > 3
    for k, v in bn_state(expected).items():
        assert torch.equal(got[k], v), k
    g_stats = bn_state(snaps[-1])
    assert all(not torch.allclose(got[k], g_stats[k]) for k in got if "running_" in k)  # not copied from G
    saved = ema.state_dict()["model"]  # what checkpoints and exports hold
    for k, v in got.items():
        assert torch.equal(saved[k], v), k


def test_ema_statistics_are_recomputed_lazily_once_per_change():
    """update() only marks them stale; the first read recomputes (one forward per input batch), later reads don't."""
    family = gan_family("ema.bn_samples=600")
    snaps = trained_g(family, seed=2)
    ema = EMA(snaps[0], family.cfg.ema, family.bn_inputs(0))
    assert len(ema.bn_inputs) == 3 and [len(z) for z, _ in ema.bn_inputs] == [256, 256, 88]
    calls = []
    ema.shadow.register_forward_hook(lambda *a: calls.append(1))
    ema.update(snaps[1], images=8)
    ema.update(snaps[2], images=8)
    assert calls == [] and ema.stale
    ema.model  # noqa: B018
    ema.state_dict()
    ema.model  # noqa: B018
    assert len(calls) == 3 and not ema.stale
    ema.update(snaps[2], images=8)
    ema.state_dict()
    assert len(calls) == 6


def test_ema_statistics_do_not_depend_on_the_global_rng_and_leave_it_alone():
    family = gan_family()
    snaps = trained_g(family, seed=3)
    states = []
    for global_seed in (0, 12345):
        ema = EMA(snaps[0], family.cfg.ema, family.bn_inputs(7))
        for g in snaps:
            ema.update(g, images=8)
        torch.manual_seed(global_seed)
        rng = torch.get_rng_state()
        states.append(bn_state(ema.model))
        assert torch.equal(torch.get_rng_state(), rng)  # training's random stream is untouched
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_other_buffers_are_still_copied_from_g():
    """Spectral norm's power-iteration vectors (buffers outside BatchNorm) follow G as before."""
    family = gan_family("model.g_spectral_norm=true")
    snaps = trained_g(family, seed=4)
    ema = EMA(snaps[0], family.cfg.ema, family.bn_inputs(0))
    for g in snaps:
        ema.update(g, images=8)
    g_bufs, e_bufs = dict(snaps[-1].named_buffers()), dict(ema.model.named_buffers())
    sn = [k for k in g_bufs if k.endswith(("._u", "._v"))]
    assert sn and all(torch.equal(e_bufs[k], g_bufs[k]) for k in sn)


def test_without_inputs_or_with_bn_samples_0_the_statistics_are_copied():
    family = gan_family("ema.bn_samples=0")
    assert family.bn_inputs(0) is None
    snaps = trained_g(family, seed=5)
    ema = EMA(snaps[0], family.cfg.ema, family.bn_inputs(0))
    ema.update(snaps[-1], images=8)
    g_stats = bn_state(snaps[-1])
    assert all(torch.equal(v, g_stats[k]) for k, v in bn_state(ema.model).items())


def test_resumed_ema_reads_the_same_statistics():
    family = gan_family()
    snaps = trained_g(family, seed=6, steps=4)
    inputs = family.bn_inputs(0)
    straight = EMA(snaps[0], family.cfg.ema, inputs)
    for g in snaps:
        straight.update(g, images=8)
    first = EMA(snaps[0], family.cfg.ema, inputs)
    for g in snaps[:2]:
        first.update(g, images=8)
    state = copy.deepcopy(first.state_dict())
    resumed = EMA(snaps[0], family.cfg.ema, inputs)
    resumed.load_state_dict(state)
    for g in snaps[2:]:
        resumed.update(g, images=8)
    for (k, a), b in zip(straight.state_dict()["model"].items(), resumed.state_dict()["model"].values()):
        assert torch.equal(a, b), k


TWO_RANKS = """
import json, os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from test_ema import EMA, bn_state, gan_family, trained_g
dist.init_process_group("gloo")
rank = dist.get_rank()
family = gan_family()
snaps = trained_g(family, seed=8)
torch.manual_seed(1000 + rank)  # each rank its own global random stream, as in training
ema = EMA(snaps[0], family.cfg.ema, family.bn_inputs(family.cfg.train.seed))
for g in snaps:
    ema.update(g, images=16)
torch.save(bn_state(ema.model), os.path.join({out!r}, f"rank-{{rank}}.pt"))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_ranks_compute_the_same_statistics_without_a_collective(tmp_path):
    """torchrun, 2 gloo processes with different global RNG states: each recomputes its EMA's statistics
    on its own (no collective) and they are identical, bit for bit."""
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS.format(root=str(ROOT), tests=str(ROOT / "tests"), out=str(tmp_path)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = (torch.load(tmp_path / f"rank-{i}.pt") for i in (0, 1))
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.numerics
def test_training_exports_and_checkpoints_the_ema_gs_own_statistics(tmp_path, tiny_shards):
    """A debug run: RUN/export/ (and so evaluate.py, sample.py, export.py, serving), the checkpoint's EMA
    part and the pictures' source hold the statistics recomputed for the EMA G's weights, not G's."""
    from safetensors.torch import load_file

    from gan.families.gan.config import ModelConfig
    from gan.families.gan.models import build_models

    run = tmp_path / "run"
    train_debug(run, tiny_shards, "train.max_steps=5", "ema.schedule=rampup", env={"OMP_NUM_THREADS": "1"})
    export = load_file(str(run / "export" / "G_ema.safetensors"))
    spec = json.loads((run / "export" / "model.json").read_text())
    G, _ = build_models(ModelConfig(**spec["model"]))
    G.load_state_dict(export)
    family = gan_family()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the run's one thread: the same kernels in the same order
    try:
        recompute_bn(G, family.bn_inputs(family.cfg.train.seed))
    finally:
        torch.set_num_threads(threads)
    ckpt = run / "checkpoints" / "step-00000005"
    meta = json.loads((ckpt / "meta.json").read_text())
    ema_part = torch.load(ckpt / meta["parts"]["ema"], map_location="cpu", weights_only=True)["model"]
    g_part = load_file(str(ckpt / meta["parts"]["G"]))
    stats = [k for k in export if "running_" in k]
    assert stats
    for k in stats:
        assert torch.equal(export[k], G.state_dict()[k]), k  # another process, the same arithmetic: bit for bit
        assert torch.equal(ema_part[k], export[k]), k
        assert not torch.allclose(export[k], g_part[k]), k  # G's own statistics were not copied
