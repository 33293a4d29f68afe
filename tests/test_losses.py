"""Losses, penalties, DiffAugment, optimisers and schedules; every architecture x loss trains."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from gan.config import ConfigError, LossConfig, OptimConfig, load_config
from gan.families.gan.diffaug import color, cutout, translation
from gan.families.gan.losses import (LOSSES, build_loss, gradient_penalty, hinge_d_loss, hinge_g_loss, ls_d_loss, ls_g_loss,
                        ns_d_loss, r1_penalty, wasserstein_d_loss)

ROOT = Path(__file__).resolve().parents[1]


class Linear(nn.Module):
    """D(x, y) = <w, x>: grad_x D = w for every input."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x, y):
        return (x * self.w).flatten(1).sum(1)


class Quadratic(nn.Module):
    """D(x, y) = 1/2 |x|^2: grad_x D = x."""

    def forward(self, x, y):
        return 0.5 * x.square().flatten(1).sum(1)


def test_gradient_penalty_matches_hand_computation():
    w = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)  # |w| = 5 -> (5 - 1)^2 = 16
    real, fake, y = torch.randn(3, 2, 1, 1), torch.randn(3, 2, 1, 1), torch.zeros(3, dtype=torch.long)
    assert gradient_penalty(Linear(w), real, fake, y).item() == pytest.approx(16.0)
    alpha = torch.tensor([0.0, 0.5, 1.0]).view(3, 1, 1, 1)
    real, fake = torch.ones(3, 2, 1, 1), torch.zeros(3, 2, 1, 1)
    # x_hat = alpha * 1: |x_hat| = alpha * sqrt(2)
    want = sum((a * math.sqrt(2) - 1) ** 2 for a in (0.0, 0.5, 1.0)) / 3
    assert gradient_penalty(Quadratic(), real, fake, y, alpha=alpha).item() == pytest.approx(want, rel=1e-6)


def test_gradient_penalty_reaches_d_weights():
    D = Linear(torch.tensor([3.0, 4.0]).view(1, 2, 1, 1))
    gp = gradient_penalty(D, torch.randn(2, 2, 1, 1), torch.randn(2, 2, 1, 1), torch.zeros(2, dtype=torch.long))
    gp.backward()  # d/dw (|w| - 1)^2 = 2 (|w| - 1) w / |w| = 2 * 4 * w / 5
    assert torch.allclose(D.w.grad.flatten(), torch.tensor([4.8, 6.4]))


def test_r1_matches_hand_computation():
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0]]).view(2, 2, 1, 1)
    y = torch.zeros(2, dtype=torch.long)
    assert r1_penalty(Quadratic(), x, y).item() == pytest.approx((5.0 + 9.0) / 2)  # mean |x|^2
    assert r1_penalty(Linear(torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)), x, y).item() == pytest.approx(25.0)


def test_lazy_r1_weighting():
    loss = build_loss(LossConfig(r1_gamma=2.0, r1_every=4))
    x = torch.tensor([[1.0, 2.0]]).view(1, 2, 1, 1)
    value, stats = loss.d_regularizer(Quadratic(), x, torch.zeros(1, dtype=torch.long))
    assert stats["Loss/D/r1"].item() == pytest.approx(5.0)
    assert value.item() == pytest.approx(0.5 * 2.0 * 5.0 * 4)  # gamma/2 * penalty * interval


def test_objective_values():
    r, f = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    assert hinge_d_loss(r, f).item() == pytest.approx((0 + 1) / 2 + (0 + 1.5) / 2)
    assert hinge_g_loss(f).item() == pytest.approx(0.75)
    assert wasserstein_d_loss(r, f).item() == pytest.approx(-0.75 - 1.0)
    assert ls_d_loss(r, f).item() == pytest.approx(0.5 * (1 + 1) / 2 + 0.5 * (4 + 0.25) / 2)
    assert ls_g_loss(f).item() == pytest.approx(0.5 * (9 + 0.25) / 2)
    # one-sided label smoothing moves only the real target
    zero = torch.zeros(4)
    assert ns_d_loss(zero, zero, smoothing=0.1).item() == pytest.approx(ns_d_loss(zero, zero).item())
    big = torch.full((4,), 10.0)
    assert ns_d_loss(big, -big, smoothing=0.1).item() > ns_d_loss(big, -big).item() + 0.5


def test_instance_noise_decays():
    loss = build_loss(LossConfig(instance_noise=0.2, instance_noise_steps=100))
    assert loss.noise_std() == pytest.approx(0.2)
    loss.step = 50
    assert loss.noise_std() == pytest.approx(0.1)
    loss.step = 200
    assert loss.noise_std() == 0.0
    x = torch.zeros(64, 3, 8, 8)
    loss.step = 0
    # the std of N = 12,288 normal draws: relative standard error 1/sqrt(2N) = 0.0064, so 0.05 is ~8 of them
    assert loss.d_input(x).std().item() == pytest.approx(0.2, rel=0.05)


