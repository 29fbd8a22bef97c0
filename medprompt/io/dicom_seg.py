"""Label maps as DICOM SEG, written offline (pydicom-seg), on the grid of the DICOM series they segment.

A PACS (and OHIF through it) keeps corrections as DICOM Segmentation objects that reference the
series' own instances; MONAI Label writes them with dcmqi's ``itkimage2segimage``, a binary it would
download. Here the SEG is written in-process, one segment per class named as in the label map's
sidecar, and read back into a label map on the series grid.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from medprompt.errors import InputError
from medprompt.io.dicom import LPS_TO_RAS
from medprompt.io.volume import atomic_write

# Colours (RGB) for segments 1, 2, ... in viewers that show them; cycled.
_COLOURS = [(221, 130, 101), (157, 108, 162), (185, 102, 83), (128, 174, 128), (241, 214, 145), (216, 101, 79),
            (183, 156, 220), (111, 184, 210), (230, 220, 70), (255, 250, 220)]


def write_seg(labels: np.ndarray, affine: np.ndarray, names: dict[str, int], series: Sequence[str | os.PathLike],
              out: str | os.PathLike, creator: str = "MedPrompt Label") -> Path:
    """Write ``labels`` (i, j, k on the series' grid, voxel -> RAS+ ``affine``) as a DICOM SEG of ``series``.

    ``names``: class name -> label value; each class present becomes a segment with that label.
    ``series``: the source series' files (their UIDs and geometry are referenced). Written atomically.
    """
    import pydicom
    import pydicom_seg
    import SimpleITK as sitk

    present = {name: value for name, value in names.items() if np.any(labels == value)}
    if not present:
        raise InputError("the label map is empty: a DICOM SEG needs at least one segment")
    sources = sorted((pydicom.dcmread(str(f), stop_before_pixels=True) for f in series),
                     key=lambda d: float(d.get("InstanceNumber", 0) or 0))
    # Segment numbers are the label values, so the SEG reads back as the same label map; values that
    # name no class are left out.
    kept = np.where(np.isin(labels, list(present.values())), labels, 0).astype(np.uint16)
    image = sitk.GetImageFromArray(np.ascontiguousarray(kept.transpose(2, 1, 0)))
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)[:3]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in (lps[:, :3] / spacing).ravel()])
    image.SetOrigin([float(v) for v in lps[:, 3]])
    meta = {
        "ContentCreatorName": creator.replace(" ", "^"),
        "ClinicalTrialSeriesID": "1", "ClinicalTrialTimePointID": "1",
        "SeriesDescription": "MedPrompt Label", "SeriesNumber": "300", "InstanceNumber": "1",
        "BodyPartExamined": str(sources[0].get("BodyPartExamined", "")),
        "segmentAttributes": [[
            {"labelID": value, "SegmentDescription": name, "SegmentLabel": name,
             "SegmentAlgorithmType": "SEMIAUTOMATIC", "SegmentAlgorithmName": creator,
             "recommendedDisplayRGBValue": list(_COLOURS[(value - 1) % len(_COLOURS)]),
             "SegmentedPropertyCategoryCodeSequence": {"CodeValue": "123037004", "CodingSchemeDesignator": "SCT",
                                                       "CodeMeaning": "Anatomical Structure"},
             "SegmentedPropertyTypeCodeSequence": {"CodeValue": "85756007", "CodingSchemeDesignator": "SCT",
                                                   "CodeMeaning": "Tissue"}}
            for name, value in sorted(present.items(), key=lambda item: item[1])]],
        "ContentLabel": "SEGMENTATION", "ContentDescription": "MedPrompt Label draft or correction",
    }
    template = pydicom_seg.template.from_dcmqi_metainfo(meta)
    writer = pydicom_seg.MultiClassWriter(template=template, inplane_cropping=False, skip_empty_slices=True,
                                          skip_missing_segment=True)
    dataset = writer.write(image, [pydicom.dcmread(str(f)) for f in _files_of(sources, series)])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: dataset.save_as(str(tmp)))
    return out


def read_seg(path: str | os.PathLike, grid: tuple[tuple[int, int, int], np.ndarray] | None = None
             ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """A DICOM SEG as (labels (i, j, k), voxel -> RAS+ affine, segment label -> value).

    A SEG holds only the slices its segments touch; ``grid`` (shape, affine of the source series, as
    ``load_volume`` reads it) places them back on the whole series grid.
    """
    import pydicom
    import pydicom_seg

    try:
        dataset = pydicom.dcmread(str(path))
        result = pydicom_seg.MultiClassReader().read(dataset)
    except Exception as error:  # pydicom's and pydicom-seg's many failure types: one line naming the file
        raise InputError(f"{path}: not a readable DICOM SEG ({type(error).__name__}: {error})") from None
    image = result.image
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=np.float64)
    names = {str(s.SegmentLabel): int(s.SegmentNumber) for s in dataset.SegmentSequence}
    labels = np.ascontiguousarray(result.data.transpose(2, 1, 0))
    if grid is None:
        return labels, affine, names
    return _on_grid(labels, affine, grid, path), np.asarray(grid[1], dtype=np.float64), names


def _on_grid(labels: np.ndarray, affine: np.ndarray, grid: tuple[tuple[int, int, int], np.ndarray],
             path: str | os.PathLike) -> np.ndarray:
    """Paste the SEG's slices into the series grid: the same axes, shifted by whole voxels."""
    shape, target = grid
    to_target = np.linalg.inv(np.asarray(target, dtype=np.float64)) @ affine
    offset = to_target[:3, 3]
    if not np.allclose(to_target[:3, :3], np.eye(3), atol=1e-3) or not np.allclose(offset, np.round(offset), atol=1e-2):
        raise InputError(f"{path}: the SEG's grid is not the series' grid (another orientation or spacing)")
    start = np.round(offset).astype(int)
    end = start + np.asarray(labels.shape)
    if np.any(start < 0) or np.any(end > np.asarray(shape)):
        raise InputError(f"{path}: the SEG reaches outside the series' grid")
    out = np.zeros(shape, labels.dtype)
    out[start[0]:end[0], start[1]:end[1], start[2]:end[2]] = labels
    return out


def _files_of(sources: Sequence, series: Sequence[str | os.PathLike]) -> list[str]:
    """The files of ``series`` in ``sources``' order (pydicom-seg wants every referenced instance)."""
    import pydicom

    by_uid = {str(pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID): str(f) for f in series}
    return [by_uid[str(d.SOPInstanceUID)] for d in sources]
