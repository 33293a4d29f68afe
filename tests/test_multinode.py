"""Multi-node training for real: a two-node Slurm cluster in network namespaces (tests/slurm_multinode.py).

Each node is a slurmd with its own address, hostname and /etc/hosts; on CPU a node runs one
process (GPUS_PER_NODE=1, ACCELERATE_USE_CPU=1: `accelerate launch --num_machines 2`, gloo), so a
2-node job has world size 2 with one rank per node. ``pytest -m multinode`` runs just these.
The straight run, its 1-node twin and the preemption run once per train.backend: DDP and DeepSpeed
ZeRO-2 (``train.backend=deepspeed deepspeed.stage=2``; skipped where deepspeed is not installed).
Skipped, with the reason, where the namespaces can't be built (not root, no ``ip``, refused).
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from slurm_multinode import ClusterUnavailable, MultiNodeCluster
from test_slurm import array_job_of, assert_same, checkpoint_contents, task_logs

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.multinode, pytest.mark.slow]

STEPS = 300  # long enough for a USR2 to land mid-run; a debug step takes milliseconds
CPU_RANKS = {"GPUS_PER_NODE": "1", "ACCELERATE_USE_CPU": "1"}  # one gloo rank per node
QUIET = ["checkpoint.every=100000", "log.every=1", "log.sample_every=100000"]  # only the final checkpoint
BACKENDS = {"ddp": [], "deepspeed": ["train.backend=deepspeed", "deepspeed.stage=2"]}  # what the tests add


@pytest.fixture(scope="module")
def cluster():
    try:
        c = MultiNodeCluster.start(log=lambda m: print(f"[multinode fixture] {m}", file=sys.stderr))
    except ClusterUnavailable as e:
        pytest.skip(f"no two-node cluster here: {e}")
    try:
        yield c
    finally:
        c.stop()


def test_leftovers_of_a_crashed_run_are_removed_at_the_next_start(tmp_path):
    """A run killed with -9 (no finally, no atexit) leaves daemons, namespaces and the bridge; the
    next start removes them all, and its own stop leaves nothing. (First in the file: the module's
    cluster holds the lock once it is up.)"""
    code = ("import os, sys; sys.path.insert(0, 'tests'); from slurm_multinode import MultiNodeCluster as C\n"
            "try:\n    c = C.start(log=lambda m: None)\nexcept Exception as e:\n    print('unavailable', e, flush=True); sys.exit(0)\n"
            "print('up', c.root, flush=True); os.kill(os.getpid(), 9)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if r.stdout.startswith("unavailable"):
        pytest.skip(f"no two-node cluster here: {r.stdout}")
    assert r.returncode == -9 and r.stdout.startswith("up"), r.stdout + r.stderr
    old_root = r.stdout.split()[1]
    assert Path("/sys/class/net/gmn-br").exists() and Path("/run/netns/gmn-node1").exists()

    code = ("import sys; sys.path.insert(0, 'tests'); from slurm_multinode import MultiNodeCluster as C\n"
            "c = C.start(log=print); print('second', c.root, c.node_states(), flush=True); c.stop()")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "removing what an earlier multinode run left behind" in r.stdout, r.stdout + r.stderr
    assert "['idle', 'idle']" in r.stdout, r.stdout
    assert not Path(old_root).exists() and not Path(r.stdout.split("second ")[1].split()[0]).exists()
    assert not Path("/sys/class/net/gmn-br").exists()
    assert not any(Path(f"/run/netns/gmn-node{i}").exists() for i in (1, 2))
    survivors = subprocess.run(["pgrep", "-f", old_root], capture_output=True, text=True).stdout.split()
    assert survivors == [], f"processes of the crashed run still alive: {survivors}"


def test_a_cluster_that_cannot_be_built_says_why_and_leaves_nothing(tmp_path):
    """No `ip` on the PATH: the reason, before anything is made. The subnet already in use (a veth
    pair holding an address in it): the reason, and the bridge, namespaces and directory made so
    far are gone."""
    code = ("import sys; sys.path.insert(0, 'tests'); from slurm_multinode import MultiNodeCluster as C, "
            "ClusterUnavailable as U\ntry:\n    C.start(log=lambda m: None)\nexcept U as e:\n    print('unavailable:', e)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PATH": str(tmp_path)})
    assert "unavailable: `ip` is not installed" in r.stdout, r.stdout + r.stderr
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("the second half needs root and `ip`")
    before = set(Path(tempfile.gettempdir()).glob("gan-slurm2-*"))
    made = subprocess.run(["ip", "link", "add", "gmn-test0", "type", "veth", "peer", "name", "gmn-test1"],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"can't add a veth pair here: {made.stderr}")
    try:
        subprocess.run(["ip", "addr", "add", "10.213.13.77/24", "dev", "gmn-test0"], check=True)
        subprocess.run(["ip", "link", "set", "gmn-test0", "up"], check=True)
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["ip", "link", "del", "gmn-test0"], capture_output=True)
    assert "unavailable: the subnet 10.213.13.0/24 is already routed here" in r.stdout, r.stdout + r.stderr
    assert not Path("/sys/class/net/gmn-br").exists() and not Path("/run/netns/gmn-node1").exists()
    assert set(Path(tempfile.gettempdir()).glob("gan-slurm2-*")) == before


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from conftest import build_tiny

    return build_tiny(tmp_path_factory.mktemp("mn_shards") / "shards", 240, 3, 32, 80, "tiny10")


def _env(**extra):
    return {"GAN_PYTHON": sys.executable, "GAN_REPO": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def sbatch(cluster, run: Path, shards: Path, *overrides, nodes: int = 2, env: dict | None = None,
           log_name: str = "") -> tuple[str, Path]:
    log = run.parent / f"{log_name or run.name}.log"
    r = cluster.run(["sbatch", "--parsable", f"--nodes={nodes}", "--cpus-per-task=1", f"--output={log}",
                     "slurm/train.sbatch", "--config", "configs/debug_cpu.yaml", "--run-dir", str(run),
                     f"data.shards={shards}", *QUIET, *overrides],
                    cwd=ROOT, env=_env(**(env or CPU_RANKS)))
    return r.stdout.strip().split(";")[0], log


def ended(log: Path) -> bool:
    """The job's log ends with train.sbatch's last line, and not with a requeue (that job runs again)."""
    if not log.is_file():
        return False
    last = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("[train.sbatch] end ")]
    return bool(last) and "action=requeue" not in last[-1]


def wait_done(cluster, job: str, logs: list[Path], timeout: float) -> None:
    """Wait until every log has ended (see :func:`ended`) and squeue, answering, lists no task of
    ``job``. A requeued job waits REQUEUE_DELAY_S (the cluster's cred_expire), then Slurm starts it
    by itself; it is never forced to start earlier (see tests/slurm_cluster.py). A held job never
    starts: fail at once. (The log, not squeue alone: a requeued job can be missing from squeue's
    default states for a moment.)"""
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = cluster.run(["squeue", "-h", "-r", "-o", "%i|%T|%r"], check=False)
        mine = [line.split("|") for line in r.stdout.splitlines()
                if line.split("|")[0] == job or line.startswith(job + "_")]
        if r.returncode == 0 and not mine and all(ended(f) for f in logs):
            return
        held = [m for m in mine if "held" in m[-1].lower()]
        if held:
            pytest.fail(f"job(s) held by Slurm: {held}\n{cluster.run(['scontrol', 'show', 'job'], check=False).stdout}"
                        + "\n".join(f.read_text() for f in logs if f.is_file()) + cluster.logs())
        time.sleep(1)
    pytest.fail(f"job {job} not done after {timeout:.0f} s: {cluster.jobs()}\n"
                + "\n".join(f.read_text() for f in logs if f.is_file()) + cluster.logs())


def wait_for(path: Path, log: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not path.exists():
        time.sleep(0.2)
    assert path.exists(), log.read_text() if log.is_file() else f"no job log {log}"


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def final(run: Path, step: int = STEPS) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def run_state(ckpt: Path) -> dict:
    """Everything a checkpoint holds (test_slurm.checkpoint_contents), and under DeepSpeed also
    every tensor of its engines: weights and each rank's optimizer partition (test_deepspeed.engine_tensors)."""
    out = checkpoint_contents(ckpt)
    if (ckpt / "deepspeed").is_dir():
        from test_deepspeed import engine_tensors

        out.update({f"deepspeed/{k}": v for k, v in engine_tensors(ckpt).items()})
    return out


@pytest.fixture(scope="module", params=list(BACKENDS))
def backend(request) -> str:
    """The tests that take it run once per train.backend."""
    if request.param == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (the README's set-up installs it, pinned in constraints.txt)")
    return request.param


@pytest.fixture(scope="module")
def two_node_run(cluster, shards, backend, tmp_path_factory):
    """One straight 2-node x 1-process run of STEPS steps (also the reference for the preemption test)."""
    run = tmp_path_factory.mktemp(f"two_node_{backend}") / "run"
    job, log = sbatch(cluster, run, shards, f"train.max_steps={STEPS}", *BACKENDS[backend])
    wait_done(cluster, job, [log], 600)
    return run, log.read_text()


def test_two_nodes_train_with_identical_replicas_and_match_one_node(cluster, shards, backend, two_node_run, tmp_path):
    """sbatch --nodes=2: one rank on each node, rendezvous on the first node, machine ranks from
    SLURM_NODEID; the replicas end identical; and the run equals a 1-node x 2-process run exactly:
    every loss of every step, G, D, G_ema, both optimizers, and every rank's RNG states.

    Under DeepSpeed ZeRO-2 all of that is exact too (measured, not assumed), including each rank's
    optimizer partition of both engines (fp32 weights and Adam moments) and the EMA export. Why:
    DeepSpeed runs its collectives on the process group Accelerate's c10d rendezvous made (it finds
    torch.distributed initialized and uses no launcher or MASTER_ADDR of its own), gloo on both
    layouts, and with two ranks every reduced element is one addition of the same two numbers, which
    IEEE floats make order-independent. (With more ranks per reduction the summation order could
    follow the layout; that is not tested here.)"""
    run, text = two_node_run
    assert "nodes=2 gpus/node=1 processes=2 head=gmnode1:" in text, text
    assert "--num_machines 2" in text and "--machine_rank @NODE_RANK@" in text, text
    assert "node gmnode1 machine_rank=0" in text and "node gmnode2 machine_rank=1" in text, text
    assert "replica check: G, D and G_ema identical on all 2 ranks" in text, text
    assert text.rstrip().endswith("end rc=0 state=finished action=done"), text
    meta = json.loads((final(run) / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["backend"] == backend, meta
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in final(run).iterdir()}
    assert steps_logged(run) == list(range(1, STEPS + 1))

    one = tmp_path / "one_node"
    job, log = sbatch(cluster, one, shards, f"train.max_steps={STEPS}", *BACKENDS[backend], nodes=1,
                      env={"GPUS_PER_NODE": "2", "ACCELERATE_USE_CPU": "1"})
    wait_done(cluster, job, [log], 600)
    one_text = log.read_text()
    assert "nodes=1 gpus/node=2 processes=2" in one_text and "action=done" in one_text, one_text
    rows2 = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows1 = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows2, rows1, strict=True):
        for k in ("Loss/D/main", "Loss/G/main"):
            assert a[k] == b[k], (a["step"], k)
    assert_same(run_state(final(run)), run_state(final(one)))
    assert_same(load_file(str(run / "export" / "G_ema.safetensors")), load_file(str(one / "export" / "G_ema.safetensors")))


def test_usr2_checkpoints_both_nodes_requeues_and_resumes_exactly(cluster, shards, backend, two_node_run, tmp_path):
    """USR2 to the batch shell (what --signal=B:USR2@120 does): the ranks on both nodes stop at the
    same step and checkpoint together (under DeepSpeed: both engines' partitioned states, one file per
    rank); the job requeues, waits out the requeue delay (REQUEUE_DELAY_S) and resumes there; every
    step is logged once and the end state equals the straight 2-node run's, bit for bit."""
    straight, _ = two_node_run
    run = tmp_path / "run"
    job, log = sbatch(cluster, run, shards, f"train.max_steps={STEPS}", *BACKENDS[backend])
    wait_for(run / "metrics.jsonl", log)
    cluster.run(["scancel", "--signal=USR2", "--batch", job])
    wait_done(cluster, job, [log], 600)
    text = log.read_text()
    found = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    assert len(found) == 2 and found[-1] == STEPS, (found, text)
    stop = found[0]
    assert 0 < stop < STEPS, text
    assert "end rc=0 state=preempted action=requeue" in text and f"requeueing {job} " in text, text
    first, again = text.split("restart=1", 1)
    assert f"stop requested (SIGUSR2) at step {stop}" in first, first  # rank 0 saw the signal itself
    for node, rank in (("gmnode1", 0), ("gmnode2", 1)):
        assert again.count(f"node {node} machine_rank={rank}") == 1, again  # both nodes ran again
    assert f"at step {stop}" in again, again  # ... from where they stopped
    assert text.rstrip().endswith("end rc=0 state=finished action=done"), text
    assert steps_logged(run) == list(range(1, STEPS + 1))
    assert_same(run_state(final(straight)), run_state(final(run)))


def test_kill_9_on_one_node_ends_the_other_and_resume_continues(cluster, shards, tmp_path):
    """kill -9 of the training process on node 2: node 1's rank does not hang (gloo sees the peer's
    socket close; train.collective_timeout bounds a silent hang), the job ends failed (no requeue:
    it is not a preemption), and resubmitting with --resume auto continues from the last good
    checkpoint. The surviving rank ends with its own clear message ("error: ...")."""
    run, timeout_s = tmp_path / "run", 30
    extra = [f"train.collective_timeout={timeout_s}"]
    job, log = sbatch(cluster, run, shards, "train.max_steps=100000", "checkpoint.every=20", *extra)
    wait_for(final(run, 20), log)
    victims = [p for p in cluster.node_processes(1, "launch/train.py")
               if "accelerate" not in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
    assert victims, f"no training process on gmnode2\n{log.read_text()}"
    for p in victims:
        os.kill(p, 9)
    wait_done(cluster, job, [log], 10 * timeout_s)  # a hang fails here
    text = log.read_text()
    assert text.rstrip().endswith("action=failed") and "action=requeue" not in text, text
    assert "host      : gmnode2" in text and "Signal 9 (SIGKILL)" in text, text  # what died, and where
    assert cluster.node_processes(0, "launch/train.py") == [], "a rank on gmnode1 outlived the job"
    last = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    assert last >= 20

    job2, log2 = sbatch(cluster, run, shards, f"train.max_steps={last + 10}", "checkpoint.every=20", *extra,
                        log_name="resumed")
    wait_done(cluster, job2, [log2], 600)
    text2 = log2.read_text()
    assert f"at step {last}" in text2 and text2.rstrip().endswith("action=done"), text2
    assert json.loads((run / "status.json").read_text())["step"] == last + 10
    assert re.search(r"^error: .*(collective|rank)", text, re.M), text


def test_two_node_sweep_runs_and_summarises(cluster, shards, tmp_path):
    """slurm/sweep.sh with `slurm: {nodes: 2}`: every array task spans both nodes and finishes;
    the summary lists them."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"base: {ROOT / 'configs/debug_cpu.yaml'}\n"
                     "grid:\n  optim.n_dis: [1, 2]\n"
                     "overrides: {train.max_steps: 6, checkpoint.every: 3}\n"
                     "slurm: {nodes: 2, cpus-per-task: 1}\n")
    out = tmp_path / "out"
    cluster.run(["bash", "slurm/sweep.sh", str(sweep), "--out", str(out), "--set", f"data.shards={shards}"],
                cwd=ROOT, env=_env(**CPU_RANKS))
    job = array_job_of(out)
    tasks = json.loads((out / "sweep.json").read_text())["tasks"]
    wait_done(cluster, job, [out / "logs" / f"{job}_{t['index']}.log" for t in tasks], 600)
    assert len(tasks) == 2
    for t in tasks:
        log = (out / "logs" / f"{job}_{t['index']}.log").read_text()
        assert "nodes=2" in log and "node gmnode2 machine_rank=1" in log, log
        assert "replica check: G, D and G_ema identical on all 2 ranks" in log, log
        assert log.rstrip().endswith("end rc=0 state=finished action=done"), log
    cluster.run([sys.executable, "launch/sweep_summary.py", str(out)], cwd=ROOT)
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["name"] for r in rows] == [t["name"] for t in tasks], task_logs(out)
    assert {r["status"] for r in rows} == {"finished"}


def test_accelerate_launch_across_two_hosts_without_slurm(cluster, shards, tmp_path):
    """The README's command for clusters without Slurm, once per host (here: per namespace),
    rendezvous on the first host's address."""
    run, port = tmp_path / "run", 29611
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "2", "--num_processes", "2",
               "--machine_rank", str(rank), "--main_process_ip", cluster.addrs[0], "--main_process_port", str(port),
               "--multi_gpu", "--dynamo_backend", "no", "launch/train.py", "--config", "configs/debug_cpu.yaml",
               "--run-dir", str(run), f"data.shards={shards}", "train.max_steps=6"]
        out = open(tmp_path / f"host{rank}.log", "w")
        procs.append(subprocess.Popen(cluster.in_node(rank, cmd), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                      env={**os.environ, **_env(ACCELERATE_USE_CPU="1")}))
    try:
        rcs = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [(tmp_path / f"host{r}.log").read_text() for r in (0, 1)]
    assert rcs == [0, 0], "\n".join(logs)
    assert "replica check: G, D and G_ema identical on all 2 ranks" in logs[0], logs[0]
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert json.loads((final(run, 6) / "meta.json").read_text())["world_size"] == 2
