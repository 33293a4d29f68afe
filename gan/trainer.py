"""The training loop, as a thin orchestrator: it owns the order of work and nothing else.

Components own their mechanics (torchtitan's layout): the backend the optimizer step
(gan.backends: DDP or DeepSpeed), the guard the one non-finite/divergence policy (gan.guard), the
logger, sampler, evaluator and checkpointer their own timing (gan.components), the stop policy
signals, the time budget and early stopping (gan.stopping), rank 0 all writing (gan.rank_zero).
Losses compute (gan.losses), networks forward (gan.models), the checks before any work live in
gan.preflight.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import set_seed

from gan.backends import build_backend
from gan.components import Checkpointer, Evaluator, Logger, Sampler
from gan.config import Config, ConfigError
from gan.data import ShardError, train_stream
from gan.dist import PeerError, Stats, as_peer_error
from gan.ema import EMA
from gan.guard import DivergenceError, Guard, NonFiniteError
from gan.losses import build_loss
from gan.models import build_models
from gan.optim import build_scheduler
from gan.preflight import check_names, preflight
from gan.rank_zero import RankZero
from gan.rundir import RunDir
from gan.startup import banner, build_accelerator
from gan.stopping import StopPolicy, StopRequest
from gan.trackers import flat_hparams


@dataclasses.dataclass
class TrainState:
    """The small, checkpointed progress record (registered with Accelerate)."""
    step: int = 0  # G steps done
    images_seen: int = 0  # real images consumed, all ranks
    skipped_nonfinite: int = 0
    fp16_skipped: int = 0
    train_seconds: float = 0.0  # wall-clock of the training loop, summed over resumes (train.max_minutes)
    data: dict = dataclasses.field(default_factory=dict)  # TrainStream position
    eval_best: dict = dataclasses.field(default_factory=dict)  # gan.metrics.update_best: metric, value, step, stale

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, resume_from: Path | None = None):
        self.cfg, self.run_dir, self.resume_from, self.run = cfg, Path(run_dir), resume_from, RunDir(run_dir)
        t = cfg.train
        self.accelerator, self.precision_source, self.device_source = build_accelerator(cfg, self.run_dir)  # precision resolved in cfg
        acc = self.accelerator
        self.device = acc.device
        self.rank0 = RankZero(self.run, acc.is_main_process, t.max_steps, cfg.log.progress, accelerator=acc)

        set_seed(t.seed)  # identical initial weights on every rank
        self.memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
        G, D = (net.to(self.device, memory_format=self.memory_format) for net in build_models(cfg.model))
        self.ema = EMA(G, cfg.ema)
        self.backend = build_backend(cfg, acc, t.mixed_precision)  # DDP or DeepSpeed
        self.G, self.D = self.backend.prepare(G, D)
        self.schedulers = {net: build_scheduler(opt, cfg.optim, t.max_steps) for net, opt in self.backend.optimizers.items()}
        self.loss = build_loss(cfg.loss)
        self.state = TrainState()

        set_seed(t.seed, device_specific=True)  # different noise per rank
        self.stream = train_stream(cfg.data, batch_size=t.batch_size, seed=t.seed,  # data.on_device: DeviceStream
                                   rank=acc.process_index, world_size=acc.num_processes, device=self.device)
        self._batches = None  # created on first use, after any resume has positioned the stream
        self.stats = Stats(self.device)
        self.guard = Guard(t, self.state, self.stats, self.rank0, self.device)
        self.logger = Logger(cfg, self.state, self.stats, self.guard, self.rank0, self.nets)
        self.sampler = Sampler(cfg, self.ema, self.rank0, list(self.stream.manifest.classes), self.device)
        self.evaluator = Evaluator(cfg, acc, self.state, self.ema, self.rank0, self.run_dir)
        self.checkpointer = Checkpointer(cfg, acc, self.run, self.state, self.backend, self.ema, self.schedulers,
                                         self.stream, self.guard, self.rank0, self.nets)
        self.stopper = StopPolicy(cfg, self.state, self.device, acc.num_processes, self.rank0)

    def nets(self) -> dict[str, torch.nn.Module]:
        """The replicated networks, as the guard and the checkpointer check them."""
        return {"G": self.G, "D": self.D, "G_ema": self.ema.model}

    # ------------------------------------------------------------------ one step
    def _next_real(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batches is None:
            self._batches = iter(self.stream)
        x, y = next(self._batches)
        if self.device.type == "cuda" and x.device.type == "cpu":  # from pinned memory the copy is
            x, y = x.pin_memory(), y.pin_memory()  # asynchronous; from pageable memory it waits for the GPU
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        return x, y.to(self.device, non_blocking=True)

    def _noise(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(batch, self.cfg.model.z_dim, device=self.device)
        return z, torch.randint(0, self.cfg.model.num_classes, (batch,), device=self.device)

    def _update(self, phase: str, loss_and_stats: tuple[torch.Tensor, dict]) -> None:
        """One optimizer update of D (phases D, D_reg) or G through the backend, then the guard's policy."""
        loss, stats = loss_and_stats
        net = phase[0]
        u = self.backend.update(net, loss, self.cfg.train.max_grad_norm)
        self.guard.record(phase, loss, u, self.nets())
        for k, v in {**stats, f"GradNorm/{phase}": u.gnorm, f"LR/{net}": self.schedulers[net].get_last_lr()[0]}.items():
            self.stats.report(k, v.float() if torch.is_tensor(v) else v)

    def train_step(self) -> None:
        B, n_dis, loss = self.cfg.train.batch_size, self.cfg.optim.n_dis, self.loss
        loss.step = self.state.step
        for i in range(n_dis):
            real, y_real = self._next_real()
            z, y_fake = self._noise(B)
            with torch.no_grad():
                fake = self.G(z, y_fake)
            self._update("D", loss.d_loss(self.D, real, y_real, fake, y_fake))
            if loss.has_regularizer and (self.state.step * n_dis + i) % loss.cfg.r1_every == 0:
                self._update("D_reg", loss.d_regularizer(self.D, real, y_real))  # lazy R1: its own update
        z, y_fake = self._noise(B)
        with self.backend.g_phase() as D:  # frozen, no gradient sync
            self._update("G", loss.g_loss(D, self.G(z, y_fake), y_fake))
        for sched in self.schedulers.values():
            sched.step()
        self.ema.update(self.backend.unwrap(self.G))
        self.state.step += 1
        self.state.images_seen += n_dis * B * self.accelerator.num_processes
        self.state.data = self.stream.state_dict()

    # ------------------------------------------------------------------ the loop
    def fit(self) -> str:
        """Resume if asked, train until the stop policy says so. Returns "finished" or "preempted"."""
        acc, cfg, state = self.accelerator, self.cfg, self.state
        if self.resume_from is not None:
            self.checkpointer.resume(self.resume_from)  # refuses before any work
        self._batches = None
        self.guard.since = state.step
        self.rank0.open(state.step, cfg.to_yaml(), flat_hparams(cfg.to_dict()), cfg.log.project)
        for line in banner(self):  # rank 0: devices, precision and its source, models, data, resume point
            self.rank0.print(line)
        if self.resume_from is not None:
            self.rank0.print(f"resumed from {self.resume_from} at step {state.step} ({state.images_seen / 1000:.1f} kimg)")
        try:
            self.stopper.start()
            self.logger.restart()
            while not self.stopper.should_stop(state.step):
                self.train_step()
                self.stopper.tick()
                self.rank0.advance()
                self.logger.maybe_log(state.step)
                with self.logger.aside():  # samples, evaluation and checkpoints are not training time
                    self.sampler.maybe_sample(state.step)
                    self.stopper.early_stop(self.evaluator.maybe_evaluate(state.step))  # before the checkpoint:
                    self.checkpointer.maybe_save(state.step)  # it keeps the best record
            if state.step != self.checkpointer.last_saved:
                self.sampler.sample(state.step)
                self.checkpointer.save()
            if acc.num_processes > 1:
                self.rank0.print(f"replica check: G, D and G_ema identical on all {acc.num_processes} ranks")
            self.rank0.status(self.stopper.outcome, state.step, note=self.stopper.note,
                              kimg=round(state.images_seen / 1000, 3), train_seconds=round(state.train_seconds, 3))
            return self.stopper.outcome
        except BaseException as e:
            peer = as_peer_error(e, acc.process_index, state.step, cfg.train.collective_timeout)
            with contextlib.suppress(OSError):  # a full disk must not hide the error itself
                self.rank0.status("failed", state.step, f"{type(peer or e).__name__}: {peer or e}")
            if peer is not None:
                raise peer from None
            raise
        finally:
            self.rank0.close()

    def close(self) -> None:
        """Every rank, once, after ``fit`` (also after a failure): an explicit teardown, so that no rank can
        hang at exit. A process group left for the interpreter's exit to destroy can deadlock there
        (``~Reducer`` -> ``~ProcessGroupGloo`` joins a gloo thread that waits for the GIL), so: stop the
        loader's workers, drop every reference to the wrapped models and optimizers (ours and
        Accelerate's), end the trackers, destroy the process group, restore the signal handlers."""
        self.stream.close()
        self._batches = None
        self.rank0.close()
        self.accelerator.end_training()
        self.G = self.D = self.backend = self.schedulers = self.checkpointer = None
        self.accelerator.free_memory()  # Accelerate's own lists of prepared models and optimizers
        gc.collect()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        StopRequest.uninstall()


__all__ = ["Trainer", "TrainState", "StopRequest", "NonFiniteError", "DivergenceError", "PeerError", "check_names",
           "preflight", "ShardError", "ConfigError"]
