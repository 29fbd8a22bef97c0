"""The app against a real PACS: a private Orthanc (DICOMweb) holding phantoms written as DICOM series.

One server (``medprompt serve --studies http://127.0.0.1:PORT/dicom-web``, tiny random checkpoint,
drafts with ``refine none``) serves one Orthanc for the module. Every step goes through MONAI Label's
REST API; what Orthanc holds is checked through its own DICOMweb and REST APIs. The acceptance loop
(draft -> correction stored as DICOM SEG -> finetune round reads it -> the next draft scores higher)
runs after the tests that compare drafts of the tiny checkpoint (a round replaces it) and before
those that add series to the PACS (the round would train on them).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
import pydicom
import pydicom_seg
import pytest
import requests
from conftest import (REPO_ROOT, RunningServer, console_script, find_free_port, launch_server, require_orthanc,
                      serving, write_tiny_checkpoint)

from medprompt.drafts import draft
from medprompt.errors import PacsError
from medprompt.infers.http import status_of
from medprompt.io import load_labelmap, load_volume
from medprompt.io.dicom_seg import read_seg
from medprompt.pacs.client import DicomWebClient, value
from medprompt.pacs.datastore import DicomWebDatastore
from medprompt.pacs.export import storable, uid, write_series
from medprompt.pacs.orthanc import Orthanc
from medprompt.phantoms import make_phantom

PROMPTS = ("liver", "spleen")
SHAPE = (48, 48, 32)
SEEDS = (5, 6)  # as tests/test_loop.py: seed 5 is corrected, seed 6 stays unlabelled
FINETUNE = "medprompt_finetune"
ROUND_STEPS = 150


@dataclass
class Series:
    uid: str
    study: str
    folder: Path  # the DICOM files uploaded
    truth: np.ndarray  # the phantom's labels, on the series grid
    names: dict[str, int]


@dataclass
class Pacs:
    orthanc: Orthanc
    server: RunningServer
    series: dict[int, Series]  # seed -> series

    def infer(self, model: str, image: str, params: dict, output: str = "image") -> requests.Response:
        return requests.post(f"{self.server.url}/infer/{model}", params={"image": image, "output": output},
                             data={"params": json.dumps(params)}, timeout=600)


def phantom_series(folder: Path, seed: int) -> Series:
    volume, truth, names = make_phantom(seed, SHAPE)
    study = uid("test-pacs", str(seed))
    series = uid(study, "series")
    write_series(volume, folder, study_uid=study, series_uid=series, description=f"phantom {seed}",
                 patient=f"P{seed}")
    return Series(series, study, folder, truth, names)


def nifti(response: requests.Response, path: Path) -> tuple[np.ndarray, np.ndarray]:
    assert response.status_code == 200, response.text
    path.write_bytes(response.content)
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(2 * np.sum(pred & truth) / max(1, pred.sum() + truth.sum()))


def mean_dice(labels: np.ndarray, names: dict[str, int], series: Series) -> float:
    return float(np.mean([dice(labels == names[n], series.truth == series.names[n]) for n in PROMPTS]))


def orthanc_series(orthanc: Orthanc, series_uid: str) -> str:
    """Orthanc's own id of a series (its REST API names resources by these)."""
    request = urllib.request.Request(f"{orthanc.url}/tools/lookup", data=series_uid.encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return next(r["ID"] for r in json.loads(response.read()) if r["Type"] == "Series")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pacs]:
    require_orthanc()
    root = tmp_path_factory.mktemp("pacs")
    series = {seed: phantom_series(root / "dicom" / str(seed), seed) for seed in SEEDS}
    with Orthanc(root / "orthanc") as orthanc:
        for s in series.values():
            orthanc.upload(sorted(s.folder.iterdir()))
        checkpoint = write_tiny_checkpoint(root / "tiny.pt")
        env = {**os.environ, "MEDPROMPT_CACHE": str(root / "cache")}
        command = [str(console_script("medprompt")), "serve"]
        with serving(launch_server(root, command, orthanc.dicomweb, checkpoint, env)) as server:
            yield Pacs(orthanc, server, series)


