"""Golden losses: every logged loss of short 2-rank runs (gloo, ``ACCELERATE_USE_CPU=1``, 6 steps,
every step logged, loader workers 2) of each family, on the tiny shards of tests/conftest.py.

Two uses:

- the refactor check, bit for bit (rtol 0) on this machine: the same runs from another commit, in a
  temporary ``git worktree`` of it (its own launch/, gan/ and configs/; PYTHONPATH set to it), against
  the working tree. Works for commits older than this script: their launch/train.py is run with the
  same arguments. The shards are built once, by the working tree, and shared.
      PYTHONPATH=. python tests/golden.py --against HEAD~1     (default: HEAD)
- the committed file tests/golden_losses.json, a coarse guard on any machine (tests/test_golden_losses.py):
      PYTHONPATH=. python tests/golden.py --check              (bit for bit against the file)
      PYTHONPATH=. python tests/golden.py --write              (re-pin it: only for a change *meant* to
                                                               alter the numbers; say so in the commit)
      PYTHONPATH=. python tests/golden.py --code-paths         (the spread across CPU code paths and the
                                                               effect of another train.seed: the test's
                                                               tolerance is derived from these)

``--variants a,b`` limits any of these to some variants.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden_losses.json"
RUN = {"train": {"max_steps": 6, "batch_size": 8, "mixed_precision": "no"}, "log": {"every": 1, "sample_every": 100,
       "progress": False}, "checkpoint": {"every": 100}, "data": {"num_workers": 2}}
GAN = ["train.max_steps=6", "log.every=1", "data.num_workers=2", "checkpoint.every=100", "log.sample_every=100"]
VAE = {"family": "vae", "model": {"channels": 8, "latent_dim": 16, "conditional": True},
       "loss": {"kl_warmup_steps": 4}, "optim": {"lr_g": 0.001, "betas_g": [0.9, 0.999]},
       "data": {"shuffle_buffer": 64, "hflip": True}, "log": {"samples_per_class": 2}}
PIX2PIX = {"family": "pix2pix", "model": {"img_size": 64, "g_channels": 4, "d_channels": 4, "d_layers": 3},
           "data": {"shuffle_buffer": 16, "hflip": True}, "val": {"pictures": 2}, "train": {"batch_size": 4}}
# name: (config: a path in the commit's tree, or a recipe written for the run; overrides; shards)
VARIANTS = {
    "plain": ("configs/debug_cpu.yaml", GAN, "tiny"),
    "n_dis2_lazy_r1": ("configs/debug_cpu.yaml", [*GAN, "optim.n_dis=2", "loss.r1_gamma=1", "loss.r1_every=2"], "tiny"),
    "deepspeed_zero2": ("configs/debug_cpu.yaml", [*GAN, "train.backend=deepspeed", "deepspeed.stage=2"], "tiny"),
    "vae": (VAE, [], "tiny"),
    "pix2pix": (PIX2PIX, [], "pairs"),
}
# PyTorch's CPU kernels (ATEN_CPU_CAPABILITY) and oneDNN's (ONEDNN_MAX_CPU_ISA), as on other x86 CPUs
CODE_PATHS = {
    "aten=default": {"ATEN_CPU_CAPABILITY": "default"},
    "aten=avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten=avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
    "onednn=AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "onednn=SSE41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
}


def merged(*sections: dict) -> dict:
    out: dict = {}
    for s in sections:
        for k, v in s.items():
            out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) else v
    return out


def build_shards(root: Path) -> dict[str, Path]:
    """The tiny shard sets the variants train on (conftest's tiny_shards and tiny_pairs)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny
    from test_paired import inverted_pairs

    return {"tiny": build_tiny(root / "tiny", 240, 3, 32, 80, "tiny10"),
            "pairs": inverted_pairs(root / "pairs", size=64)}


def run_losses(name: str, shards: dict[str, Path], work: Path, repo: Path = REPO, env: dict | None = None,
               extra: tuple[str, ...] = ()) -> list[dict]:
    """One 2-rank run of the variant ``name`` with the code of ``repo``; every logged loss, step by step."""
    config, overrides, data = VARIANTS[name]
    run = work / name
    work.mkdir(parents=True, exist_ok=True)
    if isinstance(config, dict):
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(merged(RUN, config), sort_keys=False))
        config = str(path)
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "launch/train.py", "--config", config, "--run-dir", str(run), f"data.shards={shards[data]}",
           *overrides, *extra]
    r = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
                            "PYTHONPATH": str(repo), **(env or {})})
    if r.returncode != 0:
        raise RuntimeError(f"{name} ({repo}) failed, exit {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{"step": row["step"], **{k: v for k, v in sorted(row.items()) if k.startswith("Loss/")}}
            for row in rows if any(k.startswith("Loss/") for k in row)]


