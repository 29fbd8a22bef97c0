"""2D studies through the MONAI Label server: listed, drafted, corrected, and the next one chosen.

One server (``medprompt serve --conf models prior``, the localisers' own masks: no LiteMedSAM, so it
stays fast on a 2-core CPU) on a studies folder of small 2D images: a chest X-ray and a breast
ultrasound copied from ../shared/data/real2d (their tests skip when it is absent), a synthetic PNG,
a synthetic 2D DICOM (CR) and a synthetic 2D NIfTI. The round trip is driven by MONAI Label's own
Python client and by 3D Slicer's MONAI Label module client (the copy the monailabel wheel installs),
asking for results the way each does: PNG (our default) and NIfTI from the first, uint8 NRRD from
Slicer. Drafts are decoded and scored against the manual masks. Active learning's scores skip 2D
studies with a reason (checked on a datastore here, without a server).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Iterator

import nibabel as nib
import nrrd
import numpy as np
import pytest
import requests
from conftest import REPO_ROOT, console_script, launch_server, serving, write_tiny_checkpoint
from monailabel.client import MONAILabelClient
from monailabel.datastore.local import LocalDatastore
from PIL import Image
from test_loop import slicer_client_class

from medprompt.activelearning import ImageScore, ScoreMethod, ScoreStrategy, SKIPPED_2D
from medprompt.io.datastore import GuardedDatastore

REAL2D = REPO_ROOT.parent / "shared" / "data" / "real2d"
XRAY = REAL2D / "shenzhen_cxr2d" / "images" / "CHNCXR_0017_0.jpg"  # 512 x 512, lungs
ULTRASOUND = REAL2D / "busi_us2d" / "images" / "10080.png"  # 468 x 564 (not square: catches a transposed result)
MODEL = "medprompt_prior"
# The prior's own lungs reach about 0.87 on this X-ray and its breast tumour 0.85 on this ultrasound
# (refine none); the floors only catch a draft that is wrong, flipped, transposed or misnamed.
DICE_FLOOR = 0.6
SYNTHETIC_SHAPE = (40, 64)  # rows, columns


def manual_mask(image: Path) -> np.ndarray:
    """The set's manual mask of ``image`` as one class (breast_tumor = benign + malignant): bool (rows, cols)."""
    return np.asarray(Image.open(image.parent.parent / "labels" / (image.stem + ".png"))) > 0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.sum(a & b) / max(1, a.sum() + b.sum()))


def write_synthetic_png(path: Path) -> Path:
    rng = np.random.default_rng(0)
    pixels = (rng.random(SYNTHETIC_SHAPE) * 60 + 40).astype(np.uint8)
    pixels[10:30, 8:28] = 20  # two dark fields in a bright frame, roughly where lungs lie
    pixels[10:30, 36:56] = 20
    Image.fromarray(pixels).save(path)
    return path


