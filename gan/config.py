"""Typed, validated experiment configuration.

One dataclass per component, each validating itself in ``__post_init__``. Values are
resolved as defaults < YAML file(s) < dotted command-line overrides (``optim.lr_d=1e-4``).
A YAML file may name a ``base:`` file (relative to itself) that it extends.
Every error is a :class:`ConfigError` that names the key, raised before any work starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import keyword
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration: the message names the key and the fix."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


@dataclass
class DataConfig:
    shards: str = "data/shards/cifar10-train"  # directory holding manifest.json + *.tar
    dataset: str = ""  # expected manifest dataset name ("" accepts any)
    num_workers: int = 4  # loader worker processes per rank
    shuffle_buffer: int = 2000  # samples in each worker's shuffle buffer
    hflip: bool = True  # random horizontal flip (train only)
    color_jitter: float = 0.0  # brightness/contrast/saturation strength, 0 = off
    translate: float = 0.0  # max shift as a fraction of the image size, 0 = off
    on_device: bool = False  # keep the whole uint8 data set on the training device, batches made there (gan/data/device.py)
    on_device_budget: float = 0.5  # with on_device: largest share of the device's free memory the data may take

    def __post_init__(self):
        _check(bool(self.shards), "data.shards", "must name a shard directory")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
        _check(0.0 <= self.color_jitter <= 1.0, "data.color_jitter", "must be in [0, 1]")
        _check(0.0 <= self.translate < 0.5, "data.translate", "must be in [0, 0.5)")
        _check(0.0 < self.on_device_budget <= 1.0, "data.on_device_budget", "must be in (0, 1]")


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | adamw | rmsprop (both nets)
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    betas_g: list = field(default_factory=lambda: [0.5, 0.999])  # Adam/AdamW betas of G
    betas_d: list = field(default_factory=lambda: [0.5, 0.999])  # Adam/AdamW betas of D
    eps: float = 1e-8
    weight_decay: float = 0.0
    n_dis: int = 1  # D steps per G step
    grad_clip: float = 0.0  # max grad norm, 0 = no clipping (norms are still logged)
    lr_schedule: str = "constant"  # constant | linear | cosine | step | exponential
    lr_decay_start: int = 0  # linear/cosine: G steps at full rate before decaying to 0 at train.max_steps
    lr_step_every: int = 10000  # step/exponential: the rate is multiplied by lr_gamma every this many steps
    lr_gamma: float = 0.5

    def __post_init__(self):
        _check(self.name in ("adam", "adamw", "rmsprop"), "optim.name",
               f"'{self.name}' is not one of: adam, adamw, rmsprop")
        _check(math.isfinite(self.lr_g) and self.lr_g > 0, "optim.lr_g", f"must be a finite number > 0, got {self.lr_g}")
        _check(math.isfinite(self.lr_d) and self.lr_d > 0, "optim.lr_d", f"must be a finite number > 0, got {self.lr_d}")
        for key in ("betas_g", "betas_d"):
            betas = getattr(self, key)
            _check(len(betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas),
                   f"optim.{key}", f"must be two numbers in [0, 1), got {betas!r}")
        _check(self.eps > 0, "optim.eps", "must be > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(self.n_dis >= 1, "optim.n_dis", "must be >= 1")
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
        _check(self.lr_schedule in ("constant", "linear", "cosine", "step", "exponential"), "optim.lr_schedule",
               f"'{self.lr_schedule}' is not one of: constant, linear, cosine, step, exponential")
        _check(self.lr_decay_start >= 0, "optim.lr_decay_start", "must be >= 0")
        _check(self.lr_step_every >= 1, "optim.lr_step_every", "must be >= 1")
        _check(0 < self.lr_gamma <= 1, "optim.lr_gamma", "must be in (0, 1]")


@dataclass
class EMAConfig:
    """How the EMA generator follows G (gan.ema). ``rampup``: the EMA's half-life is
    ``min(half_life_kimg * 1000, rampup * images seen)`` images (stylegan2-ada's ema_kimg/ema_rampup), so
    an early EMA tracks G closely and a late one averages over ``half_life_kimg``. ``warmup``: the decay
    ramps as ``min(decay, (1+n)/(10+n))`` for ``warmup_steps`` updates, then is ``decay``. ``bn_samples``:
    the EMA's BatchNorm running statistics are recomputed for its own weights, over this many of the
    family's inputs (the GAN: fixed-seed z, classes in turn, batches of 256), whenever it is read after
    updates; 0 = copy G's statistics (as the families without such inputs, the VAE and pix2pix, do)."""
    schedule: str = "rampup"  # rampup | warmup
    half_life_kimg: float = 44.3  # rampup: the longest half-life, in thousands of G images (44.3 = decay 0.999 at batch 64)
    rampup: float = 0.05  # rampup: half-life as a fraction of the images seen so far (0 = always half_life_kimg)
    decay: float = 0.999  # warmup: the decay per update after warm-up
    warmup_steps: int = 1000  # warmup: decay ramps as min(decay, (1+s)/(10+s)) until then
    bn_samples: int = 2048  # inputs on which the EMA's BatchNorm statistics are recomputed (0 = copy G's)

    def __post_init__(self):
        _check(self.schedule in ("rampup", "warmup"), "ema.schedule", f"'{self.schedule}' is not one of: rampup, warmup")
        _check(math.isfinite(self.half_life_kimg) and self.half_life_kimg >= 0, "ema.half_life_kimg",
               "must be a number >= 0 (0 = the EMA is a copy of G)")
        _check(math.isfinite(self.rampup) and 0 <= self.rampup <= 1, "ema.rampup",
               "must be in [0, 1] (a fraction of the images seen; 0 = no ramp-up)")
        _check(0 <= self.decay < 1, "ema.decay", "must be in [0, 1)")
        _check(self.warmup_steps >= 0, "ema.warmup_steps", "must be >= 0")
        _check(self.bn_samples >= 0, "ema.bn_samples",
               "must be >= 0 (inputs for the EMA's own BatchNorm statistics; 0 = copy G's statistics)")


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps between checkpoints (one is always written at the end)
    keep: int = 3  # newest checkpoints kept on disk

    def __post_init__(self):
        _check(self.every >= 1, "checkpoint.every", "must be >= 1")
        _check(self.keep >= 1, "checkpoint.keep", "must be >= 1")


@dataclass
class LogConfig:
    every: int = 50  # steps between scalar logs
    sample_every: int = 500  # steps between fixed-noise sample grids
    samples_per_class: int = 8
    progress: bool = True  # progress bar on rank 0
    with_: str = "tensorboard"  # YAML key `with`: trackers, comma list of tensorboard, wandb, mlflow, aim ("" = none)
    project: str = "gan-train"  # experiment/project name for mlflow and wandb

    def __post_init__(self):
        _check(self.every >= 1, "log.every", "must be >= 1")
        _check(self.sample_every >= 1, "log.sample_every", "must be >= 1")
        _check(self.samples_per_class >= 1, "log.samples_per_class", "must be >= 1")
        unknown = [n for n in self.with_.split(",") if n.strip() and n.strip().lower() not in
                   ("tensorboard", "wandb", "mlflow", "aim")]
        _check(not unknown, "log.with", f"unknown tracker(s) {unknown}; use a comma list of tensorboard, wandb, "
                                        f"mlflow, aim ('' for none)")
        _check(bool(self.project), "log.project", "must name the project (mlflow experiment, wandb project)")


@dataclass
class TrainConfig:
    max_steps: int = 100_000  # G steps
    batch_size: int = 64  # per process
    seed: int = 0
    mixed_precision: str = "auto"  # auto (bf16 on a GPU that has it, else no) | no | fp16 | bf16
    deterministic: bool = False  # cuDNN deterministic, benchmark off
    on_nonfinite: str = "stop"  # stop | skip
    max_skipped: int = 100  # with on_nonfinite=skip: stop after this many skipped steps
    channels_last: bool = False  # NHWC memory format for G, D and batches (faster convs on GPUs)
    compile: bool = False  # torch.compile G and D (Accelerate's dynamo backend "inductor")
    max_minutes: float = 0.0  # stop (checkpointed, "finished") after this much training wall-clock, summed over resumes; 0 = off
    stop_check_every: int = 10  # multi-process: steps between the ranks' agreement on a stop signal
    backend: str = "ddp"  # ddp (Accelerate DDP + AMP) | deepspeed (ZeRO engines for G and D; section deepspeed)
    collective_timeout: float = 600.0  # seconds a collective may wait for a stalled or vanished peer before every rank fails
    # Divergence (0 = off). An update whose gradient norm (before clipping) is above max_grad_norm is
    # treated like a non-finite one (train.on_nonfinite); a loss or weight above its limit stops the run.
    max_grad_norm: float = 1e6
    max_loss: float = 1e6  # largest |loss| of any update (checked each log interval and before each checkpoint)
    max_abs_weight: float = 1e4  # largest |weight| in G, D or the EMA G (same checks)

    def __post_init__(self):
        _check(self.max_steps >= 1, "train.max_steps", "must be >= 1")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.mixed_precision in ("auto", "no", "fp16", "bf16"), "train.mixed_precision",
               f"'{self.mixed_precision}' is not one of: auto, no, fp16, bf16")
        _check(self.on_nonfinite in ("stop", "skip"), "train.on_nonfinite",
               f"'{self.on_nonfinite}' is not one of: stop, skip")
        _check(self.max_skipped >= 0, "train.max_skipped", "must be >= 0")
        _check(self.max_minutes >= 0, "train.max_minutes", "must be >= 0 (0 = no time budget)")
        _check(self.stop_check_every >= 1, "train.stop_check_every", "must be >= 1")
        _check(0 <= self.seed < 2**32, "train.seed", f"must be in [0, 2**32) (NumPy's seed range), got {self.seed}")
        _check(math.isfinite(self.collective_timeout) and self.collective_timeout > 0, "train.collective_timeout",
               "must be a number of seconds > 0")
        for key in ("max_grad_norm", "max_loss", "max_abs_weight"):
            _check(getattr(self, key) >= 0, f"train.{key}", "must be >= 0 (0 = no limit)")
        _check(self.backend in ("ddp", "deepspeed"), "train.backend", f"'{self.backend}' is not one of: ddp, deepspeed")


