"""Evaluation: standard metrics through torch-fidelity (fid, isc, kid, prc; need Inception weights)
and offline metrics with a committed CIFAR-10 classifier (cls_acc, cls_fd).

    from gan.metrics import EvalRequest, evaluate_generator, evaluate_during_training, MetricError

* :func:`evaluate_generator` (collective): class-balanced samples of G split over the ranks; each rank
  runs every extractor on its own slice, only float64 statistics (or feature rows where a metric needs
  them) cross ranks, and every rank gets the same (values, details).
* Per-sample measures (L1, PSNR, SSIM, ...): :mod:`gan.metrics.per_sample` (``register``, ``means``).
* Every family names and measures its own metrics (``Family.metric_table``, ``Family.evaluate``): the GAN
  through :func:`evaluate_generator`; the VAE and pix2pix on a held-out split through
  :mod:`gan.metrics.heldout` (per-rank reads, float64 sums, FID from summed Inception moments).
* :func:`evaluate_during_training` (collective): the trainer's hook, configured by ``cfg.metrics``.
* :func:`load_generator`, :func:`merge_metrics_json`, :func:`log_tensorboard`: what launch/evaluate.py uses.
* Metric names and which way is better: :mod:`gan.metrics.names` (light: gan.config imports it).

Attributes load their module on first use, so ``import gan.metrics.names`` stays cheap.
"""
from __future__ import annotations

import importlib

_WHERE = {
    "EvalRequest": "core", "evaluate_generator": "core", "evaluate_images": "core",
    "MetricError": "errors", "METRICS": "names", "parse_metrics": "names",
    "load_generator": "run", "log_tensorboard": "run", "merge_metrics_json": "run",
    "check_setup": "training", "evaluate_during_training": "training", "save_best": "training",
    "update_best": "training",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"gan.metrics.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'gan.metrics' has no attribute {name!r}")
