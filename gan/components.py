"""What the training loop does between steps, one component each, each deciding its own timing
(``maybe_*(step)``) from its config section: the logger, the sampler, the evaluator and the
checkpointer. The trainer only calls them in order after every step.

Each ``maybe_*`` is called on every rank; the collectives inside run on every rank alike, and
rank-0-only work goes through :class:`gan.rank_zero.RankZero` (a no-op elsewhere).
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from gan import checkpoint
from gan.dist import broadcast_buffers, check_replicas, same_on_all_ranks
from gan.optim import apply_config


class Logger:
    """Every ``log.every`` steps and at the last one: the guard's check (it reads the device-side
    counts), the statistics reduced over all ranks, and throughput. Time spent :meth:`aside` (samples,
    evaluation, checkpoints) is not counted as training time."""

    def __init__(self, cfg, state, stats, guard, rank0, nets):
        self.cfg, self.state, self.stats, self.guard, self.rank0, self.nets = cfg, state, stats, guard, rank0, nets
        self.restart()

    def restart(self) -> None:
        self._t0, self._s0, self._i0 = time.perf_counter(), self.state.step, self.state.images_seen

    @contextlib.contextmanager
    def aside(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self._t0 += time.perf_counter() - t

    def maybe_log(self, step: int) -> None:
        if step % self.cfg.log.every and step != self.cfg.train.max_steps:
            return
        self.guard.check(self.nets())  # collective
        values = self.stats.reduce()  # collective
        dt = max(time.perf_counter() - self._t0, 1e-9)
        ips = (self.state.images_seen - self._i0) / dt
        values.update({"Timing/img_per_s": ips, "Timing/sec_per_kimg": 1000.0 / ips if ips else float("inf"),
                       "Timing/sec_per_step": dt / max(step - self._s0, 1),
                       "Progress/kimg": self.state.images_seen / 1000.0,
                       "Progress/skipped_nonfinite": float(self.state.skipped_nonfinite)})
        self.rank0.scalars(step, values)
        self.restart()


class Sampler:
    """Every ``log.sample_every`` steps: the family's picture grid of the EMA network (the GAN: a
    per-class grid of the EMA G on fixed noise), rank 0 only."""

    def __init__(self, cfg, family, ema, rank0, class_names: list[str], device):
        self.cfg, self.family, self.ema, self.rank0, self.class_names, self.device = \
            cfg, family, ema, rank0, class_names, device

    def maybe_sample(self, step: int) -> None:
        if step % self.cfg.log.sample_every == 0:
            self.sample(step)

    @torch.no_grad()
    def sample(self, step: int) -> None:
        if not self.rank0.enabled:  # rank-0-only work with no collective inside
            return
        grid = self.family.picture_grid(self.ema.model, self.device)
        if grid is not None:
            return self.rank0.picture(step, grid)
        images, labels, rows = self.family.pictures(self.ema.model, self.device)
        self.rank0.samples(step, images, labels, rows, self.cfg.log.samples_per_class, self.class_names)


class Evaluator:
    """Every ``metrics.every`` steps: the family's metrics of its EMA network (``Family.evaluate``), logged
    as Eval/<name>; a new best by ``metrics.best_metric`` is exported to RUN/best/ (+ best.json);
    ``metrics.patience`` evaluations without improvement stop the run. Every rank gets the same values, so every rank
    decides alike. The best record lives in ``state.eval_best``, so it survives a resume."""

    def __init__(self, cfg, accelerator, state, ema, rank0, run_dir: Path, family=None):
        self.cfg, self.accelerator, self.state, self.ema, self.rank0, self.run_dir = \
            cfg, accelerator, state, ema, rank0, run_dir
        self.family = family

    def maybe_evaluate(self, step: int) -> str | None:
        """The early-stop note, or None to go on."""
        if not self.cfg.metrics.every or step % self.cfg.metrics.every:
            return None
        from gan.metrics import evaluate_during_training, save_best, update_best

        broadcast_buffers([self.ema.model])  # collective, every rank
        values = evaluate_during_training(self.accelerator, self.ema.model, self.cfg, step, self.family)  # collective
        self.rank0.scalars(step, {f"Eval/{k}": v for k, v in values.items()})
        improved, stop, note = update_best(self.state.eval_best, values, self.cfg, step)
        if improved and self.rank0.enabled:
            save_best(self.run_dir, self.ema.model, self.cfg, step, self.state.eval_best, values)
        return note if stop else None


class Checkpointer:
    """Every ``checkpoint.every`` steps and at the end: the guard's check first (no checkpoint ever
    holds weights it would stop on), buffers made equal, replicas checked, then the atomic, verified
    checkpoint (gan.checkpoint; the backend adds what its engines keep) and the EMA network's export. Also the
    resume: every registered part, the data position, and the config's optimizer settings."""

    def __init__(self, cfg, accelerator, run, state, backend, ema, schedulers: dict, stream, guard, rank0, nets):
        self.cfg, self.accelerator, self.run, self.state, self.backend, self.ema = \
            cfg, accelerator, run, state, backend, ema
        self.schedulers, self.stream, self.guard, self.rank0, self.nets = schedulers, stream, guard, rank0, nets
        self.last_saved = -1
        self.parts = {"nets": list(schedulers), "ema": ema is not None}  # names the checkpoint's parts
        checkpoint.register(accelerator, checkpoint.parts_of(**self.parts)[2], ema=ema, train_state=state,
                            **{f"sched_{k}": s for k, s in schedulers.items()})

    def resume(self, path: Path) -> None:
        """Collective. Refuses (CheckpointError) before any work if this config can't continue ``path`` exactly."""
        meta = checkpoint.read_meta(path)
        checkpoint.check_resume(path, meta, self.cfg, self.accelerator.num_processes)
        checkpoint.load(self.accelerator, path, extra=self.backend.load)
        if not same_on_all_ranks(self.state.step, self.accelerator.device):
            raise checkpoint.CheckpointError(
                f"the ranks resumed from different checkpoints (this one: {path}); do all nodes see the same "
                f"{self.run.checkpoints}? Pass --resume PATH to name one")
        self.stream.load_state_dict(self.state.data)
        # a value given on resume takes effect
        apply_config(self.backend.optimizers, self.schedulers, self.cfg.optim, self.backend.specs)
        self.last_saved = self.state.step

    def maybe_save(self, step: int) -> None:
        if step % self.cfg.checkpoint.every == 0:
            self.save()

    def save(self) -> Path:
        if self.ema is not None:  # the EMA's own BatchNorm statistics, so that the checks below cover them
            self.ema.refresh()
        nets = self.nets()
        self.guard.check(nets)  # collective; a stop leaves the last good checkpoint the newest
        broadcast_buffers(list(nets.values()))  # collective
        check_replicas(nets, self.accelerator.device)  # collective
        step = self.state.step
        path = checkpoint.save(self.accelerator, self.run, step,
                               {"config": self.cfg.to_dict(), "backend": self.backend.name, "family": self.cfg.family,
                                **self.parts}, self.cfg.checkpoint.keep,
                               extra=self.backend.save)
        if self.rank0.enabled and self.ema is not None:
            checkpoint.export_ema(self.run.export, self.ema.model, self.cfg, step)
        self.last_saved = step
        return path