# DeepSpeed settings that come from our own config keys; a deepspeed.config file must not set them.
DEEPSPEED_OWNED = {
    "optimizer": "optim.name/lr_g/lr_d/betas_*/eps/weight_decay (a torch optimizer is handed to DeepSpeed)",
    "scheduler": "optim.lr_schedule (stepped once per G step, not once per engine step)",
    "fp16": "train.mixed_precision=fp16", "bf16": "train.mixed_precision=bf16",
    "train_batch_size": "train.batch_size", "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "train.batch_size (one micro-batch per step)",
    "gradient_clipping": "optim.grad_clip",
}


@dataclass
class DeepSpeedConfig:
    """Used with ``train.backend=deepspeed``: G and D each become a ZeRO engine."""
    stage: int = 2  # ZeRO stage: 1 (optimizer states partitioned) or 2 (+ gradients partitioned)
    offload_optimizer: bool = False  # optimizer states and step on the CPU (ZeRO-Offload)
    config: str = ""  # JSON with everything else (bucket sizes, overlap_comm, ...); "" = DeepSpeed's defaults

    def __post_init__(self):
        _check(self.stage in (1, 2), "deepspeed.stage",
               f"{self.stage} is not supported: use 1 or 2 (stage 3 partitions the weights, which the EMA "
               f"of G and the cross-engine D(G(z)) of the G phase read whole on every rank)")
        if self.config:
            self.settings()  # exists, parses, owns none of our keys: fail now, not when the engines are built

    def settings(self) -> dict:
        """The JSON file's settings (checked), or {} without one."""
        if not self.config:
            return {}
        import json

        path = Path(self.config)
        _check(path.is_file(), "deepspeed.config", f"file not found: {path}. Use configs/deepspeed/zero1.json or "
                                                     f"zero2.json, or leave it empty for DeepSpeed's defaults")
        try:
            values = json.loads(path.read_text())
        except (ValueError, OSError) as e:
            raise ConfigError(f"config key 'deepspeed.config': {path} is not valid JSON ({e}); fix the file "
                              f"or point deepspeed.config at configs/deepspeed/zero2.json") from None
        _check(isinstance(values, dict), "deepspeed.config", f"{path} must hold a JSON object, not {type(values).__name__}")
        owned = [f"'{k}' (set {DEEPSPEED_OWNED[k]} instead)" for k in values if k in DEEPSPEED_OWNED]
        _check(not owned, "deepspeed.config", f"{path} sets {', '.join(owned)}; remove them from the file")
        stage = values.get("zero_optimization", {}).get("stage", self.stage)
        _check(stage == self.stage, "deepspeed.config",
               f"{path} says zero_optimization.stage={stage} but deepspeed.stage={self.stage}; make them agree "
               f"(deepspeed.stage=... on the command line, or the file for that stage)")
        return values


