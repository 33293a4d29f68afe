"""The training loop. It owns order and policy: D phase(s), G phase, EMA, intervals, the
finite-loss policy, checkpoints and resume. Losses compute, networks forward, rank 0 writes.

Every phase goes through :meth:`Trainer._optimize` (zero_grad, backward, unscale, clip, finite
check, step), so a backend whose backward also steps (DeepSpeed) plugs in at one place.
"""
from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed

from gan import checkpoint
from gan.backends import backend_of, build_backend
from gan.config import Config, ConfigError
from gan.data import ShardError, TrainStream, read_manifest
from gan.dist import Stats, any_rank, broadcast_buffers, check_replicas
from gan.ema import EMA
from gan.losses import build_loss
from gan.models import MODELS, build_models
from gan.optim import build_optimizer, build_scheduler, lr_factor  # noqa: F401 (re-exported for callers)
from gan.rank_zero import RankZero


class StopRequest:
    """SIGUSR2/SIGTERM -> "checkpoint at the end of this step and exit". Install it as early as
    possible (launch/train.py does, before anything is built), so a signal that arrives during
    start-up is not lost; the trainer reads ``reason`` after every step."""

    reason: str | None = None

    @classmethod
    def install(cls) -> None:
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, cls._handler)

    @classmethod
    def _handler(cls, signum, _frame) -> None:
        cls.reason = signal.Signals(signum).name


class NonFiniteError(RuntimeError):
    """Training hit a non-finite loss or gradient and the policy says stop."""


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


# ---------------------------------------------------------------------------- preflight


