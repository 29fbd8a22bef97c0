"""Per-class Dice and IoU between predicted and reference label maps, classes matched by name.

Label values are arbitrary per file (a draft numbers classes in prompt order, TotalSegmentator
by its own table), so classes are matched by name through each map's own name -> value dict.
A prediction on another grid is brought onto the reference grid first: exactly (axis flips and
permutations only) when both grids cover the same voxels, by nearest-neighbour resampling
through the affines when both describe the same space on another grid (world boxes overlapping
by at least ``SAME_SPACE_IOU``); grids over different space are an error, not a score of zero.

A whole dataset (``evaluate_folders``) is scored case by case, cases matched by name, and
summarised per class the way the MedPrompt paper scores Synapse and BTCV:

- per case and class: Dice = 2|P&R| / (|P|+|R|), IoU = |P&R| / |P|R| (|P|R| the union);
  a class empty in both maps has no score (NaN, null in JSON, empty in CSV); a class the
  reference lacks but the prediction draws scores 0 in that case (a false positive);
- a class is scored when some case's prediction and some case's reference both name it; where
  one case's map does not name it, that map counts as empty for it (a prediction: Dice 0 wherever
  the reference has the class; a reference: the case has no such structure, so a prediction
  there is a false positive); classes only one side ever names are listed, never averaged;
- per class: mean and sample standard deviation (n - 1) over the cases whose reference holds the
  class; false-positive cases are counted and listed but not averaged; mDice/mIoU: the mean of
  the class means.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence, Union

import nibabel as nib
import numpy as np
from scipy import ndimage

from medprompt.errors import InputError, one_line, shown
from medprompt.io.volume import (atomic_write, find_volumes, load_labelmap, read_label_names, sidecar_path,
                                 volume_stem)

# A class's label value, or several whose union it is (nnU-Net v2 regions, a labels JSON's "groups").
ClassValues = Mapping[str, Union[int, Sequence[int]]]
SAME_SPACE_IOU = 0.5  # world-box overlap at or above which two grids are taken to cover the same space
PICTURE_LABEL_SUFFIXES = (".png",)  # 2D label maps: pixels, no physical grid
CHANNEL_SUFFIX = re.compile(r"_\d{4}$")  # nnU-Net's image channel: case_0000.nii.gz is case 'case'
DATASET_LABEL_FOLDERS = ("labelsTs", "labelsTr")  # MSD / nnU-Net: test labels first
RULES = ("Dice/IoU per case and class; a class empty in both maps has no score; a class absent from the "
         "reference but drawn scores 0 (false positive, not averaged); class mean and sample sd over the cases "
         "whose reference holds the class; a class a case's map (prediction or reference) does not name counts as "
         "empty there; "
         "mDice/mIoU = mean of the class means")


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
        return {
            "classes": {s.name: {"dice": _clean(s.dice), "iou": _clean(s.iou), "ref_voxels": s.ref_voxels,
                                 "pred_voxels": s.pred_voxels} for s in self.scores},
            "mdice": _clean(self.mdice),
            "miou": _clean(self.miou),
            "only_pred": self.only_pred,
            "only_ref": self.only_ref,
            "resampled": self.resampled,
        }


def evaluate(pred: np.ndarray, pred_affine: np.ndarray, pred_names: ClassValues,
             ref: np.ndarray, ref_affine: np.ndarray, ref_names: ClassValues,
             name_map: dict[str, str] | None = None, classes: Sequence[str] | None = None) -> Evaluation:
    """Score ``pred`` against ``ref``; ``name_map`` renames classes (either side) before matching.

    Several names mapped to one (e.g. every ``rib_*`` to ``bone``) are scored as their union.
    ``classes`` scores exactly these names (default: those both maps name); a side that does not
    name one counts as empty for it.
    """
    aligned, resampled = align_to_reference(pred, pred_affine, ref.shape, ref_affine)
    pred_groups = _groups(pred_names, name_map)
    ref_groups = _groups(ref_names, name_map)
    scores = []
    wanted = sorted(set(pred_groups) & set(ref_groups)) if classes is None else list(classes)
    for name in wanted:
        p = np.isin(aligned, pred_groups.get(name, []))
        r = np.isin(ref, ref_groups.get(name, []))
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
    try:
        return evaluate(pred, pred_affine, pred_names, ref, ref_affine, ref_names, name_map)
    except InputError as error:
        raise InputError(f"{pred_path} against {ref_path}: {error}") from None


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
    overlap = _box_iou(labels.shape, affine, tuple(ref_shape), ref_affine)
    if overlap < SAME_SPACE_IOU:
        raise InputError(f"the prediction's grid ({_grid(labels.shape, affine)}) and the reference's "
                         f"({_grid(tuple(ref_shape), ref_affine)}) cover different space (their boxes overlap "
                         f"{overlap:.0%}): drafted on another image, or an affine was lost")
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


def _groups(names: ClassValues, name_map: dict[str, str] | None) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for name, value in names.items():
        values = [int(value)] if isinstance(value, (int, np.integer)) else [int(v) for v in value]
        groups.setdefault((name_map or {}).get(name, name), []).extend(values)
    return groups


def _box_iou(shape_a: tuple[int, ...], affine_a: np.ndarray, shape_b: tuple[int, ...],
             affine_b: np.ndarray) -> float:
    """Overlap (intersection over union) of two grids' world-space bounding boxes, voxel extents included."""
    boxes = []
    for shape, affine in ((shape_a, affine_a), (shape_b, affine_b)):
        corners = np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in shape[:3]], indexing="ij")).reshape(3, -1)
        world = np.asarray(affine, float)[:3, :3] @ corners + np.asarray(affine, float)[:3, 3:4]
        boxes.append((world.min(axis=1), world.max(axis=1)))
    (lo_a, hi_a), (lo_b, hi_b) = boxes
    inter = float(np.prod(np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0, None)))
    union = float(np.prod(hi_a - lo_a) + np.prod(hi_b - lo_b)) - inter
    return inter / union if union > 0 else 0.0