@dataclass
class MetricsConfig:
    """Evaluation during training (gan.metrics) of the family's EMA network, every ``every`` steps. The
    metric names are the family's (``Family.metric_table``); they are checked once the family is known."""
    every: int = 0  # steps between evaluations, 0 = off
    num_samples: int = 5000  # generated images per evaluation (the GAN: class-balanced; the VAE: prior samples for fid)
    metrics: str = ""  # comma-separated names of the family's metrics; "" = the family's default (GAN: cls_fd,cls_acc)
    best_metric: str = ""  # key that picks RUN/best/ (e.g. fid, cls_fd, bits_per_dim, l1); "" = first of `metrics`
    patience: int = 0  # stop after this many evaluations without improvement, 0 = never
    inception_weights: str = ""  # torch-fidelity's weights-inception-2015-12-05-6726825d.pth (fid/isc/kid/prc)
    classifier: str = ""  # cls_* classifier weights, "" = gan/metrics/assets/cifar10_classifier.safetensors
    batch_size: int = 100  # generation / feature-extraction batch
    kid_subset_size: int = 1000
    isc_splits: int = 10
    cache_dir: str = ""  # real-statistics cache, "" = $GAN_METRICS_CACHE or ~/.cache/gan-metrics

    def __post_init__(self):
        _check(self.every >= 0, "metrics.every", "must be >= 0 (0 = no evaluation during training)")
        _check(self.num_samples >= 1, "metrics.num_samples", "must be >= 1")
        _check(self.patience >= 0, "metrics.patience", "must be >= 0 (0 = no early stopping)")
        _check(self.patience == 0 or self.every > 0, "metrics.patience", "needs metrics.every > 0")
        _check(self.batch_size >= 1, "metrics.batch_size", "must be >= 1")
        _check(self.kid_subset_size >= 2, "metrics.kid_subset_size", "must be >= 2")
        _check(self.isc_splits >= 1, "metrics.isc_splits", "must be >= 1")

    def resolve(self, family, cfg) -> None:
        """The names against ``family``'s metrics (the empty default becomes the family's), best_metric
        against their keys, the sample count against what they need. ConfigError naming the key."""
        from gan.metrics.names import count_problems

        if not family.metric_table():  # a family without evaluation
            _check(not self.every and not self.metrics, "metrics.every" if self.every else "metrics.metrics",
                   f"family {family.name} defines no evaluation metrics; leave metrics.every at 0 and "
                   f"metrics.metrics empty")
            return
        try:
            names = family.parse_metrics(self.metrics or family.default_metrics(cfg))
        except ValueError as e:
            raise ConfigError(f"config key 'metrics.metrics': {e}") from None
        self.metrics = ",".join(names)
        keys = family.ranked_keys(names)  # a metric with no better side (the VAE's kl) picks no best
        if not self.best_metric and keys:
            self.best_metric = keys[0]
        _check(not self.best_metric or self.best_metric in keys, "metrics.best_metric",
               f"'{self.best_metric}' is not a ranked metric computed by metrics.metrics={self.metrics!r}; "
               f"one of: {', '.join(keys) or '(none)'}")
        _check(not self.patience or self.best_metric, "metrics.patience",
               f"early stopping needs a ranked metric in metrics.metrics={self.metrics!r} (kl has no better side)")
        problems = count_problems(names, self.num_samples, self.kid_subset_size, self.isc_splits)
        _check(not problems, "metrics.num_samples", "; ".join(problems))


