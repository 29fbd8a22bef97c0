"""Dice/IoU with classes matched by name, and predictions on other grids brought onto the reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medprompt.errors import InputError
from medprompt.evaluation import align_to_reference, evaluate, evaluate_files
from medprompt.io import load_labelmap, save_labelmap

EYE = np.eye(4)


def by_name(result) -> dict:
    return {s.name: s for s in result.scores}


def test_hand_computed_scores_with_classes_matched_by_name() -> None:
    ref = np.zeros((4, 4, 4), np.int32)
    pred = np.zeros_like(ref)
    ref[0, 0, :] = 5  # liver in the reference is 5 ...
    ref[0, 1, :2] = 5  # ... 6 voxels
    pred[0, 0, :3] = 2  # ... and 2 in the prediction: 4 voxels, 3 overlapping
    pred[3, 3, 3] = 2
    ref[2, 2, 2] = 7  # spleen: 1 voxel in ref, 1 in pred, disjoint
    pred[1, 1, 1] = 1
    result = evaluate(pred, EYE, {"spleen": 1, "liver": 2, "kidney_left": 3},
                      ref, EYE, {"liver": 5, "spleen": 7, "aorta": 9})
    scores = by_name(result)
    assert scores["liver"].dice == pytest.approx(2 * 3 / (4 + 6))
    assert scores["liver"].iou == pytest.approx(3 / 7)
    assert (scores["liver"].ref_voxels, scores["liver"].pred_voxels) == (6, 4)
    assert scores["spleen"].dice == 0.0 and scores["spleen"].iou == 0.0
    assert result.mdice == pytest.approx((0.6 + 0.0) / 2)
    assert result.miou == pytest.approx((3 / 7) / 2)
    # kidney_left is empty in the prediction but named there; it is named nowhere in the reference.
    assert result.only_pred == ["kidney_left"] and result.only_ref == ["aorta"]
    assert result.resampled is False


def test_class_empty_in_both_maps_is_not_averaged() -> None:
    ref = np.zeros((3, 3, 3), np.int32)
    ref[0] = 1
    result = evaluate(ref.copy(), EYE, {"liver": 1, "gallbladder": 2}, ref, EYE, {"liver": 1, "gallbladder": 4})
    scores = by_name(result)
    assert math.isnan(scores["gallbladder"].dice) and scores["liver"].dice == 1.0
    assert result.mdice == 1.0
    assert result.to_dict()["classes"]["gallbladder"]["dice"] is None


def test_name_map_merges_classes_before_matching() -> None:
    ref = np.zeros((4, 4, 4), np.int32)
    ref[0] = 3  # rib_left_7
    ref[1] = 4  # vertebrae_L1
    pred = np.zeros_like(ref)
    pred[:2] = 1  # bone
    result = evaluate(pred, EYE, {"bone": 1}, ref, EYE, {"rib_left_7": 3, "vertebrae_L1": 4},
                      name_map={"rib_left_7": "bone", "vertebrae_L1": "bone"})
    assert by_name(result)["bone"].dice == 1.0 and result.only_ref == []


def shapes(seed: int = 0, shape=(12, 10, 8)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 3, shape).astype(np.int32)


def test_las_prediction_on_lps_reference_is_reoriented_exactly() -> None:
    """Same physical voxels, j axis reversed: like the real DICOM (LPS) and its label (LAS)."""
    ref = shapes()
    ref_affine = np.diag([-0.9, 0.9, 2.0, 1.0])
    ref_affine[:3, 3] = (50, -40, -300)  # LAS
    n_j = ref.shape[1]
    pred_affine = ref_affine @ np.array([[1, 0, 0, 0], [0, -1, 0, n_j - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    assert nib.aff2axcodes(pred_affine) == ("L", "P", "S")
    pred = ref[:, ::-1, :].copy()
    aligned, resampled = align_to_reference(pred, pred_affine, ref.shape, ref_affine)
    assert resampled is False
    np.testing.assert_array_equal(aligned, ref)
    result = evaluate(pred, pred_affine, {"a": 1, "b": 2}, ref, ref_affine, {"b": 2, "a": 1})
    assert [s.dice for s in result.scores] == [1.0, 1.0]


def test_permuted_axes_are_reoriented_exactly() -> None:
    ref = shapes(1)
    ref_affine = np.diag([0.8, 1.0, 3.0, 1.0])
    pred = ref.transpose(2, 0, 1).copy()
    pred_affine = ref_affine[:, [2, 0, 1, 3]]
    aligned, resampled = align_to_reference(pred, pred_affine, ref.shape, ref_affine)
    assert resampled is False
    np.testing.assert_array_equal(aligned, ref)


def test_coarser_and_shifted_grid_is_resampled_through_the_affines() -> None:
    ref = np.zeros((8, 8, 8), np.int32)
    ref[2:6, 4:8, 0:4] = 1
    ref_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    # Prediction on a 2 mm grid whose first voxel centre sits at (0.5, 0.5, 0.5) mm: each
    # prediction voxel covers exactly 2x2x2 reference voxels.
    pred = np.zeros((4, 4, 4), np.int32)
    pred[1:3, 2:4, 0:2] = 1
    pred_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    pred_affine[:3, 3] = 0.5
    aligned, resampled = align_to_reference(pred, pred_affine, ref.shape, ref_affine)
    assert resampled is True
    np.testing.assert_array_equal(aligned, ref)
    # Shift the prediction by one reference voxel along x: Dice drops exactly as counted.
    pred_affine[0, 3] += 2.0
    result = evaluate(pred, pred_affine, {"x": 1}, ref, ref_affine, {"x": 1})
    assert by_name(result)["x"].dice == pytest.approx(0.5)  # half of the 2 mm-wide slabs overlap


def test_evaluate_files_reads_sidecars_and_label_json(tmp_path: Path) -> None:
    ref = shapes(2)
    save_labelmap(tmp_path / "pred.nii.gz", np.where(ref == 1, 2, np.where(ref == 2, 1, 0)), EYE,
                  {"liver": 2, "spleen": 1})
    nib.save(nib.Nifti1Image(ref.astype(np.uint8), EYE), tmp_path / "ref.nii.gz")  # no sidecar
    names = tmp_path / "labels.json"
    names.write_text(json.dumps({"labels": {"liver": 1, "spleen": 2}, "voxels": {}}))
    result = evaluate_files(tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz", ref_labels=names)
    assert {s.name: s.dice for s in result.scores} == {"liver": 1.0, "spleen": 1.0}
    with pytest.raises(InputError, match="--ref-labels"):
        evaluate_files(tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz")


def test_real_label_agrees_with_itself_across_las_and_lps(real_data: Path, tmp_path: Path) -> None:
    """The real LAS label, rewritten LPS (as a DICOM-grid draft would be), scores Dice 1 per class."""
    case = real_data / "ct_abdomen_b_dicom"
    labels, affine, _ = load_labelmap(case / "label.nii.gz")
    n_j = labels.shape[1]
    lps_affine = affine @ np.array([[1, 0, 0, 0], [0, -1, 0, n_j - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    names = json.loads((case / "labels.json").read_text())["labels"]
    save_labelmap(tmp_path / "pred.nii.gz", labels[:, ::-1, :], lps_affine, names)
    result = evaluate_files(tmp_path / "pred.nii.gz", case / "label.nii.gz", ref_labels=case / "labels.json")
    assert not result.resampled
    assert len(result.scores) == len(names) and all(s.dice == 1.0 for s in result.scores)
