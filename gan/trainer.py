"""The training loop. It owns order and policy: D phase(s), G phase, EMA, intervals, the
finite-loss policy, checkpoints and resume. Losses compute, networks forward, rank 0 writes.

Every phase goes through :meth:`Trainer._optimize` (zero_grad, backward, unscale, clip, finite
check, step), so a backend whose backward also steps (DeepSpeed) plugs in at one place.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed

from gan import checkpoint
from gan.backends import build_backend
from gan.config import Config, ConfigError
from gan.data import ShardError, read_manifest, train_stream
from gan.dist import Stats, all_reduce_, any_rank, broadcast_buffers, check_replicas, peer_failure, same_on_all_ranks
from gan.ema import EMA
from gan.losses import build_loss
from gan.models import MODELS, build_models
from gan.optim import build_optimizer, build_scheduler, lr_factor  # noqa: F401 (re-exported for callers)
from gan.rank_zero import RankZero
from gan.rundir import RunDir
from gan.startup import banner, resolve_precision_source
from gan.trackers import build_trackers, flat_hparams, tracked_metrics, tracker_names


class StopRequest:
    """SIGUSR2/SIGTERM -> "checkpoint at the end of this step and exit". Install it as early as
    possible (launch/train.py does, before anything is built), so a signal that arrives during
    start-up is not lost; the trainer reads ``reason`` after every step."""

    reason: str | None = None
    _previous: dict = {}  # signal -> the handler install() replaced

    @classmethod
    def install(cls) -> None:
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            previous = signal.signal(sig, cls._handler)
            if previous is not cls._handler:
                cls._previous[sig] = previous

    @classmethod
    def uninstall(cls) -> None:
        """Restore the handlers install() replaced: after training a plain SIGTERM ends the process."""
        for sig, previous in cls._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        cls._previous = {}

    @classmethod
    def _handler(cls, signum, _frame) -> None:
        cls.reason = signal.Signals(signum).name


class NonFiniteError(RuntimeError):
    """Training hit a non-finite loss or gradient and the policy says stop."""


class DivergenceError(NonFiniteError):
    """A finite blow-up: a loss, gradient norm or weight above its limit (train.max_loss,
    train.max_grad_norm, train.max_abs_weight)."""


class PeerError(RuntimeError):
    """A collective failed because another rank stalled or died: the message says which and what next."""


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


def _launch_rank() -> tuple[int, int]:
    """(rank, world size) as the launcher (torchrun, accelerate launch) sets them, before any process group."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def preflight(cfg: Config, run_dir: Path, resume: str | None) -> Path | None:
    """All checks that need no work: the run directory (locked by rank 0 from here on, leftovers of a
    crash cleaned), the shards against the model, and the checkpoint to resume from. Returns that
    checkpoint (or None for a fresh start)."""
    run, (rank, world_size) = RunDir(run_dir), _launch_rank()
    try:
        run.root.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            run.lock()  # raises RunDirError naming the holder
            for line in run.clean_leftovers():  # before the probe: a full disk may be full of them
                print(line, flush=True)
        probe = run.root / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run directory {run_dir} is not writable ({e.strerror}); pass --run-dir "
                          f"with a directory you can write to") from None
    check_names(cfg)
    tracker_names(cfg.log.with_)  # an unknown or uninstalled tracker fails here
    manifest = read_manifest(cfg.data.shards)
    m = cfg.model
    manifest.check(dataset=cfg.data.dataset or None, channels=m.img_channels, size=m.img_size,
                   num_classes=m.num_classes)
    manifest.check_files()  # zero-filled or truncated shards fail here, not at step 0 (or never)
    if cfg.train.batch_size > manifest.total:
        raise ConfigError(f"config key 'train.batch_size': {cfg.train.batch_size} is larger than the data set "
                          f"({manifest.total} samples in {manifest.dir}); use a batch of at most {manifest.total}")
    if cfg.data.on_device:  # a data set too big for the device fails here, not after the models are built
        from gan.data.device import check_fits, expected_device
        check_fits(manifest, expected_device(), cfg.data.on_device_budget)
    if cfg.metrics.every:  # weights files, classifier, counts: fail now, not at the first evaluation
        from gan.metrics import check_setup
        check_setup(cfg)
    path, notes = checkpoint.resume_point(run, resume, cfg, world_size, writer=rank == 0)
    for line in notes if rank == 0 else ():
        print(line, flush=True)
    return path


