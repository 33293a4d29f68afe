"""Gaussian statistics of feature sets and the Frechet distance between two of them (float64).

d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)). The trace of the matrix square root is
taken as the sum of square roots of the eigenvalues of S1 S2 (real and >= 0 up to round-off, as for
any product of two PSD matrices), which needs no scipy and no iterative sqrtm.
"""
from __future__ import annotations

import numpy as np
import torch


def gaussian_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), float64. Needs N >= 2."""
    f = features.detach().cpu().double().numpy() if torch.is_tensor(features) else np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, D), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    eig = np.linalg.eigvals(s1 @ s2)
    tr_covmean = np.sqrt(np.clip(eig.real, 0.0, None)).sum()
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def moments(features: torch.Tensor | np.ndarray, prefix: str = "") -> dict[str, np.ndarray]:
    """The sums a Gaussian is made of, float64: count ``n``, feature sum ``s`` (D,) and outer-product sum
    ``ss`` (D, D). Sums of several parts (ranks, classes) add up; :func:`moments_to_gaussian` finishes."""
    f = features.detach().cpu().double().numpy() if torch.is_tensor(features) else np.asarray(features, np.float64)
    return {prefix + "n": np.array(float(len(f))), prefix + "s": f.sum(axis=0), prefix + "ss": f.T @ f}


def moments_to_gaussian(n, s, ss) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (as ``np.cov``) from :func:`moments`' sums. Needs n >= 2."""
    n = float(n)
    if n < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {n:g}")
    mu = np.asarray(s, np.float64) / n
    return mu, (np.asarray(ss, np.float64) - n * np.outer(mu, mu)) / (n - 1)