def test_studies_are_listed_fetched_as_stored_and_drafted_by_every_model(pacs: Pacs, tmp_path: Path) -> None:
    url = pacs.server.url
    listed = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=60).json()["objects"]
    assert {s.uid for s in pacs.series.values()} <= set(listed)
    assert requests.get(f"{url}/datastore/", timeout=60).json()["total"] >= len(SEEDS)

    s = pacs.series[SEEDS[1]]
    local = load_volume(s.folder)  # what our reader makes of the very files Orthanc holds
    for model in ("medprompt_prior", "medprompt"):
        labels, affine = nifti(pacs.infer(model, s.uid, {"prompts": list(PROMPTS)}), tmp_path / f"{model}.nii.gz")
        expected = draft(local, list(PROMPTS), model={"medprompt_prior": "prior", "medprompt": "medprompt"}[model],
                         checkpoint=pacs.server.checkpoint, refine="none")
        assert labels.shape == s.truth.shape and np.allclose(affine, local.affine, atol=1e-4)
        assert np.array_equal(labels, expected.labels), f"{model}: the PACS draft is not the local draft"
    assert mean_dice(labels, expected.names, s) > 0  # a draft, not an empty map

    # The interactive model: a click in the liver draws a mask around it (LiteMedSAM, one slice).
    k = int(np.argmax((s.truth == s.names["liver"]).sum(axis=(0, 1))))
    i, j = (int(v) for v in np.argwhere(s.truth[:, :, k] == s.names["liver"]).mean(axis=0).round())
    click, _ = nifti(pacs.infer("medprompt_click", s.uid, {"label": "liver", "foreground": [[i, j, k]],
                                                          "background": [], "slice": k}), tmp_path / "click.nii.gz")
    assert click[i, j, k] and dice(click[:, :, k] > 0, s.truth[:, :, k] == s.names["liver"]) > 0.5

    # Fetched once, then served from the cache on disk (DICOM files and the decoded volume).
    fetched = [line for line in pacs.server.log.read_text().splitlines() if f"fetched series {s.uid}" in line]
    assert len(fetched) == 1, fetched
    cache = pacs.server.log.parent / "cache" / "dicomweb"
    assert len(list(cache.glob(f"*/dicom/{s.uid}/*.dcm"))) == SHAPE[2]
    assert list(cache.glob(f"*/studies/{s.uid}.nii.gz"))


def test_a_draft_as_dicom_seg_has_the_class_names_and_exactly_the_nifti_drafts_voxels(pacs: Pacs,
                                                                                         tmp_path: Path) -> None:
    s = pacs.series[SEEDS[1]]
    params = {"prompts": list(PROMPTS)}
    labels, affine = nifti(pacs.infer("medprompt_prior", s.uid, params), tmp_path / "draft.nii.gz")
    answer = pacs.infer("medprompt_prior", s.uid, params, output="json")
    names = answer.json()["label_names"]
    response = pacs.infer("medprompt_prior", s.uid, params, output="dicom_seg")  # no label_info needed
    assert response.status_code == 200 and response.headers["content-type"] == "application/dicom", response.text
    seg_path = tmp_path / "draft_seg.dcm"
    seg_path.write_bytes(response.content)

    seg = pydicom.dcmread(str(seg_path))
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == s.uid
    assert seg.StudyInstanceUID == s.study
    result = pydicom_seg.MultiClassReader().read(seg)
    assert {str(x.SegmentLabel) for x in seg.SegmentSequence} == set(PROMPTS)
    assert {int(x.SegmentNumber): str(x.SegmentLabel) for x in seg.SegmentSequence} == {v: n for n, v in names.items()}
    assert result.data.any()
    back, _, back_names = read_seg(seg_path, grid=(labels.shape, affine))
    assert back_names == names and np.array_equal(back, labels)
    # A draft is only sent, not stored in the PACS.
    assert not DicomWebClient(pacs.orthanc.dicomweb).search_series(Modality="SEG") or all(
        value(r, "SeriesInstanceUID") != seg.SeriesInstanceUID
        for r in DicomWebClient(pacs.orthanc.dicomweb).search_series(Modality="SEG"))


