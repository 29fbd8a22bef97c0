"""Scoring whole datasets: two folders matched by case name, MSD and nnU-Net layouts (both
dataset.json forms), per-case and mean +- sd per class, CSV and JSON, and the errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medprompt.cli import main
from medprompt.errors import InputError
from medprompt.evaluation import case_name, dataset_classes, evaluate_folders, find_cases
from medprompt.io import load_labelmap, save_labelmap

EYE = np.eye(4)
SHAPE = (8, 8, 8)


def box(*slices: slice) -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    mask[slices] = True
    return mask


def labelmap(**masks: tuple[int, np.ndarray]) -> np.ndarray:
    """A label map from {name: (value, mask)}; later masks overwrite earlier ones."""
    out = np.zeros(SHAPE, np.uint8)
    for value, mask in masks.values():
        out[mask] = value
    return out


def dice(p: np.ndarray, r: np.ndarray) -> float:
    return 2 * np.count_nonzero(p & r) / (np.count_nonzero(p) + np.count_nonzero(r))


def iou(p: np.ndarray, r: np.ndarray) -> float:
    return np.count_nonzero(p & r) / np.count_nonzero(p | r)


def write_ref(path: Path, labels: np.ndarray, affine: np.ndarray = EYE) -> None:
    """A reference as most datasets ship it: a bare NIfTI, no sidecar."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), path)


@pytest.fixture
def folders(tmp_path: Path) -> dict:
    """pred/ (drafts with sidecars, their own label values) and ref/ (bare maps + labels.json).

    a: liver overlaps 3/4, spleen exact; b: liver half as big, spleen drawn where the reference
    has none (a false positive); c only predicted, d only referenced.
    """
    ref_liver_a, pred_liver_a = box(slice(0, 4), slice(0, 4), slice(0, 4)), box(slice(1, 5), slice(0, 4), slice(0, 4))
    spleen_a = box(slice(6, 8), slice(6, 8), slice(6, 8))
    ref_liver_b, pred_liver_b = box(slice(0, 4), slice(0, 4), slice(0, 2)), box(slice(0, 4), slice(0, 4), slice(0, 1))
    pred_spleen_b = box(slice(7, 8), slice(7, 8), slice(7, 8))
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    save_labelmap(pred / "a_0000.nii.gz", labelmap(liver=(3, pred_liver_a), spleen=(5, spleen_a)), EYE,
                  {"liver": 3, "spleen": 5})
    save_labelmap(pred / "b.nrrd", labelmap(liver=(1, pred_liver_b), spleen=(2, pred_spleen_b)), EYE,
                  {"liver": 1, "spleen": 2})
    save_labelmap(pred / "c.nii.gz", labelmap(liver=(1, ref_liver_a)), EYE, {"liver": 1})
    write_ref(ref / "a.nii.gz", labelmap(liver=(1, ref_liver_a), spleen=(2, spleen_a)))
    write_ref(ref / "b.nii", labelmap(liver=(1, ref_liver_b)))
    write_ref(ref / "d.nii.gz", labelmap(liver=(1, ref_liver_a)))
    (ref / "labels.json").write_text(json.dumps({"labels": {"liver": 1, "spleen": 2}}))
    return {"pred": pred, "ref": ref, "liver": [(pred_liver_a, ref_liver_a), (pred_liver_b, ref_liver_b)],
            "spleen_a": spleen_a}


def test_two_folders_matched_by_case_name_per_case_and_per_class(folders: dict):
    result = evaluate_folders(folders["pred"], folders["ref"])
    assert list(result.cases) == ["a", "b"] and result.classes == ["liver", "spleen"]
    assert result.only_pred_cases == ["c"] and result.only_ref_cases == ["d"]
    liver_dice = [dice(p, r) for p, r in folders["liver"]]
    liver_iou = [iou(p, r) for p, r in folders["liver"]]
    assert liver_dice == [0.75, pytest.approx(2 / 3)]  # 2*48/(64+64); 2*16/(16+32)
    per_case = {c: {s.name: s for s in e.scores} for c, e in result.cases.items()}
    assert [per_case[c]["liver"].dice for c in "ab"] == pytest.approx(liver_dice)
    assert [per_case[c]["liver"].iou for c in "ab"] == pytest.approx(liver_iou)
    assert per_case["a"]["spleen"].dice == 1.0
    # b's reference has no spleen but the prediction draws one voxel: 0, a false positive, not averaged.
    assert per_case["b"]["spleen"].dice == 0.0 and per_case["b"]["spleen"].ref_voxels == 0
    liver, spleen = result.summary()
    assert liver.n == 2 and liver.dice_mean == pytest.approx(np.mean(liver_dice))
    assert liver.dice_sd == pytest.approx(np.std(liver_dice, ddof=1))
    assert liver.iou_mean == pytest.approx(np.mean(liver_iou)) and liver.iou_sd == pytest.approx(np.std(liver_iou, ddof=1))
    assert (spleen.n, spleen.dice_mean, spleen.false_positive_cases) == (1, 1.0, ["b"])
    assert math.isnan(spleen.dice_sd)  # one case: no spread
    assert result.mdice == pytest.approx((np.mean(liver_dice) + 1.0) / 2)


