"""Hyper-parameter sweeps as Slurm job arrays: the sweep file, the grid, the run names.

A sweep file (``configs/sweeps/<name>.yaml``)::

    base: ../debug_cpu.yaml        # experiment config (relative to this file, or to the cwd)
    grid:                          # dotted config keys -> lists of values (cartesian product)
      optim.lr_d: [1.0e-4, 4.0e-4]
      optim.n_dis: [1, 2]
    overrides: {train.max_steps: 20}   # optional, fixed for every grid point (or a list of k=v)
    max_concurrent: 2              # optional: at most this many array tasks at once (%N)
    out: runs/sweeps/debug_cpu     # optional: root of the run directories (default runs/sweeps/<name>)
    slurm: {time: "00:30:00", partition: gpu, gpus-per-node: 1}   # optional sbatch options

``slurm/sweep.sh`` calls :func:`main` (``python -m gan.sweep plan ...``) to validate the file and
write ``OUT/sweep.json``: one entry per grid point with its run directory and the exact arguments
of ``launch/train.py``. Each array task reads its entry back (``python -m gan.sweep task``), so a
task runs what was planned even if the sweep file is edited later. Every check happens here,
before anything is submitted; errors are :class:`SweepError` with the key and the fix.

The sweep's model family is the base config's (``family:``): grid keys are that family's (``loss.beta``
for the VAE, ``loss.lambda_l1`` for pix2pix) or the spine's shared ones it reads; any other key is
refused with the nearest valid ones (and the family that owns it, if another does).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import difflib
import hashlib
import itertools
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gan.config import ConfigError, load_config
from gan.io import write_json_atomic

SWEEP_KEYS = ("base", "grid", "overrides", "max_concurrent", "out", "slurm")
MANIFEST = "sweep.json"
LOGS = "logs"
# sbatch options the sweep sets itself: a sweep file may not override them.
RESERVED_SBATCH = {"array", "output", "error", "parsable", "wrap", "export", "open-mode", "chdir", "D"}
_SAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
MAX_NAME = 120


class SweepError(ValueError):
    """A bad sweep file or sweep request: the message names the key and the fix."""


@dataclass
class Sweep:
    path: Path  # the sweep file
    name: str  # its stem
    base: Path  # the experiment config, resolved
    grid: dict[str, list]  # dotted key -> values, in file order
    overrides: list[str] = field(default_factory=list)  # fixed "key=value" for every point
    max_concurrent: int | None = None
    out: Path = Path("runs/sweeps")
    slurm: dict[str, object] = field(default_factory=dict)
    family: str | None = None  # the base config's model family (set when the points are validated)

    @property
    def size(self) -> int:
        n = 1
        for values in self.grid.values():
            n *= len(values)
        return n


# ---------------------------------------------------------------------------- values and names


def format_value(value) -> str:
    """The ``key=value`` text of a grid value. Strings go as they are (the config keeps the raw
    text for string-typed keys: ``train.mixed_precision=no`` stays "no"); anything else is
    written as YAML that reads back equal (``1e-05`` would read back as a string from PyYAML,
    ``1.0e-05`` reads back a float). :func:`load_sweep` then builds every point's config, so a
    value the config can't take fails there, before anything is submitted."""
    if isinstance(value, str):
        if "\n" in value or "\r" in value:
            raise SweepError(f"grid value {value!r} spans lines; use a single-line value")
        return value
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    if text.endswith("..."):
        text = text[:-3].strip()
    if yaml.safe_load(text) != value:
        raise SweepError(f"grid value {value!r} can't be written as a key=value override that reads back "
                         f"the same; write it differently in the sweep file")
    return text


def point_overrides(point: dict) -> list[str]:
    return [f"{k}={format_value(v)}" for k, v in point.items()]