def write_cr_dicom(path: Path, rows: int = 48, cols: int = 56) -> Path:
    """A single-frame CR image as an X-ray system would export it (no patient position, ImagerPixelSpacing)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "CR", "anon"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ImagerPixelSpacing = [0.5, 0.5]
    pixels = np.full((rows, cols), 3000, np.uint16)
    pixels[12:40, 6:24] = 800
    pixels[12:40, 32:50] = 800
    ds.PixelData = pixels.tobytes()
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(str(path), write_like_original=False)
    return path


def write_nifti2d(path: Path) -> Path:
    data = np.zeros((50, 36), np.int16)  # X x Y, one slice
    data[10:40, 8:28] = 300
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 1.0, 1.0])), path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    root = tmp_path_factory.mktemp("server2d")
    studies = root / "studies"
    studies.mkdir()
    if XRAY.is_file() and ULTRASOUND.is_file():
        shutil.copy(XRAY, studies / "cxr.jpg")
        shutil.copy(ULTRASOUND, studies / "us.png")
    write_synthetic_png(studies / "synthetic.png")
    write_cr_dicom(studies / "cr.dcm")
    write_nifti2d(studies / "slice.nii.gz")
    checkpoint = write_tiny_checkpoint(root / "tiny.pt")
    # The learned model too (tiny checkpoint), for its active-learning scores and scheduled finetuning,
    # which must leave 2D studies out; drafts here use the prior.
    command = [str(console_script("medprompt")), "serve", "--conf", "models", "prior,medprompt",
               "--conf", "finetune_after_labels", "1"]
    with serving(launch_server(root, command, studies, checkpoint)) as running:
        yield running


@pytest.fixture
def client(server, tmp_path: Path) -> MONAILabelClient:
    return MONAILabelClient(server.url, tmpdir=str(tmp_path))


def need_real() -> None:
    if not (XRAY.is_file() and ULTRASOUND.is_file()):
        pytest.skip(f"real 2D images not found under {REAL2D} (they live beside the checkout, not in it)")


def objects(client) -> dict:
    return client.datastore()["objects"]


def test_the_datastore_lists_pictures_2d_dicom_and_2d_nifti(server, client: MONAILabelClient) -> None:
    listed = objects(client)
    assert {"synthetic", "cr", "slice"} <= set(listed), sorted(listed)
    assert listed["cr"]["image"]["ext"] == ".dcm"
    if XRAY.is_file():
        assert {"cxr", "us"} <= set(listed)


def infer_png(client, image: str, prompts: str) -> tuple[np.ndarray, dict]:
    path, response = client.infer(MODEL, image, {"prompts": prompts})
    assert path.endswith(".png"), path  # a 2D study's default result
    return np.asarray(Image.open(path)), response


def test_2d_dicom_and_2d_nifti_studies_are_drafted_on_their_own_grid(server, client: MONAILabelClient) -> None:
    labels, response = infer_png(client, "cr", "lungs")
    assert labels.shape == (48, 56) and labels.dtype == np.uint8
    assert response["label_names"] == {"lungs": 1} and response["dimension"] == 2
    assert response["pixel_mm"] == [0.5, 0.5]  # the CR's ImagerPixelSpacing
    assert set(np.unique(labels)) <= {0, 1}
    # As NRRD (3D Slicer's request): the grid ITK reads this CR on, i.e. 0.5 mm pixels from
    # ImagerPixelSpacing, origin 0, identity LPS directions, columns x rows x 1; the same classes.
    path, _ = client.infer(MODEL, "cr", {"prompts": "lungs", "result_extension": ".nrrd", "result_dtype": "uint8"})
    data, header = nrrd.read(path)
    assert data.shape == (56, 48, 1) and np.array_equal(data[:, :, 0].T, labels)
    np.testing.assert_allclose(header["space directions"], np.diag([0.5, 0.5, 1.0]))
    np.testing.assert_allclose(header["space origin"], 0)

    # A 2D NIfTI asked back as NIfTI: its stored grid (X x Y x 1) and its own affine.
    path, response = client.infer(MODEL, "slice", {"prompts": "lungs", "result_extension": ".nii.gz"})
    result = nib.load(path)
    assert path.endswith(".nii.gz") and result.shape[:2] == (50, 36)
    np.testing.assert_allclose(result.affine, np.diag([0.8, 0.8, 1.0, 1.0]))


class Annotator:
    """MONAI Label's Python client (PNG drafts, PNG corrections with tag final) or 3D Slicer's module
    (uint8 NRRD drafts, as MONAILabelLogic.infer asks; NRRD corrections with no tag, as onSaveLabel sends)."""

    def __init__(self, kind: str, url: str, tmpdir: Path) -> None:
        self.kind = kind
        self.client = (MONAILabelClient if kind == "monailabel" else slicer_client_class())(url, tmpdir=str(tmpdir))
        self.tmpdir = tmpdir

    def draft(self, image: str, prompts: str) -> tuple[np.ndarray, dict[str, int]]:
        """The draft as displayed (rows, cols) and its class names."""
        params = {"prompts": prompts}
        if self.kind == "slicer":
            params.update(result_extension=".nrrd", result_dtype="uint8")
        path, response = self.client.infer(MODEL, image, params)
        if self.kind == "monailabel":
            assert path.endswith(".png"), path
            return np.asarray(Image.open(path)), response["label_names"]
        assert path.endswith(".nrrd"), path
        data, header = nrrd.read(path)
        assert data.dtype == np.uint8 and data.ndim == 3 and data.shape[2] == 1
        # The grid ITK (so Slicer) reads a picture on: origin 0, identity directions in LPS, 1 mm pixels.
        assert header["space"] == "left-posterior-superior"
        np.testing.assert_allclose(header["space directions"], np.eye(3))
        np.testing.assert_allclose(header["space origin"], 0)
        return data[:, :, 0].T, response["label_names"]

    def save_correction(self, image: str, corrected: np.ndarray, name: str) -> str:
        """Save ``corrected`` (rows, cols, class 1 = ``name``); returns the stored file's suffix."""
        label_info = [{"name": name, "idx": 1}]
        if self.kind == "monailabel":
            path = self.tmpdir / "corrected.png"
            Image.fromarray(corrected.astype(np.uint8)).save(path)
            self.client.save_label(image, str(path), tag="final", params={"label_info": label_info})
            return ".png"
        path = self.tmpdir / "corrected.nrrd"
        header = {"space": "left-posterior-superior", "space directions": np.eye(3), "space origin": np.zeros(3),
                  "kinds": ["domain"] * 3}
        nrrd.write(str(path), np.ascontiguousarray(corrected.T[:, :, None].astype(np.uint8)), header)
        self.client.save_label(image, str(path), params={"label_info": label_info})
        return ".nrrd"


