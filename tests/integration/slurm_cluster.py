"""A real SLURM cluster on this machine, for tests: munge, a controller, one slurmd per node.

The nodes are network namespaces from ``runtime.bench.virtual_hosts.bridged_hosts``: each
has its own address on a bridge whose address (the root namespace's) the controller
listens on. Every slurmd runs inside its node's namespace, in a UTS and mount namespace of
its own (``nsenter --net`` + ``unshare --uts --mount``, not ``ip netns exec``, which hides
/sys/fs/cgroup and makes slurmd 22.05 exit), with the node's host name and a bind-mounted
hosts file naming the controller and every node: the jobs it starts see the same.

Nothing already on the machine is touched: munged gets its own key and socket, the
daemons their own config (``SLURM_CONF``), ports, state and logs, all under a scratch
folder that is removed at the end. On exit, also after a failure, every job is cancelled,
every daemon stopped, any process still carrying this cluster's ``SLURM_CONF`` killed, and
the namespaces deleted.

Needs root, iproute2 and Debian's slurmctld, slurmd, slurm-client and munge packages;
``unavailable_reason()`` says which is missing so a test can skip with it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from runtime.bench import virtual_hosts
from runtime.bench.virtual_hosts import Host

COMMANDS = ("munged", "mungekey", "munge", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue",
            "scancel", "nsenter", "unshare")
READY_TIMEOUT_S = 30
STOP_TIMEOUT_S = 10
NODE_CPUS = 2
NODE_MEMORY_MB = 1000  # must not exceed what `slurmd -C` reports


class SlurmUnavailable(RuntimeError):
    """The cluster cannot be brought up here; the message says why."""


def unavailable_reason() -> str | None:
    """Why no cluster can run here (not root, no iproute2, a missing package), or None."""
    if reason := virtual_hosts.unavailable_reason():
        return reason
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    if missing:
        return f"needs SLURM and munge ({', '.join(missing)} not found): apt-get install slurmctld slurmd " \
               "slurm-client munge"
    return None


@dataclass(frozen=True, slots=True)
class SlurmNode:
    name: str
    host: Host
    """Its namespace and address on the bridge."""


@dataclass(slots=True)
class SlurmCluster:
    scratch: Path
    conf: Path
    controller_address: str
    """The bridge's address in the root namespace, where slurmctld listens."""
    nodes: tuple[SlurmNode, ...]
    env: dict[str, str] = field(repr=False)
    """This machine's environment with ``SLURM_CONF`` pointing here: for clients and jobs."""

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """A SLURM client command (sbatch, scontrol, ...) against this cluster."""
        result = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}\n"
                                 f"{self.daemon_logs()}")
        return result

    def submit(self, script: Path) -> str:
        """The job id of ``script`` once queued."""
        return self.run("sbatch", "--parsable", str(script)).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as key/value pairs (JobState, ExitCode, NodeList, ...); empty
        once the controller forgot the job (MinJobAge after it ended)."""
        result = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        fields = (part.partition("=") for part in result.stdout.split())
        return {key: value for key, _, value in fields}

    def wait_job_ended(self, job_id: str, timeout: float) -> dict[str, str]:
        """The job's record once it left the running states, or AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while (info := self.job(job_id)) and info.get("JobState") in ("PENDING", "CONFIGURING", "RUNNING",
                                                                      "COMPLETING", "SUSPENDED"):
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {info.get('JobState')} after {timeout} s")
            time.sleep(0.5)
        return info

    def daemon_logs(self, tail: int = 3000) -> str:
        """The daemons' logs' ends, for failure messages."""
        parts = []
        for log in sorted((self.scratch / "log").glob("*.log")):
            parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)


@contextmanager
def slurm_cluster(parent: Path, nodes: int = 2) -> Iterator[SlurmCluster]:
    """A running cluster of ``nodes`` idle nodes (node0, node1, ...) in one partition;
    everything under ``parent/slurm``, removed at the end."""
    if reason := unavailable_reason():
        raise SlurmUnavailable(reason)
    scratch = parent / "slurm"
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        bridge = stack.enter_context(virtual_hosts.bridged_hosts(nodes))
        for sub in ("log", "state", "spool", "munge"):
            (scratch / sub).mkdir(parents=True, exist_ok=True)
        scratch.chmod(0o755)  # munged wants its socket's folders searchable by all
        members = tuple(SlurmNode(f"node{i}", host) for i, host in enumerate(bridge.hosts))
        daemons = _Daemons(scratch / "log")
        conf = scratch / "slurm.conf"
        cluster = SlurmCluster(scratch=scratch, conf=conf, controller_address=bridge.address, nodes=members,
                               env=dict(os.environ, SLURM_CONF=str(conf)))
        stack.callback(_stop_everything, cluster, daemons)

        socket_path = _start_munge(scratch / "munge", daemons)
        (scratch / "plugstack.conf").write_text("")  # not /etc/slurm's: no SPANK plugins
        conf.write_text(slurm_conf(scratch, bridge.address, members, socket_path))
        hosts = scratch / "hosts"
        hosts.write_text(f"127.0.0.1 localhost\n{bridge.address} {socket.gethostname()}\n"
                         + "".join(f"{n.host.address} {n.name}\n" for n in members))
        daemons.start("slurmctld", ["slurmctld", "-D", "-f", str(conf)], cluster.env)
        for node in members:
            # The node's own host name and hosts file, for slurmd and every job step it starts.
            inside = (f"hostname {node.name} && mount --bind {hosts} /etc/hosts && "
                      f"exec slurmd -D -N {node.name} -f {conf}")
            daemons.start(f"slurmd-{node.name}", ["nsenter", f"--net={node.host.netns_path}", "unshare", "--uts",
                                                  "--mount", "sh", "-c", inside], cluster.env)
        _wait_idle(cluster, daemons)
        yield cluster