def test_csv_and_json_hold_cases_mean_sd_and_n(folders: dict):
    result = evaluate_folders(folders["pred"], folders["ref"])
    rows = list(csv.reader(result.to_csv().splitlines()))
    assert rows[0] == ["case", "liver_dice", "liver_iou", "spleen_dice", "spleen_iou"]
    assert [r[0] for r in rows[1:]] == ["a", "b", "mean", "sd", "n"]
    table = {r[0]: r[1:] for r in rows[1:]}
    assert float(table["a"][0]) == pytest.approx(0.75) and table["b"][2] == "0.000000"
    assert float(table["mean"][2]) == 1.0 and table["sd"][2] == "" and table["n"] == ["2", "2", "1", "1"]
    doc = result.to_dict()
    assert doc["classes"]["spleen"] == {"n": 1, "dice_mean": 1.0, "dice_sd": None, "iou_mean": 1.0, "iou_sd": None,
                                        "false_positive_cases": ["b"]}
    assert doc["cases"]["a"]["classes"]["liver"]["dice"] == pytest.approx(0.75)
    assert doc["only_pred_cases"] == ["c"] and doc["only_ref_cases"] == ["d"] and "sample sd" in doc["rules"]


def test_class_empty_in_both_and_class_missing_from_one_prediction(tmp_path: Path):
    """Empty in both: no score. Not named by one case's prediction: that prediction is empty (Dice 0)."""
    liver, spleen = box(slice(0, 4), slice(0, 4), slice(0, 4)), box(slice(6, 8), slice(6, 8), slice(6, 8))
    save_labelmap(tmp_path / "pred" / "a.nii.gz", labelmap(liver=(1, liver), spleen=(2, spleen)), EYE,
                  {"liver": 1, "spleen": 2})
    save_labelmap(tmp_path / "pred" / "b.nii.gz", labelmap(liver=(1, liver)), EYE, {"liver": 1})  # no spleen named
    save_labelmap(tmp_path / "pred" / "c.nii.gz", labelmap(liver=(1, liver)), EYE, {"liver": 1, "spleen": 2})
    write_ref(tmp_path / "ref" / "a.nii.gz", labelmap(liver=(1, liver), spleen=(2, spleen)))
    write_ref(tmp_path / "ref" / "b.nii.gz", labelmap(liver=(1, liver), spleen=(2, spleen)))
    write_ref(tmp_path / "ref" / "c.nii.gz", labelmap(liver=(1, liver)))  # spleen empty in both
    (tmp_path / "ref" / "labels.json").write_text(json.dumps({"liver": 1, "spleen": 2}))
    # e's reference names no spleen (its own sidecar): no such structure there, so a drawn spleen is a false positive.
    save_labelmap(tmp_path / "pred" / "e.nii.gz", labelmap(liver=(1, liver), spleen=(2, spleen)), EYE,
                  {"liver": 1, "spleen": 2})
    save_labelmap(tmp_path / "ref" / "e.nii.gz", labelmap(liver=(4, liver)), EYE, {"liver": 4})
    result = evaluate_folders(tmp_path / "pred", tmp_path / "ref")
    spleen_scores = {c: next(s for s in e.scores if s.name == "spleen") for c, e in result.cases.items()}
    assert spleen_scores["b"].dice == 0.0 and spleen_scores["b"].ref_voxels == 8
    assert math.isnan(spleen_scores["c"].dice)
    assert spleen_scores["e"].dice == 0.0 and spleen_scores["e"].ref_voxels == 0
    summary = {c.name: c for c in result.summary()}
    assert summary["spleen"].n == 2 and summary["spleen"].dice_mean == 0.5
    assert summary["spleen"].false_positive_cases == ["e"] and summary["liver"].dice_mean == 1.0
    assert result.to_dict()["cases"]["c"]["classes"]["spleen"]["dice"] is None


