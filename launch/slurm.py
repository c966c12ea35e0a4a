"""Write (and optionally submit) a SLURM batch script that runs a Mind Mirror pipeline.

    python launch/slurm.py --config configs/mirror.yaml --nodes 2            # writes + prints it
    python launch/slurm.py --config configs/mirror-2node.yaml --nodes 2 --gpus-per-node 4 \\
        --partition gpu --time 2:00:00 --ifname ib0 --sbatch-arg=--exclusive --submit

The job runs one task per node; each is a torchrun starting --nproc-per-node ranks of
launch/mirror.py. Rank 0 (web server, control hub) lands on the allocation's first node,
the head, every time: torchrun's static rendezvous with ``--node-rank $SLURM_NODEID``
numbers the nodes as SLURM does. (The c10d rendezvous cannot promise that: it ranks nodes
by sorting their addresses, whichever node hosts the store, see ``build_script``.)

Before anything is written, the config is loaded and planned for nodes x nproc ranks, so
a pipeline that does not fit is refused here with the planner's message, not in the job.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT_DIR = REPO / "results" / "slurm"
"""Git-ignored, and next to the checkout, which the nodes must see anyway."""
MAX_AUTO_NPROC = 64
"""--nproc-per-node is searched up to this when not given (beyond it, give it)."""
TOKEN_ENV = "MINDMIRROR_TOKEN"  # stages.server.access.TOKEN_ENV, without importing the server
_TIME = re.compile(r"(\d+(-\d+)?(:\d{1,2}){0,2}|UNLIMITED|INFINITE)", re.IGNORECASE)
_NAME = re.compile(r"[A-Za-z0-9_.,+-]+")
_IFNAME = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")
# sbatch options this tool writes itself, and the option of ours that sets each.
_MANAGED = {"--nodes": "--nodes", "-N": "--nodes", "--ntasks-per-node": "--nproc-per-node",
            "--ntasks": "--nodes", "-n": "--nodes", "--output": "--output-dir", "-o": "--output-dir",
            "--job-name": "--job-name", "-J": "--job-name", "--partition": "--partition", "-p": "--partition",
            "--account": "--account", "-A": "--account", "--time": "--time", "-t": "--time",
            "--gpus-per-node": "--gpus-per-node", "--chdir": "(the repository)", "-D": "(the repository)"}


class SlurmArgumentError(ValueError):
    """A launch argument that cannot work; ``argument`` names the option to change."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"{argument}: {message}")
        self.argument = argument