def check_names(cfg: Config) -> None:
    """The registered names of the config exist (ConfigError listing the valid ones): the loss and the
    model here; metric names are checked by MetricsConfig itself when the config is built."""
    build_loss(cfg.loss)
    if cfg.model.name not in MODELS:
        build_models(cfg.model)  # raises ConfigError listing the valid architectures


def resolve_precision(name: str) -> str:
    """The precision a run will use (gan/startup.py says how "auto" resolves)."""
    return resolve_precision_source(name)[0]


# ---------------------------------------------------------------------------- trainer


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, resume_from: Path | None = None):
        self.cfg, self.run_dir, self.resume_from = cfg, Path(run_dir), resume_from
        self.run = RunDir(run_dir)
        t = cfg.train
        pg = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=t.collective_timeout))
        pg.to_kwargs = lambda: {"timeout": pg.timeout}  # Accelerate drops a value equal to its default (600 s), and
        # torch's own default for gloo is 30 min: pass it always
        precision, self.precision_source = resolve_precision_source(t.mixed_precision)
        t.mixed_precision = precision  # the resolved value is what config.yaml and the checkpoints keep
        self.accelerator = acc = Accelerator(
            # DeepSpeed's engines do their own precision (gan.backends); Accelerate prepares nothing there
            mixed_precision=precision if t.backend == "ddp" else "no",
            dynamo_backend="inductor" if t.compile else "no",
            log_with=build_trackers(tracker_names(cfg.log.with_), self.run_dir, cfg.log.project,
                                    tracked_metrics(cfg)) or None,
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False), pg])
        if acc.mixed_precision == "fp16" and acc.scaler is None:  # e.g. on CPU: fp16 without loss scaling
            raise ConfigError(f"config key 'train.mixed_precision': fp16 needs a gradient scaler, and Accelerate "
                              f"provides none on this {acc.device.type} device (it would train without one). "
                              f"Use train.mixed_precision=bf16 or no here")
        torch.backends.cudnn.deterministic = t.deterministic
        torch.backends.cudnn.benchmark = not t.deterministic
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.device = acc.device
        self.rank0 = RankZero(self.run, acc.is_main_process, t.max_steps, cfg.log.progress, accelerator=acc)

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
        checkpoint.register(acc, ema=self.ema, train_state=self.state, sched_G=self.sched_G, sched_D=self.sched_D)

        set_seed(t.seed, device_specific=True)  # different noise per rank
        self.stream = train_stream(cfg.data, batch_size=t.batch_size, seed=t.seed,  # data.on_device: DeviceStream
                                   rank=acc.process_index, world_size=acc.num_processes, device=self.device)
        self.stats = Stats(self.device)
        gen = torch.Generator().manual_seed(t.seed)
        k, n = cfg.log.samples_per_class, cfg.model.num_classes
        self.fixed_z = torch.randn(n * k, cfg.model.z_dim, generator=gen).to(self.device)
        self.fixed_y = torch.arange(n).repeat_interleave(k).to(self.device)
        self._batches = None  # created on first use, after any resume has positioned the stream
        self._fp16_streak = 0
        self._nonfinite: dict[str, torch.Tensor | int] = {}  # phase -> non-finite updates since the last check
        self._too_large: dict[str, torch.Tensor | int] = {}  # phase -> updates skipped for train.max_grad_norm
        self._peak_loss: dict[str, torch.Tensor] = {}  # phase -> largest finite |loss| since the last check
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
        """One optimizer update through the backend (gan.backends: zero_grad, backward, clip, skip,
        step), then the one non-finite/divergence policy for every backend. Skipped updates were not
        applied; counts on the device (DDP with fused Adam) are read once per log interval by
        ``_check_nonfinite``, counts already on the host (RMSprop, DeepSpeed) right away."""
        t = self.cfg.train
        # The loss differs between ranks (each has its own batch): only recorded; the ranks agree in _check_nonfinite.
        loss_abs = loss.detach().float().abs()
        peak = torch.where(torch.isfinite(loss_abs), loss_abs, 0.0)
        self._peak_loss[name] = torch.maximum(self._peak_loss[name], peak) if name in self._peak_loss else peak
        u = self.backend.update(name[0], loss, t.max_grad_norm)
        if u.diverged:  # an update the backend could not skip (fp16 scaler, DeepSpeed) with the norm above the limit
            raise DivergenceError(f"gradient norm {float(u.gnorm):.4g} in {name} at step {self.state.step} is above "
                                  f"train.max_grad_norm={t.max_grad_norm:g}; the training is diverging. Stopped; "
                                  f"the last good checkpoint is kept. Lower the learning rates")
        if u.fp16_skipped is not None:
            self.stats.report("Mixed/fp16_skipped", float(u.fp16_skipped))
            if u.fp16_skipped:
                self.state.fp16_skipped += 1
                self._fp16_streak += 1
                if self._fp16_streak > t.max_skipped:
                    raise NonFiniteError(f"{self._fp16_streak} fp16 steps in a row overflowed in {name}; "
                                         f"the loss is diverging. Lower the learning rates or use bf16")
            else:
                self._fp16_streak = 0
        for counts, n in ((self._nonfinite, u.nonfinite), (self._too_large, u.too_large)):
            if torch.is_tensor(n) or n:
                counts[name] = counts.get(name, 0) + n
        if not torch.is_tensor(u.nonfinite) and (u.nonfinite or u.too_large):  # known on the host: decide now
            self._check_nonfinite(f"loss {loss.item():.4g}, grad norm {float(u.gnorm):.4g}", last=self.state.step)
        self.stats.report(f"GradNorm/{name}", u.gnorm.float() if torch.is_tensor(u.gnorm) else u.gnorm)
        if name in ("D", "G"):
            self.stats.report(f"LR/{name}", sched.get_last_lr()[0])

    def _check_nonfinite(self, detail: str = "", last: int | None = None) -> None:
        """Every rank, a collective (it decides alike everywhere): read what the updates since the last
        check recorded on the device, with one all-reduce and one host sync, and apply the policy.

        Skipped updates (non-finite gradient, or gradient norm above ``train.max_grad_norm``) were never
        applied, so the weights are still those of the last good update: ``train.on_nonfinite`` says
        stop or skip (up to ``train.max_skipped``). A loss above ``train.max_loss`` or a weight above
        ``train.max_abs_weight`` (or a non-finite one) was already trained on: that always stops, and
        since this runs before every checkpoint, no checkpoint ever holds such weights."""
        t = self.cfg.train
        phases = {"non-finite": dict(self._nonfinite), "large": dict(self._too_large)}
        peaks = dict(self._peak_loss)
        self._nonfinite.clear()
        self._too_large.clear()
        self._peak_loss.clear()
        since, self._nonfinite_since = self._nonfinite_since, self.state.step
        nets = {"G": self.G, "D": self.D, "G_ema": self.ema.model}
        weights = [torch.nn.utils.get_total_norm([p.detach() for p in m.parameters()], norm_type=math.inf)
                   for m in nets.values()]  # the largest |weight| of each net; NaN if any is NaN
        values = [torch.as_tensor(v, dtype=torch.float32, device=self.device)
                  for kind in phases.values() for v in kind.values()] + \
                 [v.float() for v in peaks.values()] + [w.float().to(self.device) for w in weights]
        packed = torch.stack(values)
        packed = torch.where(torch.isnan(packed), torch.full_like(packed, math.inf), packed)  # MAX keeps inf, not NaN
        values = iter(all_reduce_(packed, dist.ReduceOp.MAX).tolist())  # the one sync
        counts = {kind: {k: int(next(values)) for k in c} for kind, c in phases.items()}
        peaks = {k: next(values) for k in peaks}
        weights = dict(zip(nets, values))
        last = self.state.step - 1 if last is None else last  # steps are numbered by G steps done before them
        where = f"step {last}" if last <= since else f"steps {since}-{last}"
        advice = "Stopped; the last good checkpoint is kept. Lower the learning rates (optim.lr_d, optim.lr_g)"

        n = sum(v for c in counts.values() for v in c.values())
        if n:
            self.state.skipped_nonfinite += n
            parts = []
            for kind, c in counts.items():
                c = {k: v for k, v in c.items() if v}
                if c:
                    what = ("non-finite loss/gradient" if kind == "non-finite" else
                            f"gradient norm above train.max_grad_norm={t.max_grad_norm:g}")
                    parts.append(f"{what} in {sum(c.values())} update(s) ({', '.join(f'{k} {v}' for k, v in c.items())})")
            msg = f"{'; '.join(parts)} in {where}{f' ({detail})' if detail else ''}; those updates were not applied"
            if t.on_nonfinite == "stop" or self.state.skipped_nonfinite > t.max_skipped:
                error = DivergenceError if not any(counts["non-finite"].values()) else NonFiniteError
                raise error(msg + f" ({self.state.skipped_nonfinite} in this run). {advice}, or set "
                                  f"train.on_nonfinite=skip (train.max_skipped={t.max_skipped}) to go on past them")
            self.rank0.print(f"warning: {msg}; skipped ({self.state.skipped_nonfinite} so far)")
        bad = {k: v for k, v in weights.items() if not math.isfinite(v)}
        if bad:
            raise NonFiniteError(f"non-finite weights in {', '.join(bad)} at step {self.state.step}. {advice}")
        if t.max_abs_weight and max(weights.values()) > t.max_abs_weight:
            big = ", ".join(f"{k} {v:.3g}" for k, v in weights.items() if v > t.max_abs_weight)
            raise DivergenceError(f"the training is diverging: largest |weight| above train.max_abs_weight="
                                  f"{t.max_abs_weight:g} at step {self.state.step} ({big}). {advice}, or raise "
                                  f"train.max_abs_weight if such weights are expected")
        if t.max_loss and peaks and max(peaks.values()) > t.max_loss:
            big = ", ".join(f"{k} {v:.3g}" for k, v in peaks.items() if v > t.max_loss)
            raise DivergenceError(f"the training is diverging: |loss| above train.max_loss={t.max_loss:g} in "
                                  f"{where} (largest: {big}). {advice}, or raise train.max_loss if such losses are "
                                  f"expected")

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
                           self.cfg.log.samples_per_class, list(self.stream.manifest.classes))

    def _check_finite_weights(self, nets: dict) -> None:
        """Every rank (replicas agree): refuse to checkpoint non-finite weights, naming the tensors."""
        bad = [f"{name}.{k}" for name, net in nets.items()
               for k, t in self.accelerator.unwrap_model(net).state_dict().items()
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise NonFiniteError(
                f"non-finite weights in {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''} at step {self.state.step}"
                f"; not checkpointed, so the newest checkpoint is still {self.run.latest_checkpoint()}. Lower the "
                f"learning rates (or set a train.on_nonfinite policy that stops earlier) and resume from it")

    def save_checkpoint(self) -> Path:
        self._check_nonfinite()  # policy first: a stop leaves the last good checkpoint the newest
        broadcast_buffers([self.G, self.D, self.ema.model])  # collective, every rank
        nets = {"G": self.G, "D": self.D, "G_ema": self.ema.model}
        self._check_finite_weights(nets)
        check_replicas(nets, self.device)  # collective
        path = checkpoint.save(self.accelerator, self.run, self.state.step,
                               {"config": self.cfg.to_dict(), "backend": self.backend.name}, self.cfg.checkpoint.keep,
                               extra=self.backend.save if self.backend.name == "deepspeed" else None)
        if self.rank0.enabled:
            checkpoint.export_generator(self.run.export, self.ema.model,
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

    def _apply_config(self) -> None:
        """After a resume: the config's learning rates, betas, eps and weight decay replace those restored
        with the optimizers and schedulers (the schedule's factor comes from the config already), so a
        value given on resume takes effect, as config.yaml says. Unchanged values give the same floats."""
        o = self.cfg.optim
        opts = self.backend.optimizers  # the plain torch optimizers (under ZeRO: their groups are the engines')
        for opt, sched, lr, betas in ((opts["G"], self.sched_G, o.lr_g, o.betas_g),
                                      (opts["D"], self.sched_D, o.lr_d, o.betas_d)):
            sched.base_lrs = [lr] * len(opt.param_groups)
            for group, factor in zip(opt.param_groups, sched.lr_lambdas):
                group.update(initial_lr=lr, lr=lr * factor(sched.last_epoch), eps=o.eps, weight_decay=o.weight_decay)
                if "betas" in group:
                    group["betas"] = tuple(betas)
            sched._last_lr = [group["lr"] for group in opt.param_groups]

    # ------------------------------------------------------------------ fit
    def fit(self) -> str:
        """Resume if asked, train to ``train.max_steps``. Returns "finished" or "preempted"."""
        acc, cfg = self.accelerator, self.cfg
        if self.resume_from is not None:
            meta = checkpoint.read_meta(self.resume_from)
            checkpoint.check_resume(self.resume_from, meta, cfg, acc.num_processes)  # before any work
            checkpoint.load(acc, self.resume_from, extra=self.backend.load)
            if not same_on_all_ranks(self.state.step, self.device):  # collective, every rank
                raise checkpoint.CheckpointError(
                    f"the ranks resumed from different checkpoints (this one: {self.resume_from}); do all nodes "
                    f"see the same {self.run.checkpoints}? Pass --resume PATH to name one")
            self.stream.load_state_dict(self.state.data)
            self._apply_config()
        self._batches = None
        StopRequest.install()  # idempotent; launch/train.py installs it before building
        start = self._nonfinite_since = self.state.step
        self.rank0.open(start, cfg.to_yaml(), flat_hparams(cfg.to_dict()), cfg.log.project)
        for line in banner(self):  # rank 0: devices, precision and its source, models, data, resume point
            self.rank0.print(line)
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
            why = peer_failure(e) if acc.num_processes > 1 else None
            if why is not None:  # say it in words on every rank (and in status.json), not as a gloo/NCCL trace
                e = PeerError(f"rank {acc.process_index} at step {self.state.step}: {why} "
                              f"(train.collective_timeout={cfg.train.collective_timeout:g} s). The other rank's log "
                              f"says why; then --resume auto continues from the last checkpoint. "
                              f"[{str(e).splitlines()[0]}]")
            with contextlib.suppress(OSError):  # a full disk must not hide the error itself
                self.rank0.status("failed", self.state.step, f"{type(e).__name__}: {e}")
            if why is not None:
                raise e from None
            raise
        finally:
            self.rank0.close()

    def close(self) -> None:
        """Every rank, once, after ``fit`` (also after a failure): an explicit teardown, so that no rank can
        hang at exit. A process group left for the interpreter's exit to destroy can deadlock there
        (``~Reducer`` -> ``~ProcessGroupGloo`` joins a gloo thread that waits for the GIL), so: stop the
        loader's workers, drop every reference to the DDP-wrapped models and optimizers (ours and
        Accelerate's), end the trackers, destroy the process group, restore the signal handlers."""
        self.stream.close()
        self._batches = None
        self.rank0.close()
        acc = self.accelerator
        acc.end_training()
        self.G = self.D = self.backend = self.sched_G = self.sched_D = None
        acc.free_memory()  # Accelerate's own lists of prepared models and optimizers
        gc.collect()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        StopRequest.uninstall()


__all__ = ["Trainer", "TrainState", "NonFiniteError", "DivergenceError", "PeerError", "check_names", "preflight", "ShardError",
           "ConfigError"]
