"""Adversarial objectives and regularisers, apart from networks and loop.

The math lives in pure functions of logits (and of D, for the penalties). A loss object, built
by name from ``LossConfig``, prepares D's inputs (DiffAugment, instance noise), runs D and
returns ``(loss, stats)``. It never calls backward() or step(): the trainer owns the order
(zero_grad, backward, clipping, finite check, step) and the lazy-regulariser interval.
A new objective is a new subclass that overrides ``d_objective``/``g_objective``; a new penalty
overrides ``d_loss``; nothing branches on names inside the loop.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from gan.config import ConfigError
from gan.families.gan.config import LossConfig
from gan.families.gan.diffaug import diff_augment

# ---------------------------------------------------------------------------- pure objectives


def ns_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Non-saturating D loss: BCE(D(x), 1 - smoothing) + BCE(D(G(z)), 0), from logits."""
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    return (F.binary_cross_entropy_with_logits(real_logits, torch.full_like(real_logits, 1.0 - smoothing))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def ns_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating G loss: BCE(D(G(z)), 1) = softplus(-D(G(z)))."""
    fake_logits = fake_logits.float()
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean()


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.float().mean()


def wasserstein_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return fake_logits.float().mean() - real_logits.float().mean()


def wasserstein_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.float().mean()


def ls_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Least squares (Mao et al. 2017), a-b-c = 0-1-1: 1/2 E(D(x) - b)^2 + 1/2 E D(G(z))^2."""
    return 0.5 * ((real_logits.float() - (1.0 - smoothing)) ** 2).mean() + 0.5 * (fake_logits.float() ** 2).mean()


def ls_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((fake_logits.float() - 1.0) ** 2).mean()


# ---------------------------------------------------------------------------- penalties


def uncompiled(D):
    """D for a gradient penalty's inner forward. Without torch.compile's wrapper: the same parameters
    and the same DDP wrapper, run eagerly (compiled graphs do not support double backward). Without a
    DeepSpeed engine's wrapper: the engine's output hooks would start its ZeRO gradient reduction inside
    ``torch.autograd.grad``; the plain module's parameters carry ZeRO's gradient hooks all the same."""
    D = getattr(D, "_orig_mod", D)
    deepspeed = sys.modules.get("deepspeed")
    return D.module if deepspeed is not None and isinstance(D, deepspeed.DeepSpeedEngine) else D


def gradient_penalty(D, real: torch.Tensor, fake: torch.Tensor, y: torch.Tensor,
                     alpha: torch.Tensor | None = None) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017): E (|grad D(x_hat)|_2 - 1)^2 on x_hat between real and fake."""
    if alpha is None:
        alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    x_hat = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    out = uncompiled(D)(x_hat, y)
    (grad,) = torch.autograd.grad(out.float().sum(), x_hat, create_graph=True)
    return ((grad.float().flatten(1).norm(2, dim=1) - 1.0) ** 2).mean()


def r1_penalty(D, real: torch.Tensor, y: torch.Tensor, with_logits: bool = False):
    """R1 (Mescheder et al. 2018): E |grad_x D(x)|^2 on real data (multiply by gamma / 2); with
    ``with_logits``, also D(x) (see GANLoss.d_regularizer)."""
    x = real.detach().requires_grad_(True)
    out = uncompiled(D)(x, y)
    (grad,) = torch.autograd.grad(out.float().sum(), x, create_graph=True)
    penalty = grad.float().square().flatten(1).sum(1).mean()
    return (penalty, out) if with_logits else penalty


# ---------------------------------------------------------------------------- loss objects


class GANLoss:
    """Base: D's input pipeline, the two phases, and the lazy R1 regulariser."""

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg
        self.policy = cfg.diffaug_policy
        self.step = 0  # G steps done; the trainer sets it (instance-noise decay)

    # pure objectives, overridden by subclasses
    def d_objective(self, real_logits, fake_logits):
        raise NotImplementedError

    def g_objective(self, fake_logits):
        raise NotImplementedError

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """What gets logged as D(x) and D(G(z)): the raw output, or a probability where there is one."""
        return logits

    def noise_std(self) -> float:
        c = self.cfg
        if c.instance_noise == 0:
            return 0.0
        if c.instance_noise_steps == 0:
            return c.instance_noise
        return c.instance_noise * max(0.0, 1.0 - self.step / c.instance_noise_steps)

    def d_input(self, x: torch.Tensor) -> torch.Tensor:
        """What D sees: the same differentiable DiffAugment on real and fake, then instance noise."""
        if self.policy:
            x = diff_augment(x, self.policy)
        std = self.noise_std()
        if std > 0:
            x = x + std * torch.randn_like(x)
        return x

    def d_loss(self, D, real, y_real, fake, y_fake) -> tuple[torch.Tensor, dict]:
        real_logits, fake_logits = D(self.d_input(real), y_real), D(self.d_input(fake), y_fake)
        loss = self.d_objective(real_logits, fake_logits)
        return loss, {"Loss/D/main": loss.detach(), "D/real": self.score(real_logits.detach().float()).mean(),
                      "D/fake": self.score(fake_logits.detach().float()).mean()}

    def g_loss(self, D, fake, y) -> tuple[torch.Tensor, dict]:
        fake_logits = D(self.d_input(fake), y)
        loss = self.g_objective(fake_logits)
        return loss, {"Loss/G/main": loss.detach()}

    @property
    def has_regularizer(self) -> bool:
        return self.cfg.r1_gamma > 0

    def d_regularizer(self, D, real, y) -> tuple[torch.Tensor, dict]:
        """Lazy R1, run by the trainer every ``r1_every`` D steps and weighted by that interval."""
        penalty, logits = r1_penalty(D, self.d_input(real) if self.policy else real, y, with_logits=True)
        # An input gradient does not depend on every weight (D's last bias), and DDP needs a gradient for
        # each in every backward ("Expected to have finished reduction"): D(x) joins with weight 0, as in
        # stylegan2-ada, so all of D's parameters take part at no cost.
        loss = 0.5 * self.cfg.r1_gamma * penalty * self.cfg.r1_every + 0.0 * logits.float().sum()
        return loss, {"Loss/D/r1": penalty.detach()}


