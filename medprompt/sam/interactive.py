"""Interactive editing: the annotator's clicks or box on one slice -> LiteMedSAM's mask there (and beyond).

What 3D Slicer's MONAI Label module sends to an interactive (deepgrow-type) model: ``foreground`` and
``background`` lists of voxel indices [i, j, k] of the image as stored, optionally ``roi``
[i0, i1, j0, j1, k0, k1] (its ROI box), ``slice`` (the k it updates for a 2D model) and ``label``.
OHIF's MONAI Label panel sends the same fields. The slice is the stored k plane (Slicer's
assumption); it is shown to LiteMedSAM in radiological orientation when that plane is axial.

LiteMedSAM was trained with boxes only, so a box is the prompt it answers: an ROI gives one
directly. Clicks alone become square boxes of eight sizes (20-300 mm) around them, and SAM's own
IoU estimate picks the best mask that holds every foreground click and no background click.
Measured on ct_abdomen_a (one click at each organ's deepest point, its largest slice): mean
Dice 0.85 this way; feeding the clicks as SAM point prompts, or growing a box from a small one,
gave 0.34-0.58 (BENCHMARKS.md).
``propagate`` carries the mask to neighbouring slices, each prompted with the box of the mask
before it, as LiteMedSAM's own 3D inference does, until the mask vanishes or shrinks away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import nibabel as nib
import numpy as np

from medprompt.errors import RequestError, shown
from medprompt.sam.preprocess import apply_range, intensity_range
from medprompt.sam.segmenter import SliceSegmenter

# Candidate box sides (mm) around a lone click: from a small lesion to a liver cross-section.
MIN_QUALITY = 0.7  # propagation stops where SAM's IoU estimate falls below this
CANDIDATE_SIDES_MM = (20.0, 30.0, 45.0, 70.0, 100.0, 150.0, 220.0, 300.0)


@dataclass(frozen=True)
class PlaneMap:
    """How a stored (i, j) plane is shown to SAM: (rows, cols) = optionally transposed and flipped (i, j)."""

    transpose: bool  # rows come from i (else from j)
    flip_rows: bool
    flip_cols: bool

    @classmethod
    def for_affine(cls, affine: np.ndarray) -> "PlaneMap":
        """Radiological view (anterior up, patient's right on the left) when the plane is axial; else as stored."""
        ornt = nib.orientations.io_orientation(affine)
        (ax_i, s_i), (ax_j, s_j) = ornt[0], ornt[1]
        if {int(ax_i), int(ax_j)} != {0, 1}:
            return cls(transpose=False, flip_rows=False, flip_cols=False)
        if int(ax_i) == 0:  # i runs along x (columns), j along y (rows)
            return cls(transpose=False, flip_rows=s_j > 0, flip_cols=s_i > 0)
        return cls(transpose=True, flip_rows=s_i > 0, flip_cols=s_j > 0)

    def to_view(self, plane: np.ndarray) -> np.ndarray:
        v = plane if self.transpose else plane.T
        return v[::-1 if self.flip_rows else 1, ::-1 if self.flip_cols else 1]

    def from_view(self, view: np.ndarray) -> np.ndarray:
        v = view[::-1 if self.flip_rows else 1, ::-1 if self.flip_cols else 1]
        return v if self.transpose else v.T

    def point_to_view(self, i: float, j: float, shape_ij: tuple[int, int]) -> tuple[float, float]:
        """(i, j) voxel -> (x = column, y = row) in the view."""
        r, c = (i, j) if self.transpose else (j, i)
        n_r, n_c = (shape_ij[0], shape_ij[1]) if self.transpose else (shape_ij[1], shape_ij[0])
        if self.flip_rows:
            r = n_r - 1 - r
        if self.flip_cols:
            c = n_c - 1 - c
        return c, r


def _points(value: Any, name: str, shape: tuple[int, ...]) -> list[tuple[int, int, int]]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 3 for p in value):
        raise RequestError(f"'{name}' must be a list of [i, j, k] voxel indices")
    out = []
    for p in value:
        try:
            i, j, k = (int(round(float(v))) for v in p)
        except (TypeError, ValueError, OverflowError):  # OverflowError: inf, or an int beyond float
            raise RequestError(f"'{name}' must be a list of [i, j, k] voxel indices, got {shown(p)}") from None
        if not all(0 <= v < n for v, n in zip((i, j, k), shape)):
            raise RequestError(f"'{name}' point {shown(list(p))} is outside the image (size {list(shape)})")
        out.append((i, j, k))
    return out


