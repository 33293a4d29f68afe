"""Evaluation: standard metrics through torch-fidelity (fid, isc, kid, prc; need Inception weights)
and offline metrics with a committed CIFAR-10 classifier (cls_acc, cls_fd).

    from gan.metrics import EvalRequest, evaluate_generator, evaluate_during_training, MetricError

* :func:`evaluate_generator` (collective): class-balanced samples of G split over the ranks, gathered
  to rank 0, which computes while the others wait; every rank gets the same (values, details).
* :func:`evaluate_during_training` (collective): the trainer's hook, configured by ``cfg.metrics``.
* :func:`load_generator`, :func:`merge_metrics_json`, :func:`log_tensorboard`: what launch/evaluate.py uses.
* Metric names and which way is better: :mod:`gan.metrics.names`.
"""
from gan.metrics.core import EvalRequest, evaluate_generator, evaluate_images
from gan.metrics.errors import MetricError
from gan.metrics.names import METRICS, parse_metrics
from gan.metrics.run import load_generator, log_tensorboard, merge_metrics_json
from gan.metrics.training import check_setup, evaluate_during_training, save_best, update_best

__all__ = ["EvalRequest", "METRICS", "MetricError", "check_setup", "evaluate_during_training", "evaluate_generator",
           "evaluate_images", "load_generator", "log_tensorboard", "merge_metrics_json", "parse_metrics",
           "save_best", "update_best"]
