"""Evaluation during training: the trainer's hook, and the best-checkpoint / early-stopping bookkeeping.

Every rank calls :func:`evaluate_during_training` at the same step; generation is split over the
ranks, each rank measures its own slice, and every rank gets the same dict back, so every rank takes the same
best / early-stop decision (:func:`update_best` is pure and deterministic).
"""
from __future__ import annotations

from pathlib import Path

import torch

from gan.family import build_family, get_family
from gan.metrics.core import EvalRequest


def request_from_config(cfg, family=None) -> EvalRequest:
    """The evaluation ``cfg.metrics`` asks for, on the family's evaluation shards (``Family.eval_shards``)."""
    m, family = cfg.metrics, family or build_family(cfg)
    return EvalRequest(names=m.metrics, num_samples=m.num_samples, real_shards=family.eval_shards(),
                       real_key=family.shards_key(family.eval_shards(), "data.shards"),
                       batch_size=m.batch_size, inception_weights=m.inception_weights, classifier=m.classifier,
                       kid_subset_size=m.kid_subset_size, isc_splits=m.isc_splits, cache_dir=m.cache_dir,
                       family=cfg.family, num_workers=cfg.data.num_workers,
                       progress=cfg.log.progress)  # rank 0's bars on stderr, like training's


def evaluate_during_training(accelerator, ema_net: torch.nn.Module, cfg, step: int, family=None) -> dict[str, float]:
    """Collective: every rank calls it with its (identical) EMA network. Returns the same
    ``{metric: value}`` on every rank (per-class keys included). Buffers must already be in sync
    (``gan.dist.broadcast_buffers``) so every rank measures the same network. The family measures."""
    family = family or build_family(cfg)
    values, _ = family.evaluate(ema_net, request_from_config(cfg, family), accelerator.device)
    return {k: float(v) for k, v in values.items()}


def check_setup(cfg) -> None:
    """Before training starts (every rank): the metrics that will run every ``metrics.every`` steps can
    run at all (weights files, classifier, real or held-out shards, counts). Raises MetricError otherwise."""
    if not cfg.metrics.every:
        return
    family = build_family(cfg)
    family.eval_preflight(request_from_config(cfg, family))


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
    improved = value == value and get_family(cfg.family).better(key, value, best.get("value"))  # NaN never improves
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
