"""Summarise a sweep: one row per grid point with its overrides, status, final and best metrics.

``python launch/sweep_summary.py OUT`` writes ``OUT/summary.csv``, ``OUT/summary.md`` and
``OUT/summary.png``. ``OUT`` is a sweep's root (``sweep.json`` written by ``slurm/sweep.sh``); a
directory without ``sweep.json`` is summarised from the run directories found in it.

Status, per grid point:
  finished   status.json says so
  failed     status.json says so (its error is shown), or the Slurm task log ends with a non-zero
             exit / a cancellation / a time-limit kill while status.json still said running
  preempted  stopped with a checkpoint and waiting to be requeued (or cancelled: resubmit the sweep)
  running    status.json says running (or the task has started but not yet written status.json)
  missing    no run directory and no task log: not started yet (pending) or never submitted
"""
from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gan.rundir import RunDir
from gan.sweep import LOGS, MANIFEST, SweepError, format_value, read_manifest

STATUSES = ("finished", "failed", "preempted", "running", "missing")
# name tokens: distances and errors (the VAE's and pix2pix's recon_mse, l1, bits_per_dim / bpd, nll) are lower-is-
# better; scores, accuracies and image similarities (psnr, ssim) higher. KL has no better side: it is not ranked.
_LOWER = ("fid", "kid", "frechet", "fd", "lpips", "mse", "l1", "l2", "nll", "bpd")
_LOWER_NAMES = ("bits_per_dim",)
_HIGHER = ("isc", "is", "inception", "precision", "prec", "recall", "rec", "acc", "accuracy", "score", "psnr", "ssim")
_SPREAD = ("std", "stddev", "var")
_END = re.compile(r"^\[train\.sbatch\] end rc=(-?\d+) state=(\S*) action=(\S+)")
_START = re.compile(r"^\[train\.sbatch\] \S+ start ")
_CANCEL = re.compile(r"\*\*\* (?:JOB|STEP) \S+ ON \S+ CANCELLED AT \S+(.*)\*\*\*")


def _metric_tables() -> tuple[set, set]:
    try:  # the trainer's own table of which way each metric is better
        from gan.metrics.names import HIGHER_IS_BETTER, LOWER_IS_BETTER
        return set(HIGHER_IS_BETTER), set(LOWER_IS_BETTER)
    except ImportError:  # pragma: no cover
        return set(), set()


def direction(key: str) -> str | None:
    """"min" for metrics where lower is better (FID, KID, Frechet distances; reconstruction errors
    such as recon_mse, l1 and bits_per_dim), "max" for higher-is-better ones (IS, precision, recall,
    F-score, accuracy, PSNR, SSIM), None for everything else (losses, timings, KL, spreads such as
    isc_std). Per-class keys (``Eval/cls_acc/<class>``) get none either: the summary compares the
    overall values."""
    name = key.split("/", 1)[-1].lower()
    if "/" in name:
        return None
    higher, lower = _metric_tables()
    if name in lower or name in _LOWER_NAMES:
        return "min"
    if name in higher:
        return "max"
    tokens = [t for t in re.split(r"[^a-z0-9]+", name) if t]
    if any(t in _SPREAD for t in tokens):
        return None
    if any(t.startswith(_LOWER) for t in tokens):
        return "min"
    if any(t in _HIGHER or t.startswith(("isc", "precision", "recall", "acc")) for t in tokens):
        return "max"
    return None


def read_metrics(path: str | Path) -> list[dict]:
    """metrics.jsonl rows merged by step: the trainer writes eval metrics as a row of their own
    at a step that may also have a loss row, and a step logged again after a crash and resume
    keeps its latest values. A torn last line (a run killed mid-write) is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            by_step.setdefault(row["step"], {}).update(row)
    return [by_step[s] for s in sorted(by_step)]


def _num(v) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):  # the trainer writes non-finite values as strings ("nan", "inf")
        try:
            return float(v)
        except ValueError:
            return None
    return None


def final_and_best(rows: list[dict]) -> tuple[dict[str, float], dict[str, tuple[float, int]]]:
    """Last value of every scalar; best (value, step) of every scalar with a direction."""
    final: dict[str, float] = {}
    best: dict[str, tuple[float, int]] = {}
    for row in rows:
        for k, v in row.items():
            if k in ("step", "kimg"):
                continue
            x = _num(v)
            if x is None:
                continue
            final[k] = x
            d = direction(k)
            if d is None or math.isnan(x):
                continue
            if k not in best or (x < best[k][0] if d == "min" else x > best[k][0]):
                best[k] = (x, row["step"])
    return final, best


def read_log(path: Path | None) -> dict:
    """What the task's Slurm log says about its latest attempt."""
    out = {"log": str(path) if path else "", "started": False, "end": None, "cancelled": None}
    if path is None or not path.is_file():
        return out
    lines = path.read_text(errors="replace").splitlines()
    last_start = max((i for i, l in enumerate(lines) if _START.match(l)), default=-1)
    out["started"] = last_start >= 0
    for line in lines[last_start + 1 if last_start >= 0 else 0:]:
        m = _END.match(line)
        if m:
            out["end"] = (int(m.group(1)), m.group(2), m.group(3))
        c = _CANCEL.search(line)
        if c and "REQUEUE" not in c.group(1):
            out["cancelled"] = c.group(1).strip() or "cancelled"
    return out