def compare(got: list[dict], want: list[dict], rtol: float) -> list[str]:
    """Every difference beyond ``rtol`` (relative), as readable lines; [] when they agree."""
    if [r["step"] for r in got] != [r["step"] for r in want]:
        return [f"logged steps differ: got {[r['step'] for r in got]}, want {[r['step'] for r in want]}"]
    bad = []
    for g, w in zip(got, want):
        if set(g) != set(w):
            bad.append(f"step {w['step']}: keys differ: got {sorted(g)}, want {sorted(w)}")
            continue
        for k in w:
            if not math.isclose(g[k], w[k], rel_tol=rtol, abs_tol=0.0):
                bad.append(f"step {w['step']} {k}: got {g[k]!r}, want {w[k]!r} (rel {rel(g[k], w[k]):.2e})")
    return bad


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b)) if a != b else 0.0


def max_rel(got: list[dict], want: list[dict]) -> tuple[float, str]:
    """The largest relative difference between two runs' losses (same steps and keys), and where."""
    assert [sorted(r) for r in got] == [sorted(r) for r in want], "the runs logged other steps or losses"
    return max((rel(g[k], w[k]), f"step {w['step']} {k}") for g, w in zip(got, want) for k in w if k != "step")


def n_losses(rows: list[dict]) -> int:
    return sum(len(r) - 1 for r in rows)


def table(results: dict[str, list[dict]], want: dict[str, list[dict]], against: str) -> int:
    """Print variant, number of losses and bit-exact or the first differences; 1 if any differs."""
    status = 0
    print(f"\n{'variant':<18}{'losses':>7}  against {against}")
    for name, got in results.items():
        bad = compare(got, want[name], 0.0) if name in want else [f"no {name} in {against}"]
        print(f"{name:<18}{n_losses(got):>7}  {'bit-exact' if not bad else f'{len(bad)} differ, first:'}")
        for line in bad[:5]:
            print(f"{'':<27}{line}")
        status |= bool(bad)
    return status


def commit(rev: str) -> str:
    """The full hash of ``rev``; one clear error if it names no commit."""
    r = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=REPO,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"--against {rev}: not a commit of this repository; give a commit, branch or tag, "
                         "e.g. --against HEAD~1")
    return r.stdout.strip()


def against_commit(sha: str, names: list[str], shards: dict[str, Path], work: Path) -> dict[str, list[dict]]:
    """The variants' losses with the code of commit ``sha``, run from a temporary worktree of it."""
    tree = work / f"worktree-{sha[:10]}"
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(tree), sha], cwd=REPO, check=True)
    try:
        return {n: run_losses(n, shards, work / "old", repo=tree) for n in names}
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)
        subprocess.run(["git", "worktree", "prune"], cwd=REPO, check=False)


def code_paths(names: list[str], shards: dict[str, Path], work: Path) -> None:
    """Each variant under every code path this CPU has and with train.seed=1, against its run here with
    no variable set."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    best = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                          capture_output=True, text=True, env=env).stdout.strip()
    paths = {p: e for p, e in CODE_PATHS.items() if p != "aten=avx512" or best == "AVX512"}
    print(f"\nlargest relative difference of any loss against the run with no variable set (this CPU: {best})")
    print(f"{'variant':<18}" + "".join(f"{p:>14}" for p in [*paths, "train.seed=1"]))
    worst = []
    for name in names:
        base = run_losses(name, shards, work)
        cells = [max_rel(run_losses(name, shards, work, env=e), base) for e in paths.values()]
        cells.append(max_rel(run_losses(name, shards, work, extra=("train.seed=1",)), base))
        print(f"{name:<18}" + "".join(f"{c:>14.2e}" for c, _ in cells), flush=True)
        worst.append((name, *max(zip(cells[:-1], paths))))
    for name, (r, where), path in worst:
        print(f"{name}: largest across code paths {r:.2e} ({path}, {where})")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--against", metavar="REV", default="HEAD", help="commit to compare with (default HEAD)")
    mode.add_argument("--check", action="store_true", help=f"compare with {GOLDEN.relative_to(REPO)}, bit for bit")
    mode.add_argument("--write", action="store_true", help=f"re-pin {GOLDEN.relative_to(REPO)}")
    mode.add_argument("--code-paths", action="store_true", help="measure the spread across CPU code paths")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated (default: all)")
    a = p.parse_args(argv)
    names = [n for n in a.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    sha = None if a.check or a.write or a.code_paths else commit(a.against)
    t0 = time.time()
    try:
        status = execute(a, names, sha)
    except RuntimeError as e:  # a run failed: its output says why
        print(e, file=sys.stderr)
        status = 2
    print(f"({time.time() - t0:.0f} s)")
    return status


def execute(a: argparse.Namespace, names: list[str], sha: str | None) -> int:
    with tempfile.TemporaryDirectory(prefix="golden-") as d:
        work = Path(d)
        shards = build_shards(work / "shards")
        if a.code_paths:
            code_paths(names, shards, work)
            status = 0
        else:
            results = {n: run_losses(n, shards, work) for n in names}
            if a.write:
                pinned = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
                GOLDEN.write_text(json.dumps({**pinned, **results}, indent=1) + "\n")
                print(f"wrote {', '.join(names)} into {GOLDEN}")
                status = 0
            elif a.check:
                status = table(results, json.loads(GOLDEN.read_text()), GOLDEN.name)
            else:
                status = table(results, against_commit(sha, names, shards, work), f"{a.against} ({sha[:10]})")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