def msd_dataset(root: Path, labels: dict, split: str = "labelsTr") -> tuple[np.ndarray, np.ndarray]:
    """A dataset root: dataset.json, imagesTr/ (empty here) and labelsTr/ or labelsTs/ with liver 1, tumour 2."""
    liver = box(slice(0, 6), slice(0, 6), slice(0, 6))
    tumour = box(slice(2, 4), slice(2, 4), slice(2, 4))
    (root / "imagesTr").mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"name": "toy", "labels": labels, "numTraining": 2}))
    for case in ("liver_1", "liver_2"):
        write_ref(root / split / f"{case}.nii.gz", labelmap(liver=(1, liver), tumour=(2, tumour)))
    return liver, tumour


def test_msd_layout_with_msd_style_dataset_json(tmp_path: Path):
    liver, tumour = msd_dataset(tmp_path / "Task03_Liver", {"0": "background", "1": "liver", "2": "tumour"})
    assert dataset_classes(tmp_path / "Task03_Liver" / "dataset.json") == {"liver": [1], "tumour": [2]}
    # The drafts number the classes the other way round; names decide.
    pred_tumour = box(slice(2, 4), slice(2, 4), slice(2, 3))
    save_labelmap(tmp_path / "drafts" / "liver_1.nii.gz", labelmap(liver=(2, liver), tumour=(1, pred_tumour)), EYE,
                  {"liver": 2, "tumour": 1})
    result = evaluate_folders(tmp_path / "drafts", tmp_path / "Task03_Liver")
    assert list(result.cases) == ["liver_1"] and result.only_ref_cases == ["liver_2"]
    scores = {s.name: s for s in result.cases["liver_1"].scores}
    assert scores["tumour"].dice == pytest.approx(dice(pred_tumour, tumour)) == pytest.approx(2 * 4 / (4 + 8))
    # The reference's liver is 1 only where no tumour is: the draft's liver covers the tumour too.
    assert scores["liver"].dice == pytest.approx(dice(liver & ~pred_tumour, liver & ~tumour))


def test_nnunet_v2_dataset_json_regions_and_test_labels_first(tmp_path: Path):
    root = tmp_path / "Dataset003_Liver"
    labels = {"background": 0, "liver": 1, "tumour": 2, "liver_and_tumour": [1, 2]}
    liver, tumour = msd_dataset(root, labels, split="labelsTs")
    write_ref(root / "labelsTr" / "train_9.nii.gz", labelmap(liver=(1, liver)))  # not the test split
    assert dataset_classes(root / "dataset.json") == {"liver": [1], "tumour": [2], "liver_and_tumour": [1, 2]}
    pred_all = box(slice(0, 6), slice(0, 6), slice(0, 3))  # half of the organ, tumour included
    draft = labelmap(liver=(1, pred_all), tumour=(2, tumour & pred_all))
    for case in ("liver_1", "liver_2"):
        save_labelmap(tmp_path / "pred" / f"{case}_0000.nii.gz", draft, EYE, {"liver": 1, "tumour": 2})
    names = tmp_path / "pred_labels.json"
    names.write_text(json.dumps({"labels": {"liver": 1, "tumour": 2}, "groups": {"liver_and_tumour": [1, 2]}}))
    for ref in (root, root / "labelsTs"):  # the dataset root, or its label folder (dataset.json one up)
        result = evaluate_folders(tmp_path / "pred", ref, pred_labels=names)
        assert list(result.cases) == ["liver_1", "liver_2"] and not result.only_ref_cases
        region = {c.name: c for c in result.summary()}["liver_and_tumour"]
        assert region.n == 2 and region.dice_mean == pytest.approx(dice(pred_all, liver)) == pytest.approx(2 / 3)
        assert region.dice_sd == 0.0


@pytest.mark.parametrize("labels, match", [
    ({"0": "background"}, "only the background"),
    ({"liver": "one"}, "neither MSD"),
    ([1, 2], "no 'labels' mapping"),
])
def test_bad_dataset_json_is_an_error_naming_the_file(tmp_path: Path, labels, match: str):
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels}))
    with pytest.raises(InputError, match=match) as err:
        dataset_classes(tmp_path / "dataset.json")
    assert str(tmp_path / "dataset.json") in str(err.value)


