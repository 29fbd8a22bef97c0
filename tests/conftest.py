"""Shared fixtures: the real-data folder beside the checkout, free ports, and one running server.

The server is started once per session through the user's own command (``medprompt serve``) on a
tiny phantom datastore, because its start-up (torch, MONAI, MONAI Label) dominates the suite's time.
It serves a tiny random MedPrompt checkpoint and writes training rounds to a temporary model
folder, never into the checkout.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import pytest

if TYPE_CHECKING:
    from medprompt.pacs.orthanc import Orthanc

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = REPO_ROOT.parent / "shared" / "data" / "real"
SERVER_START_TIMEOUT_S = 180.0
SERVER_STOP_TIMEOUT_S = 30.0


@pytest.fixture
def sam_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """LiteMedSAM's embeddings (and text vectors) go to the test's own folder, never the user's cache,
    so a test's cache hits and misses are its own."""
    from medprompt import sam

    monkeypatch.setenv("MEDPROMPT_CACHE", str(tmp_path / "cache"))
    sam.shared_cache.cache_clear()
    yield tmp_path / "cache"
    sam.shared_cache.cache_clear()


@pytest.fixture(scope="module")
def random_sam_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seeded random weights of LiteMedSAM's architecture, saved as a checkpoint file: they go through
    the real loading code where the shipped weights are not needed."""
    import torch

    from medprompt.sam.weights import build_architecture

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam") / "random_lite_medsam.pth"
    torch.save(build_architecture().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def phantom_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, dict[str, int]]:
    """Phantom 1 saved as NIfTI: (path, its labels, class name -> value)."""
    from medprompt.io import save_volume
    from medprompt.phantoms import make_phantom

    volume, labels, names = make_phantom(1)
    path = save_volume(tmp_path_factory.mktemp("phantom") / "ct.nii.gz", volume)
    return path, labels, names


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


def write_tiny_checkpoint(path: Path) -> Path:
    """A random ``tiny`` MedPromptNet saved the way training saves one, with stored vectors for the Synapse 8.

    Seeded, so every write is the same network; the stored class vectors mean serving it needs no
    text encoder for those classes (they claim MiniLM's key, as the shipped checkpoint does).
    """
    import torch

    from medprompt.catalog import SYNAPSE8
    from medprompt.model.checkpoint import save_model
    from medprompt.model.network import MedPromptNet, NetConfig
    from medprompt.text.encoders import MINILM_KEY

    torch.manual_seed(0)
    net = MedPromptNet(NetConfig.preset("tiny", text_dim=384))
    vectors = np.random.default_rng(0).normal(size=(len(SYNAPSE8), 384))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    meta = {"text_encoder": MINILM_KEY, "classes": list(SYNAPSE8), "step": 0,
            "class_vectors": {name: v.tolist() for name, v in zip(SYNAPSE8, vectors)}}
    return save_model(path, net, meta)


@dataclass
class RunningServer:
    """A MONAI Label server process with the MedPrompt app and what the tests need to talk to it."""

    url: str
    studies: Path
    process: subprocess.Popen
    log: Path
    model_dir: Path  # --conf model_dir: training rounds go to model_dir/medprompt/
    checkpoint: Path  # --conf checkpoint: served until a round writes one
    started: float  # time.monotonic() at launch
    configs_before: frozenset[str] = frozenset()  # logging configs already in its temp folder (a killed server's)

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
        except urllib.error.HTTPError as error:
            if error.code == 401:  # up, with authentication on
                return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"server did not answer /info/ within {SERVER_START_TIMEOUT_S:.0f} s:\n{server.log_tail()}")


def launch_server(root: Path, command: Sequence[str], studies: Path, checkpoint: Path,
                  env: dict[str, str] | None = None, refine: str = "none") -> RunningServer:
    """Start ``command`` (a server launcher taking --port and --conf) in ``root``; returns at once.

    Its model folder is ``root/model`` and its medprompt start checkpoint ``checkpoint``; the log is
    ``root/server.log`` and its temp folder (TMPDIR: uploads' copies, drafts' results) ``root/tmp``, so
    what a server killed on purpose leaves stays in the test. Drafts default to ``--conf refine none``:
    LiteMedSAM costs about half a second per slice on a CPU whatever the weights, so the tests that
    exercise it ask for it per request (``"refine": "sam"``) and the rest test the localisers' own masks.
    """
    port = find_free_port()
    log = root / "server.log"
    model_dir = root / "model"
    args = [*command, "--studies", str(studies), "--port", str(port),
            "--conf", "model_dir", str(model_dir), "--conf", "checkpoint", str(checkpoint),
            "--conf", "refine", refine]
    (root / "tmp").mkdir(exist_ok=True)
    configs_before = frozenset(p.name for p in (root / "tmp").glob("tmp*.json"))
    env = {**(os.environ if env is None else env), "TMPDIR": str(root / "tmp")}
    started = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, cwd=root, stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,  # its own process group: a teardown signal reaches nothing else
        )
    return RunningServer(url=f"http://127.0.0.1:{port}", studies=studies, process=process, log=log,
                         model_dir=model_dir, checkpoint=checkpoint, started=started, configs_before=configs_before)


@contextmanager
def serving(server: RunningServer) -> Iterator[RunningServer]:
    """Wait until ``server`` answers, yield it, then stop it with Ctrl-C and require a clean exit."""
    try:
        _wait_until_up(server)
        yield server
    finally:
        stopped_cleanly = _stop(server.process)
    # Ctrl-C is how users stop the server: it must shut down gracefully with exit code 0.
    assert stopped_cleanly, f"server did not stop cleanly on Ctrl-C:\n{server.log_tail()}"
    if "serve" in server.process.args:  # medprompt serve (MONAI Label's own start_server leaves its logging config)
        left = sorted(p.name for p in (server.log.parent / "tmp").glob("tmp*.json")
                      if p.name not in server.configs_before)
        assert not left, f"medprompt serve left its logging config in the temp folder: {left}"


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """``medprompt serve`` on 3 small phantoms (references in studies/reference/) with a tiny checkpoint."""
    from medprompt.phantoms import write_sample_data

    root = tmp_path_factory.mktemp("server")
    studies = root / "studies"
    write_sample_data(studies, n=3, shape=(64, 64, 40))
    checkpoint = write_tiny_checkpoint(root / "medprompt_tiny.pt")
    env = {**os.environ, "MEDPROMPT_CACHE": str(root / "cache")}  # embeddings and text vectors stay in the test
    with serving(launch_server(root, [str(console_script("medprompt")), "serve"], studies, checkpoint, env)) as running:
        yield running


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


def require_orthanc() -> None:
    """Skip, saying how to install it, unless Orthanc and its DICOMweb plugin are installed."""
    from medprompt.pacs.orthanc import INSTALL_HINT, find_dicomweb_plugin, find_orthanc

    if find_orthanc() is None:
        pytest.skip(f"Orthanc is not installed ({INSTALL_HINT})")
    if find_dicomweb_plugin() is None:
        pytest.skip(f"Orthanc's DICOMweb plugin is not installed ({INSTALL_HINT})")


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator["Orthanc"]:
    """A started private Orthanc (DICOMweb on, loopback only) storing in the test's folder; stopped after."""
    from medprompt.pacs.orthanc import Orthanc

    require_orthanc()
    with Orthanc(tmp_path / "orthanc") as running:
        yield running


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a shared 2-core machine their syncing costs 10-50x."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
