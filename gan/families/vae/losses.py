"""The VAE's objective as pure functions: per-sample reconstruction terms, the KL to N(0, I), the KL
warm-up, and the negative ELBO in bits per dimension.

Per-sample terms are sums over the sample's dimensions (pixels or latents), in float32, so a batch mean
is the Monte-Carlo ELBO and the values can be summed across ranks. ``vae_loss`` returns ``(loss, stats)``
and never calls backward().

Bits per dimension
------------------
Images are 8-bit: pixel value k in 0..255 is stored as x = lo + k * delta on the data range [lo, hi]
(``delta = (hi - lo) / 255``: [-1, 1] is ``k / 127.5 - 1``, the project's convention; [0, 1] is ``k / 255``).
A continuous density p(x) is turned into a probability of the 8-bit value by spreading each value
uniformly over its bin of width delta (uniform dequantization, Theis et al. 2016), so
``-log2 P(k) = -log2 p(x) - log2 delta``. Over D = C * H * W dimensions:

    bits/dim = (-log p(x) [nats]) / (D * ln 2) - log2(delta)

i.e. ``+ log2(127.5) = 6.994`` bits for [-1, 1] data and ``+ log2(255) = 7.994`` for [0, 1] data (the
literature's ``+ 8`` divides by 256 instead of 255). A density uniform over the data range scores
``log2(255)`` bits/dim in either convention, as it should (256 equally likely values, up to the bin edges).
The negative ELBO bounds -log p(x) from above, so its bits/dim bound the model's from above.

``model.recon: mse`` is the Gaussian likelihood N(x; tanh(h), obs_std^2) (with ``obs_std = sqrt(1/2)`` the
training term is exactly the summed squared error); its ELBO gives bits/dim. ``model.recon: bce`` compares
pixels rescaled to [0, 1] with Bernoulli logits; on pixels that are not 0 or 1 that is not a normalised
density (Loaiza-Ganem & Cunningham 2019), so it has no bits/dim and ``neg_elbo_bits_per_dim`` refuses it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DATA_RANGES = {"[-1,1]": (-1.0, 1.0), "[0,1]": (0.0, 1.0)}


def _per_sample(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).sum(1)


def mse_recon(x: torch.Tensor, h: torch.Tensor, obs_std: float = math.sqrt(0.5)) -> torch.Tensor:
    """Per-sample sum((x - tanh(h))^2) / (2 obs_std^2), x in [-1, 1]: the Gaussian -log p(x|z) without
    its constant (see :func:`gaussian_nll`)."""
    return _per_sample((x.float() - torch.tanh(h.float())) ** 2) / (2 * obs_std ** 2)


def bce_recon(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-sample binary cross-entropy of the logits h against x rescaled from [-1, 1] to [0, 1]."""
    target = (x.float() + 1) / 2
    return _per_sample(F.binary_cross_entropy_with_logits(h.float(), target, reduction="none"))


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(N(mu, sigma^2) || N(0, I)) = -1/2 sum(1 + log sigma^2 - mu^2 - sigma^2), in nats."""
    mu, logvar = mu.float(), logvar.float()
    return -0.5 * _per_sample(1 + logvar - mu.pow(2) - logvar.exp())


def kl_weight(step: int, beta: float, warmup_steps: int) -> float:
    """KL weight at a step: beta * min(1, step / warmup_steps), a linear warm-up from 0 (Bowman et al.
    2016, Sønderby et al. 2016); beta from the start when warmup_steps is 0."""
    if warmup_steps <= 0:
        return float(beta)
    return float(beta) * min(1.0, max(step, 0) / warmup_steps)


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """Per-sample -log N(x; mean, std^2 I) in nats, with its constant."""
    d = x[0].numel()
    sq = _per_sample((x.float() - mean.float()) ** 2)
    return sq / (2 * std ** 2) + d * (math.log(std) + 0.5 * math.log(2 * math.pi))


def bits_per_dim(nll_nats: torch.Tensor, num_dims: int, data_range: str = "[-1,1]") -> torch.Tensor:
    """-log p(x) of a continuous density on 8-bit data scaled to ``data_range`` -> bits per dimension
    of the discrete data (the module docstring derives it)."""
    if data_range not in DATA_RANGES:
        raise ValueError(f"data_range '{data_range}' is not one of: {', '.join(DATA_RANGES)}")
    lo, hi = DATA_RANGES[data_range]
    delta = (hi - lo) / 255
    return nll_nats / (num_dims * math.log(2)) - math.log2(delta)


def neg_elbo_bits_per_dim(x: torch.Tensor, h: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                          recon: str = "mse", obs_std: float = math.sqrt(0.5)) -> torch.Tensor:
    """Per-sample negative ELBO (beta = 1, whatever the training beta) in bits/dim, x in [-1, 1]."""
    if recon != "mse":
        raise ValueError(f"model.recon={recon} is not a normalised likelihood of 8-bit pixels, so it has no "
                         f"bits/dim; use model.recon=mse (Gaussian) to report the negative ELBO in bits/dim")
    nll = gaussian_nll(x, torch.tanh(h.float()), obs_std) + kl_divergence(mu, logvar)
    return bits_per_dim(nll, x[0].numel(), "[-1,1]")


def recon_per_sample(x: torch.Tensor, h: torch.Tensor, recon: str = "mse",
                     obs_std: float = math.sqrt(0.5)) -> torch.Tensor:
    """The reconstruction term of ``recon`` (mse or bce), per sample."""
    if recon not in ("mse", "bce"):
        raise ValueError(f"recon '{recon}' is not one of: mse, bce")
    return mse_recon(x, h, obs_std) if recon == "mse" else bce_recon(x, h)


def vae_loss(x: torch.Tensor, h: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, kl_w: float,
             recon: str = "mse", obs_std: float = math.sqrt(0.5)) -> tuple[torch.Tensor, dict]:
    """Batch mean of recon + kl_w * KL (kl_w: :func:`kl_weight` at this step) -> (loss, stats)."""
    rec, kl = recon_per_sample(x, h, recon, obs_std), kl_divergence(mu, logvar)
    loss = (rec + kl_w * kl).mean()
    return loss, {"Loss/VAE/total": loss.detach(), "Loss/VAE/recon": rec.detach().mean(),
                  "Loss/VAE/kl": kl.detach().mean(), "VAE/kl_weight": float(kl_w)}
