"""A run directory as evaluation sees it: its config, the EMA generator of a checkpoint (or export),
and ``metrics.json`` (merged, written atomically) + TensorBoard scalars ``Eval/<name>``."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gan.config import Config, ConfigError, from_dict, load_config
from gan.metrics.errors import MetricError
from gan.metrics.names import FIDELITY
from gan.rundir import CheckpointError, RunDir, read_meta, verify

if TYPE_CHECKING:
    from gan.family import Family


@dataclasses.dataclass
class LoadedGenerator:
    G: torch.nn.Module  # the family's EMA network (the GAN's and pix2pix's G, the VAE), eval mode
    cfg: Config  # the run's config (config.yaml), model section as the weights were written
    step: int | None
    source: Path  # checkpoint dir or .safetensors file
    label: str  # "step-00000006", "export", "best" ...
    family: Family | None = None  # the run's family (gan.family), built from ``cfg``: generate(), example_inputs() ...
    net: str = "ema"  # which copy: "ema", or "trained" (the network's own weights; its label ends in "-trained")


def run_config(run_dir: Path) -> Config:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MetricError(f"run directory not found: {run_dir}. Pass the --run-dir of a launch/train.py run")
    path = RunDir(run_dir).config
    if not path.is_file():
        raise MetricError(f"{run_dir} is not a run directory (no config.yaml); pass the --run-dir of a "
                          f"launch/train.py run")
    return load_config(path)


def _model_diff(saved: dict, cfg: Config) -> list[str]:
    ours = dataclasses.asdict(cfg.model)
    return [f"model.{k}: weights {saved.get(k)!r}, run config {v!r}" for k, v in ours.items() if k in saved
            and saved.get(k) != v] + [f"model.{k}: weights {v!r}, unknown to this code" for k, v in saved.items()
                                      if k not in ours]


def resolve_source(run_dir: Path, checkpoint: str | Path | None) -> Path:
    """--checkpoint, else the newest checkpoint that verifies, else export/G_ema.safetensors."""
    if checkpoint:
        p = Path(checkpoint)
        if not p.exists():
            raise MetricError(f"checkpoint not found: {p}. Pass a checkpoints/step-XXXXXXXX directory or a "
                              f"G_ema.safetensors export")
        return p
    run = RunDir(run_dir)
    latest, skipped = run.newest_valid()
    for line in skipped:
        print(f"warning: skipped a damaged checkpoint: {line}", file=sys.stderr)
    if latest is not None:
        return latest
    if run.export_weights.is_file():
        return run.export_weights
    raise MetricError(f"{run_dir} has no complete checkpoint (checkpoints/step-*/ with meta.json) and no "
                      f"export/G_ema.safetensors: train it first (launch/train.py --run-dir {run_dir}) or pass "
                      f"--checkpoint PATH")


NETS = ("ema", "trained")  # launch/evaluate.py's and sample.py's --net: which copy of the family's ema network


def load_generator(run_dir: str | Path, checkpoint: str | Path | None = None, device="cpu",
                   net: str = "ema") -> LoadedGenerator:
    """The eval-mode EMA network of a run (its family's ``ema`` network: the GAN's G, the VAE, pix2pix's
    G), from a checkpoint or an export; ``net="trained"``: that network's own weights as training left
    them, from a checkpoint (verified first; an export holds only the EMA). Raises MetricError/CheckpointError
    with the fix."""
    from safetensors.torch import load_file

    from gan.checkpoint import ema_state, trained_state
    from gan.family import build_family, get_family

    if net not in NETS:
        raise MetricError(f"--net {net}: one of {', '.join(NETS)}")
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    ema = get_family(cfg.family).ema
    if ema is None:
        raise MetricError(f"family {cfg.family} keeps no EMA network to sample, evaluate or export")
    src = resolve_source(run_dir, checkpoint)
    if net == "trained" and not src.is_dir():
        where = (f"{src} is an export" if checkpoint else
                 f"{run_dir} has no checkpoint that verifies, only the export {src}")
        raise CheckpointError(f"--net trained reads the trained network from a checkpoint, and {where} (the EMA "
                              f"network alone); pass --checkpoint RUN/checkpoints/step-XXXXXXXX, or drop --net trained")
    if src.is_dir():
        # the trained network is read as a resume reads it: verified (resolve_source's own pick already is)
        meta = verify(src) if net == "trained" and checkpoint else read_meta(src)
        saved_model = meta.get("config", {}).get("model", {})
        step, label = meta.get("step"), src.name + ("-trained" if net == "trained" else "")
        if meta.get("family", "gan") != cfg.family:
            raise CheckpointError(f"{src} is a checkpoint of a {meta.get('family', 'gan')} run, but the run's "
                                  f"config.yaml is a {cfg.family} run. Pass a checkpoint of this run")
        state = trained_state(src, meta, ema) if net == "trained" else ema_state(src, meta)
    elif src.suffix == ".safetensors":
        spec_path = src.with_name("model.json")
        if not spec_path.is_file():
            raise CheckpointError(f"{src} has no model.json beside it, so its architecture is unknown")
        spec = json.loads(spec_path.read_text())
        saved_model, step, label = spec.get("model", {}), spec.get("step"), src.parent.name
        saved_family = spec.get("family", "gan")  # written before families: a GAN's
        if saved_family != cfg.family:
            raise CheckpointError(f"{src} holds a {saved_family} network (its model.json), but the run's config.yaml "
                                  f"is a {cfg.family} run. Pass an export of this run, or the run it belongs to")
        state = load_file(str(src))
    else:
        raise MetricError(f"{src} is neither a checkpoints/step-XXXXXXXX directory nor a .safetensors export")
    diff = _model_diff(saved_model, cfg)
    if diff:
        raise CheckpointError(f"{src} was written for a different architecture than the run's config.yaml "
                              f"({'; '.join(diff)}). Pass a checkpoint of this run, or the run it belongs to")
    try:
        cfg = from_dict({**cfg.to_dict(), "model": {**dataclasses.asdict(cfg.model), **saved_model}})
    except ConfigError as e:
        raise CheckpointError(f"{src}: its model config is not valid here ({e})") from None
    family = build_family(cfg)
    G = family.build_networks()[ema]
    try:
        G.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"the weights in {src} do not fit the {cfg.family} run's {ema} network "
                              f"(config.yaml: {first} ...). Pass a checkpoint of this run") from None
    return LoadedGenerator(G.to(device).eval().requires_grad_(False), cfg, step, src, label, family, net)


# ---------------------------------------------------------------------------- outputs


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _clean(v):
    return v if not isinstance(v, float) or math.isfinite(v) else str(v)


def merge_metrics_json(path: str | Path, label: str, step: int | None, source: str, values: dict,
                       details: dict, net: str = "ema") -> dict:
    """Merge one evaluation into ``path`` ({"format": 1, "evaluations": {label: {...}}}), atomically.
    Values of the same label are updated key by key, so separate runs of fid and cls_acc combine. ``net``:
    the network measured (:data:`NETS`); a trained network's label is its own (``step-X-trained``)."""
    path = Path(path)
    doc = {"format": 1, "evaluations": {}}
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise MetricError(f"{path} is not valid JSON ({e}); move it away and run again (it is not "
                              f"overwritten)") from None
    entry = doc.setdefault("evaluations", {}).setdefault(label, {"metrics": {}, "details": {}})
    entry.update({"step": step, "source": str(source), "net": net, "updated": _now()})
    entry.setdefault("metrics", {}).update({k: _clean(v) for k, v in values.items()})
    common = {k: v for k, v in details.items() if k not in ("inception", "offline", "metrics")}
    for name in details.get("metrics", []):
        part = details.get("inception" if name in FIDELITY else "offline", {})
        entry.setdefault("details", {})[name] = {**common, **part}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return doc


def log_tensorboard(run_dir: str | Path, step: int, values: dict, net: str = "ema") -> None:
    """Scalars ``Eval/<name>`` at ``step`` (the trained network's: ``Eval/trained/<name>``)."""
    from torch.utils.tensorboard import SummaryWriter

    prefix = "Eval" if net == "ema" else f"Eval/{net}"
    w = SummaryWriter(str(run_dir), filename_suffix=".eval")
    try:
        for k, v in values.items():
            w.add_scalar(f"{prefix}/{k}", v, step)
    finally:
        w.close()