@dataclass(frozen=True, kw_only=True, slots=True)
class SlurmJob:
    """Everything the batch script is made of; checked when built."""

    nodes: int
    """Nodes to allocate; one torchrun task runs on each."""
    nproc_per_node: int
    """Ranks torchrun starts on every node (torchrun needs the same count everywhere)."""
    config: Path | None = None
    """Pipeline config (absolute); None: launch/mirror.py's embedded default."""
    gpus_per_node: int | None = None
    """GPUs to request per node (``#SBATCH --gpus-per-node``); None: a CPU job."""
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    """Time limit in a SLURM format (``30``, ``2:00:00``, ``1-12``, ...); None: the partition's."""
    job_name: str = "mindmirror"
    """SLURM job name, also the prefix of the script's and logs' file names."""
    output_dir: Path = DEFAULT_OUTPUT_DIR
    """Where the batch log and the per-node logs go: must be visible from every node."""
    port: int = 8765
    """The web server's port on the head node."""
    rdzv_port: int = 29400
    """The head's torchrun store port, which every node connects to."""
    host: str = "0.0.0.0"
    """Web bind address. A wildcard: browsers come from other machines than the head."""
    ifname: str | None = None
    """Network interface the nodes reach each other on (GLOO/NCCL_SOCKET_IFNAME); also
    where the head's address is read. None: the libraries choose, the head's name is resolved."""
    python: str = sys.executable
    """Interpreter (e.g. a virtualenv's) to run on every node: a path they all see."""
    repo: Path = REPO
    """Checkout the job runs from (its working directory)."""
    max_restarts: int = 0
    """torchrun --max-restarts: relaunches of a node's ranks after they failed."""
    join_timeout_s: int = 300
    """Seconds the nodes wait for each other at the rendezvous before giving up."""
    sbatch_args: tuple[str, ...] = ()
    """Extra ``#SBATCH`` options, verbatim (e.g. ``--exclusive``, ``--mem=0``)."""

    def __post_init__(self) -> None:
        for name, value, low in (("--nodes", self.nodes, 1), ("--nproc-per-node", self.nproc_per_node, 1),
                                 ("--max-restarts", self.max_restarts, 0), ("--join-timeout", self.join_timeout_s, 1)):
            if value < low:
                raise SlurmArgumentError(name, f"must be at least {low}, got {value}")
        if self.gpus_per_node is not None and self.gpus_per_node < 1:
            raise SlurmArgumentError("--gpus-per-node", f"must be at least 1 (omit it for CPU nodes), "
                                                         f"got {self.gpus_per_node}")
        for name, port in (("--port", self.port), ("--rdzv-port", self.rdzv_port)):
            if not 1 <= port <= 65535:
                raise SlurmArgumentError(name, f"must be a TCP port within 1..65535, got {port}")
        if self.port == self.rdzv_port:
            raise SlurmArgumentError("--rdzv-port", f"must differ from --port ({self.port}): both listen on the head")
        names = (("--partition", self.partition), ("--account", self.account), ("--job-name", self.job_name))
        for name, value in names:
            if value is not None and not _NAME.fullmatch(value):
                raise SlurmArgumentError(name, f"{value!r} is not a SLURM name (letters, digits, _ . , + -)")
        if self.time is not None and not _TIME.fullmatch(self.time):
            raise SlurmArgumentError("--time", f"{self.time!r} is not a SLURM time: use minutes, MM:SS, HH:MM:SS, "
                                               "D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED")
        if self.ifname is not None and not _IFNAME.fullmatch(self.ifname):
            raise SlurmArgumentError("--ifname", f"{self.ifname!r} is not a network interface name (e.g. eth0, ib0)")
        if not self.host or any(c.isspace() for c in self.host):
            raise SlurmArgumentError("--host", f"must be an address or host name, got {self.host!r}")
        for name, path in (("--output-dir", self.output_dir), ("the repository", self.repo)):
            if any(c.isspace() or c == "%" for c in str(path)):
                raise SlurmArgumentError(name, f"{str(path)!r} holds a space or '%', which #SBATCH lines cannot "
                                               "carry; choose another folder")
        for arg in self.sbatch_args:
            _check_sbatch_arg(arg)

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node

    @property
    def batch_log(self) -> Path:
        """The batch script's own log (``%j``: the job id): the plan, the head, the URL."""
        return self.output_dir / f"{self.job_name}-%j.out"

    @property
    def node_log(self) -> Path:
        """One log per node (``%N``: its name) with everything its ranks print."""
        return self.output_dir / f"{self.job_name}-%j-%N.log"


def _check_sbatch_arg(arg: str) -> None:
    if not arg.startswith("-") or "\n" in arg:
        raise SlurmArgumentError("--sbatch-arg", f"{arg!r} is not one sbatch option (e.g. --sbatch-arg=--exclusive)")
    option = arg.split("=", 1)[0] if arg.startswith("--") else arg[:2]
    if option in _MANAGED:
        raise SlurmArgumentError("--sbatch-arg", f"{option} is set by this tool; use {_MANAGED[option]} instead")