def test_acceptance_draft_correction_as_seg_in_the_pacs_finetune_reads_it_next_draft_scores_higher(
        pacs: Pacs, tmp_path: Path) -> None:
    url, s, other = pacs.server.url, pacs.series[SEEDS[0]], pacs.series[SEEDS[1]]
    params = {"prompts": ",".join(PROMPTS)}
    response = pacs.infer("medprompt", s.uid, params, output="json")
    names = response.json()["label_names"]
    before_labels, affine = nifti(pacs.infer("medprompt", s.uid, params), tmp_path / "before.nii.gz")
    before = mean_dice(before_labels, names, s)

    # The annotator's correction: the true organs, named as 3D Slicer and OHIF name them.
    corrected = np.zeros(s.truth.shape, np.uint8)
    for v, name in enumerate(PROMPTS, start=1):
        corrected[s.truth == s.names[name]] = v
    label = tmp_path / "corrected.nii.gz"
    nib.save(nib.Nifti1Image(corrected, affine), label)
    label_info = [{"name": name, "idx": v} for v, name in enumerate(PROMPTS, start=1)]
    with label.open("rb") as handle:
        saved = requests.put(f"{url}/datastore/label", params={"image": s.uid, "tag": "final"},
                             files={"label": ("corrected.nii.gz", handle)},
                             data={"params": json.dumps({"label_info": label_info})}, timeout=300)
    assert saved.status_code == 200, saved.text

    # Stored in Orthanc as a DICOM SEG of the series, segments named by class, voxels as corrected.
    pacs_client = DicomWebClient(pacs.orthanc.dicomweb)
    segs = [r for r in pacs_client.search_series(Modality="SEG") if value(r, "StudyInstanceUID") == s.study]
    assert len(segs) == 1
    seg_folder = tmp_path / "seg"
    seg_file = pacs_client.retrieve_series(s.study, value(segs[0], "SeriesInstanceUID"), seg_folder)[0]
    seg = pydicom.dcmread(str(seg_file))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == s.uid
    assert {int(x.SegmentNumber): str(x.SegmentLabel) for x in seg.SegmentSequence} == {1: "liver", 2: "spleen"}
    back, _, _ = read_seg(seg_file, grid=(corrected.shape, affine))
    assert np.array_equal(back, corrected)

    # The study is labelled; active learning offers the other one.
    assert requests.get(f"{url}/datastore/", timeout=60).json()["completed"] == 1
    listed = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=60).json()["objects"]
    assert "final" in listed[s.uid]["labels"]
    for strategy in ("first", "random"):
        nxt = requests.post(f"{url}/activelearning/{strategy}", json={}, timeout=300)
        assert nxt.status_code == 200 and nxt.json()["id"] == other.uid, nxt.text

    # A finetune round in MONAI Label's training process reads the SEG back from the PACS.
    started = requests.post(f"{url}/train/{FINETUNE}", json={"steps": ROUND_STEPS}, timeout=60)
    assert started.status_code == 200, started.text
    deadline = time.monotonic() + 900
    while (task := requests.get(f"{url}/train/", timeout=60).json())["status"] in ("SUBMITTED", "RUNNING"):
        assert time.monotonic() < deadline, f"round still running: {task.get('details')}"
        time.sleep(1)
    assert task["status"] == "DONE", "\n".join(task.get("details", []))
    stats = requests.get(f"{url}/info/", timeout=60).json()["train_stats"][FINETUNE]
    assert stats["accepted"] and stats["steps"] == ROUND_STEPS, stats
    assert stats["validation_images"] == [f"{s.uid}.nii.gz"], stats  # the corrected series, from its SEG
    assert stats["validation_dice_after"] >= stats["validation_dice_before"]

    after_labels, _ = nifti(pacs.infer("medprompt", s.uid, params), tmp_path / "after.nii.gz")
    after = mean_dice(after_labels, names, s)
    assert after > before + 0.05, f"mean Dice {before:.3f} -> {after:.3f}"


