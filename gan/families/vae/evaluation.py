"""The VAE's evaluation: its metrics, measured on a held-out split that each sample is read from once
(``val.shards``), plus FID of prior samples.

Per-sample measures: reconstructions decode the posterior mean (deterministic); the ELBO terms use one
reparameterized z per image whose noise is drawn from a seed made of the image's own bytes and the
evaluation seed, so the value of a sample does not depend on which rank reads it or in which batch, and a
re-run gives the same values. Each rank sums its samples' values in float64; only the sums cross ranks.
FID: ``metrics.num_samples`` prior samples (class-balanced with a conditional decoder; sample i uses noise
row i whatever the world size), split over the ranks, against the held-out images, through the project's
torch-fidelity path (gan.metrics.fidelity: per-rank features, moments summed, real features cached).
"""
from __future__ import annotations

import hashlib
import math

import torch

from gan.families.vae.losses import kl_divergence, neg_elbo_bits_per_dim
from gan.family import MetricSpec
from gan.metrics.image_pairs import image_measures

MEASURES = ("recon_mse", "psnr", "ssim", "kl", "bits_per_dim")
METRICS = {
    "bits_per_dim": MetricSpec(("bits_per_dim",), False, "negative ELBO (beta = 1, one z per image) in bits/dim, "
                                                         "model.recon=mse only"),
    "recon_mse": MetricSpec(("recon_mse",), False, "per-pixel MSE of the reconstruction (decoded posterior mean), "
                                                   "images in [-1, 1]"),
    "psnr": MetricSpec(("psnr",), True, "PSNR (dB) of the reconstruction, data range 2 (torchmetrics)"),
    "ssim": MetricSpec(("ssim",), True, "SSIM of the reconstruction (torchmetrics, 11x11 Gaussian window)"),
    "kl": MetricSpec(("kl",), None, "KL(q(z|x) || N(0, I)) in nats per image (no better side: not a best_metric)"),
    "fid": MetricSpec(("fid",), False, "FID of metrics.num_samples prior samples against the held-out images "
                                       "(torch-fidelity Inception)"),
}


def image_noise(x: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """(N, dim) standard normal noise, row i drawn from a generator seeded by image i's 8-bit pixels and
    ``seed``: the same image gets the same noise on any rank, in any batch."""
    u8 = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    rows = []
    for img in u8:
        h = int.from_bytes(hashlib.blake2b(img.numpy().tobytes(), digest_size=7).digest(), "little")
        rows.append(torch.randn(dim, generator=torch.Generator().manual_seed(h ^ seed)))
    return torch.stack(rows) if rows else torch.zeros(0, dim)


@torch.no_grad()
def per_sample_measures(vae, x: torch.Tensor, y: torch.Tensor | None = None, obs_std: float = math.sqrt(0.5),
                        seed: int = 0) -> dict[str, torch.Tensor]:
    """{"recon_mse", "psnr", "ssim", "kl", "bits_per_dim"} -> float64 (N,): per-pixel MSE, PSNR and SSIM of
    the reconstruction from mu, KL(q(z|x) || N(0, I)) in nats, and the negative ELBO in bits/dim (only
    with model.recon=mse: see gan.families.vae.losses). ``y``: labels for a conditional decoder."""
    y = y if vae.cfg.conditional else None
    mu, logvar = vae.encode(x)
    image = image_measures(vae.to_image(vae.decode(mu, y)), x)
    out = {"recon_mse": image["mse"], "psnr": image["psnr"], "ssim": image["ssim"],
           "kl": kl_divergence(mu, logvar).double()}
    if vae.cfg.recon == "mse":
        eps = image_noise(x, mu.shape[1], seed).to(mu.device, mu.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps
        out["bits_per_dim"] = neg_elbo_bits_per_dim(x, vae.decode(z, y), mu, logvar, "mse", obs_std).double()
    return out


def preflight(family, req) -> dict:
    """Not a collective: the held-out split fits the model, the metrics can be computed (MetricError)."""
    from gan.metrics.errors import MetricError
    from gan.metrics.heldout import check_split

    m = family.cfg.model
    if "bits_per_dim" in req.names and m.recon != "mse":
        raise MetricError(f"bits_per_dim needs model.recon=mse (a Gaussian likelihood); this run has "
                          f"model.recon={m.recon}, whose ELBO is not a density of 8-bit pixels. Leave bits_per_dim out")
    return check_split(req, "the VAE (family: vae)", lambda man: man.check(
        channels=m.img_channels, size=m.img_size, num_classes=m.num_classes if m.conditional else None,
        key=req.real_key), family)


def evaluate(family, vae, req, device) -> tuple[dict, dict]:
    """Collective: the metrics ``req.names`` of ``vae`` on ``req.real_shards`` (see the module docstring)."""
    from pathlib import Path

    from gan.metrics import collective, heldout
    from gan.metrics.fidelity import fidelity_local

    resolved = collective.everywhere(preflight, family, req)
    per = [n for n in req.names if n in MEASURES]
    m, obs_std = family.cfg.model, family.cfg.loss.obs_std
    weights = Path(resolved["inception_weights"]) if "fid" in req.names else None

    @torch.no_grad()
    def local():
        was = vae.training
        vae.eval()
        try:
            sums = heldout.zeros(per)
            if per:
                for x, y in heldout.split_batches(req, "held-out"):
                    values = per_sample_measures(vae, x.to(device), y.to(device), obs_std, req.seed)
                    heldout.add(sums, {n: values[n] for n in per})
            if weights is not None:
                images, _ = collective.generate_slice(lambda z, y: family.generate(vae, z, y), req.num_samples,
                                                      m.latent_dim, m.num_classes, req.seed, req.batch_size, device,
                                                      progress=req.progress)
                sums.update(fidelity_local(images, ["fid"], req.real_shards, weights, device, req.batch_size,
                                           req.max_real, req.cache_dir or None,
                                           req.progress and collective.rank() == 0)["sums"])
            return sums
        finally:
            vae.train(was)

    def finish(sums):
        return heldout.finish_means_and_fid(sums, per, weights)

    return heldout.run(local, finish, req, resolved, req.num_samples if weights is not None else 0)
