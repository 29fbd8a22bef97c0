"""Semi-supervised finetuning: labels + unlabelled studies, new classes, and safe model replacement."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medprompt.catalog import catalog_with, default_catalog
from medprompt.errors import InputError
from medprompt.model.checkpoint import load_model
from medprompt.phantoms import write_sample_data
from medprompt.trainers.finetune import find_labelled, train_finetune
from medprompt.trainers.zero_shot import ZeroShotConfig, train_zero_shot


@pytest.fixture(scope="module")
def datastore(tmp_path_factory) -> Path:
    """Three small phantoms; one has a corrected label (with an extra class) in labels/final."""
    root = tmp_path_factory.mktemp("ds")
    write_sample_data(root, n=3, seed=11, shape=(48, 48, 32))
    final = root / "labels" / "final"
    final.mkdir(parents=True)
    ref = root / "reference" / "phantom_000.nii.gz"
    shutil.copy(ref, final / "phantom_000.nii.gz")
    names = json.loads((root / "reference" / "phantom_000.json").read_text())["labels"]
    keep = {k: v for k, v in names.items() if k in ("liver", "spleen", "bone")}
    keep["psoas_major"] = keep.pop("bone")  # an annotator's class that prompts/ does not know
    (final / "phantom_000.json").write_text(json.dumps({"labels": keep}))
    shutil.rmtree(root / "reference")
    return root


@pytest.fixture(scope="module")
def start_model(datastore: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "served.pt"
    cfg = ZeroShotConfig(studies=[datastore], out=out, steps=2, batch_size=2, model_config="tiny",
                         classes=("liver", "spleen"), device="cpu")
    return train_zero_shot(cfg, progress=False).out


def test_labelled_and_unlabelled_are_told_apart(datastore: Path):
    labelled, unlabelled = find_labelled(datastore)
    assert [s.image.name for s in labelled] == ["phantom_000.nii.gz"]
    assert set(labelled[0].names) == {"liver", "spleen", "psoas_major"}
    assert sorted(p.name for p in unlabelled) == ["phantom_001.nii.gz", "phantom_002.nii.gz"]


def test_a_2d_nifti_beside_volumes_is_one_2d_study(datastore: Path, tmp_path: Path):
    """A one-slice NIfTI in a datastore is a 2D study: listed once (not also as a volume, which would
    count its correction twice and hand the 3D trainers a slice), labelled by its 2D label map."""
    import nibabel as nib
    import numpy as np

    from medprompt.trainers.sam_rounds import find_corrections
    from medprompt.trainers.zero_shot import list_studies

    store = tmp_path / "store"
    shutil.copytree(datastore, store)
    slice_ = np.zeros((40, 30), np.int16)
    slice_[10:30, 5:25] = 50
    for stem in ("slice_a", "slice_b"):
        nib.save(nib.Nifti1Image(slice_, np.diag([0.8, 0.8, 2.0, 1.0])), store / f"{stem}.nii.gz")
    nib.save(nib.Nifti1Image((slice_ > 0).astype(np.uint8), np.diag([0.8, 0.8, 2.0, 1.0])),
             store / "labels" / "final" / "slice_a.nii.gz")
    (store / "labels" / "final" / "slice_a.json").write_text(json.dumps({"labels": {"liver": 1}}))
    assert sorted(p.name for p in list_studies([store])) == [f"phantom_00{i}.nii.gz" for i in range(3)]
    labelled, unlabelled = find_corrections(store)
    assert sorted(s.image.name for s in labelled) == ["phantom_000.nii.gz", "slice_a.nii.gz"]
    assert sorted(p.name for p in unlabelled) == ["phantom_001.nii.gz", "phantom_002.nii.gz", "slice_b.nii.gz"]
    only_2d = tmp_path / "only_2d"
    only_2d.mkdir()
    shutil.copy(store / "slice_b.nii.gz", only_2d)
    with pytest.raises(InputError, match="1 2D NIfTI images"):
        list_studies([only_2d])


def test_a_datastore_of_one_slice_ct_dicom_files_is_a_2d_datastore(tmp_path: Path):
    """A 2D CT set stored as DICOM: one slice per patient, each its own series, in one folder. Each file
    is a 2D study with its PNG correction; the folder is not a DICOM series (it held four, and the
    round stopped on "holds 4 DICOM series")."""
    import numpy as np
    from PIL import Image

    from medprompt.io.volume import find_volumes
    from medprompt.trainers.sam_rounds import find_corrections
    from test_image2d import write_dicom2d

    store = tmp_path / "store"
    (store / "labels" / "final").mkdir(parents=True)
    pixels = np.full((40, 30), 1024 + 40, np.uint16)  # stored values; HU = value - 1024
    for i in range(4):
        write_dicom2d(store / f"patient{i}.dcm", pixels, "CT", PixelSpacing=[0.8, 0.8], RescaleIntercept=-1024,
                      RescaleSlope=1)
    mask = np.zeros((40, 30), np.uint8)
    mask[10:30, 5:25] = 1
    Image.fromarray(mask).save(store / "labels" / "final" / "patient0.png")
    assert find_volumes(store) == []
    labelled, unlabelled = find_corrections(store, {"liver": 1})
    assert [(s.image.name, s.label.name) for s in labelled] == [("patient0.dcm", "patient0.png")]
    assert sorted(p.name for p in unlabelled) == ["patient1.dcm", "patient2.dcm", "patient3.dcm"]


def test_a_2d_study_corrected_in_3d_slicer_is_a_correction(tmp_path: Path):
    """3D Slicer saves a 2D study's correction as NRRD on the grid ITK reads the picture on (columns x rows
    x 1); the server stores it as labels/final/<id>.nrrd. A round must train on it, read as displayed:
    it was taken for an unlabelled image (no stem matched '.nrrd', and the 2D label reader read PNG and
    NIfTI only)."""
    import nrrd
    import numpy as np
    from PIL import Image

    from medprompt.io.image2d import load_image2d, load_label2d
    from medprompt.trainers.sam_rounds import find_corrections

    store = tmp_path / "store"
    final = store / "labels" / "final"
    final.mkdir(parents=True)
    pixels = np.zeros((40, 64), np.uint8)
    pixels[5:20, 10:50] = 200
    for stem in ("cxr", "other"):
        Image.fromarray(pixels).save(store / f"{stem}.png")
    mask = np.zeros((40, 64), np.uint8)
    mask[5:20, 10:50] = 1  # not symmetric under transposition or flips
    header = {"space": "left-posterior-superior", "space directions": np.eye(3), "space origin": np.zeros(3)}
    nrrd.write(str(final / "cxr.nrrd"), np.ascontiguousarray(mask.T[:, :, None]), header)
    (final / "cxr.json").write_text(json.dumps({"labels": {"lungs": 1}}))
    labelled, unlabelled = find_corrections(store)
    assert [(s.image.name, s.label.name, s.names) for s in labelled] == [("cxr.png", "cxr.nrrd", {"lungs": 1})]
    assert [p.name for p in unlabelled] == ["other.png"]
    labels, names = load_label2d(labelled[0].label, load_image2d(labelled[0].image))
    assert names == {"lungs": 1}
    np.testing.assert_array_equal(labels, mask)


def test_unknown_label_class_becomes_a_prompt():
    cat = catalog_with(["liver", "psoas_major"], default_catalog())
    entry = cat["psoas_major"]
    assert entry.descriptions == ("psoas major",) and not entry.prior_supported
    assert "psoas_major" not in default_catalog()  # the shared catalog is untouched
    # A label named by an alias ("kidney", both kidneys) keeps its class's attributes under the label's name.
    kidney = catalog_with(["kidney"], default_catalog())["kidney"]
    both = default_catalog()["kidneys"]
    assert kidney.image2d == both.image2d and int(kidney.image2d.get("parts", 1)) == 2
    assert kidney.prior == both.prior and kidney.source == "labels"


def test_round_adds_classes_and_replaces_only_when_no_worse(datastore: Path, start_model: Path, tmp_path: Path):
    served = tmp_path / "served.pt"
    shutil.copy(start_model, served)
    result = train_finetune(datastore, served, steps=3, batch_size=2, lr=1e-3, device="cpu", progress=False)
    assert result.classes[:2] == ["liver", "spleen"] and "psoas_major" in result.classes
    assert result.validation == ["phantom_000.nii.gz"]
    assert result.previous_score is not None
    _, meta = load_model(served)
    if result.accepted:
        assert result.candidate_score >= result.previous_score
        assert "psoas_major" in meta["classes"] and result.version.is_file()
    else:
        assert meta["classes"] == ["liver", "spleen"]  # the served model is untouched
    assert not (served.parent / "finetune_work" / "candidate.pt").exists()


def test_a_worse_candidate_never_replaces_the_served_model(datastore: Path, start_model: Path, tmp_path: Path,
                                                           monkeypatch):
    served = tmp_path / "served.pt"
    shutil.copy(start_model, served)
    before = served.read_bytes()
    import medprompt.trainers.finetune as ft

    scores = iter([0.1, 0.9])  # candidate first, then the model in service
    monkeypatch.setattr(ft, "mean_dice", lambda *a, **k: next(scores))
    result = train_finetune(datastore, served, steps=1, batch_size=2, device="cpu", progress=False)
    assert not result.accepted and served.read_bytes() == before
    assert not list(served.parent.glob("versions/*.pt"))  # nothing was kept as a new version


def test_no_labels_is_a_clear_error(tmp_path: Path, start_model: Path):
    write_sample_data(tmp_path, n=1, seed=1, shape=(32, 32, 16))
    with pytest.raises(InputError, match="no saved labels"):
        train_finetune(tmp_path, start_model, steps=1, device="cpu", progress=False)


def test_server_train_task_never_overwrites_the_shipped_model(datastore: Path, start_model: Path, tmp_path: Path):
    """The MONAI Label task finetunes from the model in service into the app's own model folder."""
    from monailabel.datastore.local import LocalDatastore

    from medprompt.configs.medprompt import Checkpoints
    from medprompt.trainers.finetune_task import FinetuneTrainTask

    shipped = tmp_path / "shipped.pt"
    shutil.copy(start_model, shipped)
    before = shipped.read_bytes()
    checkpoints = Checkpoints(rounds=tmp_path / "app_model" / "medprompt", start=shipped)
    task = FinetuneTrainTask(checkpoints, text_encoder=None)
    stats = task({"steps": 2}, LocalDatastore(str(datastore), extensions=("*.nii.gz",)))
    assert shipped.read_bytes() == before
    assert stats["validation_images"] == ["phantom_000.nii.gz"] and stats["steps"] == 2
    if stats["accepted"]:
        assert checkpoints.trained.is_file() and checkpoints.served() == checkpoints.trained
    else:
        assert not checkpoints.trained.exists() and checkpoints.served() == shipped
    assert task.stats() == stats