def _grid(shape: tuple[int, ...], affine: np.ndarray) -> str:
    spacing = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)
    origin = np.asarray(affine, float)[:3, 3]
    return (f"{'x'.join(map(str, shape))} voxels of {'x'.join(f'{v:g}' for v in spacing.round(3))} mm "
            f"at ({', '.join(f'{v:g}' for v in origin.round(1))})")


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


# --- whole datasets ----------------------------------------------------------------------------

@dataclass
class LabelFolder:
    """The label maps of one side, by case, and the class names that hold for the whole folder."""

    folder: Path
    cases: dict[str, Path]
    names: dict[str, list[int]] | None  # from an option, a dataset.json or the folder's labels.json
    names_from: str | None              # that file, for messages


@dataclass
class ClassSummary:
    """One class over a dataset: mean and sd over the cases whose reference holds it."""

    name: str
    n: int
    dice_mean: float
    dice_sd: float
    iou_mean: float
    iou_sd: float
    false_positive_cases: list[str]


@dataclass
class DatasetEvaluation:
    """Per-case scores of the cases found on both sides, and what was found on one side only."""

    cases: dict[str, Evaluation]
    classes: list[str]
    pred_paths: dict[str, str]
    ref_paths: dict[str, str]
    only_pred_cases: list[str] = field(default_factory=list)
    only_ref_cases: list[str] = field(default_factory=list)
    only_pred_classes: list[str] = field(default_factory=list)
    only_ref_classes: list[str] = field(default_factory=list)

    def summary(self) -> list[ClassSummary]:
        out = []
        for name in self.classes:
            rows = [(case, s) for case, e in self.cases.items() for s in e.scores if s.name == name]
            present = [s for _, s in rows if s.ref_voxels > 0]
            dice = [s.dice for s in present]
            iou = [s.iou for s in present]
            out.append(ClassSummary(name, len(present), _nanmean(dice), _sd(dice), _nanmean(iou), _sd(iou),
                                    [case for case, s in rows if s.ref_voxels == 0 and s.pred_voxels > 0]))
        return out

    @property
    def mdice(self) -> float:
        return _nanmean([c.dice_mean for c in self.summary()])

    @property
    def miou(self) -> float:
        return _nanmean([c.iou_mean for c in self.summary()])

    def to_dict(self) -> dict:
        """JSON-ready: per-case scores, per-class summary, unmatched cases and classes, the rules."""
        summary = self.summary()
        return {
            "rules": RULES,
            "classes": {c.name: {"n": c.n, "dice_mean": _clean(c.dice_mean), "dice_sd": _clean(c.dice_sd),
                                 "iou_mean": _clean(c.iou_mean), "iou_sd": _clean(c.iou_sd),
                                 "false_positive_cases": c.false_positive_cases} for c in summary},
            "mdice": _clean(_nanmean([c.dice_mean for c in summary])),
            "miou": _clean(_nanmean([c.iou_mean for c in summary])),
            "cases": {case: {"pred": self.pred_paths[case], "ref": self.ref_paths[case], "resampled": e.resampled,
                             "classes": e.to_dict()["classes"]} for case, e in self.cases.items()},
            "only_pred_cases": self.only_pred_cases,
            "only_ref_cases": self.only_ref_cases,
            "only_pred_classes": self.only_pred_classes,
            "only_ref_classes": self.only_ref_classes,
        }

    def to_csv(self) -> str:
        """One row per case (``<class>_dice``, ``<class>_iou`` columns), then rows mean, sd and n."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["case"] + [f"{c}_{m}" for c in self.classes for m in ("dice", "iou")])
        cell = lambda v: "" if v is None or math.isnan(v) else f"{v:.6f}"  # noqa: E731
        for case, e in self.cases.items():
            scores = {s.name: s for s in e.scores}
            writer.writerow([case] + [cell(getattr(scores[c], m)) for c in self.classes for m in ("dice", "iou")])
        summary = self.summary()
        writer.writerow(["mean"] + [cell(v) for c in summary for v in (c.dice_mean, c.iou_mean)])
        writer.writerow(["sd"] + [cell(v) for c in summary for v in (c.dice_sd, c.iou_sd)])
        writer.writerow(["n"] + [str(c.n) for c in summary for _ in range(2)])
        return buffer.getvalue()

    def write_csv(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = self.to_csv()
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return path


def case_name(path: str | os.PathLike) -> str:
    """The case a label map belongs to: its name without suffix and nnU-Net channel
    (``liver_7.nii.gz``, ``liver_7_0000.nii.gz``, ``liver_7.png`` and a DICOM folder ``liver_7`` -> ``liver_7``)."""
    path = Path(path)
    name = path.name
    stem = name[:-len(".png")] if name.lower().endswith(PICTURE_LABEL_SUFFIXES) else volume_stem(path)
    return CHANNEL_SUFFIX.sub("", stem)


def find_cases(folder: str | os.PathLike) -> dict[str, Path]:
    """Label maps in ``folder`` by case: NIfTI/NRRD/PNG files and DICOM series folders (JSON sidecars skipped)."""
    folder = Path(folder)
    found = [p for p in find_volumes(folder) if p != folder]
    found += [p for p in sorted(folder.iterdir()) if p.is_file() and p.name.lower().endswith(PICTURE_LABEL_SUFFIXES)]
    cases: dict[str, Path] = {}
    for path in sorted(p for p in found if not p.name.startswith(".")):
        name = case_name(path)
        if name in cases:
            raise InputError(f"{folder}: two label maps for case '{name}' ({cases[name].name}, {path.name}); "
                             f"keep one")
        cases[name] = path
    return cases


def read_class_values(path: str | os.PathLike) -> dict[str, list[int]]:
    """Class name -> label values from a labels JSON (``{"labels": {...}}`` plus optional ``"groups"``
    of unions, as in ``{"groups": {"breast_tumor": [1, 2]}}``), or from an MSD/nnU-Net dataset.json."""
    path = Path(path)
    if path.name == "dataset.json":
        return dataset_classes(path)
    out = {name: [value] for name, value in read_label_names(path).items()}
    doc = _read_json(path)
    groups = doc.get("groups") if isinstance(doc, dict) else None
    if groups is not None:
        if not isinstance(groups, dict) or not all(_values(v) for v in groups.values()):
            raise InputError(f"{path}: 'groups' must map a class name to a list of label values")
        out.update({name: _values(values) for name, values in groups.items()})
    return out


def dataset_classes(path: str | os.PathLike) -> dict[str, list[int]]:
    """Classes of an MSD or nnU-Net dataset.json, background left out.

    Both forms: MSD's ``{"0": "background", "1": "liver"}`` and nnU-Net v2's
    ``{"background": 0, "liver": 1}``, whose region classes (``"tumour": [1, 2]``) are unions.
    """
    path = Path(path)
    doc = _read_json(path)
    labels = doc.get("labels") if isinstance(doc, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise InputError(f"{path}: no 'labels' mapping (MSD: {{\"1\": \"liver\"}}, nnU-Net v2: {{\"liver\": 1}})")
    out: dict[str, list[int]] = {}
    for key, value in labels.items():
        if isinstance(value, str) and key.strip().isdigit():
            name, values = value, [int(key)]  # MSD
        elif _values(value):
            name, values = key, _values(value)  # nnU-Net v2, regions included
        else:
            raise InputError(f"{path}: label entry {shown(key)}: {shown(value)} is neither MSD's "
                             f"\"1\": \"liver\" nor nnU-Net v2's \"liver\": 1")
        if all(v == 0 for v in values):
            continue  # background
        if name in out:
            raise InputError(f"{path}: class {shown(name)} is listed twice")
        out[name] = values
    if not out:
        raise InputError(f"{path}: 'labels' holds only the background")
    return out


def open_labels(path: str | os.PathLike, labels_json: str | os.PathLike | None = None,
                option: str = "--ref") -> LabelFolder:
    """A folder of label maps, or an MSD/nnU-Net dataset (a folder with dataset.json and labelsTs/
    or labelsTr/; labelsTs first), or one of those label folders (its dataset.json one level up)."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: {'no such folder' if not path.exists() else 'not a folder'} ({option})")
    folder, dataset = path, None
    if (path / "dataset.json").is_file():
        dataset = path / "dataset.json"
        found = [path / sub for sub in DATASET_LABEL_FOLDERS if (path / sub).is_dir() and find_cases(path / sub)]
        if not found:
            raise InputError(f"{path}: has a dataset.json but no {' or '.join(DATASET_LABEL_FOLDERS)} folder "
                             f"with label maps ({option})")
        folder = found[0]
    elif path.name in DATASET_LABEL_FOLDERS and (path.parent / "dataset.json").is_file():
        dataset = path.parent / "dataset.json"
    cases = find_cases(folder)
    if not cases:
        raise InputError(f"{folder}: no label maps found (.nii.gz, .nii, .nrrd, .png or DICOM series folders) "
                         f"({option})")
    source = Path(labels_json) if labels_json is not None else dataset
    if source is None and (folder / "labels.json").is_file():
        source = folder / "labels.json"
    names = read_class_values(source) if source is not None else None
    return LabelFolder(folder, cases, names, str(source) if source is not None else None)