class NonSaturating(GANLoss):
    """Goodfellow et al. 2014 with the -log D(G(z)) generator objective; D(x) logged as a probability."""

    def d_objective(self, real_logits, fake_logits):
        return ns_d_loss(real_logits, fake_logits, self.cfg.label_smoothing)

    def g_objective(self, fake_logits):
        return ns_g_loss(fake_logits)

    def score(self, logits):
        return torch.sigmoid(logits)


class Hinge(GANLoss):
    """Lim & Ye 2017; Miyato et al. 2018 (SNGAN, BigGAN)."""

    def d_objective(self, real_logits, fake_logits):
        return hinge_d_loss(real_logits, fake_logits)

    def g_objective(self, fake_logits):
        return hinge_g_loss(fake_logits)


class WassersteinGP(GANLoss):
    """WGAN-GP: Wasserstein critic loss + gp_weight * gradient penalty."""

    def d_objective(self, real_logits, fake_logits):
        return wasserstein_d_loss(real_logits, fake_logits)

    def g_objective(self, fake_logits):
        return wasserstein_g_loss(fake_logits)

    def d_loss(self, D, real, y_real, fake, y_fake):
        loss, stats = super().d_loss(D, real, y_real, fake, y_fake)
        gp = gradient_penalty(D, real, fake, y_real)
        stats["Loss/D/gp"] = gp.detach()
        return loss + self.cfg.gp_weight * gp, stats


class LeastSquares(GANLoss):
    def d_objective(self, real_logits, fake_logits):
        return ls_d_loss(real_logits, fake_logits, self.cfg.label_smoothing)

    def g_objective(self, fake_logits):
        return ls_g_loss(fake_logits)


LOSSES = {"ns": NonSaturating, "hinge": Hinge, "wgan_gp": WassersteinGP, "lsgan": LeastSquares}


def build_loss(cfg: LossConfig) -> GANLoss:
    if cfg.name not in LOSSES:
        raise ConfigError(f"config key 'loss.name': unknown loss '{cfg.name}'. Valid names: {', '.join(sorted(LOSSES))}")
    return LOSSES[cfg.name](cfg)