@dataclass
class Config:
    family: str = "gan"  # the model family (gan.family.FAMILIES); it owns the sections it names (GAN: model, loss)
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = None  # the family's sections, built by __post_init__ from the family's defaults when not given
    loss: Any = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def __post_init__(self):
        from gan.family import get_family

        _check(isinstance(self.family, str), "family", f"must name a model family, got {self.family!r}")
        family = get_family(self.family)  # ConfigError listing the families
        for name, cls in family.sections.items():
            if getattr(self, name, None) is None:
                setattr(self, name, cls())
        self.metrics.resolve(family, self)  # metric names are the family's
        if self.train.backend == "deepspeed":
            for problem in deepspeed_problems(self):
                raise ConfigError(problem)

    def family_sections(self) -> dict:
        """The family's config sections by name (the GAN: model, loss)."""
        from gan.family import get_family

        return {name: getattr(self, name) for name in get_family(self.family).sections}

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values.update(self.family_sections())  # a family may own sections beyond model and loss
        return _keyword_keys({k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                              for k, v in values.items() if v is not None})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def deepspeed_problems(cfg: Config) -> list[str]:
    """Why ``train.backend=deepspeed`` can't run ``cfg``: each entry names the key, the reason and the fix."""
    import importlib.util

    out = []
    if importlib.util.find_spec("deepspeed") is None:
        out.append("config key 'train.backend': deepspeed is not installed in this environment. Install it with "
                   "pip install 'gan-train[deepspeed]' (tested: deepspeed==0.19.8), or use train.backend=ddp")
    if cfg.optim.name == "rmsprop":
        out.append("config key 'optim.name': rmsprop with train.backend=deepspeed is refused: ZeRO supports "
                   "Adam/AdamW (DeepSpeed marks other optimizers untested). Use optim.name=adam or adamw, "
                   "or train.backend=ddp")
    if cfg.train.compile:
        out.append("config key 'train.compile': torch.compile with train.backend=deepspeed is refused: the engines "
                   "wrap G and D themselves and this combination is untested here. Use train.compile=false, or "
                   "train.backend=ddp")
    return out