def run_status(run_dir: Path, log: dict) -> tuple[str, str]:
    """(status, detail) from status.json, the run directory and the task log."""
    status = None
    sp = RunDir(run_dir).status_file
    if sp.is_file():
        try:
            status = json.loads(sp.read_text())
        except (json.JSONDecodeError, OSError):
            status = None
    end, cancelled = log.get("end"), log.get("cancelled")
    if status is not None:
        state, err = status.get("state"), status.get("error")
        if state == "finished":
            return "finished", ""
        if state == "failed":
            return "failed", str(err or "failed")
        if state == "preempted":
            if cancelled:
                return "preempted", f"stopped with a checkpoint, job {cancelled.lower()}: resubmit the sweep to resume"
            if end and end[2] == "requeue":
                return "preempted", "checkpointed, requeued"
            if end and end[2] == "stopped":
                return "preempted", "checkpointed, not requeued (GAN_MAX_REQUEUES reached): resubmit the sweep to resume"
            return "preempted", "checkpointed"
        if state == "running":
            if end and end[0] != 0:
                return "failed", f"task exited rc={end[0]} while the run said running"
            if cancelled:
                return "failed", f"killed: {cancelled.lower() or 'cancelled'}"
            return "running", f"step {status.get('step')}/{status.get('max_steps')}"
    if run_dir.is_dir() or log.get("started"):
        if end and end[0] != 0:
            return "failed", f"task exited rc={end[0]} (see {log.get('log')})"
        if cancelled:
            return "failed", f"killed: {cancelled.lower()}"
        return "running", "starting"
    return "missing", "no run directory and no task log (pending or not submitted)"


def _task_log(out: Path, index: int) -> Path | None:
    logs = sorted((out / LOGS).glob(f"*_{index}.log"), key=lambda p: p.stat().st_mtime)
    return logs[-1] if logs else None


@dataclass
class Row:
    index: int
    name: str
    run_dir: Path
    overrides: dict
    status: str = "missing"
    detail: str = ""
    step: int | None = None
    max_steps: int | None = None
    final: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)  # key -> (steps, values)
    log: str = ""
    family: str = ""  # the run's model family (its config.yaml, else the manifest's)


def _discover(out: Path) -> list[dict]:
    """Without a manifest: every sub-directory that looks like a run directory."""
    tasks = []
    for i, d in enumerate(sorted(p for p in out.iterdir() if p.is_dir() and p.name != LOGS)):
        run = RunDir(d)
        if run.status_file.exists() or run.metrics_file.exists() or run.checkpoints.is_dir():
            tasks.append({"index": i, "name": d.name, "run_dir": str(d), "overrides": {}})
    return tasks


def _run_family(run_dir: Path) -> str:
    """The ``family`` of a run's config.yaml ("gan" when the config predates families); "" without one."""
    try:
        cfg = yaml.safe_load(RunDir(run_dir).config.read_text())
    except (OSError, yaml.YAMLError):
        return ""
    return str(cfg.get("family") or "gan") if isinstance(cfg, dict) else ""


def collect(out: str | Path) -> tuple[list[Row], list[str]]:
    """Rows for every grid point (from the manifest) and the list of swept keys."""
    out = Path(out)
    if not out.is_dir():
        raise SweepError(f"sweep directory not found: {out}. Pass the sweep's out directory "
                         f"(the one holding {MANIFEST})")
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        tasks, keys, family = manifest["tasks"], list(manifest["grid"]), manifest.get("family") or ""
    else:
        tasks, keys, family = _discover(out), [], ""
        if not tasks:
            raise SweepError(f"{out} holds no {MANIFEST} and no run directories; pass a sweep's out directory")
    rows = []
    for t in tasks:
        run_dir = Path(t["run_dir"])
        if not run_dir.is_absolute():
            run_dir = out / run_dir
        if not run_dir.exists() and (out / t["name"]).exists():  # the sweep directory was moved
            run_dir = out / t["name"]
        log = read_log(_task_log(out, t["index"]))
        row = Row(t["index"], t["name"], run_dir, t.get("overrides", {}), log=log["log"],
                  family=_run_family(run_dir) or family)
        row.status, row.detail = run_status(run_dir, log)
        metrics = read_metrics(RunDir(run_dir).metrics_file)
        row.final, row.best = final_and_best(metrics)
        for m in metrics:
            for k, v in m.items():
                x = _num(v)
                if k not in ("step", "kimg") and x is not None:
                    row.curves.setdefault(k, ([], []))
                    row.curves[k][0].append(m["step"])
                    row.curves[k][1].append(x)
        try:
            st = json.loads(RunDir(run_dir).status_file.read_text())
            row.step, row.max_steps = st.get("step"), st.get("max_steps")
        except (OSError, json.JSONDecodeError):
            row.step = metrics[-1]["step"] if metrics else None
        rows.append(row)
    return rows, keys


