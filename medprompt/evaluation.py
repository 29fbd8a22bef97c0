"""Per-class Dice and IoU between a predicted and a reference label map, classes matched by name.

Label values are arbitrary per file (a draft numbers classes in prompt order, TotalSegmentator
by its own table), so classes are matched by name through each map's own name -> value dict.
A prediction on another grid is brought onto the reference grid first: exactly (axis flips and
permutations only) when both grids cover the same voxels, by nearest-neighbour resampling
through the affines otherwise.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from medprompt.errors import InputError
from medprompt.io.volume import load_labelmap, read_label_names


@dataclass
class ClassScore:
    """Overlap of one class; dice and iou are NaN when the class is empty in both maps."""

    name: str
    dice: float
    iou: float
    ref_voxels: int
    pred_voxels: int


@dataclass
class Evaluation:
    """Scores of the classes named in both maps, plus the classes named in only one of them."""

    scores: list[ClassScore]
    only_pred: list[str] = field(default_factory=list)
    only_ref: list[str] = field(default_factory=list)
    resampled: bool = False

    @property
    def mdice(self) -> float:
        """Mean Dice over the shared classes that are non-empty in at least one map."""
        return _nanmean([s.dice for s in self.scores])

    @property
    def miou(self) -> float:
        return _nanmean([s.iou for s in self.scores])

    def to_dict(self) -> dict:
        """JSON-ready summary (NaN becomes null)."""
        clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
        return {
            "classes": {s.name: {"dice": clean(s.dice), "iou": clean(s.iou), "ref_voxels": s.ref_voxels,
                                 "pred_voxels": s.pred_voxels} for s in self.scores},
            "mdice": clean(self.mdice),
            "miou": clean(self.miou),
            "only_pred": self.only_pred,
            "only_ref": self.only_ref,
            "resampled": self.resampled,
        }


def evaluate(pred: np.ndarray, pred_affine: np.ndarray, pred_names: dict[str, int],
             ref: np.ndarray, ref_affine: np.ndarray, ref_names: dict[str, int],
             name_map: dict[str, str] | None = None) -> Evaluation:
    """Score ``pred`` against ``ref``; ``name_map`` renames classes (either side) before matching.

    Several names mapped to one (e.g. every ``rib_*`` to ``bone``) are scored as their union.
    """
    aligned, resampled = align_to_reference(pred, pred_affine, ref.shape, ref_affine)
    pred_groups = _groups(pred_names, name_map)
    ref_groups = _groups(ref_names, name_map)
    scores = []
    for name in sorted(set(pred_groups) & set(ref_groups)):
        p = np.isin(aligned, pred_groups[name])
        r = np.isin(ref, ref_groups[name])
        inter, n_p, n_r = int(np.count_nonzero(p & r)), int(np.count_nonzero(p)), int(np.count_nonzero(r))
        union = n_p + n_r - inter
        dice = 2.0 * inter / (n_p + n_r) if union else math.nan
        iou = inter / union if union else math.nan
        scores.append(ClassScore(name, dice, iou, n_r, n_p))
    return Evaluation(scores=scores, only_pred=sorted(set(pred_groups) - set(ref_groups)),
                      only_ref=sorted(set(ref_groups) - set(pred_groups)), resampled=resampled)


def evaluate_files(pred_path: str | os.PathLike, ref_path: str | os.PathLike,
                   pred_labels: str | os.PathLike | None = None,
                   ref_labels: str | os.PathLike | None = None,
                   name_map: dict[str, str] | None = None) -> Evaluation:
    """Load both label maps (names from the given JSON files, else from each map's sidecar)."""
    pred, pred_affine, pred_names = _labelmap_with_names(pred_path, pred_labels, "--pred-labels")
    ref, ref_affine, ref_names = _labelmap_with_names(ref_path, ref_labels, "--ref-labels")
    return evaluate(pred, pred_affine, pred_names, ref, ref_affine, ref_names, name_map)


def align_to_reference(labels: np.ndarray, affine: np.ndarray, ref_shape: tuple[int, ...],
                       ref_affine: np.ndarray) -> tuple[np.ndarray, bool]:
    """Put ``labels`` on the reference grid; returns (labels on that grid, whether resampled).

    Grids that differ only by axis order or direction are reoriented exactly (no interpolation);
    any other difference is resampled nearest-neighbour, outside the prediction counting as 0.
    """
    affine, ref_affine = np.asarray(affine, float), np.asarray(ref_affine, float)
    tolerance = 0.01 * float(np.linalg.norm(ref_affine[:3, :3], axis=0).min())
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                                nib.orientations.io_orientation(ref_affine))
    reoriented = nib.orientations.apply_orientation(labels, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, labels.shape)
    if reoriented.shape == tuple(ref_shape) and np.allclose(new_affine, ref_affine, atol=tolerance):
        return np.ascontiguousarray(reoriented), False
    # Reference voxel -> prediction voxel; order 0 picks the nearest prediction voxel, and
    # 'grid-constant' counts a border voxel's whole extent (not only up to its centre) as inside.
    ref_to_pred = np.linalg.inv(affine) @ ref_affine
    resampled = ndimage.affine_transform(labels, ref_to_pred[:3, :3], offset=ref_to_pred[:3, 3],
                                         output_shape=tuple(ref_shape), order=0, mode="grid-constant",
                                         cval=0)
    return resampled, True


def _labelmap_with_names(path: str | os.PathLike, names_path: str | os.PathLike | None,
                         option: str) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    labels, affine, names = load_labelmap(path)
    if names_path is not None:
        names = read_label_names(names_path)
    if names is None:
        stem = Path(path)
        raise InputError(f"{stem}: no class names (no JSON sidecar beside it); pass {option} FILE.json")
    return labels, affine, names


def _groups(names: dict[str, int], name_map: dict[str, str] | None) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for name, value in names.items():
        groups.setdefault((name_map or {}).get(name, name), []).append(value)
    return groups


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan
