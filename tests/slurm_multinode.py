"""A throw-away two-node Slurm cluster on one machine: each compute node in its own namespaces.

    host (slurmctld, munged) ── bridge gmn-br 10.213.13.1/24
        ├─ veth ── netns gmn-node1: eth0 10.213.13.2, hostname gmnode1, own /etc/hosts ── slurmd
        └─ veth ── netns gmn-node2: eth0 10.213.13.3, hostname gmnode2, own /etc/hosts ── slurmd

Each slurmd runs as ``nsenter --net=/run/netns/gmn-nodeK unshare --uts --mount sh -c 'mount --bind HOSTS
/etc/hosts; hostname gmnodeK; exec slurmd -D'``: a network namespace (its own address), a UTS
namespace (its own hostname, so slurmd finds its NodeName and gloo/torchrun see a distinct host)
and a mount namespace whose /etc/hosts (a file in the cluster's temporary directory) maps the node
names to their addresses. The machine's /etc/hosts is never touched: slurm.conf gives every node its
NodeAddr, and the jobs (which inherit slurmd's namespaces) resolve ``scontrol show hostnames``
names through the private hosts file. Traffic stays on the bridge, between the namespaces and the host.

Everything (daemons, namespaces, veths, bridge, temporary directory) is removed by :meth:`stop`,
which the fixture calls in ``finally`` and ``atexit`` calls if the process exits otherwise. A run
holds an exclusive lock (LOCK) for its lifetime; whatever a crashed earlier run left (namespaces and
the processes in them, the bridge, its daemons, its directory, recorded in STATE) is removed when
the next one starts. Where the cluster can't be built (not root, no ``ip``/``unshare``, namespaces
refused) :class:`ClusterUnavailable` says why, after removing whatever was made.

    with MultiNodeCluster.start() as cluster:     # or python tests/slurm_multinode.py
        subprocess.run(["sbatch", "--nodes=2", ...], env=cluster.env)
"""
from __future__ import annotations

import atexit
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import CONF_POLICY, SlurmCluster, SlurmUnavailable, _free_ports, auth_lines, ensure_installed  # noqa: E402

BRIDGE = "gmn-br"
SUBNET = "10.213.13"  # a private /24 used only on BRIDGE
NODES = ("gmnode1", "gmnode2")
LOCK = Path("/run/lock/gan-multinode.lock")
STATE = Path("/run/lock/gan-multinode.json")


class ClusterUnavailable(SlurmUnavailable):
    """The namespaces or the cluster can't be built here: a reason to skip."""


def netns_name(i: int) -> str:
    return f"gmn-node{i + 1}"


def node_addr(i: int) -> str:
    return f"{SUBNET}.{i + 2}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise ClusterUnavailable(f"`ip {' '.join(args)}` failed ({r.returncode}): {r.stderr.strip()}")
    return r


def netns_pids(ns: str) -> list[int]:
    """Pids of the processes in network namespace ``ns`` (by the namespace's inode; `ip netns pids`
    finds none under gVisor)."""
    try:
        want = f"net:[{os.stat(f'/run/netns/{ns}').st_ino}]"
    except OSError:
        return []
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.readlink(d / "ns" / "net") == want:
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def _kill_pids(pids, grace: float = 10.0) -> None:
    """TERM, then KILL after ``grace`` seconds, each pid given (the ones this module started)."""
    pids = [p for p in pids if p != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() and not _zombie(p) for p in pids):
            time.sleep(0.2)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def remove_network() -> None:
    """Delete our namespaces (after ending every process in them) and the bridge; idempotent."""
    for i in range(len(NODES)):
        ns = netns_name(i)
        if Path(f"/run/netns/{ns}").exists():
            _kill_pids(netns_pids(ns))
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", f"gmn-n{i + 1}", check=False)  # the host end, if its namespace is gone
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        _ip("link", "del", BRIDGE, check=False)