def preflight(cfg: Config, run_dir: Path, resume: str | None) -> Path | None:
    """All checks that need no work: the run directory, the shards against the model, and the
    checkpoint to resume from. Returns that checkpoint (or None for a fresh start)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run directory {run_dir} is not writable ({e.strerror}); pass --run-dir "
                          f"with a directory you can write to") from None
    build_loss(cfg.loss)  # unknown names fail here, listing the valid ones
    if cfg.model.name not in MODELS:
        build_models(cfg.model)  # raises ConfigError listing the valid architectures
    manifest = read_manifest(cfg.data.shards)
    m = cfg.model
    manifest.check(dataset=cfg.data.dataset or None, channels=m.img_channels, size=m.img_size,
                   num_classes=m.num_classes)
    if cfg.metrics.every:  # weights files, classifier, counts: fail now, not at the first evaluation
        from gan.metrics import check_setup
        check_setup(cfg)
    if resume is None:
        return None
    path = checkpoint.latest_checkpoint(run_dir / "checkpoints") if resume == "auto" else Path(resume)
    if path is None:
        return None
    meta = checkpoint.read_meta(path)
    written_by = backend_of(meta)
    if written_by != cfg.train.backend:
        raise checkpoint.CheckpointError(
            f"checkpoint {path} was written by the {written_by} backend and this run uses train.backend="
            f"{cfg.train.backend}. Resume it with train.backend={written_by}; it can't be converted in place "
            f"(the optimizer states are laid out differently: {'ZeRO partitions, one file per rank' if written_by == 'deepspeed' else 'whole, in Accelerate files'}). "
            f"Its EMA G export (RUN/export/) works with either backend; to switch, start a new --run-dir")
    if written_by == "deepspeed" and meta.get("world_size") not in (None, _world_size()):
        raise checkpoint.CheckpointError(
            f"checkpoint {path} holds ZeRO optimizer states partitioned over {meta['world_size']} ranks and this run "
            f"has {_world_size()}; resume it with {meta['world_size']} processes (--nproc_per_node), or start a new --run-dir")
    saved = meta.get("config", {}).get("model", {})
    diff = [f"model.{k}: checkpoint {saved.get(k)!r}, config {v!r}" for k, v in dataclasses.asdict(m).items()
            if saved.get(k) != v]
    if diff:
        raise checkpoint.CheckpointError(
            f"checkpoint {path} was written for a different architecture ({'; '.join(diff)}). "
            f"Resume with the config saved in {path / checkpoint.META}, or start a new --run-dir")
    return path


def _world_size() -> int:
    import os
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_precision(name: str) -> str:
    """"auto": bf16 where the GPU supports it, else full precision."""
    if name != "auto":
        return name
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


# ---------------------------------------------------------------------------- trainer


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, resume_from: Path | None = None):
        self.cfg, self.run_dir, self.resume_from = cfg, Path(run_dir), resume_from
        t = cfg.train
        self.accelerator = acc = Accelerator(
            mixed_precision=resolve_precision(t.mixed_precision),
            dynamo_backend="inductor" if t.compile else "no",
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        torch.backends.cudnn.deterministic = t.deterministic
        torch.backends.cudnn.benchmark = not t.deterministic
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.device = acc.device
        self.rank0 = RankZero(self.run_dir, acc.is_main_process, t.max_steps, cfg.log.progress)

        set_seed(t.seed)  # identical initial weights on every rank
        G, D = build_models(cfg.model)
        self.memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
        G, D = G.to(self.device, memory_format=self.memory_format), D.to(self.device, memory_format=self.memory_format)
        self.ema = EMA(G, cfg.ema)
        self.backend = build_backend(cfg, acc, resolve_precision(t.mixed_precision))  # DDP or DeepSpeed
        self.G, self.D = self.backend.prepare(G, D)
        self.sched_G = build_scheduler(self.backend.optimizers["G"], cfg.optim, t.max_steps)
        self.sched_D = build_scheduler(self.backend.optimizers["D"], cfg.optim, t.max_steps)
        self.loss = build_loss(cfg.loss)
        self.state = TrainState()
        acc.register_for_checkpointing(self.ema, self.state, self.sched_G, self.sched_D)

        set_seed(t.seed, device_specific=True)  # different noise per rank
        self.stream = TrainStream(cfg.data, batch_size=t.batch_size, seed=t.seed,
                                  rank=acc.process_index, world_size=acc.num_processes)
        self.stats = Stats(self.device)
        gen = torch.Generator().manual_seed(t.seed)
        k, n = cfg.log.samples_per_class, cfg.model.num_classes
        self.fixed_z = torch.randn(n * k, cfg.model.z_dim, generator=gen).to(self.device)
        self.fixed_y = torch.arange(n).repeat_interleave(k).to(self.device)
        self._batches = None  # created on first use, after any resume has positioned the stream
        self._fp16_streak = 0
        self._nonfinite: dict[str, torch.Tensor | int] = {}  # phase -> non-finite updates since the last check
        self._nonfinite_since = 0

    # ------------------------------------------------------------------ pieces
    def _noise(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(batch, self.cfg.model.z_dim, device=self.device)
        y = torch.randint(0, self.cfg.model.num_classes, (batch,), device=self.device)
        return z, y

    def _next_real(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batches is None:
            self._batches = iter(self.stream)
        x, y = next(self._batches)
        if self.device.type == "cuda" and x.device.type == "cpu":  # from pinned memory the copy is
            x, y = x.pin_memory(), y.pin_memory()  # asynchronous; from pageable memory it waits for the GPU
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        return x, y.to(self.device, non_blocking=True)

    def _optimize(self, name: str, loss: torch.Tensor, sched) -> None:
        """One optimizer update through the backend (gan.backends), then the one non-finite/fp16
        policy for every backend. Non-finite updates were not applied; counts on the device (DDP with
        fused Adam) are read once per log interval by ``_check_nonfinite``, counts already on the host
        (RMSprop, DeepSpeed) right away."""
        u = self.backend.update(name[0], loss)
        if u.fp16_skipped is not None:
            self.stats.report("Mixed/fp16_skipped", float(u.fp16_skipped))
            if u.fp16_skipped:
                self.state.fp16_skipped += 1
                self._fp16_streak += 1
                if self._fp16_streak > self.cfg.train.max_skipped:
                    raise NonFiniteError(f"{self._fp16_streak} fp16 steps in a row overflowed in {name}; "
                                         f"the loss is diverging. Lower the learning rates or use bf16")
            else:
                self._fp16_streak = 0
        elif torch.is_tensor(u.nonfinite):
            self._nonfinite[name] = self._nonfinite.get(name, 0) + u.nonfinite
        elif u.nonfinite:
            self._nonfinite[name] = self._nonfinite.get(name, 0) + u.nonfinite
            self._check_nonfinite(f"loss {loss.item():.4g}, grad norm {float(u.gnorm):.4g}", last=self.state.step)
        self.stats.report(f"GradNorm/{name}", u.gnorm.float() if torch.is_tensor(u.gnorm) else u.gnorm)
        if name in ("D", "G"):
            self.stats.report(f"LR/{name}", sched.get_last_lr()[0])

    def _check_nonfinite(self, detail: str = "", last: int | None = None) -> None:
        """Every rank (the counts agree, so every rank decides alike): fold the non-finite updates
        counted since the last check into the state and apply ``train.on_nonfinite``. Those updates
        were never applied, so the weights are still those of the last finite update."""
        counts = dict(self._nonfinite)
        self._nonfinite.clear()
        since, self._nonfinite_since = self._nonfinite_since, self.state.step
        if not counts:
            return
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device)
                              for v in counts.values()]).tolist()  # the one host sync
        counts = {k: int(v) for k, v in zip(counts, values) if v}
        n = sum(counts.values())
        if n == 0:
            return
        self.state.skipped_nonfinite += n
        last = self.state.step - 1 if last is None else last  # steps are numbered by G steps done before them
        where = f"step {last}" if last <= since else f"steps {since}-{last}"
        msg = (f"non-finite loss/gradient in {n} update(s) ({', '.join(f'{k} {v}' for k, v in counts.items())}) "
               f"in {where}{f' ({detail})' if detail else ''}; those updates were not applied")
        t = self.cfg.train
        if t.on_nonfinite == "stop" or self.state.skipped_nonfinite > t.max_skipped:
            raise NonFiniteError(msg + f" ({self.state.skipped_nonfinite} in this run). Stopped; the last good "
                                 f"checkpoint is kept. Lower the learning rates, or set train.on_nonfinite=skip "
                                 f"(train.max_skipped={t.max_skipped}) to go on past them")
        self.rank0.print(f"warning: {msg}; skipped ({self.state.skipped_nonfinite} so far)")

    def train_step(self) -> None:
        acc, B, n_dis = self.accelerator, self.cfg.train.batch_size, self.cfg.optim.n_dis
        self.loss.step = self.state.step
        with acc.accumulate(self.G, self.D):
            for i in range(n_dis):
                real, y_real = self._next_real()
                z, y_fake = self._noise(B)
                with torch.no_grad():
                    fake = self.G(z, y_fake)
                loss, stats = self.loss.d_loss(self.D, real, y_real, fake, y_fake)
                self._optimize("D", loss, self.sched_D)
                self._report(stats)
                if self.loss.has_regularizer and (self.state.step * n_dis + i) % self.loss.cfg.r1_every == 0:
                    loss, stats = self.loss.d_regularizer(self.D, real, y_real)  # lazy R1: its own update
                    self._optimize("D_reg", loss, self.sched_D)
                    self._report(stats)
            z, y_fake = self._noise(B)
            with self.backend.g_phase() as D:  # frozen, no gradient sync
                loss, stats = self.loss.g_loss(D, self.G(z, y_fake), y_fake)
                self._optimize("G", loss, self.sched_G)
            self._report(stats)
        self.sched_G.step()
        self.sched_D.step()
        self.ema.update(self.backend.unwrap(self.G))
        self.state.step += 1
        self.state.images_seen += self.cfg.optim.n_dis * B * acc.num_processes
        self.state.data = self.stream.state_dict()

    def _report(self, stats: dict) -> None:
        for k, v in stats.items():
            self.stats.report(k, v)

    # ------------------------------------------------------------------ intervals
    def _log(self, t0: float, steps: int, images: int) -> None:
        self._check_nonfinite()
        values = self.stats.reduce()  # collective, every rank
        dt = max(time.perf_counter() - t0, 1e-9)
        ips = images / dt
        values.update({"Timing/img_per_s": ips, "Timing/sec_per_kimg": 1000.0 / ips if ips else float("inf"),
                       "Timing/sec_per_step": dt / max(steps, 1),
                       "Progress/kimg": self.state.images_seen / 1000.0,
                       "Progress/skipped_nonfinite": float(self.state.skipped_nonfinite)})
        self.rank0.scalars(self.state.step, values)

    @torch.no_grad()
    def _samples(self) -> None:
        if not self.rank0.enabled:  # rank-0-only work with no collective inside
            return
        images = torch.cat([self.ema.model(z, y) for z, y in zip(self.fixed_z.split(256), self.fixed_y.split(256))])
        self.rank0.samples(self.state.step, images, self.fixed_y, self.cfg.model.num_classes,
                           self.cfg.log.samples_per_class)

    def save_checkpoint(self) -> Path:
        self._check_nonfinite()  # policy first: a stop leaves the last good checkpoint the newest
        broadcast_buffers([self.G, self.D, self.ema.model])  # collective, every rank
        check_replicas({"G": self.G, "D": self.D, "G_ema": self.ema.model}, self.device)  # collective
        path = checkpoint.save(self.accelerator, self.run_dir / "checkpoints", self.state.step,
                               {"config": self.cfg.to_dict(), "backend": self.cfg.train.backend}, self.cfg.checkpoint.keep,
                               extra=self.backend.save)
        if self.rank0.enabled:
            checkpoint.export_generator(self.run_dir / "export", self.ema.model,
                                        dataclasses.asdict(self.cfg.model), self.state.step)
        return path

    def _evaluate(self) -> str:
        """Every rank: metrics of the EMA G (gan.metrics), logged as Eval/<name>; a new best by
        metrics.best_metric is exported to RUN/best/ (+ best.json). Returns the early-stop note, or ""
        to go on. Every rank gets the same values, so every rank decides alike."""
        from gan.metrics import evaluate_during_training, save_best, update_best

        broadcast_buffers([self.ema.model])  # collective, every rank
        step = self.state.step
        values = evaluate_during_training(self.accelerator, self.ema.model, self.cfg, step)  # collective
        self.rank0.scalars(step, {f"Eval/{k}": v for k, v in values.items()})
        improved, stop, note = update_best(self.state.eval_best, values, self.cfg, step)
        if improved and self.rank0.enabled:
            save_best(self.run_dir, self.ema.model, self.cfg.model, step, self.state.eval_best, values)
        return note if stop else ""

    def _stop_check_due(self, step: int) -> bool:
        """A single process reads its own flag every step for free; with several, the agreement is a
        collective that waits for the GPU, so it runs every ``train.stop_check_every`` steps."""
        every = self.cfg.train.stop_check_every if self.accelerator.num_processes > 1 else 1
        return step % every == 0 or step == self.cfg.train.max_steps

    # ------------------------------------------------------------------ fit
    def fit(self) -> str:
        """Resume if asked, train to ``train.max_steps``. Returns "finished" or "preempted"."""
        acc, cfg = self.accelerator, self.cfg
        if self.resume_from is not None:
            checkpoint.load(acc, self.resume_from, extra=self.backend.load)
            self.stream.load_state_dict(self.state.data)
        self._batches = None
        StopRequest.install()  # idempotent; launch/train.py installs it before building
        start = self._nonfinite_since = self.state.step
        self.rank0.open(start, cfg.to_yaml())
        if self.resume_from is not None:
            self.rank0.print(f"resumed from {self.resume_from} at step {start} ({self.state.images_seen / 1000:.1f} kimg)")
        outcome, note = "finished", None
        budget = cfg.train.max_minutes * 60.0
        # From the checkpoint, so the same on every rank; in the loop the ranks agree on it (their clocks differ).
        spent = bool(budget) and self.state.train_seconds >= budget
        try:
            t0, s0, i0 = time.perf_counter(), self.state.step, self.state.images_seen
            clock0, seconds0 = t0, self.state.train_seconds
            last_saved = start if self.resume_from is not None else -1
            while self.state.step < cfg.train.max_steps and not spent:
                self.train_step()
                self.state.train_seconds = seconds0 + time.perf_counter() - clock0
                step = self.state.step
                self.rank0.advance()
                if step % cfg.log.every == 0 or step == cfg.train.max_steps:
                    self._log(t0, step - s0, self.state.images_seen - i0)
                    t0, s0, i0 = time.perf_counter(), step, self.state.images_seen
                t_aside = time.perf_counter()  # samples, evaluation and checkpoints don't count as training time
                if step % cfg.log.sample_every == 0:
                    self._samples()
                if cfg.metrics.every and step % cfg.metrics.every == 0:  # before the checkpoint: it keeps eval_best
                    note = self._evaluate() or None
                    if note:
                        self.rank0.print(note)
                        break
                if step % cfg.checkpoint.every == 0:
                    self.save_checkpoint()
                    last_saved = step
                t0 += time.perf_counter() - t_aside
                if not self._stop_check_due(step):
                    continue
                signalled, spent = any_rank([StopRequest.reason is not None,  # collective, every rank
                                             bool(budget) and self.state.train_seconds >= budget], self.device)
                if signalled and not spent:  # a spent budget ends the run anyway: "finished", no requeue
                    self.rank0.print(f"stop requested ({StopRequest.reason or 'signal on another rank'}) "
                                     f"at step {step}; checkpointing")
                    outcome = "preempted"
                    break
            if spent:
                note = f"time budget of {cfg.train.max_minutes:g} min (train.max_minutes) reached at step {self.state.step}"
                self.rank0.print(note)
            if self.state.step != last_saved:
                self._samples()
                self.save_checkpoint()
            if acc.num_processes > 1:
                self.rank0.print(f"replica check: G, D and G_ema identical on all {acc.num_processes} ranks")
            self.rank0.status(outcome, self.state.step, note=note, kimg=round(self.state.images_seen / 1000, 3),
                              train_seconds=round(self.state.train_seconds, 3))
            return outcome
        except BaseException as e:
            self.rank0.status("failed", self.state.step, f"{type(e).__name__}: {e}")
            raise
        finally:
            self.rank0.close()


__all__ = ["Trainer", "TrainState", "NonFiniteError", "preflight", "ShardError", "ConfigError"]