def fit_pipeline(config: Path | None, nodes: int, gpus_per_node: int | None, nproc_per_node: int | None,
                 host: str = "0.0.0.0", port: int = 8765) -> int:
    """The processes per node to run: ``nproc_per_node`` once the pipeline plans on it;
    when None, ``gpus_per_node`` (one process per GPU), else the fewest that plan. Raises
    ``SlurmArgumentError`` with the config loader's or the planner's message."""
    # Imported here: they pull in torch, which --help and argument errors need not wait for.
    from core.config import ConfigError
    from runtime.config import load_config
    from runtime.placement import PlanError
    from runtime.planner import plan

    try:
        job_config = load_config(config, {"server.host": host, "server.port": port})
    except ConfigError as e:
        raise SlurmArgumentError("--config", f"{config or 'the embedded default'}: {e}") from None
    gpus = gpus_per_node or 0

    def problem(nproc: int) -> str | None:
        try:
            plan(job_config.pipeline, nodes * nproc, nodes, gpus, job_config.transport)
        except PlanError as e:
            return str(e.in_config())
        return None

    wanted = nproc_per_node or gpus_per_node
    if wanted is not None:
        if (message := problem(wanted)) is not None:
            raise SlurmArgumentError("--nproc-per-node", f"the pipeline does not fit {nodes} node(s) x {wanted} "
                                                         f"process(es): {message}")
        return wanted
    tried = []
    for nproc in range(1, MAX_AUTO_NPROC + 1):
        if (message := problem(nproc)) is None:
            return nproc
        tried.append(f"with {nproc} per node: {message}")
    raise SlurmArgumentError("--nproc-per-node", f"no count from 1 to {MAX_AUTO_NPROC} fits the pipeline on {nodes} "
                                                 f"node(s); " + "; ".join(tried[:2]))


