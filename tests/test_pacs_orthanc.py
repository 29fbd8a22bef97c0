"""The private Orthanc launcher (medprompt.pacs.orthanc) against the real Orthanc binary."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from medprompt.pacs.orthanc import INSTALL_HINT, Orthanc, OrthancError, find_dicomweb_plugin
from tests.test_io import write_dicom_series


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read() or b"null")


def test_orthanc_serves_dicomweb_and_stores_uploads_in_its_folder(orthanc: Orthanc, tmp_path: Path) -> None:
    assert orthanc.url.startswith("http://127.0.0.1:") and orthanc.dicomweb == orthanc.url + "/dicom-web"
    assert "dicom-web" in _get(f"{orthanc.url}/plugins")
    assert not _get(f"{orthanc.dicomweb}/studies")  # empty PACS
    data = np.arange(16 * 12 * 5, dtype=np.int16).reshape(16, 12, 5)
    files = write_dicom_series(tmp_path / "series", data, np.diag([0.8, 0.8, 2.5, 1.0]), modality="CT")
    ids = orthanc.upload(files)
    assert len(set(ids)) == 5 and ids == orthanc.upload(files)  # re-upload: same instances
    studies = _get(f"{orthanc.dicomweb}/studies")
    assert [s["0020000D"]["Value"][0] for s in studies] == ["1.2.826.0.1.3680043.2.1125.0"]
    assert any((orthanc.storage / "db").rglob("*")), "storage is not in the given folder"
    config = json.loads(orthanc.config_path.read_text())
    assert config["RemoteAccessAllowed"] is False and config["DicomServerEnabled"] is False


def test_orthanc_stops_and_frees_its_port(orthanc: Orthanc) -> None:
    process = orthanc.process
    orthanc.stop()
    assert process.poll() is not None
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{orthanc.url}/system", timeout=2)
    orthanc.stop()  # twice is harmless


def test_upload_of_a_non_dicom_file_names_it(orthanc: Orthanc, tmp_path: Path) -> None:
    junk = tmp_path / "notes.dcm"
    junk.write_text("not DICOM")
    with pytest.raises(OrthancError, match="notes.dcm"):
        orthanc.upload([junk])


def test_missing_orthanc_is_a_clear_error(tmp_path: Path) -> None:
    orthanc = Orthanc(tmp_path / "o")
    orthanc.executable = None
    with pytest.raises(OrthancError, match="apt-get install -y orthanc orthanc-dicomweb"):
        orthanc.start()


def test_an_orthanc_that_dies_at_start_names_its_log(tmp_path: Path) -> None:
    fake = tmp_path / "Orthanc"
    fake.write_text("#!/bin/sh\necho 'E: cannot open database' >&2\nexit 3\n")
    fake.chmod(0o755)
    if find_dicomweb_plugin() is None:
        pytest.skip(f"Orthanc's DICOMweb plugin is not installed ({INSTALL_HINT})")
    with pytest.raises(OrthancError, match=r"exited with code 3.*orthanc\.log"):
        Orthanc(tmp_path / "o", executable=str(fake)).start(timeout=10)
    assert "cannot open database" in (tmp_path / "o" / "orthanc.log").read_text()


def test_a_port_in_use_fails_naming_the_log(orthanc: Orthanc, tmp_path: Path) -> None:
    with pytest.raises(OrthancError, match=f"port {orthanc.http_port} .* in use"):
        Orthanc(tmp_path / "second", http_port=orthanc.http_port).start(timeout=10)