def _short_keys(keys: list[str]) -> dict[str, str]:
    """The last dotted part of each key where that is unambiguous, else the whole key."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _digest(point: dict) -> str:
    return hashlib.sha1(json.dumps(point, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_names(points: list[dict]) -> list[str]:
    """One filesystem-safe, unique, stable directory name per grid point, from its overrides:
    ``lr_d=0.0001,n_dis=2``. A name that had to be altered (unsafe characters, too long) or
    that collides with another (also case-insensitively) gets a short hash of the point."""
    if not points:
        return []
    short = _short_keys(list(points[0]))
    raw = [",".join(f"{short[k]}={format_value(v)}" for k, v in p.items()) or "default" for p in points]
    safe = [_SAFE.sub("_", r) for r in raw]
    safe = [s if not s.startswith(".") else "_" + s[1:] for s in safe]
    names = []
    for r, s, p in zip(raw, safe, points):
        if s != r or len(s) > MAX_NAME:
            s = f"{s[:MAX_NAME]}-{_digest(p)}"
        names.append(s)
    lowered = [n.lower() for n in names]
    for i, n in enumerate(names):
        if lowered.count(n.lower()) > 1:
            names[i] = f"{n}-{_digest(points[i])}"
    if len({n.lower() for n in names}) != len(names):  # pragma: no cover - sha1 prefix collision
        names = [f"{i:04d}-{n}" for i, n in enumerate(names)]
    return names


def grid_points(grid: dict[str, list]) -> list[dict]:
    """Cartesian product in file order (the last key varies fastest)."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


# ---------------------------------------------------------------------------- loading


def _resolve_base(base: str, sweep_path: Path) -> Path:
    p = Path(base).expanduser()
    tried = [p] if p.is_absolute() else [sweep_path.parent / p, Path.cwd() / p]
    for cand in tried:
        if cand.is_file():
            return cand.resolve()
    raise SweepError(f"sweep file {sweep_path}: 'base' config not found: {base} (tried "
                     f"{', '.join(str(t) for t in tried)}). Name an existing experiment config, "
                     f"e.g. base: ../debug_cpu.yaml")


def _norm_overrides(raw, where: str) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, dict):
        return [f"{k}={format_value(v)}" for k, v in raw.items()]
    if isinstance(raw, (list, tuple)) and all(isinstance(x, str) and "=" in x for x in raw):
        return list(raw)
    raise SweepError(f"{where}: 'overrides' must be a mapping of dotted keys to values, or a list of "
                     f"key=value strings, not {raw!r}")


def _override_keys(overrides: list[str]) -> list[str]:
    return [o.partition("=")[0].strip() for o in overrides]


def _norm_slurm(raw, where: str) -> dict[str, object]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: 'slurm' must be a mapping of sbatch options, e.g. "
                         f"{{time: '04:00:00', partition: gpu, gpus-per-node: 1}}, not {raw!r}")
    out = {}
    for k, v in raw.items():
        key = str(k).strip().lstrip("-").replace("_", "-")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", key):
            raise SweepError(f"{where}: slurm option '{k}' is not an sbatch option name (e.g. time, partition)")
        if key in RESERVED_SBATCH:
            raise SweepError(f"{where}: slurm option '{k}' is set by slurm/sweep.sh itself (one array task per "
                             f"grid point, logs under OUT/{LOGS}/); remove it")
        if isinstance(v, (dict, list)):
            raise SweepError(f"{where}: slurm option '{k}' must be a single value, not {v!r}")
        out[key] = v
    return out


