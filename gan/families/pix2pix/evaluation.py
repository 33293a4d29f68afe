"""pix2pix's per-sample evaluation measures on validation pairs (L1, MSE, PSNR, SSIM of G(input) against
the target), for an evaluation that sums them over batches and ranks; FID of outputs against targets
goes through the project's torch-fidelity path with the outputs as the generated images."""
from __future__ import annotations

import torch

from gan.metrics.image_pairs import image_measures


@torch.no_grad()
def per_sample_measures(G, real_a: torch.Tensor, real_b: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """-> ({"l1", "mse", "psnr", "ssim"} -> float64 (N,), the outputs G(a) in [-1, 1])."""
    fake_b = G(real_a)
    return image_measures(fake_b, real_b), fake_b
