"""Moving a volume into the prior's working frame (RAS-oriented, coarse isotropic grid) and back.

The prior reasons in patient directions (right, anterior, superior) and in millimetres, so every
input, whatever its storage order, obliquity or spacing, is first put in closest-RAS axis order and
resampled to one working spacing; results go back to the input's own voxel grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class WorkFrame:
    """How the working grid relates to the input grid (axis permutation/flips, then zoom)."""

    ornt: np.ndarray  # nibabel orientation: input axes -> RAS
    canonical_shape: tuple[int, int, int]
    work_shape: tuple[int, int, int]
    canonical_spacing: tuple[float, float, float]
    work_spacing: tuple[float, float, float]

    @property
    def zoom(self) -> tuple[float, ...]:
        return tuple(w / c for w, c in zip(self.work_shape, self.canonical_shape))


def to_work(
    data: np.ndarray, affine: np.ndarray, spacing_mm: float, exact_inplane: bool = False
) -> tuple[np.ndarray, WorkFrame]:
    """Reorient to closest RAS and resample (linear) so no axis is finer than ``spacing_mm``.

    Axes already coarser than the working spacing are kept, so thick-slice studies are not
    interpolated into slices that were never acquired. ``exact_inplane`` resamples the axial
    plane to exactly ``spacing_mm`` (the network needs one pixel size; the prior does not).
    """
    ornt = nib.orientations.io_orientation(affine)
    canon = nib.orientations.apply_orientation(data, ornt)
    vox = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    canon_spacing = tuple(float(vox[int(ax)]) for ax in _inverse_axes(ornt))
    target = tuple(
        spacing_mm if (exact_inplane and ax < 2) else max(s, spacing_mm) for ax, s in enumerate(canon_spacing)
    )
    work_shape = tuple(max(2, int(round(n * s / t))) for n, s, t in zip(canon.shape, canon_spacing, target))
    zoom = [w / n for w, n in zip(work_shape, canon.shape)]
    work = canon.astype(np.float32, copy=False)
    if any(abs(z - 1) > 1e-3 for z in zoom):
        # Average before decimating so thin-slice noise does not alias into the coarse grid.
        sigma = [max(0.0, (1 / z - 1) / 2.5) for z in zoom]
        if any(s > 0 for s in sigma):
            work = ndi.gaussian_filter(work, sigma)
        work = ndi.zoom(work, zoom, order=1, grid_mode=True, mode="nearest")
    real_spacing = tuple(s * n / w for s, n, w in zip(canon_spacing, canon.shape, work_shape))
    frame = WorkFrame(ornt, tuple(canon.shape), tuple(work.shape), canon_spacing, real_spacing)
    return np.ascontiguousarray(work, dtype=np.float32), frame


def _inverse_axes(ornt: np.ndarray) -> list[int]:
    """For each RAS output axis, the input axis that feeds it."""
    out = [0, 0, 0]
    for in_ax, (out_ax, _) in enumerate(ornt):
        out[int(out_ax)] = in_ax
    return out


def mask_to_canonical(mask: np.ndarray, frame: WorkFrame) -> np.ndarray:
    """Upsample a working-grid mask to the canonical grid: trilinear, thresholded at 0.5.

    Trilinear upsampling of the binary mask gives smooth organ borders instead of 2.5 mm steps;
    torch does it multithreaded, which keeps a 512x512x200 output within the time budget.
    """
    if tuple(mask.shape) == tuple(frame.canonical_shape):
        return mask.astype(bool, copy=False)
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    with torch.no_grad():
        up = F.interpolate(t, size=frame.canonical_shape, mode="trilinear", align_corners=False)
    return (up[0, 0] > 0.5).numpy()


def canonical_to_input(data: np.ndarray, frame: WorkFrame) -> np.ndarray:
    """Undo the RAS reorientation: canonical-grid array back to the input's storage order."""
    inv = nib.orientations.ornt_transform(np.array([[0, 1], [1, 1], [2, 1]]), frame.ornt)
    return nib.orientations.apply_orientation(data, inv)
