"""The EMA generator's schedules (gan.ema): the rampup half-life follows the images seen and is capped,
the first update copies G, the batch size does not change what the settings mean, and the state
(weights, updates, images seen) resumes exactly, also from a checkpoint that predates the count; BatchNorm
statistics recomputed for a model's own weights are the exact ones, deterministic and side-effect free."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from gan.config import ConfigError, EMAConfig, load_config
from gan.ema import EMA, recompute_bn


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
    assert param(ema) == pytest.approx(0.25, rel=1e-5)
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
    ("ema.rampup=-0.1", "ema.rampup"), ("ema.decay=1.0", "ema.decay")])
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
