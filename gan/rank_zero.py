"""Everything only rank 0 does, in one place: the trackers (TensorBoard by default, through
Accelerate's tracker API: gan/trackers.py), metrics.jsonl, status.json, the resolved config, sample
grids and the progress bar.

On other ranks every method is a no-op, so the trainer calls them unconditionally and never
needs an ``if rank == 0`` branch (which is where collectives end up hanging DDP). Nothing in
this module may call a collective.
"""
from __future__ import annotations

import math

import torch

from gan.io import write_text_atomic
from gan.rundir import RunDir
from gan.viz import cell_centres, class_grid, save_png, with_labels


class RankZero:
    def __init__(self, run: RunDir, enabled: bool, max_steps: int, progress: bool, accelerator=None):
        self.run = run
        self.enabled = enabled
        self.max_steps = max_steps
        self._acc = accelerator  # its trackers (Accelerator(log_with=...)) get scalars, images and the config
        self._trackers = []
        self._bar = None
        self._progress = progress

    # ------------------------------------------------------------------ lifecycle
    def open(self, start_step: int, config_yaml: str, hparams: dict | None = None, project: str = "gan-train") -> None:
        """Write config.yaml and start the trackers: ``hparams`` (the flattened config) as their
        hyperparameters, the config text beside them."""
        if not self.enabled:
            return
        from gan.trackers import log_text

        self.run.samples.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.run.config, config_yaml)
        # Rows and events after the start step were written after the checkpoint this run resumes
        # from (or by a run that wrote none): this run writes them again, once.
        self.run.truncate_metrics(start_step)
        if self._acc is not None and self._acc.log_with and not self._acc.trackers:
            for t in self._acc.log_with:  # TensorBoard drops its events after start_step as it starts
                if getattr(t, "name", "") == "tensorboard":
                    t.init_kwargs["purge_step"] = start_step + 1
            self._acc.init_trackers(project, config=hparams)
            self._trackers = list(self._acc.trackers)
            log_text(self._trackers, "config", config_yaml)
        if self._progress:
            from tqdm import tqdm
            self._bar = tqdm(total=self.max_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True)
        self.status("running", start_step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        for t in self._trackers:  # accelerator.end_training() finishes them; flush what is written now
            if t.name == "tensorboard":
                t.writer.flush()

    # ------------------------------------------------------------------ writing
    def status(self, state: str, step: int, error: str | None = None, note: str | None = None, **fields) -> None:
        if not self.enabled:
            return
        self.run.write_status(state, step, self.max_steps, error, **({"note": note} if note else {}), **fields)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._trackers:
            self._acc.log(values, step=step)
        row = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}
        self.run.append_metrics(row)
        if self._bar is not None:
            short = {k.split("/")[-2] + "/" + k.split("/")[-1] if k.count("/") >= 2 else k: v
                     for k, v in values.items() if k.startswith("Loss/")}
            ips = values.get("Timing/img_per_s")
            post = {k: f"{v:.3f}" for k, v in short.items()}
            if ips is not None:
                post["img/s"] = f"{ips:.0f}"
            self._bar.set_postfix(post, refresh=False)

    def samples(self, step: int, images: torch.Tensor, labels: torch.Tensor, num_classes: int, per_class: int,
                class_names: list[str] | None = None) -> None:
        """A per-class grid (rows = classes, named) of images in [-1, 1]: PNG file + tracker image."""
        if not self.enabled:
            return
        grid = class_grid(images.float().cpu(), labels.cpu(), num_classes, per_class)
        if class_names and num_classes > 1:
            grid = with_labels(grid, rows=list(zip(cell_centres(num_classes, images.shape[2]), class_names)))
        self.picture(step, grid)

    def picture(self, step: int, grid: torch.Tensor) -> None:
        """A uint8 (C, H, W) picture of the EMA network: PNG file + tracker image."""
        if not self.enabled:
            return
        from gan.trackers import log_images

        save_png(grid, self.run.sample_png(step))
        log_images(self._trackers, "Samples/ema", grid, step)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def print(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)