def _metric_columns(rows: list[Row]) -> tuple[list[str], list[str]]:
    """final/<key> for losses and eval metrics, best/<key> for metrics with a direction."""
    keys = sorted({k for r in rows for k in r.final if not (k.startswith("Eval/") and k.count("/") > 1)})
    final = [k for k in keys if k.startswith(("Loss/", "Eval/")) or direction(k)]
    best = [k for k in keys if direction(k)]
    return final, best


def table(rows: list[Row], keys: list[str]) -> tuple[list[str], list[list]]:
    final_keys, best_keys = _metric_columns(rows)
    header = ["task", "name", *keys, "status", "step", "max_steps"]
    header += [f"final {k}" for k in final_keys]
    for k in best_keys:
        header += [f"best {k}", f"best {k} step"]
    header += ["detail", "run_dir"]
    body = []
    for r in rows:
        line = [r.index, r.name, *(format_value(r.overrides[k]) if k in r.overrides else "" for k in keys),
                r.status, r.step if r.step is not None else "", r.max_steps if r.max_steps is not None else ""]
        line += [r.final.get(k, "") for k in final_keys]
        for k in best_keys:
            v = r.best.get(k)
            line += [v[0], v[1]] if v else ["", ""]
        line += [r.detail, str(r.run_dir)]
        body.append(line)
    return header, body


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def write_csv(path: Path, header: list[str], body: list[list]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(body)


def write_markdown(path: Path, header: list[str], body: list[list], rows: list[Row], title: str) -> None:
    counts = {s: sum(r.status == s for r in rows) for s in STATUSES}
    lines = [f"# Sweep summary: {title}", "",
             f"{len(rows)} grid point(s): " + ", ".join(f"{n} {s}" for s, n in counts.items() if n), ""]
    _, best_keys = _metric_columns(rows)
    for k in best_keys:
        cands = [r for r in rows if k in r.best]
        if cands:
            pick = (min if direction(k) == "min" else max)(cands, key=lambda r: r.best[k][0])
            lines.append(f"Best {k}: {pick.best[k][0]:.4g} ({pick.name}, step {pick.best[k][1]})")
    if best_keys:
        lines.append("")
    elif any(r.final for r in rows):
        lines += ["No evaluation metrics in these runs (metrics.every=0): the final training losses only.", ""]
    keep = [i for i, h in enumerate(header) if h != "run_dir"]
    lines.append("| " + " | ".join(header[i] for i in keep) + " |")
    lines.append("|" + "|".join("---" for _ in keep) + "|")
    for b in body:
        lines.append("| " + " | ".join(_fmt(b[i]) for i in keep) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, rows: list[Row], title: str) -> None:
    """Curves of the eval metrics (else the losses) of every run, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in rows for k in r.curves if direction(k)})
    if not keys:
        keys = sorted({k for r in rows for k in r.curves if k.startswith("Loss/")})
    keys = keys[:6]
    n = max(1, len(keys))
    cols = min(n, 3)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows + 0.8), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    if not keys:
        axes.flat[0].text(0.5, 0.5, "no metrics logged yet", ha="center", va="center")
    for ax, k in zip(axes.flat, keys):
        for r in rows:
            if k in r.curves:
                steps, vals = r.curves[k]
                ax.plot(steps, vals, marker="." if len(steps) < 30 else None, label=f"{r.name} [{r.status}]")
        d = direction(k)
        ax.set_title(k + (" (lower is better)" if d == "min" else " (higher is better)" if d == "max" else ""))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize="small",
                   frameon=False)
    fig.suptitle(f"sweep {title}")
    legend_rows = math.ceil(len(labels) / 3) if labels else 0
    fig.tight_layout(rect=(0, min(0.45, 0.04 * legend_rows + 0.02), 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(out: str | Path) -> dict[str, Path]:
    out = Path(out)
    rows, keys = collect(out)
    header, body = table(rows, keys)
    families = sorted({r.family for r in rows if r.family})
    title = out.name + (f" (family {', '.join(families)})" if families else "")
    paths = {"csv": out / "summary.csv", "md": out / "summary.md", "png": out / "summary.png"}
    write_csv(paths["csv"], header, body)
    write_markdown(paths["md"], header, body, rows, title)
    plot(paths["png"], rows, title)
    return paths


def main(argv=None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="launch/sweep_summary.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="the sweep's out directory (holds sweep.json, logs/ and the run directories)")
    a = p.parse_args(argv)
    try:
        paths = summarize(a.dir)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(paths["md"].read_text(), end="")
    print(f"\nwrote {paths['csv']}, {paths['md']}, {paths['png']}")
    return 0
