"""``medprompt pacs-demo``: a local Orthanc with the phantoms (or a DICOM folder), served for OHIF;
Ctrl-C stops both."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from conftest import console_script, find_free_port, require_orthanc

from medprompt.errors import InputError
from medprompt.io import load_volume
from medprompt.pacs.client import DicomWebClient, value
from medprompt.pacs.datastore import DicomWebDatastore
from medprompt.pacs.demo import PHANTOMS, run_demo
from medprompt.pacs.export import uid, write_series
from medprompt.phantoms import make_phantom

START_TIMEOUT_S = 240.0


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_pacs_demo_serves_the_phantoms_from_orthanc_for_ohif_and_ctrl_c_stops_both(tmp_path: Path) -> None:
    require_orthanc()
    port = find_free_port()
    log = tmp_path / "demo.log"
    storage = tmp_path / "demo"
    env = {**os.environ, "PATH": f"{console_script('medprompt').parent}{os.pathsep}{os.environ['PATH']}"}
    with log.open("wb") as out:
        process = subprocess.Popen([str(console_script("medprompt")), "pacs-demo", "--storage", str(storage),
                                    "--port", str(port), "--conf", "models", "prior", "--conf", "refine", "none"],
                                   cwd=tmp_path, env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(f"{url}/info/"):
            assert process.poll() is None, f"pacs-demo exited with {process.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"pacs-demo did not start:\n{log.read_text()}"
            time.sleep(0.5)
        text = log.read_text()
        assert f"OHIF: {url}/ohif/" in text
        dicomweb = re.search(r"DICOMweb (http://127\.0\.0\.1:\d+/dicom-web)", text).group(1)
        assert str(storage.resolve() / "orthanc") in text  # it names where the PACS keeps its data
        status = requests.get(f"{url}/datastore/", timeout=60).json()
        assert status["total"] == PHANTOMS and status["url"] == dicomweb
        assert len(DicomWebClient(dicomweb).search_series()) == PHANTOMS
        assert requests.get(f"{url}/ohif/", timeout=30).status_code == 200  # the bundled viewer is served
        # Ctrl-C while a model still loads in the background can abort the interpreter at exit (the
        # server's own behaviour, not the demo's): stop once loading is done, as a user would.
        while "model medprompt_prior: weights loaded" not in log.read_text():
            assert time.monotonic() < deadline, f"the model did not load:\n{log.read_text()}"
            time.sleep(0.5)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
    assert code == 0, log.read_text()
    assert not _answers(f"{dicomweb}/studies"), "Orthanc still answers after Ctrl-C"
    assert any((storage / "orthanc" / "db").rglob("*"))  # the studies stay for the next run


def _blank_uids(folder: Path) -> None:
    """What the shared real CT's anonymiser did: Study, Series and SOP Instance UIDs emptied."""
    for path in folder.iterdir():
        ds = pydicom.dcmread(str(path))
        ds.StudyInstanceUID = ds.SeriesInstanceUID = ds.SOPInstanceUID = ""
        ds.save_as(str(path))


def test_pacs_demo_uploads_a_dicom_folder_giving_blanked_uids_stable_ones(tmp_path: Path) -> None:
    require_orthanc()
    volume, _, _ = make_phantom(3, (32, 32, 12))
    folder = tmp_path / "export" / "ct"
    write_series(volume, folder, study_uid=uid("x"), series_uid=uid("x", "s"), description="x", patient="X")
    _blank_uids(folder)
    (tmp_path / "export" / "README.txt").write_text("not DICOM")
    seen = {}

    def serve(studies: str, host: str, port: int, conf: dict | None) -> int:
        records = DicomWebClient(studies).search_series()
        seen["series"] = [value(r, "SeriesInstanceUID") for r in records]
        store = DicomWebDatastore(studies, cache=tmp_path / "cache")
        seen["volume"] = load_volume(store.get_image_uri(seen["series"][0]))
        seen["url"] = studies
        return 0

    lines: list[str] = []
    assert run_demo(dicom=tmp_path / "export", storage=tmp_path / "demo", serve=serve, say=lines.append) == 0
    assert len(seen["series"]) == 1 and seen["series"][0]
    assert np.array_equal(seen["volume"].data, np.round(volume.data))
    assert any("uploaded 12 DICOM files" in line for line in lines)
    assert not _answers(f"{seen['url']}/studies")  # stopped when serving ended
    # A second run stores the same instances again: the UIDs given are stable.
    run_demo(dicom=tmp_path / "export", storage=tmp_path / "demo", serve=serve, say=lines.append)
    assert len(seen["series"]) == 1


def test_pacs_demo_with_a_folder_without_dicom_fails_before_starting_orthanc(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no DICOM here")
    with pytest.raises(InputError, match="no DICOM files"):
        run_demo(dicom=tmp_path, storage=tmp_path / "demo", serve=lambda **_: 0)
    with pytest.raises(InputError, match="not a folder"):
        run_demo(dicom=tmp_path / "missing", storage=tmp_path / "demo", serve=lambda **_: 0)
    assert not (tmp_path / "demo").exists()