@pytest.mark.parametrize("kind", ["monailabel", "slicer"])
def test_an_xray_round_trips_list_draft_correct_and_next_sample(server, tmp_path: Path, kind: str) -> None:
    need_real()
    annotator = Annotator(kind, server.url, tmp_path)
    assert "cxr" in objects(annotator.client)
    draft, names = annotator.draft("cxr", "lungs")
    truth = manual_mask(XRAY)
    assert draft.shape == truth.shape == (512, 512)
    assert names == {"lungs": 1} and set(np.unique(draft)) <= {0, 1}
    score = dice(draft == names["lungs"], truth)
    assert score > DICE_FLOOR, f"lungs Dice {score:.3f}"
    assert dice(draft.T == names["lungs"], truth) < score  # the orientation is the image's, not its transpose

    suffix = annotator.save_correction("cxr", truth, "lungs")
    stored = objects(annotator.client)["cxr"]["labels"]["final"]
    assert stored["ext"] == suffix and stored["info"]["label_info"] == [{"name": "lungs", "idx": 1}]
    final = server.studies / "labels" / "final"
    assert sorted(p.name for p in final.glob("cxr.*")) == [f"cxr{suffix}"]  # a replaced correction leaves no other
    saved = np.asarray(Image.open(final / "cxr.png")) if suffix == ".png" else nrrd.read(str(final / "cxr.nrrd"))[0][:, :, 0].T
    assert np.array_equal(saved > 0, truth)

    sample = annotator.client.next_sample("first", {})
    assert sample["id"] != "cxr" and sample["id"] in objects(annotator.client)


def test_an_ultrasound_comes_back_as_nifti_when_asked_and_a_png_correction_is_stored(
        server, client: MONAILabelClient, tmp_path: Path) -> None:
    need_real()
    truth = manual_mask(ULTRASOUND)
    assert truth.shape == (468, 564)
    path, response = client.infer(MODEL, "us", {"prompts": "breast lesion", "result_extension": ".nii.gz"})
    assert path.endswith(".nii.gz")
    result = nib.load(path)
    assert result.shape == (564, 468, 1)  # columns x rows x 1, as ITK reads the PNG
    np.testing.assert_allclose(result.affine, np.diag([-1.0, -1.0, 1.0, 1.0]))  # LPS identity, in RAS
    assert response["label_names"] == {"breast_tumor": 1}
    assert response["prompts_resolved"] == {"breast lesion": "breast_tumor"}
    draft = np.asarray(result.dataobj)[:, :, 0].T
    assert dice(draft == 1, truth) > DICE_FLOOR

    corrected = tmp_path / "us_corrected.png"
    Image.fromarray(truth.astype(np.uint8)).save(corrected)
    client.save_label("us", str(corrected), tag="final", params={"label_info": [{"name": "breast_tumor", "idx": 1}]})
    stored = np.asarray(Image.open(server.studies / "labels" / "final" / "us.png"))
    assert np.array_equal(stored, truth.astype(np.uint8))
    assert "final" in objects(client)["us"]["labels"]


def put_label(server, image: str, path: Path) -> requests.Response:
    with path.open("rb") as f:
        return requests.put(f"{server.url}/datastore/label?image={image}&tag=final",
                            files={"label": (path.name, f)}, data={"params": "{}"}, timeout=60)


