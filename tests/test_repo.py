"""Repository hygiene that CI enforces: lint, and CI running exactly the README's command."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO


def readme_commands() -> list[str]:
    """The shell commands of the README's first code block."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert block, "README.md must start with a code block of the two commands"
    return [line for line in block[1].splitlines() if line and not line.startswith("#")]


def test_readme_starts_with_two_commands_and_ci_runs_the_test_one():
    main, tests = readme_commands()
    assert main.endswith("python -m bdat_ray.sweep") and "pytest" in tests
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert tests in ci_lines


def test_ruff_is_clean():
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