def test_the_real_jpeg2000_ct_is_fetched_as_stored_decoded_here_and_its_seg_round_trips(
        pacs: Pacs, real_data: Path, tmp_path: Path) -> None:
    folder = real_data / "ct_abdomen_b_dicom" / "dicom"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    files = storable(sorted(folder.iterdir()), tmp_path / "with_uids")  # the export blanked every UID
    pacs.orthanc.upload(files)
    series_uid = str(pydicom.dcmread(str(files[0]), stop_before_pixels=True).SeriesInstanceUID)
    with urllib.request.urlopen(f"{pacs.orthanc.url}/series/{orthanc_series(pacs.orthanc, series_uid)}/instances",
                                timeout=10) as r:
        instance = json.loads(r.read())[0]["ID"]
    with urllib.request.urlopen(f"{pacs.orthanc.url}/instances/{instance}/metadata/TransferSyntax", timeout=10) as r:
        assert r.read().decode() == "1.2.840.10008.1.2.4.90"  # stored as JPEG 2000 lossless

    local = load_volume(folder)
    labels, affine = nifti(pacs.infer("medprompt_prior", series_uid, {"prompts": ["liver"]}),
                           tmp_path / "liver.nii.gz")
    expected = draft(local, ["liver"], model="prior", refine="none")
    assert np.array_equal(labels, expected.labels)
    reference, _, ref_names = load_labelmap(real_data / "ct_abdomen_b_dicom" / "label.nii.gz")
    ref_names = ref_names or json.loads((real_data / "ct_abdomen_b_dicom" / "labels.json").read_text())["labels"]
    assert dice(labels == 1, reference == ref_names["liver"]) > 0.5

    # The reference liver saved as the correction: a SEG of the JPEG 2000 series, read back exactly.
    corrected = (reference == ref_names["liver"]).astype(np.uint8)
    label = tmp_path / "corrected.nii.gz"
    nib.save(nib.Nifti1Image(corrected, affine), label)
    with label.open("rb") as handle:
        saved = requests.put(f"{pacs.server.url}/datastore/label", params={"image": series_uid, "tag": "final"},
                             files={"label": ("corrected.nii.gz", handle)},
                             data={"params": json.dumps({"label_info": [{"name": "liver", "idx": 1}]})}, timeout=300)
    assert saved.status_code == 200, saved.text
    fresh = DicomWebDatastore(pacs.orthanc.dicomweb, cache=tmp_path / "fresh_cache")  # another server's view
    assert series_uid in fresh.get_labeled_images()
    back, _, names = load_labelmap(fresh.get_label_uri(series_uid, "final"))
    assert names == {"liver": 1} and np.array_equal(back, corrected)


def test_a_series_the_pacs_cannot_give_is_a_404_naming_it(pacs: Pacs, tmp_path: Path) -> None:
    gone = phantom_series(tmp_path / "gone", seed=40)
    pacs.orthanc.upload(sorted(gone.folder.iterdir()))
    listed = requests.get(f"{pacs.server.url}/datastore/", params={"output": "all"}, timeout=60).json()["objects"]
    assert gone.uid in listed
    request = urllib.request.Request(f"{pacs.orthanc.url}/series/{orthanc_series(pacs.orthanc, gone.uid)}",
                                     method="DELETE")
    urllib.request.urlopen(request, timeout=10).close()  # listed a moment ago, gone from the PACS now
    response = pacs.infer("medprompt_prior", gone.uid, {"prompts": ["liver"]}, output="json")
    assert response.status_code == 404 and gone.uid in response.json()["detail"], response.text


def test_a_pacs_that_stops_answering_is_a_502_naming_it(orthanc: Orthanc, tmp_path: Path) -> None:
    s = phantom_series(tmp_path / "dicom", seed=7)
    orthanc.upload(sorted(s.folder.iterdir()))
    store = DicomWebDatastore(orthanc.dicomweb, cache=tmp_path / "cache")
    assert store.list_images() == [s.uid] and store.get_labeled_images() == []
    orthanc.stop()
    with pytest.raises(PacsError, match=f"cannot reach the DICOMweb server {orthanc.dicomweb}") as error:
        store.get_image_uri(s.uid)
    assert status_of(error.value) == 502


def _one_line_error(command: list[str], env: dict | None = None, timeout: float = 120) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    errors = [line for line in (done.stderr + done.stdout).splitlines() if "error: " in line]
    assert len(errors) == 1, done.stderr
    return errors[0]