def test_bad_2d_labels_are_refused_with_422_naming_the_problem(server, tmp_path: Path) -> None:
    wrong_size = tmp_path / "wrong_size.png"
    Image.fromarray(np.zeros((30, 20), np.uint8)).save(wrong_size)
    answer = put_label(server, "synthetic", wrong_size)
    assert answer.status_code == 422 and "30x20" in answer.text and "40x64" in answer.text, answer.text

    colour = tmp_path / "colour.png"
    rgb = np.zeros((*SYNTHETIC_SHAPE, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(colour)
    answer = put_label(server, "synthetic", colour)
    assert answer.status_code == 422 and "colour" in answer.text, answer.text

    jpeg = tmp_path / "label.jpg"
    Image.fromarray(np.zeros(SYNTHETIC_SHAPE, np.uint8)).save(jpeg)
    answer = put_label(server, "synthetic", jpeg)
    assert answer.status_code == 422 and "'.jpg'" in answer.text and ".png" in answer.text, answer.text

    fractional = tmp_path / "fractional.nii.gz"
    nib.save(nib.Nifti1Image(np.full((64, 40, 1), 0.5, np.float32), np.eye(4)), fractional)
    answer = put_label(server, "synthetic", fractional)
    assert answer.status_code == 422 and "whole numbers" in answer.text, answer.text

    transposed = tmp_path / "transposed.nrrd"  # rows x columns where ITK's grid is columns x rows
    nrrd.write(str(transposed), np.zeros((40, 64, 1), np.uint8),
               {"space": "left-posterior-superior", "space directions": np.eye(3), "space origin": np.zeros(3)})
    answer = put_label(server, "synthetic", transposed)
    assert answer.status_code == 422 and "40x64" in answer.text and "64x40" in answer.text, answer.text

    # None of them was stored; the right grid is.
    assert not list((server.studies / "labels" / "final").glob("synthetic.*"))
    good = tmp_path / "good.png"
    Image.fromarray(np.ones(SYNTHETIC_SHAPE, np.uint8)).save(good)
    assert put_label(server, "synthetic", good).status_code == 200
    assert (server.studies / "labels" / "final" / "synthetic.png").is_file()


def test_2d_uploads_are_checked_and_a_good_one_is_listed_and_drafted(server, client: MONAILabelClient,
                                                                     tmp_path: Path) -> None:
    def upload(path: Path, image_id: str) -> requests.Response:
        with path.open("rb") as f:
            return requests.put(f"{server.url}/datastore/?image={image_id}", files={"file": (path.name, f)},
                                data={"params": "{}"}, timeout=60)

    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not a picture at all")
    answer = upload(garbage, "garbage")
    assert answer.status_code == 422 and "cannot read" in answer.text, answer.text
    thumbnail = tmp_path / "thumbnail.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(thumbnail)
    answer = upload(thumbnail, "thumbnail")
    assert answer.status_code == 422 and "4x4" in answer.text, answer.text
    assert not ({"garbage", "thumbnail"} & set(objects(client)))

    good = write_synthetic_png(tmp_path / "uploaded.png")
    client.upload_image(str(good), "uploaded")
    assert objects(client)["uploaded"]["image"]["ext"] == ".png"
    labels, response = infer_png(client, "uploaded", "lungs")
    assert labels.shape == SYNTHETIC_SHAPE and response["label_names"] == {"lungs": 1}

    answer = requests.post(f"{server.url}/infer/{MODEL}?image=uploaded&output=json",
                           data={"params": json.dumps({"prompts": "lungs", "result_extension": ".jpg"})}, timeout=60)
    assert answer.status_code == 422 and ".jpg" in answer.text and ".png" in answer.text, answer.text


def test_2d_corrections_start_no_3d_round_and_scores_skip_2d_studies(server, client: MONAILabelClient,
                                                                      tmp_path: Path) -> None:
    corrected = tmp_path / "corrected.png"
    Image.fromarray(np.ones((48, 56), np.uint8)).save(corrected)
    client.save_label("cr", str(corrected), tag="final", params={"label_info": [{"name": "lungs", "idx": 1}]})
    # finetune_after_labels 1 would start a round of the 3D network on the next 3D correction; a 2D one is not.
    assert not client.train_status(check_if_running=True)
    rounds = requests.get(f"{server.url}/train/?all=true", timeout=30)
    assert rounds.status_code == 404 or rounds.json() == [], rounds.text  # MONAI Label: 404 when no task ever ran

    answer = requests.post(f"{server.url}/scoring/uncertainty?run_sync=true", json={}, timeout=120)
    assert answer.status_code == 200, answer.text
    summary = answer.json()
    assert summary["scored"] == 0 and summary["failed"] == 0 and summary["skipped_2d"] == summary["total"] > 0
    assert summary["skipped_reason"] == SKIPPED_2D
    sample = client.next_sample("uncertainty", {})  # only 2D studies: one is still offered, unscored
    assert sample["id"] in objects(client) and "final" not in objects(client)[sample["id"]]["labels"]


# -- active learning on a datastore holding 2D studies --------------------------------------------

class CountingScore(ImageScore):
    """A score that records what it was asked to compute (the image's mean), to see 2D studies never reach it."""

    name = "counting"
    description = "test score"

    def __init__(self) -> None:
        self.computed: list[str] = []

    def compute(self, volume, checkpoint: Path) -> float:
        self.computed.append(volume.source)
        return float(np.mean(volume.data))


class StubModel:
    def key(self) -> dict:
        return {"checkpoint": "/nonexistent/never-read.pt"}


def test_active_learning_skips_2d_studies_with_a_reason_and_ranks_them_last(tmp_path: Path, caplog) -> None:
    studies = tmp_path / "studies"
    studies.mkdir()
    write_synthetic_png(studies / "a_picture.png")
    write_cr_dicom(studies / "b_cr.dcm")
    write_nifti2d(studies / "c_slice.nii.gz")
    nib.save(nib.Nifti1Image(np.full((16, 16, 8), 5.0, np.float32), np.eye(4)), studies / "d_volume.nii.gz")
    store = GuardedDatastore.open(str(studies), extensions=["*.nii.gz", "*.nii", "*.png"], auto_reload=False,
                                  read_only=False)
    assert sorted(store.get_unlabeled_images()) == ["a_picture", "b_cr", "c_slice", "d_volume"]
    score = CountingScore()
    score.model = StubModel()

    with caplog.at_level(logging.INFO, logger="medprompt.activelearning"):
        summary = ScoreMethod(score)({}, store)
    assert [Path(p).name for p in score.computed] == ["d_volume.nii.gz"]  # only the volume was scored
    assert summary["scored"] == 1 and summary["skipped_2d"] == 3 and summary["failed"] == 0
    assert summary["skipped_reason"] == SKIPPED_2D
    assert "a_picture not scored: a 2D study" in caplog.text

    assert ScoreStrategy(score)({}, store) == {"id": "d_volume", "score": 5.0}
    # With only 2D studies left, the strategy still proposes one (unscored) rather than failing.
    store.save_label("d_volume", str(studies / "d_volume.nii.gz"), "final", {})
    assert ScoreStrategy(score)({}, store) == {"id": "a_picture", "score": None}


def test_a_dicom_slice_of_a_series_is_not_listed_as_a_2d_study(tmp_path: Path) -> None:
    """A flat folder holding a CT series' slices: those files are not 2D studies; a lone CR file is, and so
    is a CT file alone in its series."""
    studies = tmp_path / "studies"
    studies.mkdir()
    write_cr_dicom(studies / "cr.dcm")
    series = tmp_path / "series"
    series.mkdir()
    import pydicom
    from pydicom.uid import generate_uid

    uid = generate_uid()
    for i in range(2):
        ds = pydicom.dcmread(str(write_cr_dicom(series / f"ct_{i}.dcm")))
        ds.Modality, ds.SeriesInstanceUID = "CT", uid  # two slices of one series
        ds.save_as(str(studies / f"ct_{i}.dcm"))
    ds.SeriesInstanceUID = generate_uid()  # a CT slice alone in its series: a 2D study (one slice per patient)
    ds.save_as(str(studies / "ct_alone.dcm"))
    store = GuardedDatastore.open(str(studies), extensions=["*.nii.gz"], auto_reload=False, read_only=False)
    assert sorted(store.list_images()) == ["cr", "ct_alone"]
    assert isinstance(store, LocalDatastore)