@dataclass
class ClickRequest:
    """A parsed interactive request, in stored voxel indices."""

    k: int
    foreground: list[tuple[int, int, int]]
    background: list[tuple[int, int, int]]
    roi: tuple[int, int, int, int] | None  # i0, i1, j0, j1 on the plane
    propagate: int

    @classmethod
    def parse(cls, request: dict[str, Any], shape: tuple[int, ...], propagate_default: int = 0) -> "ClickRequest":
        fg = _points(request.get("foreground"), "foreground", shape)
        bg = _points(request.get("background"), "background", shape)
        roi = request.get("roi") or None
        if roi is not None:
            if not (isinstance(roi, (list, tuple)) and len(roi) == 6):
                raise RequestError("'roi' must be [i0, i1, j0, j1, k0, k1] voxel indices")
            try:
                i0, i1, j0, j1, k0, k1 = (int(round(float(v))) for v in roi)
            except (TypeError, ValueError, OverflowError):
                raise RequestError(f"'roi' must hold numbers, got {shown(roi)}") from None
            i0, i1, j0, j1 = min(i0, i1), max(i0, i1), min(j0, j1), max(j0, j1)
            i0, j0 = max(0, i0), max(0, j0)
            i1, j1 = min(shape[0] - 1, i1), min(shape[1] - 1, j1)
            if i1 <= i0 or j1 <= j0:
                raise RequestError(f"'roi' {shown(list(roi))} holds no pixels of the image (size {list(shape)})")
            roi = (i0, i1, j0, j1)
            roi_k = (min(k0, k1) + max(k0, k1)) // 2
        k = request.get("slice")
        if k is None or k == "":
            k = fg[-1][2] if fg else (roi_k if roi is not None else (bg[-1][2] if bg else None))
        if k is None:
            raise RequestError("nothing to segment: add a foreground click or an ROI box")
        try:
            k = int(k)
        except (TypeError, ValueError, OverflowError):
            raise RequestError(f"'slice' must be a slice index, got {shown(k)}") from None
        if not 0 <= k < shape[2]:
            raise RequestError(f"'slice' {shown(k)} is outside the image ({shape[2]} slices)")
        fg = [p for p in fg if p[2] == k]
        bg = [p for p in bg if p[2] == k]
        if not fg and roi is None:
            raise RequestError(f"no foreground click on slice {k} and no ROI box: nothing to segment")
        try:
            propagate = int(request.get("propagate", propagate_default))
        except (TypeError, ValueError, OverflowError):
            raise RequestError(f"'propagate' must be a number of slices, got {shown(request.get('propagate'))}") from None
        return cls(k=k, foreground=fg, background=bg, roi=roi, propagate=max(0, min(propagate, shape[2])))


def click_segment(
    data: np.ndarray,
    affine: np.ndarray,
    modality: str,
    request: ClickRequest,
    make_segmenter: Callable[[np.ndarray, Sequence[float]], SliceSegmenter],
    window: Sequence[float] | None = None,
    margin_px: float = 3.0,
) -> np.ndarray:
    """Boolean mask on the stored grid: the clicked slice, plus ``request.propagate`` slices each way."""
    pmap = PlaneMap.for_affine(affine)
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    pixel_mm = (spacing[0], spacing[1]) if pmap.transpose else (spacing[1], spacing[0])
    rng = intensity_range(data, modality, window)
    lo_k = max(0, request.k - request.propagate)
    hi_k = min(data.shape[2], request.k + request.propagate + 1)
    # Only the slices this request can touch are converted; their uint8 pixels are what drafts
    # of the same study use, so the embedding cache is shared with them.
    views = np.stack([pmap.to_view(apply_range(data[:, :, k], rng)) for k in range(lo_k, hi_k)])
    seg = make_segmenter(views, pixel_mm)
    shape_ij = data.shape[:2]
    fg = np.array([pmap.point_to_view(i, j, shape_ij) for i, j, _ in request.foreground], np.float32).reshape(-1, 2)
    bg = np.array([pmap.point_to_view(i, j, shape_ij) for i, j, _ in request.background], np.float32).reshape(-1, 2)
    rows, cols = views.shape[1:]
    centre = request.k - lo_k
    limit = np.array([cols - 1, rows - 1, cols - 1, rows - 1], np.float32)

    def predict(k: int, boxes: np.ndarray) -> np.ndarray:
        return seg.predict(k, boxes=np.clip(boxes, 0, limit).astype(np.float32)).numpy() > 0

    if request.roi is not None:
        i0, i1, j0, j1 = request.roi
        (xa, ya), (xb, yb) = pmap.point_to_view(i0, j0, shape_ij), pmap.point_to_view(i1, j1, shape_ij)
        mask = predict(centre, np.array([[min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)]], np.float32))[0]
    else:
        # Clicks alone: square boxes of several sizes around them; SAM's own IoU estimate picks among
        # the masks that hold every foreground click and no background click.
        lo, hi = fg.min(axis=0), fg.max(axis=0)
        per_mm = 1.0 / np.array([pixel_mm[1], pixel_mm[0]])
        boxes = np.stack([np.concatenate([lo - side / 2 * per_mm, hi + side / 2 * per_mm]) for side in CANDIDATE_SIDES_MM])
        masks = predict(centre, boxes)
        quality = seg.last_quality.numpy()

        def holds(m: np.ndarray) -> bool:
            return all(m[int(round(y)), int(round(x))] for x, y in fg) and \
                not any(m[int(round(y)), int(round(x))] for x, y in bg)

        best = max(range(len(boxes)), key=lambda n: (holds(masks[n]), float(quality[n])))
        mask = masks[best]
    out = np.zeros((hi_k - lo_k, rows, cols), bool)
    out[centre] = mask
    for direction in (-1, 1):
        previous = mask
        k = centre + direction
        while 0 <= k < len(views) and previous.any():
            nxt = predict(k, _box_of(previous, margin_px)[None])[0]
            # The structure ended, or SAM lost it: its mask collapses, or its own IoU estimate drops
            # (measured at a spleen's lower tip: above 0.87 inside the organ, 0.50 one slice past it).
            if nxt.sum() < 0.2 * previous.sum() or float(seg.last_quality[0]) < MIN_QUALITY:
                break
            out[k] = previous = nxt
            k += direction
    full = np.zeros(data.shape, bool)
    for offset in range(out.shape[0]):
        full[:, :, lo_k + offset] = pmap.from_view(out[offset])
    return full


def _box_of(mask: np.ndarray, margin: float) -> np.ndarray | None:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    return np.array([cols[0] - margin, rows[0] - margin, cols[-1] + margin, rows[-1] + margin], np.float32)