def test_an_unreachable_or_wrong_dicomweb_url_is_one_line_at_serve_start(orthanc: Orthanc, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{find_free_port()}/dicom-web"
    line = _one_line_error([str(console_script("medprompt")), "serve", "--studies", dead,
                            "--port", str(find_free_port())])
    assert line == f"error: cannot reach the DICOMweb server {dead} (Connection refused)"
    line = _one_line_error([str(console_script("medprompt")), "serve", "--studies", orthanc.url,
                            "--port", str(find_free_port())])
    assert line.startswith(f"error: {orthanc.url} is not a DICOMweb server") and "/dicom-web" in line
    # MONAI Label's start_server writes a logging config to the temp folder and never removes it.
    env = {**os.environ, "PATH": f"{console_script('monailabel').parent}{os.pathsep}{os.environ['PATH']}",
           "TMPDIR": str(tmp_path)}
    line = _one_line_error([str(console_script("monailabel")), "start_server", "--app",
                            str(REPO_ROOT / "apps" / "medprompt"), "--studies", dead, "--host", "127.0.0.1",
                            "--port", str(find_free_port())], env=env)
    assert line.endswith(f"error: cannot reach the DICOMweb server {dead} (Connection refused)")


def test_monailabel_start_server_serves_a_dicomweb_url(orthanc: Orthanc, tmp_path: Path) -> None:
    s = phantom_series(tmp_path / "dicom", seed=SEEDS[0])
    orthanc.upload(sorted(s.folder.iterdir()))
    env = {**os.environ, "MEDPROMPT_CACHE": str(tmp_path / "cache"),
           "PATH": f"{console_script('monailabel').parent}{os.pathsep}{os.environ['PATH']}"}
    command = [str(console_script("monailabel")), "start_server", "--app", str(REPO_ROOT / "apps" / "medprompt"),
               "--host", "127.0.0.1", "--conf", "models", "prior"]
    with serving(launch_server(tmp_path, command, orthanc.dicomweb, tmp_path / "unused.pt", env)) as server:
        assert requests.get(f"{server.url}/datastore/", timeout=60).json()["total"] == 1
        response = requests.post(f"{server.url}/infer/medprompt_prior", params={"image": s.uid, "output": "json"},
                                 data={"params": json.dumps({"prompts": ["liver"]})}, timeout=300)
        assert response.status_code == 200 and response.json()["label_names"] == {"liver": 1}, response.text
    assert "itkimage2segimage" not in server.log.read_text()  # no dcmqi warning, no download


def test_saved_labels_need_names_the_image_grid_and_only_final_ones_reach_the_pacs(
        orthanc: Orthanc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    from medprompt.errors import InputError, RequestError
    from medprompt.io import save_labelmap

    s = phantom_series(tmp_path / "dicom", seed=8)
    orthanc.upload(sorted(s.folder.iterdir()))
    store = DicomWebDatastore(orthanc.dicomweb, cache=tmp_path / "cache")
    volume = load_volume(store.get_image_uri(s.uid))
    liver = (s.truth == s.names["liver"]).astype(np.uint8)
    path = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(liver * 3, volume.affine), path)
    with pytest.raises(RequestError, match="label value 3 has no class name"):
        store.save_label(s.uid, str(path), "final", {"label_info": [{"name": "liver", "idx": 1}]})
    nib.save(nib.Nifti1Image(liver[:, :, :-1], volume.affine), path)
    with pytest.raises(InputError, match="is not the image's"):
        store.save_label(s.uid, str(path), "final", {"label_names": {"liver": 1}})
    with pytest.raises(RequestError, match="remove the SEG there"):
        store.remove_label(s.uid, "final")

    # Another tag is kept in the cache only; the PACS holds no SEG and the series stays unlabelled.
    save_labelmap(path, liver, volume.affine, {"liver": 1})
    store.save_label(s.uid, str(path), "original", {})
    assert not DicomWebClient(orthanc.dicomweb).search_series(Modality="SEG")
    assert store.get_labeled_images() == [] and store.get_unlabeled_images() == [s.uid]

    # OHIF's raw voxels (.bin, SimpleITK's z-y-x order) with names from the label's sidecar, read without
    # writing anything to the temp folder. Voxels of another grid are refused first.
    binary = tmp_path / "label.bin"
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    binary.write_bytes(np.ascontiguousarray(liver[:, :, :-1]).tobytes())
    with pytest.raises(InputError, match="bytes are not the image's"):
        store.save_label(s.uid, str(binary), "final", {"label_names": {"liver": 2}})
    binary.write_bytes(np.ascontiguousarray((liver * 2).transpose(2, 1, 0)).tobytes())
    store.save_label(s.uid, str(binary), "final", {"label_names": {"liver": 2}})
    assert store.get_labeled_images() == [s.uid] and list((tmp_path / "tmp").iterdir()) == []
    back, _, names = load_labelmap(DicomWebDatastore(orthanc.dicomweb, cache=tmp_path / "other").get_label_uri(
        s.uid, "final"))
    assert names == {"liver": 2} and np.array_equal(back, liver * 2)
