"""The install is what the README promises: the console script, the pinned stack, setup.sh's guards."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO_ROOT = Path(__file__).resolve().parents[1]


def requirement_lines(name: str) -> list[str]:
    lines = (REPO_ROOT / name).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def test_console_script_lists_the_subcommands_setup_relies_on() -> None:
    script = Path(sys.executable).parent / "medprompt"
    assert script.is_file(), "the medprompt console script is missing: run `pip install -e .`"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for command in ("infer", "evaluate", "sample-data", "serve"):
        assert command in done.stdout


@pytest.mark.parametrize("name", ["requirements.txt", "requirements-dev.txt", "constraints.txt"])
def test_installed_packages_satisfy_the_requirement_files(name: str) -> None:
    """Catches a requirement or pin edited without re-running setup (or a stale CI cache)."""
    problems = []
    for line in requirement_lines(name):
        req = Requirement(line)
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            problems.append(f"{req.name} is not installed")
            continue
        if not req.specifier.contains(installed.split("+")[0], prereleases=True):
            problems.append(f"{req.name} {installed} does not satisfy '{req.specifier}'")
    assert not problems, f"{name}: " + "; ".join(problems)


def test_constraints_pin_torch_because_they_replace_pips_global_constraints() -> None:
    pinned = {Requirement(line).name: str(Requirement(line).specifier) for line in requirement_lines("constraints.txt")}
    assert pinned["torch"].startswith("==") and pinned["torchvision"].startswith("==")


def test_setup_refuses_a_missing_python_with_a_clear_message(tmp_path: Path) -> None:
    """In a copy without .venv, a wrong PYTHON stops setup before anything is created."""
    shutil.copytree(REPO_ROOT / "scripts", tmp_path / "scripts")
    env = {**os.environ, "PYTHON": "python3.11-does-not-exist"}
    done = subprocess.run(["bash", "scripts/setup.sh", "--no-serve"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "Python 3.11 is required" in done.stderr
    assert not (tmp_path / ".venv").exists()


def test_setup_rejects_unknown_options() -> None:
    done = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "setup.sh"), "--serv"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--serv" in done.stderr