def evaluate_folders(pred: str | os.PathLike, ref: str | os.PathLike,
                     pred_labels: str | os.PathLike | None = None, ref_labels: str | os.PathLike | None = None,
                     name_map: dict[str, str] | None = None, progress: bool = False) -> DatasetEvaluation:
    """Score every case found in both folders (see the module docstring for the rules).

    Class names: ``pred_labels``/``ref_labels`` when given, else each map's JSON sidecar (drafts
    write one), else the folder's dataset.json or labels.json. All names are read before any
    volume, so a case without names fails at once.
    """
    from tqdm import tqdm

    preds = open_labels(pred, pred_labels, "--pred")
    refs = open_labels(ref, ref_labels, "--ref")
    shared = sorted(set(preds.cases) & set(refs.cases))
    if not shared:
        raise InputError(f"no case is in both {preds.folder} ({_some(preds.cases)}) and {refs.folder} "
                         f"({_some(refs.cases)}); cases are matched by file name without suffix and _0000")
    pred_names = {c: _case_names(preds, c, pred_labels is not None, "--pred-labels") for c in shared}
    ref_names = {c: _case_names(refs, c, ref_labels is not None, "--ref-labels") for c in shared}
    named_pred = set().union(*(_groups(n, name_map) for n in pred_names.values()))
    named_ref = set().union(*(_groups(n, name_map) for n in ref_names.values()))
    classes = sorted(named_pred & named_ref)
    if not classes:
        raise InputError(f"the predictions and references share no class names (predictions: "
                         f"{', '.join(sorted(named_pred)) or 'none'}; references: {', '.join(sorted(named_ref)) or 'none'})")
    cases: dict[str, Evaluation] = {}
    for case in tqdm(shared, desc="evaluating", unit="case", disable=not progress or len(shared) < 2,
                     file=sys.stderr):
        p_labels, p_affine, p_picture = _load_case(preds.cases[case])
        r_labels, r_affine, r_picture = _load_case(refs.cases[case])
        where = f"case '{case}' ({preds.cases[case]} against {refs.cases[case]})"
        if p_picture or r_picture:
            if p_labels.shape != r_labels.shape:
                raise InputError(f"{where}: the prediction is {_shape(p_labels)} and the reference "
                                 f"{_shape(r_labels)} pixels; 2D label maps must share their pixel grid")
            p_affine = r_affine = np.eye(4)
        try:
            cases[case] = evaluate(p_labels, p_affine, pred_names[case], r_labels, r_affine, ref_names[case],
                                   name_map, classes)
        except InputError as error:
            raise InputError(f"{where}: {error}") from None
    return DatasetEvaluation(
        cases=cases, classes=classes,
        pred_paths={c: str(preds.cases[c]) for c in shared}, ref_paths={c: str(refs.cases[c]) for c in shared},
        only_pred_cases=sorted(set(preds.cases) - set(refs.cases)),
        only_ref_cases=sorted(set(refs.cases) - set(preds.cases)),
        only_pred_classes=sorted(named_pred - named_ref), only_ref_classes=sorted(named_ref - named_pred))


