"""Experiment trackers through Accelerate's tracker API (``log.with``: tensorboard, wandb, mlflow, aim).

``tracker_names`` validates ``log.with`` before any work (an unknown name, or one whose package is not
installed, is a ConfigError naming the fix); ``build_trackers`` makes the tracker objects passed to
``Accelerator(log_with=...)``; gan/rank_zero.py then starts them (``init_trackers``, on rank 0 only,
with the resolved config as hyperparameters), logs scalars with ``accelerator.log`` and calls
:func:`log_images` / :func:`log_text` here for what Accelerate's common API does not cover.

Where each one writes: TensorBoard event files in the run directory itself (as before; the hparams
plugin gets the flattened config with the run's metrics declared, so it shows them side by side);
MLflow to ``MLFLOW_TRACKING_URI`` (default ``./mlruns``), experiment ``log.project``, run named after
the run directory; wandb and aim to their own defaults (aim's repository: the run directory).
"""
from __future__ import annotations

import importlib.util
import json

import numpy as np

from gan.config import ConfigError

# log.with name -> (python module that must be importable, pip package)
KNOWN = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
         "mlflow": ("mlflow", "mlflow-skinny"), "aim": ("aim", "aim")}
IMAGE_TRACKERS = ("tensorboard", "wandb", "mlflow", "aim")


def tracker_names(spec: str) -> list[str]:
    """``log.with`` ("tensorboard,mlflow") -> names; ConfigError for unknown or uninstalled trackers."""
    names = [n.strip().lower() for n in spec.split(",") if n.strip()]
    for n in names:
        if n not in KNOWN:
            raise ConfigError(f"config key 'log.with': unknown tracker '{n}'; use a comma list of "
                              f"{', '.join(KNOWN)} (or '' for none)")
        module, package = KNOWN[n]
        if importlib.util.find_spec(module) is None:
            rest = ",".join(x for x in names if x != n) or "'' (none)"
            raise ConfigError(f"config key 'log.with': tracker '{n}' is not installed (no module '{module}'). "
                              f"Install it (`pip install {package}`) or leave it out: log.with={rest}")
    return list(dict.fromkeys(names))


def tracked_metrics(cfg) -> list[str]:
    """The scalars shown beside the hyperparameters (TensorBoard's hparams plugin)."""
    names = ["Loss/D/main", "Loss/G/main", "Timing/img_per_s", "Progress/kimg"]
    if cfg.metrics.every:
        from gan.family import get_family

        family = get_family(cfg.family)
        names += [f"Eval/{k}" for k in family.metric_keys(family.parse_metrics(cfg.metrics.metrics))]
    return names


def flat_hparams(d: dict, prefix: str = "") -> dict:
    """Nested config -> {"section.key": bool/int/float/str} (lists and None as text), for every tracker."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_hparams(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = json.dumps(v)
    return out


def build_trackers(names: list[str], run_dir, project: str, metric_names: list[str]) -> list:
    """Accelerate tracker objects for ``names`` (started later by ``accelerator.init_trackers`` on rank 0)."""
    from accelerate.tracking import AimTracker, MLflowTracker, TensorBoardTracker, WandBTracker

    class TensorBoard(TensorBoardTracker):
        """Accelerate's TensorBoard tracker writing into the run directory itself, with the
        hyperparameters as an hparams-plugin session in that same run (Accelerate's own puts them in
        a timestamped sub-run without metrics) so TensorBoard shows them beside the run's metrics."""

        def store_init_configuration(self, values: dict) -> None:
            from torch.utils.tensorboard.summary import hparams

            for summary in hparams(values, {m: 0.0 for m in metric_names}):
                self.writer.file_writer.add_summary(summary)
            self.writer.flush()

    out = []
    for n in names:
        if n == "tensorboard":
            out.append(TensorBoard("", str(run_dir)))
        elif n == "mlflow":
            out.append(MLflowTracker(experiment_name=project, run_name=run_dir.name))
        elif n == "wandb":
            out.append(WandBTracker(project, name=run_dir.name, dir=str(run_dir)))
        elif n == "aim":
            out.append(AimTracker(run_dir.name, str(run_dir)))
    return out


def log_images(trackers, name: str, image, step: int) -> None:
    """A uint8 (C, H, W) picture to every tracker that takes images."""
    chw = np.asarray(image)
    hwc = chw[0] if chw.shape[0] == 1 else chw.transpose(1, 2, 0)
    for t in trackers:
        if t.name == "tensorboard":
            t.writer.add_image(name, chw, step)
            t.writer.flush()
        elif t.name == "mlflow":
            import mlflow

            mlflow.log_image(np.ascontiguousarray(hwc), key=name.replace("/", "_"), step=step)
        elif t.name == "wandb":
            t.log_images({name: [np.ascontiguousarray(hwc)]}, step=step)
        elif t.name == "aim":
            t.log_images({name: np.ascontiguousarray(hwc)}, step=step)


def log_text(trackers, name: str, text: str) -> None:
    """A text (the resolved config) to every tracker that keeps text."""
    for t in trackers:
        if t.name == "tensorboard":
            t.writer.add_text(name, "\n".join("    " + line for line in text.splitlines()), 0)  # markdown code
            t.writer.flush()
        elif t.name == "mlflow":
            import mlflow

            mlflow.log_text(text, f"{name}.yaml")
        elif t.name == "wandb":
            t.tracker.config.update({"config_yaml": text}, allow_val_change=True)