def slurm_conf(scratch: Path, controller_address: str, nodes: tuple[SlurmNode, ...], munge_socket: Path) -> str:
    """A minimal slurm.conf: no cgroups, no accounting database, everything under ``scratch``."""
    node_lines = [f"NodeName={n.name} NodeAddr={n.host.address} CPUs={NODE_CPUS} RealMemory={NODE_MEMORY_MB} "
                  "State=UNKNOWN" for n in nodes]
    return "\n".join([
        f"ClusterName=mm{os.getpid()}",
        f"SlurmctldHost={socket.gethostname()}({controller_address})",
        f"SlurmctldPort={_free_port()}",  # not 6817: a real controller may be running here
        "SlurmUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        "MpiDefault=none",
        "ProctrackType=proctrack/linuxproc",  # no cgroups in a namespace
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",  # memory not consumed: two small jobs may share the nodes
        "ReturnToService=2",
        "KillWait=10",  # seconds from scancel's SIGTERM to SIGKILL (default 30)
        f"PlugStackConfig={scratch / 'plugstack.conf'}",
        f"StateSaveLocation={scratch / 'state'}",
        f"SlurmdSpoolDir={scratch / 'spool'}/%n",
        f"SlurmctldPidFile={scratch / 'slurmctld.pid'}",
        f"SlurmdPidFile={scratch / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={scratch / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={scratch / 'log' / 'slurmd-%n.log'}",
        *node_lines,
        f"PartitionName=test Nodes={','.join(n.name for n in nodes)} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


class _Daemons:
    """Processes started here, each in a session of its own with its output in ``log_dir``."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        with open(self.log_dir / f"{name}.out.log", "wb") as out:
            self.procs[name] = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)

    def exited(self) -> list[str]:
        return [f"{name} exited {p.returncode}" for name, p in self.procs.items() if p.poll() is not None]

    def stop(self, names: list[str]) -> None:
        """SIGTERM, then SIGKILL for whoever is still there after ``STOP_TIMEOUT_S``."""
        procs = [self.procs[n] for n in names if n in self.procs and self.procs[n].poll() is None]
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)


def _start_munge(folder: Path, daemons: _Daemons) -> Path:
    """munged with a key and socket of its own; returns the socket's path."""
    key, sock = folder / "munge.key", folder / "munge.socket"
    subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True, capture_output=True, timeout=20)
    # --force: munged refuses to run as root, or with its files under /tmp, without it.
    daemons.start("munged", ["munged", "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
                             f"--pid-file={folder / 'munged.pid'}",
                             f"--log-file={folder.parent / 'log' / 'munged.log'}",
                             f"--seed-file={folder / 'munged.seed'}"], dict(os.environ))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while subprocess.run(["munge", "--socket", str(sock), "--no-input"], capture_output=True).returncode != 0:
        if time.monotonic() > deadline or daemons.exited():
            raise SlurmUnavailable(f"munged did not start: {daemons.exited()}")
        time.sleep(0.1)
    return sock


def _wait_idle(cluster: SlurmCluster, daemons: _Daemons) -> None:
    """Until ``sinfo`` shows every node idle; SlurmUnavailable with the logs if not in time."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        result = cluster.run("sinfo", "--noheader", "--Node", "--format=%N %T", check=False)
        states = dict(line.split() for line in result.stdout.splitlines() if len(line.split()) == 2)
        if len(states) == len(cluster.nodes) and set(states.values()) == {"idle"}:
            return
        if daemons.exited() or time.monotonic() > deadline:
            raise SlurmUnavailable(f"nodes not idle in {READY_TIMEOUT_S} s: {states or result.stderr.strip()}; "
                                   f"{daemons.exited()}\n{cluster.daemon_logs()}")
        time.sleep(0.3)


def _stop_everything(cluster: SlurmCluster, daemons: _Daemons) -> None:
    """Cancel every job, stop the daemons, then kill whatever still carries this cluster's
    SLURM_CONF (job steps whose slurmd went first)."""
    if "slurmctld" in daemons.procs and daemons.procs["slurmctld"].poll() is None:
        jobs = cluster.run("squeue", "--noheader", "--format=%i", check=False).stdout.split()
        if jobs:
            cluster.run("scancel", *jobs, check=False)
            deadline = time.monotonic() + STOP_TIMEOUT_S + 5  # KillWait, then the SIGKILL
            while cluster.run("squeue", "--noheader", "--format=%i", check=False).stdout.split():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
    daemons.stop([n for n in daemons.procs if n.startswith("slurmd-")])
    daemons.stop(["slurmctld"])
    daemons.stop(["munged"])
    marker = f"SLURM_CONF={cluster.conf}".encode()
    for pid in processes_with_env(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def processes_with_env(entry: bytes) -> list[int]:
    """Pids of this machine's processes whose environment holds ``entry`` (``KEY=value``)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:  # gone, or a kernel thread
            continue
        if entry in environ.split(b"\0"):
            found.append(int(proc.name))
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