def _case_names(side: LabelFolder, case: str, forced: bool, option: str) -> dict[str, list[int]]:
    """A case's class names: the option's file, else the map's sidecar, else the folder's names."""
    path = side.cases[case]
    sidecar = sidecar_path(path) if not path.name.lower().endswith(PICTURE_LABEL_SUFFIXES) \
        else path.with_name(path.name[:-len(".png")] + ".json")
    if not forced and sidecar.is_file():
        return {name: [value] for name, value in read_label_names(sidecar).items()}
    if side.names is not None:
        return side.names
    raise InputError(f"{path}: no class names (no JSON sidecar, no dataset.json or labels.json in {side.folder}); "
                     f"pass {option} FILE.json")


def _load_case(path: Path) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """(labels, affine, is a 2D label map); a 2D map (a PNG, a 2D NIfTI such as a draft of a 2D NIfTI
    slice, or a one-slice NRRD as 3D Slicer saves a 2D study's label) is read as displayed and compared
    pixel for pixel, so its affine is None."""
    from medprompt.io.image2d import is_image2d, load_label2d

    if is_image2d(path):  # of what find_cases lists: a PNG, a NIfTI or NRRD of X x Y (x 1)
        labels, _ = load_label2d(path)
        return labels[:, :, None], None, True
    labels, affine, _ = load_labelmap(path)
    return labels, affine, False


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, ValueError, RecursionError) as error:
        raise InputError(f"{path}: not a readable JSON file ({one_line(error)})") from None


def _values(value: object) -> list[int]:
    """Label values of one class entry (an integer or a non-empty list of them), else []."""
    items = value if isinstance(value, list) else [value]
    if items and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 65535 for v in items):
        return [int(v) for v in items]
    return []


def _shape(labels: np.ndarray) -> str:
    return "x".join(str(n) for n in labels.shape[:2])


def _some(cases: Mapping[str, Path], n: int = 3) -> str:
    names = sorted(cases)
    return ", ".join(names[:n]) + (f", ... ({len(names)} cases)" if len(names) > n else "")


def _sd(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.std(finite, ddof=1)) if len(finite) >= 2 else math.nan


def _clean(value: float) -> float | None:
    return None if math.isnan(value) else value


def read_name_map(path: str | os.PathLike) -> dict[str, str]:
    """A JSON object renaming classes before matching (``{"cancer": "liver_tumour"}``)."""
    path = Path(path)
    content = _read_json(path)
    if not isinstance(content, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                                for k, v in content.items()):
        raise InputError(f"{path}: a name map must be a JSON object of class name -> class name")
    return content
