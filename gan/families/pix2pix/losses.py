"""pix2pix's objective as pure functions: G's adversarial term through any registered GAN loss plus
lambda * L1 to the target, and D's term on (input, target) against (input, output) pairs.

The adversarial part is a loss object of the GAN family (``gan.families.gan.losses.build_loss``), so every objective,
penalty and D-input option it has (ns, hinge, wgan_gp's gradient penalty, R1, label smoothing, instance
noise) works here unchanged; D sees :func:`~gan.families.pix2pix.networks.pair` tensors and no label.
As in the reference implementation, D's loss is halved ("slows down the rate at which D learns relative
to G"). Nothing here calls backward().
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gan.families.pix2pix.networks import pair

D_LOSS_SCALE = 0.5


def l1_loss(fake_b: torch.Tensor, real_b: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over all pixels of the batch (the reference's nn.L1Loss)."""
    return F.l1_loss(fake_b.float(), real_b.float())


def generator_loss(gan_loss, D, real_a: torch.Tensor, fake_b: torch.Tensor, real_b: torch.Tensor,
                   lambda_l1: float) -> tuple[torch.Tensor, dict]:
    """adversarial(D(a, G(a))) + lambda_l1 * |G(a) - b|_1 -> (loss, stats)."""
    adv, stats = gan_loss.g_loss(D, pair(real_a, fake_b), None)
    l1 = l1_loss(fake_b, real_b)
    loss = adv + lambda_l1 * l1
    return loss, {**stats, "Loss/G/l1": l1.detach(), "Loss/G/total": loss.detach()}


def discriminator_loss(gan_loss, D, real_a: torch.Tensor, fake_b: torch.Tensor,
                       real_b: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """D's objective on real pairs (a, b) and fake pairs (a, G(a)), G(a) detached, halved -> (loss, stats)."""
    loss, stats = gan_loss.d_loss(D, pair(real_a, real_b), None, pair(real_a, fake_b.detach()), None)
    return D_LOSS_SCALE * loss, stats