@pytest.mark.parametrize("op", [color, translation, cutout])
def test_diffaugment_is_differentiable(op):
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    out = op(x)
    assert out.shape == x.shape
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_diffaugment_ops_do_what_they_say():
    torch.manual_seed(0)
    img = torch.arange(64.0).view(1, 1, 8, 8).repeat(16, 1, 1, 1)
    moved = translation(img)
    for m in moved:  # each sample is the image shifted by at most 1 pixel, zero-filled
        assert any(torch.equal(m[0], torch.roll(img[0, 0], (dy, dx), (0, 1)) * _keep(dy, dx))
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    holes = cutout(torch.ones(16, 1, 8, 8))
    zeros = (holes == 0).flatten(1).sum(1)
    assert (zeros > 0).all() and (zeros <= 16).all()  # a 4x4 square, clipped at the borders


def _keep(dy, dx):
    m = torch.ones(8, 8)
    if dy > 0:
        m[:dy] = 0
    if dy < 0:
        m[dy:] = 0
    if dx > 0:
        m[:, :dx] = 0
    if dx < 0:
        m[:, dx:] = 0
    return m


def test_diffaugment_in_loss_keeps_labels_and_gradients():
    seen = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x, y):
            seen.append(y.clone())
            return (x.flatten(1).mean(1)) * self.w

    loss = build_loss(LossConfig(name="hinge", diffaug="color,translation,cutout"))
    real = torch.randn(4, 3, 8, 8)
    fake = torch.randn(4, 3, 8, 8, requires_grad=True)
    yr, yf = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7])
    loss.d_loss(Recorder(), real, yr, fake.detach(), yf)
    assert torch.equal(seen[0], yr) and torch.equal(seen[1], yf)
    g, _ = loss.g_loss(Recorder(), fake, yf)
    g.backward()
    assert fake.grad.abs().sum() > 0  # G gets gradients through the augmentation


def test_bad_loss_options():
    with pytest.raises(ConfigError, match="unknown loss 'wgan'.*hinge, lsgan, ns, wgan_gp"):
        build_loss(LossConfig(name="wgan"))
    with pytest.raises(ConfigError, match="loss.label_smoothing"):
        LossConfig(name="hinge", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="unknown DiffAugment op"):
        LossConfig(diffaug="color,rotate")


def test_lr_schedules():
    from gan.optim import lr_factor

    f = lr_factor(OptimConfig(lr_schedule="linear", lr_decay_start=50), 150)
    assert (f(0), f(50), f(100), f(150)) == (1.0, 1.0, 0.5, 0.0)
    f = lr_factor(OptimConfig(lr_schedule="cosine"), 100)
    assert f(0) == 1.0 and f(50) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    f = lr_factor(OptimConfig(lr_schedule="step", lr_step_every=10, lr_gamma=0.5), 100)
    assert (f(9), f(10), f(25)) == (1.0, 0.5, 0.25)
    f = lr_factor(OptimConfig(lr_schedule="exponential", lr_step_every=10, lr_gamma=0.5), 100)
    assert f(5) == pytest.approx(0.5 ** 0.5)


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                       ("rmsprop", torch.optim.RMSprop)])
def test_optimizers(name, cls):
    from gan.optim import build_optimizer

    o = OptimConfig(name=name, betas_d=[0.0, 0.9])
    opt = build_optimizer(nn.Linear(2, 2).parameters(), o, 1e-3, o.betas_d)
    assert isinstance(opt, cls)
    if name != "rmsprop":
        assert opt.param_groups[0]["betas"] == (0.0, 0.9)


# ------------------------------------------------------------------ every architecture x loss


def _combos():
    from gan.families.gan.models import MODELS
    archs = [(m, "") for m in sorted(MODELS)] + [("cdcgan", "googlenet")]
    return [(m, b, l) for m, b in archs for l in sorted(LOSSES)]


@pytest.mark.parametrize("arch, backbone, loss", _combos())
def test_every_architecture_and_loss_trains_a_finite_step(arch, backbone, loss, tiny_shards, tmp_path):
    from gan.trainer import Trainer

    cfg = load_config(ROOT / "configs/debug_cpu.yaml", [
        f"data.shards={tiny_shards}", f"model.name={arch}", f"model.d_backbone={backbone}", f"loss.name={loss}",
        "model.z_dim=32",
        "model.shared_dim=16", "loss.r1_gamma=1.0", "loss.r1_every=1", "loss.diffaug=color,translation,cutout",
        "loss.instance_noise=0.1", "optim.n_dis=2", "optim.grad_clip=10"])
    t = Trainer(cfg, tmp_path / "run")
    before = [p.detach().clone() for p in t.nets["G"].parameters()] + [p.detach().clone() for p in t.nets["D"].parameters()]
    t.train_step()
    stats = t.stats.reduce()
    assert all(math.isfinite(v) for v in stats.values()), stats
    assert {"Loss/D/main", "Loss/G/main", "Loss/D/r1"} <= set(stats)
    after = list(t.nets["G"].parameters()) + list(t.nets["D"].parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert sum(not torch.equal(a, b) for a, b in zip(before, after)) > len(after) // 2
