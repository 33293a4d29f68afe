"""The training spine does not change the numbers: every loss of three short 2-rank runs (gloo,
``ACCELERATE_USE_CPU=1``) against the sequence pinned in tests/golden_losses.json.

The variants: the plain recipe; ``n_dis=2`` with lazy R1 (its own update every 2nd D step); and the
DeepSpeed ZeRO-2 backend. Each runs 6 steps of configs/debug_cpu.yaml on the tiny shards with
loader workers and every step logged; every ``Loss/*`` value in metrics.jsonl is compared.

Tolerance: the file was written on an Intel x86 CPU, where a refactor of the spine must reproduce it
bit for bit (that is how the move of the GAN onto the family interface was checked). Another x86 CPU
(e.g. AMD, or another oneDNN/MKL code path) may round the last bits of a convolution differently, and
six optimizer steps carry such a difference along without amplifying it much, so the committed test
compares with a relative tolerance of 1e-5: far below any change a refactor that alters the order of
work (another RNG draw, another update order, a missed regularizer step) would make, which moves the
losses in the second or third digit.

Regenerate (only when a change is *meant* to alter the numbers, and say so in the commit):
    PYTHONPATH=. python tests/test_golden_losses.py --write
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden_losses.json"
RTOL = 1e-5
COMMON = ["train.max_steps=6", "log.every=1", "data.num_workers=2", "checkpoint.every=100",
          "log.sample_every=100"]
VARIANTS = {
    "plain": [],
    "n_dis2_lazy_r1": ["optim.n_dis=2", "loss.r1_gamma=1", "loss.r1_every=2"],
    "deepspeed_zero2": ["train.backend=deepspeed", "deepspeed.stage=2"],
}


def run_losses(name: str, shards: Path, work: Path) -> list[dict]:
    """One 2-rank run of the variant ``name``; every logged loss, step by step."""
    run = work / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "launch/train.py", "--config", "configs/debug_cpu.yaml", "--run-dir", str(run),
           f"data.shards={shards}", *COMMON, *VARIANTS[name]]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
                            "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stdout + r.stderr
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
                bad.append(f"step {w['step']} {k}: got {g[k]!r}, want {w[k]!r}")
    return bad


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_golden_losses(tmp_path, tiny_shards, name):
    if name.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    want = json.loads(GOLDEN.read_text())[name]
    got = run_losses(name, tiny_shards, tmp_path)
    bad = compare(got, want, RTOL)
    assert not bad, "losses differ from tests/golden_losses.json:\n" + "\n".join(bad)


def main(argv: list[str]) -> int:
    """--write: pin the golden file; --check: compare bit for bit (rtol 0) and print the result."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny

    with tempfile.TemporaryDirectory() as d:
        shards = build_tiny(Path(d) / "shards", 240, 3, 32, 80, "tiny10")
        results = {name: run_losses(name, shards, Path(d)) for name in VARIANTS}
    if "--write" in argv:
        GOLDEN.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {GOLDEN}")
        return 0
    want = json.loads(GOLDEN.read_text())
    status = 0
    for name, got in results.items():
        bad = compare(got, want[name], 0.0)
        n = sum(len(r) - 1 for r in got)
        print(f"{name}: {n} losses, {'bit-exact' if not bad else f'{len(bad)} differ'}")
        for line in bad:
            print("  " + line)
        status |= bool(bad)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