def test_prediction_on_another_grid_of_the_same_space_is_resampled(tmp_path: Path):
    """A draft on a 2 mm grid over the same field as the 1 mm reference: nearest neighbour, exact here."""
    ref = labelmap(liver=(1, box(slice(2, 6), slice(4, 8), slice(0, 4))))
    coarse = np.zeros((4, 4, 4), np.uint8)
    coarse[1:3, 2:4, 0:2] = 1
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = 0.5  # voxel centres of the 2 mm grid sit between 1 mm voxel centres
    save_labelmap(tmp_path / "pred" / "a.nii.gz", coarse, affine, {"liver": 1})
    write_ref(tmp_path / "ref" / "a.nii.gz", ref)
    (tmp_path / "ref" / "labels.json").write_text(json.dumps({"liver": 1}))
    result = evaluate_folders(tmp_path / "pred", tmp_path / "ref")
    assert result.cases["a"].resampled and result.cases["a"].scores[0].dice == 1.0


def test_prediction_in_other_space_is_an_error_naming_the_case(tmp_path: Path):
    ref = labelmap(liver=(1, box(slice(2, 6), slice(2, 6), slice(2, 6))))
    far = EYE.copy()
    far[:3, 3] = (300, 0, 0)  # same shape, another place: drafted on another image, or a lost affine
    save_labelmap(tmp_path / "pred" / "case7.nii.gz", ref, far, {"liver": 1})
    write_ref(tmp_path / "ref" / "case7.nii.gz", ref)
    (tmp_path / "ref" / "labels.json").write_text(json.dumps({"liver": 1}))
    with pytest.raises(InputError, match=r"case 'case7' .* cover different space \(their boxes overlap 0%\)"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref")


def write_png(path: Path, labels: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint8)).save(path)


