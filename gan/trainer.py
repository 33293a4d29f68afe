"""The training loop, as a thin orchestrator: it owns the order of work and nothing else.

Components own their mechanics (torchtitan's layout): the backend the optimizer step
(gan.backends: DDP or DeepSpeed), the guard the one non-finite/divergence policy (gan.guard), the
logger, sampler, evaluator and checkpointer their own timing (gan.components), the stop policy
signals, the time budget and early stopping (gan.stopping), rank 0 all writing (gan.rank_zero).
The model family (gan.family) owns the networks, their optimizer settings and the order of updates in
a step; the trainer knows networks only by name and is the family's step context (``nets``, ``step``,
``batch()``, ``update()``, ``frozen()``). The checks before any work live in gan.preflight.
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
from gan.family import build_family
from gan.guard import DivergenceError, Guard, NonFiniteError
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
    step: int = 0  # training steps done
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
        t, self.batch_size = cfg.train, cfg.train.batch_size
        self.accelerator, self.precision_source, self.device_source = build_accelerator(cfg, self.run_dir)
        acc, self.device = self.accelerator, self.accelerator.device  # precision resolved in cfg
        self.global_batch = t.batch_size * acc.num_processes  # images per drawn batch, all ranks
        self.rank0 = RankZero(self.run, acc.is_main_process, t.max_steps, cfg.log.progress, accelerator=acc)

        set_seed(t.seed)  # identical initial weights on every rank
        self.memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
        self.family = family = build_family(cfg)
        nets = {n: m.to(self.device, memory_format=self.memory_format) for n, m in family.build_networks().items()}
        self.ema = EMA(nets[family.ema], cfg.ema, family.bn_inputs(t.seed)) if family.ema else None
        self.backend = build_backend(cfg, acc, t.mixed_precision)  # DDP or DeepSpeed
        self.nets = self.backend.prepare(nets, {n: family.optimizer(n) for n in nets})
        self.schedulers = {net: build_scheduler(opt, cfg.optim, t.max_steps) for net, opt in self.backend.optimizers.items()}
        family.check()  # builds what the step needs (the GAN: its loss) before the per-rank seed, as always
        self.state = TrainState()

        set_seed(t.seed, device_specific=True)  # different noise per rank
        self.stream = train_stream(cfg.data, batch_size=t.batch_size, seed=t.seed,  # data.on_device: DeviceStream
                                   rank=acc.process_index, world_size=acc.num_processes, device=self.device)
        self._batches, self._drawn = None, 0  # created on first use, after any resume has positioned the stream
        self.stats = Stats(self.device)
        self.guard = Guard(t, self.state, self.stats, self.rank0, self.device)
        self.logger = Logger(cfg, self.state, self.stats, self.guard, self.rank0, self.replicas)
        self.sampler = Sampler(cfg, family, self.ema, self.rank0, list(self.stream.manifest.classes), self.device)
        self.evaluator = Evaluator(cfg, acc, self.state, self.ema, self.rank0, self.run_dir, family)
        self.checkpointer = Checkpointer(cfg, acc, self.run, self.state, self.backend, self.ema, self.schedulers,
                                         self.stream, self.guard, self.rank0, self.replicas)
        self.stopper = StopPolicy(cfg, self.state, self.device, acc.num_processes, self.rank0)

    def replicas(self) -> dict[str, torch.nn.Module]:
        """The replicated networks, as the guard and the checkpointer check them (the EMA copy as <net>_ema,
        as it stands: the checkpointer refreshes its statistics before it checks and saves)."""
        return {**self.nets, **({f"{self.family.ema}_ema": self.ema.shadow} if self.ema else {})}

    # ------------------------------------------------------------------ the step context (gan.family.StepContext)
    @property
    def step(self) -> int:
        return self.state.step

    def batch(self) -> tuple[torch.Tensor, ...]:
        """The next batch of the stream on the device (images in the memory format); counted as drawn."""
        if self._batches is None:
            self._batches = iter(self.stream)
        batch = next(self._batches)
        self._drawn += 1
        if self.device.type == "cuda" and batch[0].device.type == "cpu":  # from pinned memory the copy is
            batch = tuple(b.pin_memory() for b in batch)  # asynchronous; from pageable memory it waits for the GPU
        batch = tuple(b.to(self.device, non_blocking=True) for b in batch)
        return tuple(b.contiguous(memory_format=self.memory_format) if b.dim() == 4 else b for b in batch)

    def update(self, name: str, loss: torch.Tensor, stats: dict, phase: str | None = None) -> None:
        """One optimizer update of network ``name`` through the backend, then the guard's policy."""
        phase = phase or name
        u = self.backend.update(name, loss, self.cfg.train.max_grad_norm)
        self.guard.record(phase, loss, u, self.replicas())
        lr = self.schedulers[name].get_last_lr()[0]
        for k, v in {**stats, f"GradNorm/{phase}": u.gnorm, f"LR/{name}": lr}.items():
            self.stats.report(k, v.float() if torch.is_tensor(v) else v)

    def frozen(self, name: str):
        """Network ``name`` frozen, without gradient sync (the backend's), for a phase trained through it."""
        return self.backend.frozen(name)

    def train_step(self) -> None:
        self._drawn = 0
        self.family.train_step(self)
        for sched in self.schedulers.values():
            sched.step()
        if self.ema is not None:  # one update of the EMA'd network per step, on the global batch
            self.ema.update(self.backend.unwrap(self.nets[self.family.ema]), images=self.global_batch)
        self.state.step += 1
        self.state.images_seen += self._drawn * self.global_batch
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
                *first, last = self.replicas()
                listed = f"{', '.join(first)} and {last}" if first else last
                self.rank0.print(f"replica check: {listed} identical on all {acc.num_processes} ranks")
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
        self.nets = self.ema = self.backend = self.schedulers = self.checkpointer = self.family = None
        self.accelerator.free_memory()  # Accelerate's own lists of prepared models and optimizers
        gc.collect()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        StopRequest.uninstall()


__all__ = ["Trainer", "TrainState", "StopRequest", "NonFiniteError", "DivergenceError", "PeerError", "preflight",
           "check_names", "ShardError", "ConfigError"]