def load_sweep(path: str | Path, *, out: str | Path | None = None, extra_overrides=(),
               max_array_size: int | None | str = "auto", validate_config: bool = True) -> Sweep:
    """Read and check a sweep file. ``extra_overrides`` (``key=value``) are added to every point
    (``--set`` on the command line). ``max_array_size="auto"`` asks ``scontrol show config``
    (no check when Slurm isn't installed); an int checks against that; None skips the check."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}. Pass e.g. configs/sweeps/debug_cpu.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"sweep file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"sweep file {path} must hold a mapping with keys {', '.join(SWEEP_KEYS)}")
    for key in raw:
        if key not in SWEEP_KEYS:
            near = difflib.get_close_matches(str(key), SWEEP_KEYS, n=1, cutoff=0.5)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            raise SweepError(f"sweep file {path}: unknown key '{key}'.{hint} Valid keys: {', '.join(SWEEP_KEYS)}")
    if "base" not in raw or not isinstance(raw["base"], str) or not raw["base"]:
        raise SweepError(f"sweep file {path}: 'base' must name the experiment config, e.g. base: ../debug_cpu.yaml")
    base = _resolve_base(raw["base"], path)

    grid = raw.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise SweepError(f"sweep file {path}: 'grid' is empty; give at least one dotted key with a list of "
                         f"values, e.g. grid: {{optim.lr_d: [1.0e-4, 2.0e-4]}}")
    clean: dict[str, list] = {}
    for k, values in grid.items():
        key = str(k)
        if not isinstance(values, list):
            raise SweepError(f"sweep file {path}: grid key '{key}' must map to a list of values, e.g. "
                             f"{key}: [{values!r}]")
        if not values:
            raise SweepError(f"sweep file {path}: grid key '{key}' has an empty list of values; the grid "
                             f"would be empty")
        texts = [format_value(v) for v in values]
        dup = sorted({t for t in texts if texts.count(t) > 1})
        if dup:
            raise SweepError(f"sweep file {path}: grid key '{key}' lists {dup[0]} twice")
        if "=" in key or not all(key.split(".")):
            raise SweepError(f"sweep file {path}: grid key '{key}' must be a dotted config key like optim.lr_d")
        clean[key] = values

    overrides = _norm_overrides(raw.get("overrides"), f"sweep file {path}") + list(extra_overrides)
    both = sorted(set(_override_keys(overrides)) & set(clean))
    if both:
        raise SweepError(f"sweep file {path}: {', '.join(both)} is both swept in 'grid' and fixed in "
                         f"'overrides' (or --set); keep one")

    mc = raw.get("max_concurrent")
    if mc is not None and (not isinstance(mc, int) or isinstance(mc, bool) or mc < 1):
        raise SweepError(f"sweep file {path}: 'max_concurrent' must be a positive integer, not {mc!r}")

    out_dir = Path(out) if out is not None else Path(raw.get("out") or Path("runs/sweeps") / path.stem)
    sweep = Sweep(path=path, name=path.stem, base=base, grid=clean, overrides=overrides,
                  max_concurrent=mc, out=out_dir, slurm=_norm_slurm(raw.get("slurm"), f"sweep file {path}"))

    if max_array_size == "auto":
        max_array_size = cluster_max_array_size()
    if max_array_size is not None and sweep.size > max_array_size:
        raise SweepError(f"sweep file {path}: the grid has {sweep.size} points but this cluster's MaxArraySize "
                         f"is {max_array_size} (array indices 0..{max_array_size - 1}); split the sweep into "
                         f"several files or shrink the grid")
    if validate_config:
        _validate_points(sweep)
    return sweep


def _validate_points(sweep: Sweep) -> None:
    """Every grid point must build a valid config of its family: unknown keys (with the nearest ones of
    the family's sections), bad types and bad values (``optim.n_dis=0``), the family's own checks (its
    registered names) and keys the family never reads fail here, naming the point, before anything is
    submitted. Sets ``sweep.family``."""
    from gan.family import build_family

    try:
        sweep.family = load_config(sweep.base, sweep.overrides).family
    except ConfigError as e:
        raise SweepError(f"sweep file {sweep.path}: fixed overrides on {sweep.base}: {e}") from None
    for point in grid_points(sweep.grid):
        ov = point_overrides(point)
        where = f"sweep file {sweep.path} (family {sweep.family}): grid point {' '.join(ov)}"
        try:
            cfg = load_config(sweep.base, sweep.overrides + ov)
            family = build_family(cfg)
            family.check()
        except ConfigError as e:
            raise SweepError(f"{where}: {e}{_owner_hint(point, sweep.family)}") from None
        for key in point:
            if key in family.unread_keys:
                raise SweepError(f"{where}: family {cfg.family} does not read '{key}', so every grid point would "
                                 f"train the same run. Sweep a key it reads{_nearest_read(key, cfg, family)}")


def _config_keys(cfg) -> list[str]:
    """Every dotted leaf key of a built config, the family's sections included."""
    def walk(d: dict, prefix: str):
        for k, v in d.items():
            yield from walk(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return list(walk(cfg.to_dict(), ""))


def _nearest_read(key: str, cfg, family) -> str:
    read = [k for k in _config_keys(cfg) if k not in family.unread_keys]
    near = difflib.get_close_matches(key, read, n=3, cutoff=0.8)
    own = [k for k in read if k.split(".")[0] in family.sections]
    return (f", e.g. {', '.join(near)}" if near else "") + \
        f". Keys of family {cfg.family}'s own sections: {', '.join(own)}"


def _owner_hint(point: dict, family: str) -> str:
    """For a grid key that is not the family's but another's (``loss.lambda_l1`` under a VAE base config):
    which family owns it."""
    from gan.family import FAMILIES

    def owns(f, key: str) -> bool:
        section, _, name = key.partition(".")
        return section in f.sections and name in {x.name for x in dataclasses.fields(f.sections[section])}

    hints = []
    for key in point:
        owners = [n for n, f in sorted(FAMILIES.items()) if n != family and owns(f, key)]
        if owners and not owns(FAMILIES[family], key):
            hints.append(f" ('{key}' is a key of family {' and '.join(owners)}; this sweep's base config trains "
                         f"family {family})")
    return "".join(hints)


def cluster_max_array_size() -> int | None:
    """MaxArraySize from ``scontrol show config``; None where Slurm isn't reachable."""
    if shutil.which("scontrol") is None:
        return None
    try:
        r = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^\s*MaxArraySize\s*=\s*(\d+)", r.stdout, re.M)
    return int(m.group(1)) if r.returncode == 0 and m else None


# ---------------------------------------------------------------------------- plan


def train_args(sweep: Sweep, run_dir: Path, point: dict) -> list[str]:
    """Arguments of launch/train.py for one grid point (fixed overrides first, then the point's)."""
    return ["--config", str(sweep.base), "--run-dir", str(run_dir), "--resume", "auto",
            *sweep.overrides, *point_overrides(point)]


def plan(sweep: Sweep) -> dict:
    """The manifest: everything an array task and the summary need, in plain JSON."""
    points = grid_points(sweep.grid)
    names = run_names(points)
    out = sweep.out.resolve()
    tasks = []
    for i, (p, n) in enumerate(zip(points, names)):
        run_dir = out / n
        tasks.append({"index": i, "name": n, "run_dir": str(run_dir), "overrides": p,
                      "args": train_args(sweep, run_dir, p)})
    return {"format": 1, "name": sweep.name, "family": sweep.family, "sweep_file": str(sweep.path.resolve()),
            "base": str(sweep.base), "out": str(out), "grid": sweep.grid, "overrides": sweep.overrides,
            "max_concurrent": sweep.max_concurrent, "slurm": sweep.slurm,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "tasks": tasks}


def sbatch_args(manifest: dict) -> list[str]:
    """sbatch options for the array: one task per point, the cap, per-task logs, the file's options."""
    n = len(manifest["tasks"])
    array = f"0-{n - 1}" + (f"%{manifest['max_concurrent']}" if manifest.get("max_concurrent") else "")
    args = [f"--array={array}", f"--job-name=sweep-{manifest['name']}",
            f"--output={Path(manifest['out']) / LOGS / '%A_%a.log'}"]
    for k, v in manifest.get("slurm", {}).items():
        if v is True:
            args.append(f"--{k}")
        elif v is None or v is False:
            continue
        else:
            args.append(f"--{k}={v}")
    return args


def write_manifest(manifest: dict) -> Path:
    out = Path(manifest["out"])
    (out / LOGS).mkdir(parents=True, exist_ok=True)
    path = out / MANIFEST
    old = read_manifest(path) if path.is_file() else None
    if old is not None:
        before = {t["name"]: t["args"] for t in old.get("tasks", [])}
        changed = [t["name"] for t in manifest["tasks"] if t["name"] in before and before[t["name"]] != t["args"]]
        if changed:
            print(f"note: {path} existed; {len(changed)} run(s) now get different arguments "
                  f"(e.g. {changed[0]}); they resume from their checkpoints with --resume auto",
                  file=sys.stderr)
    write_json_atomic(path, manifest)
    return path


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise SweepError(f"no sweep manifest at {path}; it is written by slurm/sweep.sh")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SweepError(f"sweep manifest {path} is not valid JSON ({e}); resubmit with slurm/sweep.sh") from None
    if manifest.get("format") != 1 or not isinstance(manifest.get("tasks"), list):
        raise SweepError(f"sweep manifest {path} has an unknown format; resubmit with slurm/sweep.sh")
    return manifest


def describe(manifest: dict, python: str = "python", submit: list[str] | None = None) -> str:
    """Human-readable grid and commands (the dry run)."""
    grid = manifest["grid"]
    lines = [f"sweep {manifest['name']}: {len(manifest['tasks'])} grid point(s) "
             f"({' x '.join(str(len(v)) for v in grid.values())}) over {', '.join(grid)}",
             f"base config: {manifest['base']}" + (f" (family {manifest['family']})" if manifest.get("family") else ""),
             f"fixed overrides: {' '.join(manifest['overrides']) or '(none)'}",
             f"run directories under: {manifest['out']}",
             f"max concurrent tasks: {manifest.get('max_concurrent') or '(no cap)'}", ""]
    keys = list(grid)
    table = [["task", *keys, "run dir"]]
    for t in manifest["tasks"]:
        table.append([str(t["index"]), *(format_value(t["overrides"][k]) for k in keys), t["name"]])
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.append("")
    if submit is not None:
        lines += ["submit:", "  " + shlex.join(submit), ""]
    lines.append("each task runs (via slurm/train.sbatch):")
    for t in manifest["tasks"]:
        lines.append(f"  [{t['index']}] " + shlex.join([python, "launch/train.py", *t["args"]]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gan.sweep", description="Plan a sweep (used by slurm/sweep.sh).")
    sub = p.add_subparsers(dest="cmd", required=True)
    pl = sub.add_parser("plan", help="validate a sweep file; print the plan (--dry-run) or write OUT/sweep.json")
    pl.add_argument("sweep")
    pl.add_argument("--out", default=None, help="root of the run directories (overrides the file's 'out')")
    pl.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="fixed override added to every grid point (repeatable)")
    pl.add_argument("--dry-run", action="store_true", help="print the grid and the commands; write nothing")
    pl.add_argument("--script", default="slurm/train.sbatch", help="batch script shown in the submit line")
    pl.add_argument("--sbatch-out", default=None,
                    help="write the sbatch arguments here, NUL-separated (for slurm/sweep.sh)")
    pl.add_argument("--python", default="python", help="interpreter shown in the dry-run commands")
    tk = sub.add_parser("task", help="print one task's launch/train.py arguments, NUL-separated")
    tk.add_argument("manifest")
    tk.add_argument("index", type=int)
    a = p.parse_args(argv)
    try:
        if a.cmd == "task":
            manifest = read_manifest(a.manifest)
            tasks = manifest["tasks"]
            if not 0 <= a.index < len(tasks):
                raise SweepError(f"task index {a.index} is outside the sweep's 0..{len(tasks) - 1}")
            sys.stdout.write("\0".join(tasks[a.index]["args"]) + "\0")
            return 0
        for s in a.sets:
            if "=" not in s:
                raise SweepError(f"--set '{s}' must look like key=value, e.g. data.shards=/data/cifar10")
        sweep = load_sweep(a.sweep, out=a.out, extra_overrides=a.sets)
        manifest = plan(sweep)
        args = sbatch_args(manifest)
        manifest_path = Path(manifest["out"]) / MANIFEST
        submit = ["sbatch", *args, a.script, "--sweep", str(manifest_path)]
        if a.dry_run:
            print(describe(manifest, a.python, submit))
            print("\n(dry run: nothing written, nothing submitted)")
            return 0
        write_manifest(manifest)
        print(describe(manifest, a.python, submit), file=sys.stderr)
        if a.sbatch_out:
            Path(a.sbatch_out).write_text("\0".join(submit[1:]) + "\0")
        return 0
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
