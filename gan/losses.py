"""Adversarial objectives, apart from networks and loop.

The math lives in pure functions of logits. A loss object (registered by name) runs D on the
inputs the trainer hands it and returns ``(loss, stats)``; it never calls backward() or step():
the trainer owns the order (zero_grad, backward, clipping, finite check, step). Variants such as
hinge, WGAN-GP or R1 are new loss classes, not branches in the loop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gan.config import ConfigError, LossConfig


def ns_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating D loss: BCE(D(x), 1) + BCE(D(G(z)), 0), with logits."""
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def ns_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating G loss: BCE(D(G(z)), 1) = softplus(-D(G(z)))."""
    fake_logits = fake_logits.float()
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


class NonSaturating:
    """Goodfellow et al. 2014, the -log D(G(z)) generator objective."""

    def d_loss(self, D, real, y_real, fake, y_fake) -> tuple[torch.Tensor, dict]:
        real_logits, fake_logits = D(real, y_real), D(fake, y_fake)
        loss = ns_d_loss(real_logits, fake_logits)
        return loss, {"Loss/D/main": loss.detach(),
                      "D/real": torch.sigmoid(real_logits.detach().float()).mean(),
                      "D/fake": torch.sigmoid(fake_logits.detach().float()).mean()}

    def g_loss(self, D, fake, y) -> tuple[torch.Tensor, dict]:
        fake_logits = D(fake, y)
        loss = ns_g_loss(fake_logits)
        return loss, {"Loss/G/main": loss.detach()}


LOSSES = {"ns": NonSaturating}


def build_loss(cfg: LossConfig):
    if cfg.name not in LOSSES:
        raise ConfigError(f"config key 'loss.name': unknown loss '{cfg.name}'. Valid names: {', '.join(sorted(LOSSES))}")
    return LOSSES[cfg.name]()
