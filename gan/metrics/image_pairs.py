"""Per-sample measures between two batches of images (reconstruction vs input, output vs target):
L1, MSE, PSNR and SSIM, from torchmetrics' functional API.

Each function returns one float64 value per sample, shape (N,), so an evaluation can sum them over its
batches and ranks and divide by the sample count (a mean over the whole split, independent of how the
samples were spread over ranks). Images are in [-1, 1] (the data stream's range): PSNR and SSIM use a
data range of 2. Identical images have PSNR +inf (torchmetrics' value; the mean over a split then is inf).
SSIM uses torchmetrics' defaults: an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03.
"""
from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

DATA_RANGE = 2.0  # images in [-1, 1]
MEASURES = ("l1", "mse", "psnr", "ssim")


def _pair(preds: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if preds.shape != target.shape or preds.dim() != 4:
        raise ValueError(f"expected two (N, C, H, W) batches of the same shape, got {tuple(preds.shape)} "
                         f"and {tuple(target.shape)}")
    return preds.detach().double(), target.detach().double()


def l1_per_sample(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p, t = _pair(preds, target)
    return (p - t).abs().flatten(1).mean(1)


def mse_per_sample(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p, t = _pair(preds, target)
    return (p - t).square().flatten(1).mean(1)


def psnr_per_sample(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p, t = _pair(preds, target)
    return peak_signal_noise_ratio(p, t, data_range=DATA_RANGE, reduction="none", dim=(1, 2, 3))


def ssim_per_sample(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p, t = _pair(preds, target)
    if min(p.shape[-2:]) < 11:
        raise ValueError(f"SSIM's 11x11 window needs images of at least 11x11 pixels, got {tuple(p.shape[-2:])}")
    return structural_similarity_index_measure(p, t, data_range=DATA_RANGE, reduction="none")


def image_measures(preds: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"l1", "mse", "psnr", "ssim"} -> float64 (N,) per-sample values."""
    return {"l1": l1_per_sample(preds, target), "mse": mse_per_sample(preds, target),
            "psnr": psnr_per_sample(preds, target), "ssim": ssim_per_sample(preds, target)}
