"""Waiting OpenMP threads sleep in the server and its training rounds (medprompt.cpu_sharing).

Each check runs in a fresh interpreter, because the OpenMP runtime reads the variable once, when
torch loads it; libgomp's own report (OMP_DISPLAY_ENV=VERBOSE) says what the runtime took.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, find_free_port

CHILD_SEES = "import os; print(os.environ.get('OMP_WAIT_POLICY'))"


def _reporting_env(**update: str) -> dict[str, str]:
    """This environment without a wait policy, with libgomp asked to report what it took."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return {**env, "OMP_DISPLAY_ENV": "VERBOSE", **update}


def _run(code: str, **env_update: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_reporting_env(**env_update), timeout=120, cwd=REPO_ROOT)


def _spin_count(stderr: str) -> str:
    """libgomp's GOMP_SPINCOUNT as it reports it ('0': waiting threads sleep at once)."""
    for line in stderr.splitlines():
        if line.strip().startswith("GOMP_SPINCOUNT"):
            return line.split("=", 1)[1].strip().strip("'")
    pytest.skip("torch's OpenMP runtime is not libgomp (no GOMP_SPINCOUNT in its report)")


PROBE = f"""
import subprocess, sys
from medprompt.cpu_sharing import share_cpu
{{before}}
sleeps = share_cpu()
import torch
torch.ones(64).sum()
child = subprocess.run([sys.executable, "-c", {CHILD_SEES!r}], capture_output=True, text=True).stdout.strip()
print(sleeps, child)
"""


def test_before_torch_loads_the_process_and_its_children_sleep_when_they_wait() -> None:
    done = _run(PROBE.format(before=""))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "PASSIVE"]
    assert _spin_count(done.stderr) == "0"


def test_after_torch_loaded_only_the_children_get_it_and_the_call_says_so() -> None:
    done = _run(PROBE.format(before="import torch"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "PASSIVE"]
    assert _spin_count(done.stderr) != "0"  # this process's runtime had already read its default


def test_a_policy_the_user_set_is_kept() -> None:
    done = _run(PROBE.format(before=""), OMP_WAIT_POLICY="ACTIVE")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "ACTIVE"]
    assert _spin_count(done.stderr) != "0"


def test_medprompt_serve_sets_it_before_torch_loads(tmp_path: Path) -> None:
    """The CLI's server process itself (where drafts run) gets sleeping waits, not only its children."""
    missing = tmp_path / "no_such_folder"
    done = subprocess.run([sys.executable, "-m", "medprompt", "serve", "--studies", str(missing),
                           "--port", str(find_free_port())], capture_output=True, text=True, env=_reporting_env(),
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 2 and f"studies folder not found: {missing}" in done.stderr
    assert _spin_count(done.stderr) == "0"  # torch loaded (the task configs) after the variable was set
