"""Everything only rank 0 does, in one place: TensorBoard, metrics.jsonl, status.json, the
resolved config, sample grids and the progress bar.

On other ranks every method is a no-op, so the trainer calls them unconditionally and never
needs an ``if rank == 0`` branch (which is where collectives end up hanging DDP). Nothing in
this module may call a collective.
"""
from __future__ import annotations

import math

import torch

from gan.io import write_text_atomic
from gan.rundir import RunDir
from gan.viz import class_grid, save_png


class RankZero:
    def __init__(self, run: RunDir, enabled: bool, max_steps: int, progress: bool):
        self.run = run
        self.enabled = enabled
        self.max_steps = max_steps
        self._tb = None
        self._bar = None
        self._progress = progress

    # ------------------------------------------------------------------ lifecycle
    def open(self, start_step: int, config_yaml: str) -> None:
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.run.samples.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.run.config, config_yaml)
        # Rows and events after the start step were written after the checkpoint this run resumes
        # from (or by a run that wrote none): this run writes them again, once.
        self.run.truncate_metrics(start_step)
        self._tb = SummaryWriter(str(self.run.root), purge_step=start_step + 1)
        if self._progress:
            from tqdm import tqdm
            self._bar = tqdm(total=self.max_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True)
        self.status("running", start_step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    # ------------------------------------------------------------------ writing
    def status(self, state: str, step: int, error: str | None = None, note: str | None = None, **fields) -> None:
        if not self.enabled:
            return
        self.run.write_status(state, step, self.max_steps, error, **({"note": note} if note else {}), **fields)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, v in values.items():
            self._tb.add_scalar(name, v, step)
        self._tb.flush()
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

    def samples(self, step: int, images: torch.Tensor, labels: torch.Tensor, num_classes: int, per_class: int) -> None:
        """A per-class grid (rows = classes) of images in [-1, 1]: PNG file + TensorBoard image."""
        if not self.enabled:
            return
        grid = class_grid(images.float().cpu(), labels.cpu(), num_classes, per_class)
        save_png(grid, self.run.sample_png(step))
        self._tb.add_image("Samples/ema", grid, step)
        self._tb.flush()

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
