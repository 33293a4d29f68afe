"""A throw-away one-node Slurm cluster for the tests: Debian's slurm-wlm + munge, started by hand.

Everything lives in one temporary directory (munge key and socket, slurm.conf, state, spool, logs)
and on free ports, so it touches nothing system-wide and can run next to another copy of itself.
No systemd: the daemons run in the foreground as children of the test process, as root, and
:meth:`SlurmCluster.stop` cancels every job and stops every daemon it started.

    with SlurmCluster.start() as cluster:      # or python tests/slurm_cluster.py (prints SLURM_CONF)
        subprocess.run(["sbatch", ...], env=cluster.env)
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from debian import Unavailable, apt_install  # noqa: E402

BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo", "munged")
PACKAGES = ("slurm-wlm", "munge")
REQUEUE_DELAY_S = 30  # slurm.conf AuthInfo cred_expire: how long a requeued job waits before it may start again


class SlurmUnavailable(Unavailable):
    """Slurm can't be installed here (not root, no apt-get, apt failed): a reason to skip."""


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def ensure_installed(log=print) -> None:
    """Install slurm-wlm and munge with apt-get if any binary is missing."""
    missing = missing_binaries()
    if not missing:
        return
    try:
        apt_install(PACKAGES, f"Slurm ({', '.join(missing)} missing)", log=log)
    except Unavailable as e:
        raise SlurmUnavailable(str(e)) from None
    still = missing_binaries()
    if still:
        raise SlurmUnavailable(f"apt-get installed {' '.join(PACKAGES)} but {', '.join(still)} is still missing")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
            socks.append(s)
            if p not in (6817, 6818, 6819) and p not in ports:
                ports.append(p)
    finally:
        for s in socks:
            s.close()
    return ports


# slurm.conf lines every test cluster shares (the one-node cluster here, the two-node one in
# tests/slurm_multinode.py): no cgroups or systemd, consumable cores, no accounting.
CONF_POLICY = [
    "ProctrackType=proctrack/linuxproc",
    "TaskPlugin=task/none",
    "SelectType=select/cons_tres",
    "SelectTypeParameters=CR_Core",
    "SchedulerType=sched/backfill",
    # A requeued job may start REQUEUE_DELAY_S after its requeue, and then the main scheduling loop
    # starts it: every 60 s by default (nothing changes when a BeginTime passes, so neither an event nor
    # the backfill loop, which runs only after changes, starts it earlier). Every 2 s: within 2 s.
    "SchedulerParameters=sched_interval=2",
    "MpiDefault=none",
    "SwitchType=switch/none",
    "JobCompType=jobcomp/none",
    "JobAcctGatherType=jobacct_gather/none",
    "AccountingStorageType=accounting_storage/none",
    "ReturnToService=2",
    "MaxArraySize=1001",
    "KillWait=10",
    "SlurmctldDebug=info",
    "SlurmdDebug=info",
]

def auth_lines(munge_socket: Path) -> list[str]:
    """slurm.conf's munge authentication for every test cluster (one node here, two in
    tests/slurm_multinode.py). cred_expire is also Slurm's requeue delay: a requeued job may start
    only once the credentials of its previous run have expired (120 s by default). Forcing it earlier
    (scontrol update StartTime=now) can launch it while a slurmd still holds the revoked credential:
    the launch fails and Slurm holds the job ("launch failed requeued held"), for ever.
    REQUEUE_DELAY_S (30 s) keeps the tests short."""
    return ["AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={munge_socket},cred_expire={REQUEUE_DELAY_S}"]


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for k in list(self.env):  # never talk to (or inherit settings of) another Slurm
            if (k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_"))) and k != "SLURM_CONF":
                del self.env[k]

    # ------------------------------------------------------------------ start
    @classmethod
    def start(cls, timeout: float = 90.0, log=print) -> "SlurmCluster":
        ensure_installed(log)
        root = Path(tempfile.mkdtemp(prefix="gan-slurm-"))
        root.chmod(0o755)  # munged insists that every directory above its socket is searchable
        cluster = cls(root)
        try:
            cluster._start(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start(self, timeout: float) -> None:
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir()
        self._start_munge(timeout)

        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        node = re.sub(r"\s+UpTime=\S+", "", node).strip()
        self.node = re.match(r"NodeName=(\S+)", node).group(1)
        ctl_port, d_port = _free_ports(2)
        self.conf.write_text("\n".join([
            "# generated by tests/slurm_cluster.py: one node, everything under this directory",
            "ClusterName=gantest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctl_port}",
            f"SlurmdPort={d_port}",
            *auth_lines(self.munge_socket),
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            *CONF_POLICY,
            f"{node} NodeAddr=127.0.0.1 State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._wait(lambda: self.run(["scontrol", "ping"], check=False).returncode == 0, timeout,
                   "slurmctld to answer")
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self._wait(lambda: self.node_state().startswith("idle"), timeout, "the node to become idle")

    def _start_munge(self, timeout: float) -> None:
        """munged with a fresh key, its socket under this cluster's directory (``self.munge_socket``)."""
        key_dir, run_dir = self.root / "munge-key", self.root / "munge-run"
        key_dir.mkdir(mode=0o700)
        run_dir.mkdir(mode=0o755)
        key = key_dir / "munge.key"
        key.write_bytes(os.urandom(1024))  # any >= 32 random bytes make a key (what mungekey --create writes)
        key.chmod(0o600)
        self.munge_socket = run_dir / "munge.socket"
        self._spawn("munged", ["munged", "--foreground", "--force", f"--key-file={key}",
                               f"--socket={self.munge_socket}", f"--pid-file={run_dir / 'munged.pid'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}",
                               f"--seed-file={run_dir / 'munged.seed'}"])
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged to create its socket")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.console", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)

    def _wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited ({p.returncode}) while waiting for {what}\n{self.logs()}")
            if cond():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")

    # ------------------------------------------------------------------ use
    def run(self, cmd: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                           timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def node_state(self) -> str:
        r = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
        return r.stdout.strip().lower() if r.returncode == 0 else ""

    def jobs(self) -> list[tuple[str, str, str]]:
        """(id, state, reason) of every job still known to squeue, array tasks one by one."""
        r = self.run(["squeue", "-h", "-r", "-o", "%i|%T|%r"], check=False)
        return [tuple(line.split("|", 2)) for line in r.stdout.splitlines() if line.count("|") == 2]

    def logs(self, lines: int = 40) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f.name} (last {len(text)} lines)\n" + "\n".join(text))
        return "\n".join(out)

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        """Cancel every job, stop slurmd, slurmctld and munged (each by its own pid), and remove the
        directory (set GAN_SLURM_KEEP=1 to keep it, logs included)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--user", str(os.getuid())], check=False)
            deadline = time.time() + 30
            while time.time() < deadline and self.jobs():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        if os.environ.get("GAN_SLURM_KEEP"):
            print(f"[slurm fixture] kept {self.root} (GAN_SLURM_KEEP)", file=sys.stderr)
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


if __name__ == "__main__":  # a cluster to play with: prints SLURM_CONF, stops on Ctrl-C
    c = SlurmCluster.start()
    print(f"export SLURM_CONF={c.conf}", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
        sys.exit(0)