def test_2d_png_label_maps_and_their_pixel_grid(tmp_path: Path):
    ref = np.zeros((20, 30), np.uint8)
    ref[5:15, 5:25] = 1  # 200 pixels
    pred = np.zeros_like(ref)
    pred[5:15, 10:30] = 1  # 200 pixels, 150 shared
    write_png(tmp_path / "ref" / "us_01.png", ref)
    write_png(tmp_path / "pred" / "us_01.png", pred)
    (tmp_path / "pred" / "us_01.json").write_text(json.dumps({"labels": {"breast_tumor": 1}}))
    names = tmp_path / "labels.json"
    names.write_text(json.dumps({"labels": {"breast_tumor_benign": 1}, "groups": {"breast_tumor": [1]}}))
    result = evaluate_folders(tmp_path / "pred", tmp_path / "ref", ref_labels=names)
    assert {s.name: s.dice for s in result.cases["us_01"].scores} == {"breast_tumor": 0.75}  # 2*150/400
    assert result.only_ref_classes == ["breast_tumor_benign"]
    write_png(tmp_path / "pred" / "us_01.png", pred[:, :20])
    with pytest.raises(InputError, match=r"case 'us_01' .* 20x20 and the reference 20x30 pixels"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", ref_labels=names)


def test_case_names_strip_suffixes_and_the_nnunet_channel(tmp_path: Path):
    assert [case_name(n) for n in ("liver_7.nii.gz", "liver_7_0000.nii.gz", "liver_7.nrrd", "liver_7.png",
                                   "liver_7.NII", "scan_2024_0001.nii.gz", "series_12")] == \
        ["liver_7"] * 5 + ["scan_2024", "series_12"]
    (tmp_path / "liver_7.nii.gz").write_bytes(b"")
    (tmp_path / "liver_7.json").write_text("{}")  # a sidecar, not a case
    (tmp_path / "notes.txt").write_text("")
    assert find_cases(tmp_path) == {"liver_7": tmp_path / "liver_7.nii.gz"}
    (tmp_path / "liver_7_0000.nrrd").write_bytes(b"")
    with pytest.raises(InputError, match="two label maps for case 'liver_7'"):
        find_cases(tmp_path)


def test_a_dicom_series_folder_is_a_case_named_by_the_folder(tmp_path: Path):
    from test_dicom import write_series  # noqa: E402  (the tests' own DICOM writer)

    stored = np.zeros((6, 5, 4), np.int16)
    stored[1:4, 1:3, 1:3] = 1
    positions = np.array([[0.0, 0.0, 2.0 * k] for k in range(4)])
    write_series(tmp_path / "ref" / "patient_3", stored, positions, [1, 0, 0, 0, 1, 0], (1.0, 1.0))
    labels, affine, _ = load_labelmap(tmp_path / "ref" / "patient_3")
    save_labelmap(tmp_path / "pred" / "patient_3.nii.gz", labels, affine, {"liver": 1})
    (tmp_path / "ref" / "labels.json").write_text(json.dumps({"liver": 1}))
    assert list(find_cases(tmp_path / "ref")) == ["patient_3"]
    result = evaluate_folders(tmp_path / "pred", tmp_path / "ref")
    assert result.cases["patient_3"].scores[0].dice == 1.0 and not result.cases["patient_3"].resampled


# --- command line ------------------------------------------------------------------------------------

def test_cli_scores_folders_warns_about_unmatched_cases_and_writes_csv_json(folders: dict, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture):
    code = main(["evaluate", "--pred", str(folders["pred"]), "--ref", str(folders["ref"]),
                 "--csv", str(tmp_path / "out" / "scores.csv"), "--json", str(tmp_path / "out" / "scores.json")])
    assert code == 0
    captured = capsys.readouterr()
    assert "warning: 1 case(s) only in the prediction folder, not scored: c" in captured.err
    assert "warning: 1 case(s) only in the reference folder, not scored: d" in captured.err
    liver_row = next(line for line in captured.out.splitlines() if line.startswith("liver"))
    mean, sd = np.mean([0.75, 2 / 3]), np.std([0.75, 2 / 3], ddof=1)
    assert liver_row.split()[:5] == ["liver", "2", f"{mean:.3f}", "+-", f"{sd:.3f}"]
    spleen_row = next(line for line in captured.out.splitlines() if line.startswith("spleen"))
    assert spleen_row.split()[1:5] == ["1", "1.000", "+-", "n/a"] and spleen_row.split()[-1] == "1"
    assert json.loads((tmp_path / "out" / "scores.json").read_text())["only_ref_cases"] == ["d"]
    assert (tmp_path / "out" / "scores.csv").read_text().splitlines()[1].startswith("a,0.750000,0.600000,")


def test_cli_name_map_renames_before_matching(folders: dict, tmp_path: Path, capsys: pytest.CaptureFixture):
    (tmp_path / "map.json").write_text(json.dumps({"liver": "hepar"}))
    assert main(["evaluate", "--pred", str(folders["pred"]), "--ref", str(folders["ref"]),
                 "--name-map", str(tmp_path / "map.json")]) == 0
    assert any(line.startswith("hepar ") for line in capsys.readouterr().out.splitlines())


def one_line_error(capsys: pytest.CaptureFixture, *words: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for word in words:
        assert word in err[0], (word, err[0])


def test_cli_errors_exit_2_with_one_line(folders: dict, tmp_path: Path, capsys: pytest.CaptureFixture):
    pred, ref = folders["pred"], folders["ref"]

    def fails(argv: list[str], *words: str) -> None:
        assert main(["evaluate", *argv]) == 2, argv
        one_line_error(capsys, *words)

    fails(["--pred", str(pred), "--ref", str(ref / "a.nii.gz")], "not a file and a folder")
    fails(["--pred", str(pred), "--ref", str(tmp_path / "nowhere")], "nowhere", "no such")
    other = tmp_path / "other"
    write_ref(other / "zzz.nii.gz", np.zeros(SHAPE, np.uint8))
    fails(["--pred", str(pred), "--ref", str(other), "--ref-labels", str(ref / "labels.json")],
          "no case is in both", "zzz")
    bare = tmp_path / "bare"
    write_ref(bare / "a.nii.gz", np.zeros(SHAPE, np.uint8))
    fails(["--pred", str(bare), "--ref", str(ref)], str(bare / "a.nii.gz"), "--pred-labels")
    dataset = tmp_path / "ds"
    (dataset / "labelsTr").mkdir(parents=True)
    (dataset / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver"}}))
    fails(["--pred", str(pred), "--ref", str(dataset)], "dataset.json but no labelsTs or labelsTr")
    write_ref(dataset / "labelsTr" / "a.nii.gz", np.zeros(SHAPE, np.uint8))
    (dataset / "dataset.json").write_text('{"labels": {"liver": true}}')
    fails(["--pred", str(pred), "--ref", str(dataset)], str(dataset / "dataset.json"), "neither MSD")
    (tmp_path / "map.json").write_text('["liver"]')
    fails(["--pred", str(pred), "--ref", str(ref), "--name-map", str(tmp_path / "map.json")], "map.json", "name map")


def test_cli_grid_mismatch_and_one_pair_csv(tmp_path: Path, capsys: pytest.CaptureFixture):
    ref = labelmap(liver=(1, box(slice(2, 6), slice(2, 6), slice(2, 6))))
    far = EYE.copy()
    far[:3, 3] = (0, -500, 0)
    save_labelmap(tmp_path / "pred" / "p1.nii.gz", ref, far, {"liver": 1})
    write_ref(tmp_path / "ref" / "p1.nii.gz", ref)
    (tmp_path / "ref" / "labels.json").write_text(json.dumps({"liver": 1}))
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref")]) == 2
    one_line_error(capsys, "case 'p1'", "cover different space")
    # One pair: the same CSV layout, one case named after the reference.
    save_labelmap(tmp_path / "pred" / "p1.nii.gz", ref, EYE, {"liver": 1})
    assert main(["evaluate", "--pred", str(tmp_path / "pred" / "p1.nii.gz"), "--ref", str(tmp_path / "ref" / "p1.nii.gz"),
                 "--ref-labels", str(tmp_path / "ref" / "labels.json"), "--csv", str(tmp_path / "one.csv")]) == 0
    assert (tmp_path / "one.csv").read_text().splitlines()[:2] == ["case,liver_dice,liver_iou",
                                                                   "p1,1.000000,1.000000"]


def test_2d_nifti_label_maps_are_scored_as_2d_against_png_or_nifti(tmp_path: Path):
    """A 2D CT set stored as one-slice NIfTI files: its references are 2D label maps, not volumes, and a
    draft of such a slice (a NIfTI on its grid, or a PNG as displayed) is scored pixel for pixel."""
    from medprompt.io.image2d import load_image2d, save_label2d

    stored = np.zeros((30, 20), np.uint8)  # X x Y as stored
    stored[5:25, 5:15] = 1  # 200 pixels
    (tmp_path / "ref").mkdir()
    nib.save(nib.Nifti1Image(stored, np.diag([0.8, 0.8, 2.0, 1.0])), tmp_path / "ref" / "slice_3.nii.gz")
    names = tmp_path / "labels.json"
    names.write_text(json.dumps({"labels": {"liver": 1}}))
    image = load_image2d(tmp_path / "ref" / "slice_3.nii.gz")  # as displayed: 20 x 30
    shown = (image.pixels > 0).astype(np.uint8)
    shown[:, :15] = 0  # keep half of the organ's columns as displayed
    kept = int(shown.sum())
    save_label2d(tmp_path / "nifti" / "slice_3.nii.gz", shown, image, {"liver": 1})
    write_png(tmp_path / "png" / "slice_3.png", shown)
    (tmp_path / "png" / "slice_3.json").write_text(json.dumps({"labels": {"liver": 1}}))
    assert 0 < kept < 200
    for pred in ("nifti", "png"):
        result = evaluate_folders(tmp_path / pred, tmp_path / "ref", ref_labels=names)
        assert {s.name: s.dice for s in result.cases["slice_3"].scores} == {"liver": pytest.approx(2 * kept / (200 + kept))}


def test_a_one_slice_nrrd_reference_is_a_2d_map_against_a_png(tmp_path: Path):
    """3D Slicer saves a 2D study's label as a one-slice NRRD on the grid ITK reads a picture on (columns x
    rows x 1). Scored against a PNG draft it is that picture's map, pixel for pixel; it was refused as
    "2D; a 3D volume is needed"."""
    import nrrd

    ref = np.zeros((20, 30), np.uint8)
    ref[5:15, 5:25] = 1  # 200 pixels
    pred = np.zeros_like(ref)
    pred[5:15, 10:30] = 1  # 200 pixels, 150 shared
    (tmp_path / "ref").mkdir()
    nrrd.write(str(tmp_path / "ref" / "us_01.nrrd"), np.ascontiguousarray(ref.T[:, :, None]))
    write_png(tmp_path / "pred" / "us_01.png", pred)
    names = tmp_path / "labels.json"
    names.write_text(json.dumps({"labels": {"breast_tumor": 1}}))
    result = evaluate_folders(tmp_path / "pred", tmp_path / "ref", pred_labels=names, ref_labels=names)
    assert {s.name: s.dice for s in result.cases["us_01"].scores} == {"breast_tumor": 0.75}  # 2*150/400
