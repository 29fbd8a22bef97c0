"""Shared fixtures: the real-data folder beside the checkout, free ports, and one running server.

The server is started once per session through the user's own command (``medprompt serve``) on a
tiny phantom datastore, because its start-up (torch, MONAI, MONAI Label) dominates the suite's time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = REPO_ROOT.parent / "shared" / "data" / "real"
SERVER_START_TIMEOUT_S = 180.0
SERVER_STOP_TIMEOUT_S = 30.0


@pytest.fixture(scope="session")
def real_data() -> Path:
    """``../shared/data/real`` beside the checkout (never copied into the repo), or skip."""
    if not (REAL_DATA / "README.md").is_file():
        pytest.skip(f"real data not found at {REAL_DATA} (it lives beside the checkout, not in it)")
    return REAL_DATA


def find_free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def free_port() -> int:
    return find_free_port()


@dataclass
class RunningServer:
    """A ``medprompt serve`` process and what the tests need to talk to it."""

    url: str
    studies: Path
    process: subprocess.Popen
    log: Path

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def console_script(name: str) -> Path:
    """A console script installed beside this interpreter (the venv's bin/)."""
    return Path(sys.executable).parent / name


def _wait_until_up(server: RunningServer) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"server exited with {server.process.returncode} while starting:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}/info/", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"server did not answer /info/ within {SERVER_START_TIMEOUT_S:.0f} s:\n{server.log_tail()}")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """``medprompt serve`` on 3 small phantoms (references in studies/reference/); stopped with Ctrl-C."""
    from medprompt.phantoms import write_sample_data

    root = tmp_path_factory.mktemp("server")
    studies = root / "studies"
    write_sample_data(studies, n=3, shape=(64, 64, 40))
    port = find_free_port()
    log = root / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(console_script("medprompt")), "serve", "--studies", str(studies), "--port", str(port)],
            cwd=root,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a teardown signal reaches nothing else
        )
    running = RunningServer(url=f"http://127.0.0.1:{port}", studies=studies, process=process, log=log)
    try:
        _wait_until_up(running)
        yield running
    finally:
        stopped_cleanly = _stop(process)
    # Ctrl-C is how users stop the server: it must shut down gracefully with exit code 0.
    assert stopped_cleanly, f"server did not stop cleanly on Ctrl-C:\n{running.log_tail()}"


def _stop(process: subprocess.Popen) -> bool:
    """Send Ctrl-C (SIGINT); kill the process group if it has not exited in time. True if it exited 0."""
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout=SERVER_STOP_TIMEOUT_S) == 0
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return False