def clean_leftovers(log=print) -> None:
    """Remove what a crashed earlier run left behind (call with LOCK held: nobody else owns it)."""
    state = {}
    if STATE.is_file():
        try:
            state = json.loads(STATE.read_text())
        except ValueError:
            pass
    leftover = bool(state) or Path(f"/sys/class/net/{BRIDGE}").exists() or any(
        Path(f"/run/netns/{netns_name(i)}").exists() for i in range(len(NODES)))
    if not leftover:
        return
    log(f"removing what an earlier multinode run left behind: {state or 'namespaces/bridge'}")
    root = state.get("root", "")
    mine = []
    for pid in state.get("pids", []):  # host daemons, only if still running from that directory
        try:
            if root and root in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                mine.append(pid)
        except OSError:
            pass
    _kill_pids(mine)
    remove_network()
    if root.startswith(tempfile.gettempdir()) and Path(root).name.startswith("gan-slurm2-"):
        shutil.rmtree(root, ignore_errors=True)
    STATE.unlink(missing_ok=True)


class MultiNodeCluster(SlurmCluster):
    """slurmctld + munged on the host, one slurmd per node namespace. ``nodes``: the node names;
    ``addrs``: their addresses; ``env``: SLURM_CONF for sbatch & co."""

    nodes = NODES

    def __init__(self, root: Path, lock_fd: int):
        super().__init__(root)
        self.lock_fd = lock_fd
        self.addrs = [node_addr(i) for i in range(len(NODES))]
        self.host_addr = f"{SUBNET}.1"
        self.hosts_file = root / "hosts"
        self._stopped = False

    @classmethod
    def start(cls, timeout: float = 120.0, log=print) -> "MultiNodeCluster":
        if os.geteuid() != 0:
            raise ClusterUnavailable("network namespaces, veth links and a bridge need root")
        for tool in ("ip", "nsenter", "unshare", "mount"):
            if shutil.which(tool) is None:
                raise ClusterUnavailable(f"`{tool}` is not installed (Debian: iproute2 / util-linux / mount)")
        ensure_installed(log)
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.time() + 1800
        while True:  # one two-node cluster per machine at a time (fixed names and subnet)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() > deadline:
                    os.close(fd)
                    raise ClusterUnavailable(f"another two-node test cluster held {LOCK} for 30 minutes")
                time.sleep(2)
        root = Path(tempfile.mkdtemp(prefix="gan-slurm2-"))
        root.chmod(0o755)
        cluster = cls(root, fd)
        atexit.register(cluster.stop)
        try:
            clean_leftovers(log)
            cluster._save_state()
            cluster._network()
            cluster._start(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _save_state(self) -> None:
        STATE.write_text(json.dumps({"root": str(self.root), "pids": [p.pid for p in self.procs.values()]}))

    # ------------------------------------------------------------------ network
    def _network(self) -> None:
        for route in _ip("-4", "route", "show").stdout.splitlines():
            if route.startswith(f"{SUBNET}.") or f" {SUBNET}." in route:
                raise ClusterUnavailable(f"the subnet {SUBNET}.0/24 is already routed here: {route}")
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{self.host_addr}/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for i, addr in enumerate(self.addrs):
            ns, host_end = netns_name(i), f"gmn-n{i + 1}"
            _ip("netns", "add", ns)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", host_end, "master", BRIDGE, "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        hostname = os.uname().nodename
        self.hosts_file.write_text("\n".join(
            ["127.0.0.1 localhost", f"{self.host_addr} {hostname}"]
            + [f"{a} {n}" for a, n in zip(self.addrs, self.nodes)]) + "\n")
        # Check the namespaces can really be entered (a UTS/mount namespace may be refused).
        r = subprocess.run(self.in_node(0, ["sh", "-c", "hostname; getent hosts gmnode2"]),
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0 or r.stdout.split()[:2] != [NODES[0], self.addrs[1]]:
            raise ClusterUnavailable(f"can't enter a node's namespaces ({r.returncode}): {r.stdout}{r.stderr}")

    def in_node(self, i: int, cmd: list[str]) -> list[str]:
        """``cmd`` as run on node ``i``: its network namespace, hostname and /etc/hosts."""
        script = 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"'
        # nsenter, not `ip netns exec`: that one remounts /sys, hiding /sys/fs/cgroup from slurmd.
        return ["nsenter", f"--net=/run/netns/{netns_name(i)}", "unshare", "--uts", "--mount", "--propagation", "private",
                "sh", "-c", script, "in-node", str(self.hosts_file), self.nodes[i], *cmd]

    # ------------------------------------------------------------------ daemons
    def _start(self, timeout: float) -> None:
        r = self.root
        for d in ("state", "log", *(f"spool/{n}" for n in self.nodes)):
            (r / d).mkdir(parents=True)
        self._start_munge(timeout)

        probe = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        hw = re.sub(r"^NodeName=\S+\s*|\s+UpTime=\S+", "", probe).strip()
        # Each node owns the machine's cores; no node may claim all the memory of both.
        hw = re.sub(r"RealMemory=(\d+)", lambda m: f"RealMemory={int(m.group(1)) // 4}", hw)
        (ctl_port,) = _free_ports(1)
        host = os.uname().nodename
        self.conf.write_text("\n".join([
            "# generated by tests/slurm_multinode.py: two nodes in network namespaces",
            "ClusterName=gantest2",
            f"SlurmctldHost={host}({self.host_addr})",
            f"SlurmctldPort={ctl_port}",
            "SlurmdPort=6818",  # every node has its own address
            *auth_lines(self.munge_socket),  # with cred_expire: the requeue delay, REQUEUE_DELAY_S
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'spool'}/%n/slurmd.pid",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log'}/slurmd-%n.log",
            *CONF_POLICY,
            *(f"NodeName={n} NodeAddr={a} {hw} State=UNKNOWN" for n, a in zip(self.nodes, self.addrs)),
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._save_state()
        self._wait(lambda: self.run(["scontrol", "ping"], check=False).returncode == 0, timeout,
                   "slurmctld to answer")
        for i, n in enumerate(self.nodes):
            self._spawn(f"slurmd-{n}", self.in_node(i, ["slurmd", "-D", "-f", str(self.conf)]))
        self._wait(lambda: self.node_states() == ["idle"] * len(self.nodes), timeout, "both nodes to become idle")

    def node_states(self) -> list[str]:
        r = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
        return [s.lower() for s in r.stdout.split()] if r.returncode == 0 else []

    def node_processes(self, i: int, pattern: str) -> list[int]:
        """Pids of the processes on node ``i`` whose command line contains ``pattern``."""
        out = []
        for pid in netns_pids(netns_name(i)):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if pattern in cmd:
                out.append(pid)
        return out

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        """Cancel every job, stop the daemons, remove namespaces, links, bridge and the directory
        (GAN_SLURM_KEEP=1 keeps the directory), release the lock. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
                self.run(["scancel", "--full", "--user", str(os.getuid())], check=False)
                deadline = time.time() + 30
                while time.time() < deadline and self.jobs():
                    time.sleep(0.5)
            for name in [*(f"slurmd-{n}" for n in self.nodes), "slurmctld", "munged"]:
                p = self.procs.get(name)
                if p is not None and p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait(timeout=10)
            remove_network()  # and with it any job process still in a node's namespace
            if os.environ.get("GAN_SLURM_KEEP"):
                print(f"[multinode fixture] kept {self.root} (GAN_SLURM_KEEP)", file=sys.stderr)
            else:
                shutil.rmtree(self.root, ignore_errors=True)
            STATE.unlink(missing_ok=True)
        finally:
            os.close(self.lock_fd)  # releases the lock


if __name__ == "__main__":  # a cluster to play with: prints SLURM_CONF, stops on Ctrl-C
    c = MultiNodeCluster.start()
    print(f"export SLURM_CONF={c.conf}", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
        sys.exit(0)
