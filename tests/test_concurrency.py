"""Many clients at once, and a server killed mid-work: every request answered, nothing saved is lost.

One dedicated server per module (training rounds change what it serves, so not the session's server).
The SIGKILL test runs once here; ``MEDPROMPT_CRASH_RUNS=10`` repeats it (the note says when it was run so).
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import RunningServer, console_script, launch_server, serving, write_tiny_checkpoint, _wait_until_up
from medprompt.io.volume import sidecar_path
from medprompt.model.checkpoint import load_model

FINETUNE = "medprompt_finetune"
PRIOR = "medprompt_prior"
STEPS = 400  # long enough (tens of seconds) for requests to land while the round runs
CRASH_RUNS = int(os.environ.get("MEDPROMPT_CRASH_RUNS", "1"))


def _studies(root: Path) -> Path:
    from medprompt.phantoms import write_sample_data

    studies = root / "studies"
    write_sample_data(studies, n=3, shape=(48, 48, 32))
    return studies


def _command() -> list[str]:
    return [str(console_script("medprompt")), "serve"]


def _infer(url: str, image: str, model: str = PRIOR, prompts: str = "liver,spleen") -> requests.Response:
    return requests.post(f"{url}/infer/{model}?image={image}&output=json",
                         data={"params": json.dumps({"prompts": prompts})}, timeout=600)


def _save_label(url: str, image: str, path: Path, tag: str = "final") -> requests.Response:
    """Save ``path`` as a label, naming its classes as 3D Slicer does (``label_info``) from its sidecar."""
    sidecar = sidecar_path(path)
    names = json.loads(sidecar.read_text())["labels"] if sidecar.is_file() else {}
    params = {"label_info": [{"name": name, "idx": value} for name, value in names.items()]}
    with path.open("rb") as f:
        return requests.put(f"{url}/datastore/label?image={image}&tag={tag}",
                            files={"label": (path.name, f)}, data={"params": json.dumps(params)}, timeout=120)


def _reference(studies: Path, image: str) -> Path:
    return studies / "reference" / f"{image}.nii.gz"


def _train_tasks(url: str) -> list[dict]:
    answer = requests.get(f"{url}/train/?all=true", timeout=30).json()
    return answer if isinstance(answer, list) else [answer]


def _wait_round(url: str, timeout_s: float = 900) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        tasks = _train_tasks(url)
        running = [t for t in tasks if t.get("status") in ("SUBMITTED", "RUNNING")]
        if not running:
            return tasks[-1]
        assert time.monotonic() < deadline, f"rounds still running: {running}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("busy")
    studies = _studies(root)
    checkpoint = write_tiny_checkpoint(root / "tiny.pt")
    with serving(launch_server(root, _command(), studies, checkpoint)) as server:
        yield server


def test_twenty_concurrent_drafts_are_all_answered(busy_server: RunningServer) -> None:
    images = ["phantom_000", "phantom_001", "phantom_002"]
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda i: _infer(busy_server.url, images[i % 3]), range(20)))
    assert [a.status_code for a in answers] == [200] * 20, [a.text[:200] for a in answers if a.status_code != 200]
    assert all(a.json()["label_names"] == {"liver": 1, "spleen": 2} for a in answers)


def test_drafts_labels_and_a_second_round_while_a_round_runs(busy_server: RunningServer, tmp_path: Path) -> None:
    """Drafts are answered and a label saved mid-round is kept; a second round is refused (429) while one
    runs, and two rounds never run at once."""
    url, studies = busy_server.url, busy_server.studies
    assert _save_label(url, "phantom_000", _reference(studies, "phantom_000")).status_code == 200
    started = requests.post(f"{url}/train/{FINETUNE}", json={"steps": STEPS}, timeout=60)
    assert started.status_code == 200, started.text
    overlaps: list[int] = []
    stop = threading.Event()

    def watch() -> None:  # how many rounds run at the same moment, sampled all along
        while not stop.is_set():
            overlaps.append(sum(t.get("status") == "RUNNING" for t in _train_tasks(url)))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        refused = requests.post(f"{url}/train/{FINETUNE}", json={"steps": STEPS}, timeout=60)
        assert refused.status_code == 429 and "already" in refused.json()["detail"], refused.text
        assert _infer(url, "phantom_001").status_code == 200
        # A correction saved while the round reads the datastore: stored whole, whatever the round read.
        saved = _save_label(url, "phantom_001", _reference(studies, "phantom_001"))
        assert saved.status_code == 200, saved.text
        final = _wait_round(url)
    finally:
        stop.set()
        watcher.join()
    assert max(overlaps) == 1 and final["status"] == "DONE", (max(overlaps), "\n".join(final.get("details", [])[-15:]))
    stored = studies / "labels" / "final" / "phantom_001.nii.gz"
    assert stored.read_bytes() == _reference(studies, "phantom_001").read_bytes()
    assert all(t["status"] == "DONE" for t in _train_tasks(url)), _train_tasks(url)


# -- crash safety ---------------------------------------------------------------------------------

def _label(path: Path, value: int, like: Path) -> bytes:
    """A label filled with ``value`` on the grid of the image ``like``, uncompressed."""
    image = nib.load(like)
    nib.save(nib.Nifti1Image(np.full(image.shape, value, np.uint8), image.affine), path)
    return path.read_bytes()


def _kill(server: RunningServer) -> None:
    os.killpg(server.process.pid, signal.SIGKILL)  # the server and its training child, as a power cut would
    server.process.wait(timeout=30)


@pytest.mark.parametrize("run", range(CRASH_RUNS))
def test_sigkill_mid_round_and_mid_label_save_loses_nothing(tmp_path: Path, run: int) -> None:
    studies = _studies(tmp_path)
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt")
    served_before = checkpoint.read_bytes()
    versions = {a: _label(tmp_path / f"big{a}.nii", a, studies / "phantom_002.nii.gz") for a in (1, 2)}
    server = launch_server(tmp_path, _command(), studies, checkpoint)
    saved_final = _reference(studies, "phantom_000")
    try:
        _wait_until_up(server)
        assert _save_label(server.url, "phantom_000", saved_final).status_code == 200
        assert _save_label(server.url, "phantom_002", tmp_path / "big1.nii", tag="scratch").status_code == 200
        started = requests.post(f"{server.url}/train/{FINETUNE}", json={"steps": STEPS}, timeout=60)
        assert started.status_code == 200, started.text
        while not any(t.get("status") == "RUNNING" for t in _train_tasks(server.url)):
            time.sleep(0.2)
        stop = threading.Event()

        def hammer() -> None:  # saves alternate between two versions until the kill
            a = 1
            while not stop.is_set():
                a = 3 - a
                try:
                    _save_label(server.url, "phantom_002", tmp_path / f"big{a}.nii", tag="scratch")
                except requests.RequestException:
                    return

        saver = threading.Thread(target=hammer, daemon=True)
        saver.start()
        time.sleep(random.Random(run).uniform(3.0, 12.0))  # somewhere in the round, mid-save or between
        round_running = any(t.get("status") == "RUNNING" for t in _train_tasks(server.url))
        _kill(server)
        stop.set()
        saver.join(timeout=60)
        cut_short = [p.name for p in studies.rglob("*.medprompt-tmp")]
        print(f"run {run}: killed {'mid-round' if round_running else 'after the round'}; "
              f"saves cut short: {cut_short or 'none'}")
    finally:
        if server.process.poll() is None:
            _kill(server)

    # Restarted on the same folders: it starts, serves the old or a complete new model, and every label is whole.
    restarted = launch_server(tmp_path, _command(), studies, checkpoint)
    with serving(restarted):
        objects = requests.get(f"{restarted.url}/datastore/?output=all", timeout=60).json()["objects"]
        assert "final" in objects["phantom_000"]["labels"] and "scratch" in objects["phantom_002"]["labels"]
        assert (studies / "labels" / "final" / "phantom_000.nii.gz").read_bytes() == saved_final.read_bytes()
        assert (studies / "labels" / "scratch" / "phantom_002.nii").read_bytes() in versions.values()
        draft = _infer(restarted.url, "phantom_001", model="medprompt")
        assert draft.status_code == 200, draft.text
        served = Path(draft.json()["checkpoint"]["path"])
        load_model(served)  # a whole checkpoint: the original or a round's accepted one
        if served == checkpoint:
            assert checkpoint.read_bytes() == served_before


_SLOW_SAVE = """
import shutil, sys, time
from monailabel.datastore.local import LocalDatastore
from medprompt.io.datastore import GuardedDatastore

