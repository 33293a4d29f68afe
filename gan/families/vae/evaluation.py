"""The VAE's per-sample evaluation measures on held-out images, for an evaluation that sums them (in
float64) over its batches and ranks and divides by the sample count.

Reconstructions decode the posterior mean (deterministic); the ELBO terms use one reparameterized
sample from a generator the caller seeds, so a re-run gives the same values.
"""
from __future__ import annotations

import math

import torch

from gan.families.vae.losses import kl_divergence, neg_elbo_bits_per_dim
from gan.metrics.image_pairs import image_measures

MEASURES = ("recon_mse", "psnr", "ssim", "kl", "bits_per_dim")


@torch.no_grad()
def per_sample_measures(vae, x: torch.Tensor, y: torch.Tensor | None = None, obs_std: float = math.sqrt(0.5),
                        generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """{"recon_mse", "psnr", "ssim", "kl", "bits_per_dim"} -> float64 (N,): per-pixel MSE, PSNR and SSIM of
    the reconstruction from mu, KL(q(z|x) || N(0, I)) in nats, and the negative ELBO in bits/dim (only
    with model.recon=mse: see gan.families.vae.losses). ``y``: labels for a conditional decoder."""
    y = y if vae.cfg.conditional else None
    mu, logvar = vae.encode(x)
    image = image_measures(vae.to_image(vae.decode(mu, y)), x)
    out = {"recon_mse": image["mse"], "psnr": image["psnr"], "ssim": image["ssim"],
           "kl": kl_divergence(mu, logvar).double()}
    if vae.cfg.recon == "mse":
        eps = torch.randn(mu.shape, generator=generator, device=generator.device if generator else mu.device)
        z = mu + torch.exp(0.5 * logvar) * eps.to(mu.device)
        out["bits_per_dim"] = neg_elbo_bits_per_dim(x, vae.decode(z, y), mu, logvar, "mse", obs_std).double()
    return out