# ---------------------------------------------------------------------------- loading


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return isinstance(value, tp)


class _Override:
    """A command-line value: its YAML reading, and the raw text for string-typed keys
    (YAML 1.1 reads ``no``/``off``/``yes`` as booleans: ``train.mixed_precision=no`` must stay "no")."""

    def __init__(self, text: str, parsed: Any):
        self.text, self.parsed = text, parsed


def _keyword_keys(d: dict) -> dict:
    """Fields named after a Python keyword plus "_" (``with_``) are written as the keyword (``with``)."""
    return {(k[:-1] if k.endswith("_") and keyword.iskeyword(k[:-1]) else k):
            (_keyword_keys(v) if isinstance(v, dict) else v) for k, v in d.items()}


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if cls is Config:  # the family's sections take the family's types (and may add sections)
        from gan.family import get_family

        family = values.get("family", "gan")
        family = family.text if isinstance(family, _Override) else family
        sections = get_family(family).sections if isinstance(family, str) else {}
        hints.update(sections)
        names += [n for n in sections if n not in names]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if keyword.iskeyword(key) and key + "_" in names:  # log.with -> LogConfig.with_
            key = key + "_"
        if key not in names:
            shown = list(_keyword_keys(dict.fromkeys(names)))
            near = difflib.get_close_matches(key, shown, n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(prefix + n for n in near)}?" if near else ""
            raise ConfigError(f"unknown config key '{dotted}'.{hint} "
                              f"Valid keys here: {', '.join(prefix + n for n in shown)}")
        tp = hints[key]
        if isinstance(value, _Override):
            value = value.text if tp is str else value.parsed
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' is a section; give it a mapping, not {value!r}")
            kwargs[key] = _build(tp, value, dotted + ".")
            continue
        if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if not _type_ok(value, tp):
            tname = getattr(tp, "__name__", str(tp))
            hint = " (YAML reads unquoted yes/no/on/off as booleans: quote the value)" if (
                tp is str and isinstance(value, bool)) else ""
            raise ConfigError(f"config key '{dotted}' must be of type {tname}, got {value!r} "
                              f"({type(value).__name__}){hint}")
        if tp is float and isinstance(value, int):
            value = float(value)
        kwargs[key] = value
    fields = {f.name for f in dataclasses.fields(cls)}
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in fields}  # a family's own further sections
    out = cls(**kwargs)
    for k, v in extra.items():
        setattr(out, k, v)
    return out


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a config YAML file, following ``base:`` links (relative to the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}. Pass an existing file, e.g. configs/cifar10_cdcgan.yaml")
    if path.resolve() in _seen:
        raise ConfigError(f"config file {path} includes itself through 'base:'")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if raw is None:  # an empty file would silently mean "all defaults"
        raise ConfigError(f"config file {path} is empty. Give it at least a 'base:' line and the keys that "
                          f"differ, e.g. 'base: base.yaml' (see configs/)")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is not None:
        raw = _merge(read_yaml(path.parent / base, _seen + (path.resolve(),)), raw)
    return raw


def parse_overrides(overrides: list[str]) -> dict:
    """``["optim.lr_d=1e-4", "train.seed=3"]`` -> nested dict of values parsed as YAML scalars
    (kept as raw text for string-typed keys when the config is built)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value, e.g. optim.lr_d=1e-4")
        key, _, text = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}' has an empty key part")
        try:
            parsed = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            parsed = text
        value = _Override(text.strip(), parsed)
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override of '{p}'")
        node[parts[-1]] = value
    return out


def from_dict(values: dict) -> Config:
    try:
        return _build(Config, values, "")
    except ConfigError:
        raise
    except TypeError as e:  # e.g. missing positional in a nested class
        raise ConfigError(str(e)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """defaults < YAML file (with its ``base:`` chain) < dotted overrides."""
    values = read_yaml(path) if path is not None else {}
    values = _merge(values, parse_overrides(list(overrides)))
    return from_dict(values)


def __getattr__(name: str):
    """The GAN family's sections, where they were before families (``from gan.config import ModelConfig``)."""
    if name in ("ModelConfig", "LossConfig"):
        from gan.families.gan import config

        return getattr(config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
