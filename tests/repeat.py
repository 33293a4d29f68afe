"""Run the suite (or the given tests) N times under each CPU code path, and say which runs failed.

A tolerance tuned to one machine fails under another CPU code path, and a flaky test fails some of the
time: run this on each big change.

    python tests/repeat.py -n 3                                   # the whole suite, 3 times per code path
    python tests/repeat.py -n 3 tests/test_golden_losses.py       # pytest arguments after the options
    python tests/repeat.py -n 3 --keep-going -- tests/test_family_paths.py -k "zero1_and_zero2_match_ddp and vae"

Code paths (``--paths``, default both): ``default`` (no variable set: this CPU's best kernels) and
``avx2`` (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``, PyTorch's and oneDNN's kernels of an
AVX2-only x86 CPU). It stops at the first failing run unless ``--keep-going``; every run's output goes
to ``--logs`` (default: a temporary directory, kept). The end is a table: code path, run, result (the
pytest summary), seconds, the failed tests.

``--ci`` (what ``make test`` runs): the whole suite once as it is, then the numerics tests
(``-m numerics``) under the ``avx2`` code path, output streamed; the last line is one pytest summary
line counting both passes, and the exit status is non-zero if either failed.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PATHS = {"default": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}
SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?)\b")
ORDER = ("failed", "passed", "skipped", "deselected", "xfailed", "xpassed", "warnings", "errors")


def pytest_run(args: list[str], env: dict, log: Path | None) -> tuple[int, dict[str, int], list[str], float]:
    """One pytest run; its output to ``log`` (or streamed to stdout when None). Returns the exit status,
    the counts of its summary line, the failed tests and the seconds it took."""
    t0 = time.time()
    quiet = [] if any(re.fullmatch(r"-q+|--quiet", x) for x in args) else ["-q"]  # -qq drops the summary line
    cmd = [sys.executable, "-u", "-m", "pytest", *quiet, "-p", "no:cacheprovider", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    last, failed = "", []
    with open(log, "w") if log else open(os.devnull, "w") as f:
        for line in proc.stdout:
            (f if log else sys.stdout).write(line)
            if re.search(r" in [\d.]+s\b", line) and SUMMARY.search(line):
                last = line
            if line.startswith(("FAILED ", "ERROR ")):
                failed.append(line.split()[1])
    code = proc.wait()
    counts = {}
    for n, kind in SUMMARY.findall(last):
        kind = {"error": "errors", "warning": "warnings"}.get(kind, kind)
        counts[kind] = counts.get(kind, 0) + int(n)
    return code, counts, failed, time.time() - t0


def summary(counts: dict[str, int]) -> str:
    return ", ".join(f"{counts[k]} {k}" for k in ORDER if counts.get(k)) or "no tests ran"


def ci(args: list[str]) -> int:
    total: dict[str, int] = {}
    codes, seconds = [], 0.0
    for env, extra in (({}, []), (PATHS["avx2"], ["-m", "numerics"])):
        if env:
            print(f"\n--- the numerics tests again under {' '.join(f'{k}={v}' for k, v in env.items())}", flush=True)
        code, counts, _, s = pytest_run([*args, *extra], env, None)
        codes.append(code)
        seconds += s
        for k, v in counts.items():
            if k != "deselected":  # the second pass deselects all but the numerics tests
                total[k] = total.get(k, 0) + v
    print(f"\nboth passes: the suite (exit {codes[0]}), then -m numerics under avx2/AVX2 (exit {codes[1]})")
    print(f"{'=' * 20} {summary(total)} in {seconds:.2f}s {'=' * 20}")
    return next((c for c in codes if c), 0)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("-n", type=int, default=3, help="runs per code path (default 3)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)} (default: all)")
    p.add_argument("--keep-going", action="store_true", help="run every run even after a failure")
    p.add_argument("--logs", type=Path, help="directory for each run's output (default: a new temporary one)")
    p.add_argument("--ci", action="store_true", help="the suite, then -m numerics under avx2 (make test)")
    a, pytest_args = p.parse_known_args(argv)
    pytest_args = [x for x in pytest_args if x != "--"]
    if a.ci:
        return ci(pytest_args)
    paths = [x for x in a.paths.split(",") if x]
    if a.n < 1 or not paths or any(x not in PATHS for x in paths):
        p.error(f"-n must be >= 1 (got {a.n}) and --paths a list of {', '.join(PATHS)} (got {a.paths!r})")
    logs = a.logs or Path(tempfile.mkdtemp(prefix="repeat-"))
    logs.mkdir(parents=True, exist_ok=True)
    print(f"pytest {shlex.join(pytest_args) or '(the whole suite)'}: {a.n} run(s) under {', '.join(paths)}; "
          f"logs in {logs}", flush=True)
    rows, stop = [], False
    for path in paths:
        for k in range(1, a.n + 1):
            code, counts, failed, s = pytest_run(pytest_args, PATHS[path], logs / f"{path}-{k}.log")
            rows.append((path, k, code, summary(counts), s, failed))
            print(f"{path:<8} run {k}: exit {code}, {summary(counts)} ({s:.0f} s)", flush=True)
            if code and not a.keep_going:
                stop = True
                break
        if stop:
            break
    print(f"\n{'path':<8} {'run':>3}  {'exit':>4}  {'seconds':>7}  result")
    for path, k, code, result, s, failed in rows:
        print(f"{path:<8} {k:>3}  {code:>4}  {s:>7.0f}  {result}")
        for t in failed:
            print(f"{'':<30}FAILED {t}")
    bad = [r for r in rows if r[2]]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} runs passed" + (" (stopped at the first failure)" if stop else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