def slow(src, dst, length=0):  # a slow disk: the copy is under way for seconds
    while chunk := src.read(1 << 16):
        dst.write(chunk)
        dst.flush()
        time.sleep(0.05)

shutil.copyfileobj = slow
store = GuardedDatastore.wrap(LocalDatastore(sys.argv[1], extensions=["*.nii.gz", "*.nii"], auto_reload=False))
store.save_label("phantom_000", sys.argv[2], "final", {})
"""


def test_a_label_save_killed_halfway_leaves_the_previous_label_and_a_readable_index(tmp_path: Path) -> None:
    """Deterministically mid-copy (the server test's kills land between saves): the old label stays whole."""
    import subprocess
    import sys

    from monailabel.datastore.local import LocalDatastore

    from medprompt.io.datastore import GuardedDatastore

    studies = _studies(tmp_path)
    big = tmp_path / "big.nii.gz"  # an image of a few MB, so that the slow copy takes seconds
    nib.save(nib.Nifti1Image(np.zeros((160, 160, 96), np.int16), np.eye(4)), big)
    (studies / "phantom_000.nii.gz").write_bytes(big.read_bytes())
    first = _label(tmp_path / "first.nii", 1, big)
    _label(tmp_path / "second.nii", 2, big)
    store = GuardedDatastore.wrap(LocalDatastore(str(studies), extensions=["*.nii.gz", "*.nii"], auto_reload=False))
    store.save_label("phantom_000", str(tmp_path / "first.nii"), "final", {})
    child = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(studies), str(tmp_path / "second.nii")])
    deadline = time.monotonic() + 120
    while not [p for p in (studies / "labels" / "final").glob("*.medprompt-tmp") if p.stat().st_size > 0]:
        assert child.poll() is None and time.monotonic() < deadline, "the slow save never started"
        time.sleep(0.05)
    child.kill()
    child.wait()
    assert (studies / "labels" / "final" / "phantom_000.nii").read_bytes() == first
    json.loads((studies / "datastore_v2.json").read_text())
    reopened = LocalDatastore(str(studies), extensions=["*.nii.gz", "*.nii"], auto_reload=False)
    assert reopened.get_label_uri("phantom_000", "final").endswith("phantom_000.nii")


def test_an_unreadable_index_is_set_aside_and_rebuilt_from_the_files(tmp_path: Path) -> None:
    """An index cut short by an older version or a full disk no longer stops the server from starting."""
    from monailabel.datastore.local import LocalDatastore

    from medprompt.io.datastore import recover

    studies = _studies(tmp_path)
    LocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)
    (studies / "labels" / "final").mkdir(parents=True, exist_ok=True)
    (studies / "labels" / "final" / "phantom_001.nii.gz").write_bytes(_reference(studies, "phantom_001").read_bytes())
    index = studies / "datastore_v2.json"
    index.write_text(index.read_text()[:50])
    with pytest.raises(ValueError):
        LocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)
    recover(studies)
    store = LocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)
    assert sorted(store.list_images()) == ["phantom_000", "phantom_001", "phantom_002"]
    assert store.get_labeled_images() == ["phantom_001"]
    assert list(studies.glob("datastore_v2.json.unreadable-*"))
