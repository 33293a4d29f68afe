"""pix2pix's evaluation on validation pairs (``val.shards``, each pair read once, on one rank): L1, PSNR
and SSIM of G(input) against the target, and FID of the outputs against the targets.

Each rank translates its own pairs and keeps float64 sums of the per-sample measures and the Inception
feature moments of its outputs and targets (torch-fidelity's extractor, gan.metrics.fidelity); only those
sums cross ranks, so every rank ends with the same values whatever the world size. The targets' moments
of a rank's part are cached under a key of the shards' checksums, the extractor and the part.
"""
from __future__ import annotations

import torch

from gan.family import MetricSpec
from gan.metrics.image_pairs import image_measures

MEASURES = ("l1", "psnr", "ssim")
METRICS = {
    "l1": MetricSpec(("l1",), False, "mean absolute error of G(input) against the target, images in [-1, 1]"),
    "psnr": MetricSpec(("psnr",), True, "PSNR (dB) of G(input) against the target, data range 2 (torchmetrics)"),
    "ssim": MetricSpec(("ssim",), True, "SSIM of G(input) against the target (torchmetrics, 11x11 Gaussian window)"),
    "fid": MetricSpec(("fid",), False, "FID of the outputs against the targets of the validation pairs "
                                       "(torch-fidelity Inception)"),
}


@torch.no_grad()
def per_sample_measures(G, real_a: torch.Tensor, real_b: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """-> ({"l1", "mse", "psnr", "ssim"} -> float64 (N,), the outputs G(a) in [-1, 1])."""
    fake_b = G(real_a)
    return image_measures(fake_b, real_b), fake_b


def preflight(family, req) -> dict:
    """Not a collective: the validation pairs fit the model, the metrics can be computed (MetricError)."""
    from gan.metrics.heldout import check_split

    return check_split(req, "pix2pix (family: pix2pix)",
                       lambda man: family._fits(man, req.real_key), family)


def evaluate(family, G, req, device) -> tuple[dict, dict]:
    """Collective: the metrics ``req.names`` of ``G`` on the pairs of ``req.real_shards`` (module docstring)."""
    from pathlib import Path

    from gan.metrics import collective, heldout
    from gan.viz import to_uint8

    resolved = collective.everywhere(preflight, family, req)
    per = [n for n in req.names if n in MEASURES]
    weights = Path(resolved["inception_weights"]) if "fid" in req.names else None

    @torch.no_grad()
    def local():
        was = G.training
        G.eval()  # dropout off
        try:
            sums, outputs, targets = heldout.zeros(per), [], []
            for a, b, _ in heldout.split_batches(req, "validation pairs"):
                values, fake = per_sample_measures(G, a.to(device), b.to(device))
                heldout.add(sums, {n: values[n] for n in per})
                if weights is not None:
                    outputs.append(to_uint8(fake.float()))
                    targets.append(to_uint8(b))
            if weights is not None:
                def cat(parts):
                    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)

                progress = req.progress and collective.rank() == 0
                sums.update(heldout.fid_moments(cat(outputs), "fake", weights, device, req.batch_size, progress))
                sums.update(heldout.cached_moments(req.real_shards, "real", weights, req.cache_dir, lambda: (
                    heldout.fid_moments(cat(targets), "real", weights, device, req.batch_size, progress)),
                    req.max_real, resolved["real"]["count"]))
            return sums
        finally:
            G.train(was)

    def finish(sums):
        return heldout.finish_means_and_fid(sums, per, weights)

    return heldout.run(local, finish, req, resolved, resolved["real"]["count"])
