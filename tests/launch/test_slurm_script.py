"""launch/slurm.py without SLURM: the script it writes, run against stand-ins for srun,
scontrol and the interpreter, and the arguments it refuses.

The stand-ins record what the script runs; srun runs its command once per fake node with
that node's SLURM_NODEID and sends each node's output where ``--output`` says, as SLURM
does. (tests/integration/test_slurm.py runs the same script on a real SLURM.)
"""

import subprocess
import sys
from pathlib import Path

import pytest

from launch.slurm import SlurmArgumentError, SlurmJob, build_script, fit_pipeline, main, parse_args

REPO = Path(__file__).resolve().parents[2]
MIRROR = REPO / "configs" / "mirror.yaml"

FAKE_PYTHON = """#!/bin/bash
echo "python $*" >> "$RECORD"
if [[ " $* " == *" --dry-run "* ]]; then echo "PLAN for $*"; exit "${FAKE_PLAN_STATUS:-0}"; fi
echo "node $SLURM_NODEID ran: $*"
[ "$SLURM_NODEID" != 0 ] || echo "Mind Mirror is running: open http://nodeA:8765/?token=not-for-the-batch-log"
"""
FAKE_SRUN = """#!/bin/bash
echo "srun $*" >> "$RECORD"
output=""
while [[ "$1" == --* ]]; do
    case "$1" in --output=*) output="${1#--output=}" ;; esac
    shift
done
names=(nodeA nodeB)
status=0
for id in 0 1; do
    log="${output//%j/$SLURM_JOB_ID}"
    SLURM_NODEID=$id "$@" >> "${log//%N/${names[$id]}}" 2>&1 || status=$?
done
sleep "${FAKE_SRUN_LINGER:-0}"
exit "${FAKE_SRUN_STATUS:-$status}"
"""
FAKE_SCONTROL = """#!/bin/bash
[ "$*" = "show hostnames nodeA,nodeB" ] && printf 'nodeA\\nnodeB\\n'
"""
FAKE_IP = """#!/bin/bash
echo "2: $6    inet ${FAKE_HEAD_ADDR:-10.0.0.9}/24 brd 10.0.0.255 scope global $6\\       valid_lft forever"
"""
FAKE_GETENT = """#!/bin/bash
printf '%s STREAM %s\\n%s DGRAM\\n' "${FAKE_HEAD_ADDR:-10.0.0.9}" "$2" "${FAKE_HEAD_ADDR:-10.0.0.9}"
"""


