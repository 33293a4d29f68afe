"""Evaluation during training: the trainer's hook, and the best-checkpoint / early-stopping bookkeeping.

Every rank calls :func:`evaluate_during_training` at the same step; generation is split over the
ranks, each rank measures its own slice, and every rank gets the same dict back, so every rank takes the same
best / early-stop decision (:func:`update_best` is pure and deterministic).
"""
from __future__ import annotations

from pathlib import Path

import torch

from gan.metrics.core import EvalRequest, evaluate_generator
from gan.metrics.names import better


def request_from_config(cfg) -> EvalRequest:
    m = cfg.metrics
    return EvalRequest(names=m.metrics, num_samples=m.num_samples, real_shards=cfg.data.shards,
                       batch_size=m.batch_size, inception_weights=m.inception_weights, classifier=m.classifier,
                       kid_subset_size=m.kid_subset_size, isc_splits=m.isc_splits, cache_dir=m.cache_dir)


def evaluate_during_training(accelerator, g_ema: torch.nn.Module, cfg, step: int) -> dict[str, float]:
    """Collective: every rank calls it with its (identical) EMA generator. Returns the same
    ``{metric: value}`` on every rank (per-class keys included). Buffers must already be in sync
    (``gan.dist.broadcast_buffers``) so every rank generates with the same network."""
    m = cfg.model
    values, _ = evaluate_generator(g_ema, m.z_dim, m.num_classes, m.img_channels, m.img_size,
                                   request_from_config(cfg), accelerator.device)
    return {k: float(v) for k, v in values.items()}


def check_setup(cfg) -> None:
    """Before training starts (every rank): the metrics that will run every ``metrics.every`` steps can
    run at all (weights files, classifier, real shards, counts). Raises MetricError otherwise."""
    if not cfg.metrics.every:
        return
    from gan.metrics.core import preflight
    m = cfg.model
    preflight(request_from_config(cfg), m.num_classes, m.img_channels, m.img_size)


def update_best(best: dict, values: dict, cfg, step: int) -> tuple[bool, bool, str]:
    """Update ``best`` in place ({"metric", "value", "step", "stale"}) with one evaluation.
    Returns (improved, stop, note): ``stop`` when ``metrics.patience`` evaluations in a row brought
    no improvement of ``metrics.best_metric``."""
    key, patience = cfg.metrics.best_metric, cfg.metrics.patience
    if not key or key not in values:
        return False, False, ""
    value = values[key]
    if best.get("metric") != key:
        best.clear()
    improved = value == value and better(key, value, best.get("value"))  # NaN never improves
    if improved:
        best.update({"metric": key, "value": value, "step": step, "stale": 0})
    else:
        best["stale"] = best.get("stale", 0) + 1
        best.setdefault("metric", key)
    stop = bool(patience) and best["stale"] >= patience
    note = (f"early stop at step {step}: {key} has not improved on {best.get('value')} (step {best.get('step')}) "
            f"for {best['stale']} evaluations (metrics.patience={patience})") if stop else ""
    return improved, stop, note


def save_best(run_dir: str | Path, g_ema: torch.nn.Module, cfg, step: int, best: dict, values: dict) -> Path:
    """Rank 0: the EMA network of the best evaluation so far, in ``RUN/best/`` (``<net>_ema.safetensors`` +
    model.json, the export format, so evaluate.py/sample.py take ``--checkpoint RUN/best/G_ema.safetensors``)
    and ``RUN/best.json``. Each file is replaced atomically."""
    from gan.checkpoint import export_ema
    from gan.io import write_json_atomic
    from gan.rundir import RunDir

    run = RunDir(run_dir)
    export_ema(run.best, g_ema, cfg, step)
    weights = run.best_weights.relative_to(run.root)
    write_json_atomic(run.best_json, {**best, "metrics": values, "weights": str(weights)})
    return run.best