def build_script(job: SlurmJob, command_line: str = "") -> str:
    """The batch script for ``job``: bash, readable, each step commented with why."""
    q = shlex.quote
    directives = [f"--job-name={job.job_name}", f"--nodes={job.nodes}", "--ntasks-per-node=1"]
    directives += [f"--gpus-per-node={job.gpus_per_node}"] if job.gpus_per_node else []
    directives += [f"--{name}={value}" for name, value in
                   (("partition", job.partition), ("account", job.account), ("time", job.time)) if value]
    directives += [f"--chdir={job.repo}", f"--output={job.batch_log}", *job.sbatch_args]
    # Written out only when given (no empty bash array: "${a[@]}" fails under set -u before bash 4.4).
    config_flag = ' --config "$CONFIG"' if job.config else ""
    dry_run_gpus = f" --gpus-per-node {job.gpus_per_node}" if job.gpus_per_node else ""
    if job.ifname:
        network = f"""# The interface the nodes reach each other on, for gloo and NCCL alike.
export GLOO_SOCKET_IFNAME={q(job.ifname)} NCCL_SOCKET_IFNAME={q(job.ifname)}"""
        find_head = ('head_addr=$(ip -4 -o addr show dev "$GLOO_SOCKET_IFNAME" '
                     "| awk 'NR == 1 {split($4, a, \"/\"); print a[1]}')")
    else:
        network = "# No --ifname: gloo and NCCL pick an interface themselves (set one on multi-homed nodes)."
        find_head = """head_addr=$(getent ahostsv4 "$head_node" | awk 'NR == 1 {print $1}')"""
    lines = [
        "#!/bin/bash",
        "# A Mind Mirror pipeline on SLURM, written by launch/slurm.py"
        + (f":\n#   {command_line}" if command_line else "."),
        "# Submit: sbatch THIS_FILE. Stop: scancel JOB_ID (SLURM signals every process of the job).",
        *(f"#SBATCH {d}" for d in directives),
        "set -euo pipefail",
        "",
        "PYTHON=" + q(job.python),
        "LAUNCHER=" + q(str(job.repo / "launch" / "mirror.py")),
        *([f"CONFIG={q(str(job.config))}"] if job.config else []),
        f"NPROC_PER_NODE={job.nproc_per_node}",
        f"WEB_HOST={q(job.host)}",
        f"WEB_PORT={job.port}",
        f"RDZV_PORT={job.rdzv_port}",
        f"JOIN_TIMEOUT_S={job.join_timeout_s}",
        f"MAX_RESTARTS={job.max_restarts}",
        f"LOG_DIR={q(str(job.output_dir))}",
        f"JOB_NAME={q(job.job_name)}",
        "",
        network,
        "# Each line of the ranks' output reaches the logs as it is printed, not when a buffer fills.",
        "export PYTHONUNBUFFERED=1",
        "# srun of Slurm 22.05 to 23.02 does not pass an allocation's --cpus-per-task on to its tasks.",
        '[ -z "${SLURM_CPUS_PER_TASK:-}" ] || export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"',
        f"# {TOKEN_ENV}, when set where sbatch ran, reaches every rank through sbatch's default",
        "# --export=ALL: a secret is never written into this file.",
        "",
        "# The head is the allocation's first node: SLURM runs this script there, and it is",
        "# node 0 (SLURM_NODEID) of the step below, where rank 0 and the web server run.",
        'mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        'head_node=${nodes[0]:-}',
        find_head,
        'if [[ -z "$head_node" || -z "${head_addr:-}" || "$head_addr" == 127.* ]]; then',
        '    echo "cannot tell the head node\'s address (node \'$head_node\', address \'${head_addr:-}\'):" \\',
        '         "a loopback or no address; regenerate with --ifname IFACE" >&2',
        "    exit 1",
        "fi",
        'echo "job $SLURM_JOB_ID: ${#nodes[@]} node(s) ${nodes[*]}; head $head_node ($head_addr)"',
        'echo "per-node logs: $LOG_DIR/$JOB_NAME-$SLURM_JOB_ID-<node>.log"',
        "",
        "# The plan first: which rank runs what on which node. A pipeline that does not fit",
        "# stops the job here, before any node starts.",
        f'"$PYTHON" "$LAUNCHER"{config_flag} --dry-run --world-size $((SLURM_NNODES * NPROC_PER_NODE)) \\',
        f'    --nnodes "$SLURM_NNODES"{dry_run_gpus}',
        "",
        "# Rank 0 prints the page's address in the head's log; copy it here (without any",
        "# ?token=, which stays in the head's log) so this log says where to point a browser.",
        'head_log="$LOG_DIR/$JOB_NAME-$SLURM_JOB_ID-$head_node.log"',
        "# (A TERM trap, as bash runs it after the current sleep: no orphan sleep outlives the job.)",
        '(trap "exit 0" TERM',
        ' until grep -m 1 -o "Mind Mirror is running: open [^ ?]*" "$head_log" 2>/dev/null; do sleep 1; done) &',
        "url_watcher=$!",
        "",
        "# One torchrun per node. --node-rank \"$SLURM_NODEID\" with the static rendezvous puts",
        "# global rank 0 on node 0, the head, every time: c10d (is_host, --local-addr) only picks",
        "# which node hosts the store, and ranks nodes by sorting their addresses. The single",
        "# quotes defer $SLURM_NODEID to each task. --kill-on-bad-exit: one node failing stops all.",
        "status=0",
        'srun --kill-on-bad-exit=1 --ntasks-per-node=1 --output="$LOG_DIR/$JOB_NAME-%j-%N.log" \\',
        '    bash -c \'exec "$0" -m torch.distributed.run --node-rank "$SLURM_NODEID" "$@"\' "$PYTHON" \\',
        '    --nnodes "$SLURM_NNODES" --nproc-per-node "$NPROC_PER_NODE" --max-restarts "$MAX_RESTARTS" \\',
        '    --rdzv-backend static --rdzv-endpoint "$head_addr:$RDZV_PORT" --rdzv-id "$SLURM_JOB_ID" \\',
        '    --rdzv-conf "timeout=$JOIN_TIMEOUT_S" \\',
        f'    "$LAUNCHER"{config_flag} --host "$WEB_HOST" --port "$WEB_PORT" \\',
        "    || status=$?",
        'kill "$url_watcher" 2>/dev/null || true',
        'wait "$url_watcher" 2>/dev/null || true',
        "# The job's exit code is srun's: the highest of the nodes' torchrun exit codes (a node",
        "# that --kill-on-bad-exit stopped counts as 143, SIGTERM; the first failure is in its log).",
        'echo "srun exited with status $status"',
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="pipeline YAML; omitted: the embedded default mirror pipeline")
    p.add_argument("--nodes", type=int, required=True, help="nodes to allocate (one torchrun each)")
    p.add_argument("--nproc-per-node", type=int,
                   help="ranks per node; default: --gpus-per-node when given, else the fewest the pipeline plans on")
    p.add_argument("--gpus-per-node", type=int, help="GPUs to request per node; omitted: a CPU job")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--account", help="SLURM account to charge")
    p.add_argument("--time", help="time limit, e.g. 2:00:00 or 1-00 (default: the partition's)")
    p.add_argument("--job-name", default="mindmirror", help="job name and log file prefix (default: %(default)s)")
    p.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR,
                   help="where the script and logs go, visible from every node (default: %(default)s)")
    p.add_argument("--script", type=Path, help="the script's path (default: OUTPUT_DIR/JOB_NAME.sbatch)")
    p.add_argument("--port", type=int, default=8765, help="web server port on the head (default: %(default)s)")
    p.add_argument("--rdzv-port", type=int, default=29400,
                   help="torchrun store port on the head (default: %(default)s)")
    p.add_argument("--host", default="0.0.0.0", help="web server bind address (default: %(default)s)")
    p.add_argument("--ifname", help="interface between the nodes: GLOO/NCCL_SOCKET_IFNAME, and the head's address")
    p.add_argument("--python", default=sys.executable, help="interpreter on the nodes (default: this one, %(default)s)")
    p.add_argument("--max-restarts", type=int, default=0, help="torchrun --max-restarts (default: %(default)s)")
    p.add_argument("--join-timeout", type=int, default=300,
                   help="seconds the nodes wait for each other (default: %(default)s)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION",
                   help="extra #SBATCH option, verbatim; repeatable (write --sbatch-arg=--exclusive)")
    p.add_argument("--submit", action="store_true", help="submit the script with sbatch and print the job id")
    return p.parse_args(argv)