@pytest.fixture
def fake_slurm(tmp_path):
    """Runs a job's script with the stand-ins first on PATH; returns (result, record lines)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python", FAKE_PYTHON), ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("ip", FAKE_IP),
                       ("getent", FAKE_GETENT)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "record"

    def run(job: SlurmJob, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        script = tmp_path / "job.sbatch"
        script.write_text(build_script(job))
        job.output_dir.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30, env={
            "PATH": f"{bin_dir}:/usr/bin:/bin", "RECORD": str(record), "SLURM_JOB_ID": "42", "SLURM_NNODES": "2",
            "SLURM_JOB_NODELIST": "nodeA,nodeB", **env})
        return result, record.read_text().splitlines() if record.exists() else []

    return run


def job(tmp_path: Path, **fields) -> SlurmJob:
    base = dict(nodes=2, nproc_per_node=2, config=MIRROR, output_dir=tmp_path / "logs",
                python=str(tmp_path / "bin" / "python"))
    return SlurmJob(**{**base, **fields})


def node_log(tmp_path: Path, node: str) -> str:
    return (tmp_path / "logs" / f"mindmirror-42-{node}.log").read_text()


def test_the_script_is_valid_bash_with_the_sbatch_directives_first(tmp_path):
    script = build_script(job(tmp_path, gpus_per_node=4, partition="gpu", account="lab", time="1-12:00:00",
                              sbatch_args=("--exclusive", "--mem=0")))
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert directives == [
        "#SBATCH --job-name=mindmirror", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --time=1-12:00:00",
        f"#SBATCH --chdir={REPO}", f"#SBATCH --output={tmp_path}/logs/mindmirror-%j.out",
        "#SBATCH --exclusive", "#SBATCH --mem=0"]
    first_command = next(line for line in script.splitlines()[1:] if line and not line.startswith("#"))
    assert first_command == "set -euo pipefail"  # sbatch stops reading directives at the first command


def test_a_cpu_job_asks_for_no_gpus_partition_or_time(tmp_path):
    script = build_script(job(tmp_path))
    assert not any(s in script for s in ("--gpus-per-node=", "--partition=", "--account=", "--time="))
    assert "--dry-run --world-size $((SLURM_NNODES * NPROC_PER_NODE)) \\\n    --nnodes \"$SLURM_NNODES\"\n" in script


def test_the_plan_is_printed_before_any_node_starts(fake_slurm, tmp_path):
    result, calls = fake_slurm(job(tmp_path, gpus_per_node=4))
    assert result.returncode == 0, result.stderr
    assert [c.split()[0] for c in calls[:2]] == ["python", "srun"]
    assert f"--config {MIRROR} --dry-run --world-size 4 --nnodes 2 --gpus-per-node 4" in calls[0]
    assert result.stdout.index("PLAN for") < result.stdout.index("srun exited with status 0")


def test_every_node_runs_torchrun_with_its_slurm_node_id_as_node_rank(fake_slurm, tmp_path):
    """Node 0, the allocation's first node, is the head: the rendezvous is at its address
    and the static rendezvous makes its ranks 0..N-1, so rank 0 (the web server) is there."""
    result, calls = fake_slurm(job(tmp_path, ifname="ib0", port=9000, rdzv_port=29555, join_timeout_s=60,
                                   max_restarts=2))
    assert result.returncode == 0, result.stderr
    assert "head nodeA (10.0.0.9)" in result.stdout
    assert calls[1].startswith(f"srun --kill-on-bad-exit=1 --ntasks-per-node=1 --output={tmp_path}/logs/"
                               "mindmirror-%j-%N.log ")
    torchrun = ("-m torch.distributed.run --node-rank {} --nnodes 2 --nproc-per-node 2 --max-restarts 2 "
                "--rdzv-backend static --rdzv-endpoint 10.0.0.9:29555 --rdzv-id 42 --rdzv-conf timeout=60 "
                f"{REPO}/launch/mirror.py --config {MIRROR} --host 0.0.0.0 --port 9000")
    assert f"node 0 ran: {torchrun.format(0)}" in node_log(tmp_path, "nodeA")
    assert f"node 1 ran: {torchrun.format(1)}" in node_log(tmp_path, "nodeB")


def test_the_interface_names_the_head_address_and_the_libraries_socket(tmp_path):
    with_ifname = build_script(job(tmp_path, ifname="ib0"))
    assert "export GLOO_SOCKET_IFNAME=ib0 NCCL_SOCKET_IFNAME=ib0\n" in with_ifname
    assert 'ip -4 -o addr show dev "$GLOO_SOCKET_IFNAME"' in with_ifname
    without = build_script(job(tmp_path))
    assert "SOCKET_IFNAME=" not in without and 'getent ahostsv4 "$head_node"' in without


def test_a_head_that_resolves_to_loopback_stops_the_job_before_it_starts(fake_slurm, tmp_path):
    result, calls = fake_slurm(job(tmp_path), FAKE_HEAD_ADDR="127.0.1.1")
    assert result.returncode == 1 and calls == []
    assert "regenerate with --ifname" in result.stderr


@pytest.mark.parametrize("failing", [{"FAKE_SRUN_STATUS": "7"}, {"FAKE_PLAN_STATUS": "2"}])
def test_the_job_exits_with_the_status_of_what_failed(fake_slurm, tmp_path, failing):
    result, calls = fake_slurm(job(tmp_path), **failing)
    expected = int(next(iter(failing.values())))
    assert result.returncode == expected, result.stdout + result.stderr
    if "FAKE_SRUN_STATUS" in failing:
        assert result.stdout.rstrip().endswith("srun exited with status 7")
    else:
        assert [c.split()[0] for c in calls] == ["python"]  # a plan that fails starts nothing


def test_the_batch_log_shows_the_page_url_but_not_its_token(fake_slurm, tmp_path):
    result, _ = fake_slurm(job(tmp_path), FAKE_SRUN_LINGER="1.5")
    assert "Mind Mirror is running: open http://nodeA:8765/\n" in result.stdout
    assert "not-for-the-batch-log" not in result.stdout
    assert "not-for-the-batch-log" in node_log(tmp_path, "nodeA")


def test_the_cli_writes_and_prints_the_script_without_the_token(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINDMIRROR_TOKEN", "a-secret-token-0123456789")
    code = main(["--config", str(MIRROR), "--nodes", "2", "--output-dir", str(tmp_path), "--job-name", "mm"])
    out, err = capsys.readouterr()
    written = (tmp_path / "mm.sbatch").read_text()
    assert code == 0 and out == written
    assert "a-secret-token" not in written and "MINDMIRROR_TOKEN" in written
    assert "NPROC_PER_NODE=2\n" in written and "(2 node(s) x 2 process(es))" in err


def test_the_defaults_are_one_process_per_gpu_a_public_page_and_git_ignored_logs():
    args = parse_args(["--nodes", "2"])
    assert args.output_dir == SlurmJob(nodes=2, nproc_per_node=1).output_dir == REPO / "results" / "slurm"
    assert "/results/" in (REPO / ".gitignore").read_text().split()
    assert (args.host, args.port, args.rdzv_port, args.max_restarts, args.python) == (
        "0.0.0.0", 8765, 29400, 0, sys.executable)


def test_submit_prints_the_job_id_and_where_the_logs_go(tmp_path, monkeypatch, capsys):
    sbatch = tmp_path / "bin" / "sbatch"
    sbatch.parent.mkdir()
    sbatch.write_text("#!/bin/bash\necho \"$*\" > \"$(dirname \"$0\")/args\"\necho '77;cluster'\n")
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{sbatch.parent}:/usr/bin:/bin")
    assert main(["--nodes", "2", "--output-dir", str(tmp_path / "out"), "--submit"]) == 0
    out = capsys.readouterr().out
    script = tmp_path / "out" / "mindmirror.sbatch"
    assert (tmp_path / "bin" / "args").read_text().split() == ["--parsable", str(script)]
    assert "submitted job 77" in out and f"{tmp_path}/out/mindmirror-77.out" in out
    assert f"{tmp_path}/out/mindmirror-77-<node>.log" in out and "scancel 77" in out


@pytest.mark.parametrize(("fields", "message"), [
    ({"nodes": 0}, "--nodes: must be at least 1, got 0"),
    ({"nproc_per_node": 0}, "--nproc-per-node: must be at least 1, got 0"),
    ({"gpus_per_node": 0}, "--gpus-per-node: must be at least 1 (omit it for CPU nodes), got 0"),
    ({"port": 70000}, "--port: must be a TCP port within 1..65535, got 70000"),
    ({"rdzv_port": 8765}, "--rdzv-port: must differ from --port (8765)"),
    ({"time": "2 hours"}, "--time: '2 hours' is not a SLURM time: use minutes, MM:SS, HH:MM:SS"),
    ({"partition": "gpu;rm"}, "--partition: 'gpu;rm' is not a SLURM name"),
    ({"ifname": "eth 0"}, "--ifname: 'eth 0' is not a network interface name"),
    ({"max_restarts": -1}, "--max-restarts: must be at least 0, got -1"),
    ({"sbatch_args": ("--nodes=4",)}, "--sbatch-arg: --nodes is set by this tool; use --nodes instead"),
    ({"sbatch_args": ("-o/tmp/x",)}, "--sbatch-arg: -o is set by this tool; use --output-dir instead"),
    ({"sbatch_args": ("exclusive",)}, "--sbatch-arg: 'exclusive' is not one sbatch option"),
    ({"output_dir": Path("/tmp/my logs")}, "--output-dir: '/tmp/my logs' holds a space or '%'"),
])
def test_bad_arguments_are_refused_by_name(tmp_path, fields, message):
    with pytest.raises(SlurmArgumentError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        job(tmp_path, **fields)


def test_the_processes_per_node_default_to_what_the_pipeline_needs():
    assert fit_pipeline(MIRROR, nodes=2, gpus_per_node=None, nproc_per_node=None) == 2  # 3 ranks, 2 nodes
    assert fit_pipeline(REPO / "configs" / "mirror-2node.yaml", 2, None, None) == 3  # 2 visions on node 0
    assert fit_pipeline(MIRROR, nodes=2, gpus_per_node=4, nproc_per_node=None) == 4  # one per GPU
    assert fit_pipeline(None, nodes=1, gpus_per_node=None, nproc_per_node=None) == 1  # one process does it all


def test_a_pipeline_that_does_not_fit_is_refused_with_the_planners_words():
    with pytest.raises(SlurmArgumentError) as refused:
        fit_pipeline(MIRROR, nodes=2, gpus_per_node=None, nproc_per_node=1)
    assert refused.value.argument == "--nproc-per-node"
    assert "does not fit 2 node(s) x 1 process(es): pipeline.stages[2].replicas: not enough ranks" in str(refused.value)


def test_a_config_that_does_not_load_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("vision:\n  detect_every: 0\n")
    with pytest.raises(SlurmArgumentError, match=r"^--config: .*vision.detect_every: must be within 1..30, got 0"):
        fit_pipeline(bad, nodes=2, gpus_per_node=None, nproc_per_node=None)
    assert main(["--config", str(tmp_path / "missing.yaml"), "--nodes", "2", "--output-dir", str(tmp_path)]) == 2
    assert "error: --config: " in capsys.readouterr().err and not (tmp_path / "mindmirror.sbatch").exists()
