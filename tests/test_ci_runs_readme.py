"""CI runs the README's test command word for word, and the README's two commands make and
use a virtual environment (a stock system Python refuses a plain ``pip install``: PEP 668)."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = "python3 -m venv .venv && . .venv/bin/activate && "
"""How both commands start: make the virtual environment (a no-op when it exists) and enter it."""


def readme_commands() -> list[str]:
    """The lines of the README's first ``bash`` block: its two commands."""
    block = re.search(r"```bash\n(.*?)\n```", (REPO / "README.md").read_text(), re.DOTALL)
    assert block, "README.md has no ```bash block"
    return block.group(1).splitlines()


def test_the_readme_starts_with_a_run_command_and_a_test_command_both_in_a_venv():
    run, test = readme_commands()
    for command in (run, test):
        assert command.startswith(VENV + "pip install torch==2.13.0 "), command
    assert run.endswith("torchrun --standalone --nproc-per-node 3 launch/mirror.py")
    assert test.endswith("python -m pytest -q")


def test_ci_runs_the_readme_test_command_as_its_last_line():
    script = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert script[-1] == readme_commands()[1]