def job_from_args(args: argparse.Namespace) -> SlurmJob:
    """The checked job: argument checks first (cheap), then the config and the planner."""
    python = args.python if os.sep in args.python else (shutil.which(args.python) or args.python)
    if not os.access(python, os.X_OK):
        raise SlurmArgumentError("--python", f"{args.python} is not an executable here; the job runs it on every "
                                             "node, so give a path they all see (e.g. a virtualenv's bin/python)")
    config = args.config.absolute() if args.config else None
    fields = dict(nodes=args.nodes, config=config, gpus_per_node=args.gpus_per_node, partition=args.partition,
                  account=args.account, time=args.time, job_name=args.job_name, output_dir=args.output_dir.absolute(),
                  port=args.port, rdzv_port=args.rdzv_port, host=args.host, ifname=args.ifname,
                  python=os.path.abspath(python),  # not resolve(): a virtualenv's python is a symlink
                  max_restarts=args.max_restarts, join_timeout_s=args.join_timeout, sbatch_args=tuple(args.sbatch_arg))
    SlurmJob(nproc_per_node=args.nproc_per_node or 1, **fields)  # argument errors before the slow part
    nproc = fit_pipeline(config, args.nodes, args.gpus_per_node, args.nproc_per_node, args.host, args.port)
    return SlurmJob(nproc_per_node=nproc, **fields)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        job = job_from_args(args)
    except SlurmArgumentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    script = build_script(job, shlex.join(["python", "launch/slurm.py", *(sys.argv[1:] if argv is None else argv)]))
    path = (args.script or job.output_dir / f"{job.job_name}.sbatch").absolute()
    job.output_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create the logs' folder
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    sys.stdout.write(script)
    print(f"wrote {path} ({job.nodes} node(s) x {job.nproc_per_node} process(es))", file=sys.stderr)
    if job.host in ("0.0.0.0", "::") and not os.environ.get(TOKEN_ENV):
        print(f"note: the page will be open to anyone who reaches the head's port {job.port}; set {TOKEN_ENV} "
              "before sbatch to require a token", file=sys.stderr)
    if not args.submit:
        print(f"submit with: sbatch {shlex.quote(str(path))}", file=sys.stderr)
        return 0
    result = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"error: sbatch failed ({result.returncode}): {result.stderr.strip()}", file=sys.stderr)
        return result.returncode
    job_id = result.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}\n  batch log (plan, head, page URL): {str(job.batch_log).replace('%j', job_id)}\n"
          f"  per-node logs: {str(job.node_log).replace('%j', job_id).replace('%N', '<node>')}\n"
          f"  stop it with: scancel {job_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
