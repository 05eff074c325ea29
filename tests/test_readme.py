"""`pytest tests/test_readme.py -q`: README gives exactly two set-up commands, and CI runs the second one.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    """The fenced commands in README's 'Set up' section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [line for block in re.findall(r"```bash\n(.*?)```", section, re.S) for line in block.splitlines() if line.strip()]


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    main_job, tests = setup_commands()
    assert main_job.rstrip().endswith("mod-pipeline demo") and "pip install -q torch==2.13.0" in main_job
    assert tests.rstrip().endswith("python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci, "the README's test command must appear verbatim in .ci/run"
    for command in (main_job, tests):  # torch first: a plain `torch` requirement would pull a CUDA build
        assert command.index("pip install -q torch==2.13.0") < command.index("pip install -q -e")
