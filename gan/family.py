"""Model families: what a kind of generative model brings to the training spine, and their registry.

The spine (trainer, backends, guard, checkpointer, stop policy, run directory, rank-zero writing) knows
networks only by name: a family says which networks it has, how each is optimized, and what one
training step does; the spine prepares the networks on its backend, runs the step, keeps the EMA copy,
checkpoints every part and decides when to stop. A family is one module that defines a
:class:`Family` subclass and registers it::

    from gan.family import Family, register_family

    @register_family
    class VAE(Family):
        name = "vae"
        sections = {"model": VAEModelConfig, "loss": VAELossConfig}
        ema = "vae"                       # or None
        ...

and one import line in :func:`_load_builtin` so the name is known before any config is read. The
experiment picks it with the top-level config key ``family`` (default ``gan``).

The contract, in short (docs/CONTRACTS.md has it in full):

- ``sections``: the config sections the family owns, name -> a dataclass validating itself in
  ``__post_init__`` (raising :class:`gan.config.ConfigError` naming the key). ``model`` is required:
  it is the architecture, compared on resume and written beside every export (``model.json``).
- :meth:`Family.build_networks`: every trained network by name, in a fixed order (that order numbers
  Accelerate's checkpoint files). Checkpoint parts are named after them (gan.rundir.parts_of):
  ``<name>`` (weights), ``opt_<name>``, ``sched_<name>``; plus ``ema`` (when ``ema`` names a
  network) and ``train_state``.
- ``unread_keys``: the spine's config keys the family ignores (the VAE: ``optim.lr_d``, ``optim.n_dis``,
  ...); a sweep over one of them is refused, as an unknown key is.
- :meth:`Family.optimizer`: each network's learning rate and betas (the optimizer kind, eps, weight
  decay and schedule are the spine's ``optim`` section, shared).
- :meth:`Family.train_step`: the ordered updates of one step through a :class:`StepContext`, each
  ``ctx.update(name, loss, stats)``: the family never calls backward or step.
- Batches are tuples from the data stream: ``(x, y)`` for ordinary shards (x float in [-1, 1], y
  int64 labels) and ``(a, b, y)`` for paired shards (input, target, label). The family unpacks.
- :meth:`Family.pictures`: the grid logged during training; :meth:`Family.generate` /
  :meth:`Family.example_inputs`: sampling, export and serving of the EMA (or only) network;
  :meth:`Family.bn_inputs` (optional): inputs for the EMA network's own BatchNorm statistics.
- :meth:`Family.modes` / :meth:`Family.mode_inputs` / :meth:`Family.mode_forward` (one block, "export and
  serving signature"): the ways the EMA network runs (:class:`Mode`: inputs and output), one exported
  program and one ``POST /<mode>`` each.

- Evaluation (one block, below): the family's metrics (:meth:`Family.metric_table`, names and which way
  is better), how they are measured (:meth:`Family.evaluate`, collective) and the pictures of
  launch/sample.py (:attr:`Family.sample_modes`, :meth:`Family.sample`).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import ClassVar, Protocol

import torch


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """One evaluation metric of a family: the value keys it writes (its own name first), which way is
    better (None: neither, e.g. the VAE's KL; such a metric is reported, never ``metrics.best_metric``), and
    how it is measured (one line)."""
    keys: tuple[str, ...]
    higher_is_better: bool | None
    what: str = ""


@dataclasses.dataclass
class SampleRequest:
    """What launch/sample.py asks a family to draw (see :meth:`Family.sample`)."""
    mode: str
    num: int | None = None  # None: the mode's default (:attr:`Family.sample_modes`)
    seed: int = 0
    classes: list[int] | None = None  # only these classes (where the mode has classes)
    shards: str = ""  # images the picture reads (real or held-out); "" = the family's default
    class_names: list[str] | None = None
    out: str = ""  # export: the folder


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    """One trained network's optimizer settings (the rest comes from the ``optim`` section)."""
    lr: float
    betas: tuple[float, float] = (0.5, 0.999)


class StepContext(Protocol):
    """What the spine hands to :meth:`Family.train_step` (gan.trainer implements it).

    - ``nets``: the prepared networks by name (DDP-wrapped or DeepSpeed engines): call them to forward.
    - ``step``: training steps done before this one (0-based); ``device``; ``batch_size`` per rank.
    - ``batch()``: the next batch of the data stream, on the device (see the module docstring); the
      spine counts the images drawn.
    - ``update(name, loss, stats, phase=None)``: backward, clip, optimizer step of network ``name``
      through the backend, then the guard's policy; ``stats`` (name -> scalar tensor or float) are
      logged, ``phase`` (default ``name``) names the update in the guard's messages and GradNorm/<phase>.
    - ``frozen(name)``: a context manager yielding network ``name`` frozen (no weight gradients, no
      gradient sync) for a phase that trains another network through it (the GAN's G phase through D).
    """
    nets: dict[str, torch.nn.Module]
    step: int
    device: torch.device
    batch_size: int

    def batch(self) -> tuple[torch.Tensor, ...]: ...

    def update(self, name: str, loss: torch.Tensor, stats: dict, phase: str | None = None) -> None: ...

    def frozen(self, name: str) -> contextlib.AbstractContextManager[torch.nn.Module]: ...


# ---------------------------------------------------------------- export and serving signature: types
@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One input or the output of a mode: ``shape`` starts with ``"N"`` (the batch, dynamic); ``kind`` is
    ``noise`` (z ~ N(0, I)), ``class`` (int64 indices), ``unused`` (int64 indices the network ignores: an
    unconditional VAE keeps the class in its signature; servers pass zeros) or ``image`` (float32 in [-1, 1])."""
    name: str
    dtype: str
    shape: tuple
    kind: str

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "kind": self.kind}


@dataclasses.dataclass(frozen=True)
class Mode:
    """A way to run the exported network: its name (the server's ``POST /<name>``), inputs and output."""
    name: str
    inputs: tuple[TensorSpec, ...]
    output: TensorSpec
    doc: str = ""

    def input(self, kind: str) -> TensorSpec | None:
        """The input of this kind, or None."""
        return next((t for t in self.inputs if t.kind == kind), None)

    def to_json(self) -> dict:
        return {"inputs": [t.to_json() for t in self.inputs], "output": self.output.to_json(), "doc": self.doc}

    @classmethod
    def from_json(cls, name: str, d: dict) -> "Mode":
        """The mode as artifact.json records it (:meth:`to_json`)."""
        spec = lambda t: TensorSpec(t["name"], t["dtype"], tuple(t["shape"]), t["kind"])  # noqa: E731
        return cls(name, tuple(spec(t) for t in d["inputs"]), spec(d["output"]), d.get("doc", ""))


def image_tensor(name: str, channels: int, size: int) -> TensorSpec:
    return TensorSpec(name, "float32", ("N", channels, size, size), "image")


def class_tensor(used: bool = True) -> TensorSpec:
    return TensorSpec("y", "int64", ("N",), "class" if used else "unused")


def noise_tensor(dim: int) -> TensorSpec:
    return TensorSpec("z", "float32", ("N", dim), "noise")
# ---------------------------------------------------------------- end of export and serving signature: types


class Family:
    """Base class of a model family; one instance per run, built from the whole config."""

    name: ClassVar[str] = ""
    sections: ClassVar[dict[str, type]] = {}  # config sections owned: name -> dataclass ("model" required)
    ema: ClassVar[str | None] = None  # the network the spine keeps an EMA copy of (samples, evaluation, export)
    # spine config keys (dotted) the family never reads: a sweep over one would train the same run at every
    # grid point, so gan.sweep refuses it before anything is submitted
    unread_keys: ClassVar[tuple[str, ...]] = ()
    paired: ClassVar[bool] = False  # reads (input, target) pairs: a shard error names `--source paired`

    def __init__(self, cfg):
        self.cfg = cfg

    # ---------------------------------------------------------------- building and checks
    def build_networks(self) -> dict[str, torch.nn.Module]:
        """Every trained network by name, freshly initialised (the spine seeds the RNG first)."""
        raise NotImplementedError

    def optimizer(self, name: str) -> OptimSpec:
        """Learning rate and betas of network ``name``."""
        raise NotImplementedError

    def check(self, manifest=None) -> None:
        """Before any work: every registered name in the family's sections exists, and (when given) the
        shards' manifest fits the model (channels, size, classes, paired or not). Raise ConfigError or
        ShardError naming the key and the fix."""

    # ---------------------------------------------------------------- training
    def train_step(self, ctx: StepContext) -> None:
        """One training step: the ordered updates, each ``ctx.update(name, loss, stats)``."""
        raise NotImplementedError

    # ---------------------------------------------------------------- pictures, sampling, export
    def pictures(self, net: torch.nn.Module, device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The picture logged every ``log.sample_every`` steps (rank 0, under no_grad), from ``net``, the
        EMA (or only) network: (images in [-1, 1], the grid row of each, the number of rows). The same
        inputs every time (seed them from ``train.seed`` with a local torch.Generator)."""
        raise NotImplementedError

    def picture_grid(self, net: torch.nn.Module, device) -> torch.Tensor | None:
        """A picture laid out by the family instead of :meth:`pictures`' per-class grid (pix2pix's input |
        output | target rows): uint8 (C, H, W), rank 0, under no_grad. None (the default): use :meth:`pictures`."""
        return None

    def generate(self, net: torch.nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from the exported network and its inputs (see :meth:`example_inputs`)."""
        return net(*inputs)

    def bn_inputs(self, seed: int) -> list[tuple[torch.Tensor, ...]] | None:
        """Inputs of the EMA network on which the spine recomputes its BatchNorm running statistics for
        its own weights (gan.ema): CPU argument tuples, one per forward pass (batches of
        ``gan.ema.BN_BATCH``), drawn from ``seed`` with a local torch.Generator, so the statistics are a
        function of the EMA's weights alone. None (the default): the EMA copies the network's statistics."""
        return None

    def example_inputs(self, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Inputs of the exported network for a batch of ``batch`` (CPU, drawn from ``seed`` with a local
        generator): its export and serving signature (the GAN: ``(z, class)``; translation: ``(image,)``)."""
        raise NotImplementedError

    # ================================================================ export and serving signature
    # (gan.export writes one program per mode; gan.serve answers POST /<mode>; docs/CONTRACTS.md)
    def modes(self) -> tuple[Mode, ...]:
        """The ways the exported (EMA) network is run, the first the default: each mode's inputs (batch
        dimension ``N`` dynamic) and output. The GAN: ``generate`` (z, class); the VAE: ``generate`` and
        ``reconstruct``; pix2pix: ``translate``."""
        raise NotImplementedError

    def mode_inputs(self, mode: str, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Inputs of ``mode`` for a batch of ``batch`` (CPU, drawn from ``seed`` with a local generator):
        what the export traces, checks parity on and (noise and classes only) calibrates int8 with."""
        raise NotImplementedError

    def mode_forward(self, net: torch.nn.Module, mode: str) -> torch.nn.Module:
        """A module whose ``forward(*inputs)`` runs ``mode`` on ``net`` (the eval-mode EMA network):
        images in [-1, 1]. It is what gets exported, so it holds ``net`` as a submodule."""
        raise NotImplementedError

    def mode(self, name: str) -> Mode:
        """The mode called ``name``; KeyError naming the family's modes otherwise."""
        for m in self.modes():
            if m.name == name:
                return m
        raise KeyError(f"family {self.name} has no mode {name!r}; its modes: {', '.join(m.name for m in self.modes())}")
    # ================================================================ end of export and serving signature

    # ================================================================ evaluation and offline pictures
    # (gan.metrics, evaluation during training, launch/evaluate.py, launch/sample.py). Every family
    # names its metrics and measures them itself; the spine reduces nothing but what ``evaluate`` returns.
    sample_modes: ClassVar[dict[str, int]] = {}  # launch/sample.py --mode -> default --num (0: none)

    @classmethod
    def metric_table(cls) -> dict[str, MetricSpec]:
        """Every metric this family can compute: name -> :class:`MetricSpec` (none: no evaluation)."""
        return {}

    @classmethod
    def default_metrics(cls, cfg) -> str:
        """``metrics.metrics`` when the config leaves it empty (comma-separated)."""
        return ""

    @classmethod
    def parse_metrics(cls, spec: str | list | tuple) -> list[str]:
        """"a, b" -> ["a", "b"] (deduplicated); ValueError naming unknown ones and this family's valid ones."""
        from gan.metrics.names import parse_metrics

        return parse_metrics(spec, cls.metric_table(), cls.name)

    @classmethod
    def metric_keys(cls, names: list[str]) -> list[str]:
        """The value keys the metrics ``names`` write (candidates for ``metrics.best_metric``)."""
        table = cls.metric_table()
        return [k for n in names for k in table[n].keys]

    @classmethod
    def ranked_keys(cls, names: list[str]) -> list[str]:
        """The keys of ``names`` that have a better side (what ``metrics.best_metric`` may name)."""
        table = cls.metric_table()
        return [k for n in names if table[n].higher_is_better is not None for k in table[n].keys]

    @classmethod
    def better(cls, key: str, new: float, old: float | None) -> bool:
        """Is ``new`` an improvement over ``old`` for value key ``key`` ("<metric>" or "<metric>/<part>")?"""
        if old is None:
            return True
        base = key.split("/")[0]
        up = next((m.higher_is_better for m in cls.metric_table().values() if base in m.keys), False)
        return new > old if up else new < old

    def eval_shards(self) -> str:
        """The shards evaluation reads by default: ``val.shards`` where the family has a ``val`` section and it
        is set (the VAE's, pix2pix's held-out split), else ``data.shards`` (the GAN: its real images)."""
        val = getattr(self.cfg, "val", None)
        return getattr(val, "shards", "") or self.cfg.data.shards

    def shards_key(self, shards: str, flag: str) -> str:
        """The config key that names ``shards`` (``val.shards`` or ``data.shards``), else ``flag`` (the command
        line's): what a shard error names."""
        val = getattr(getattr(self.cfg, "val", None), "shards", "")
        return "val.shards" if val and shards == val else "data.shards" if shards == self.cfg.data.shards else flag

    def eval_preflight(self, request) -> dict:
        """Not a collective. Every check an evaluation of ``request`` (gan.metrics.EvalRequest) can make
        before any work: shards, counts, weights files. Raises MetricError naming the fix."""
        raise NotImplementedError

    def evaluate(self, net: torch.nn.Module, request, device) -> tuple[dict, dict]:
        """Collective (every rank calls it with the same network): ``(values, details)`` of the metrics in
        ``request.names``, the same on every rank. Each rank measures its own part of the samples; only
        float64 statistics cross ranks (gan.metrics.collective)."""
        raise NotImplementedError

    def sample(self, net: torch.nn.Module | None, request: SampleRequest, device) -> torch.Tensor:
        """launch/sample.py's picture of ``request.mode`` as uint8 (C, H, W) (``export`` writes the folder
        ``request.out`` and returns an empty tensor). ``net`` is the EMA network in eval mode."""
        raise NotImplementedError

    def curves(self, metrics_jsonl, out, title: str = ""):
        """launch/sample.py --mode curves: the run's curves from its metrics.jsonl as a PNG at ``out``."""
        from gan.sampling import curves_png

        return curves_png(metrics_jsonl, out, title)


FAMILIES: dict[str, type[Family]] = {}


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator: make ``cls`` selectable as ``family: <cls.name>``."""
    if not cls.name or "model" not in cls.sections:
        raise TypeError(f"family {cls.__name__} needs a name and a 'model' section")
    FAMILIES[cls.name] = cls
    return cls


def _load_builtin() -> None:
    """The families that ship with the project: one import line each (they register themselves)."""
    import gan.families.gan.family  # noqa: F401
    import gan.families.pix2pix.family  # noqa: F401
    import gan.families.vae.family  # noqa: F401


def family_names() -> list[str]:
    _load_builtin()
    return sorted(FAMILIES)


def get_family(name: str) -> type[Family]:
    """The family class registered as ``name``; ConfigError listing the registered ones otherwise."""
    _load_builtin()
    if name not in FAMILIES:
        from gan.config import ConfigError

        raise ConfigError(f"config key 'family': '{name}' is not a registered model family; one of: "
                          f"{', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def build_family(cfg) -> Family:
    """The family of ``cfg`` (its ``family`` key), built from the whole config."""
    return get_family(cfg.family)(cfg)


__all__ = ["Family", "FAMILIES", "OptimSpec", "StepContext", "register_family", "get_family", "build_family",
           "family_names", "MetricSpec", "SampleRequest", "Mode", "TensorSpec", "image_tensor", "class_tensor",
           "noise_tensor"]
