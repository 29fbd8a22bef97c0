"""LiteMedSAM's view of an image, exactly as it was trained: the one place that owns it.

LiteMedSAM was trained on slices saved as uint8 after CT windowing (soft tissue W400/L40 unless
a class names its own window) or, for MR and other modalities, clipping to the 0.5-99.5
percentiles of the non-zero voxels; each slice was then resized so its longest side is 256,
min-max normalised to [0, 1], repeated to 3 channels and zero-padded at the bottom and right.
Boxes are x0, y0, x1, y1 in pixels of the slice, scaled into that 256 frame; the 256x256 logits
are cropped to the unpadded part, resized back to the slice and thresholded at 0.

Axial slices are shown to the model in radiological orientation (anterior at the top, the
patient's right on the image's left), the way its training slices were stored. Pixels that are
not square are resized to their physical aspect, so an organ is not squashed: each axis is
scaled by its own factor, and boxes with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

SAM_SIZE = 256
SOFT_TISSUE_WINDOW = (40.0, 400.0)  # level, width in HU
MR_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class IntensityRange:
    """The values mapped to 0 and 255, and whether exact zeros (padding) stay 0 (MR and the rest)."""

    lo: float
    hi: float
    keep_zero: bool


def intensity_range(volume: np.ndarray, modality: str, window: Sequence[float] | None = None) -> IntensityRange:
    """CT: ``window`` (level, width) in HU, default soft tissue. Otherwise the 0.5-99.5 percentiles of the
    non-zero voxels (zero is usually padding outside the field of view), from a 2 M-voxel sample of
    large volumes (the same to < 1 grey level), so one slice can be converted without the rest."""
    if modality == "CT":
        level, width = window or SOFT_TISSUE_WINDOW
        return IntensityRange(level - width / 2.0, level + width / 2.0, keep_zero=False)
    data = np.asarray(volume)
    flat = data.ravel()
    if flat.size > 2_000_000:
        flat = flat[:: flat.size // 2_000_000 + 1]
    flat = flat[np.isfinite(flat)]
    nonzero = flat[flat != 0]
    sample = nonzero if nonzero.size else flat
    if not sample.size:
        return IntensityRange(0.0, 1.0, keep_zero=True)
    lo, hi = (float(v) for v in np.percentile(sample.astype(np.float64), MR_PERCENTILES))
    return IntensityRange(lo, hi, keep_zero=True)


def apply_range(data: np.ndarray, rng: IntensityRange) -> np.ndarray:
    """Any-shaped array -> uint8 with ``rng``: clipped, scaled to 0..255; non-finite values count as the lowest."""
    data = np.asarray(data, dtype=np.float32)
    finite = data if np.isfinite(data).all() else np.nan_to_num(data, nan=rng.lo, posinf=rng.hi, neginf=rng.lo)
    scaled = (np.clip(finite, rng.lo, rng.hi) - rng.lo) / max(rng.hi - rng.lo, 1e-6) * 255.0
    out = np.rint(scaled).astype(np.uint8)
    if rng.keep_zero:
        out[data == 0] = 0
    return out


def to_uint8(volume: np.ndarray, modality: str, window: Sequence[float] | None = None) -> np.ndarray:
    """The whole volume as LiteMedSAM's uint8 training data: CT windowed, anything else percentile-clipped."""
    return apply_range(volume, intensity_range(volume, modality, window))


HU_LIKE_MIN = -500.0  # a CT slice whose minimum is below this holds Hounsfield units (else it is a windowed picture)


def sam_pixels(grey: np.ndarray, modality: str) -> np.ndarray:
    """A 2D image's uint8 pixels as LiteMedSAM was trained on them: a CT window for HU data, else
    percentile clipping (a CT slice saved as a picture is already windowed)."""
    as_ct = modality == "CT" and float(grey.min()) < HU_LIKE_MIN
    return apply_range(grey, intensity_range(grey, "CT" if as_ct else "OTHER"))


def modality_of(data: np.ndarray, declared: str | None) -> str:
    """The modality LiteMedSAM's preprocessing follows: declared, else guessed (HU-like values are CT)
    from a strided sample, so it costs milliseconds on a full CT."""
    from medprompt.prior.landmarks import guess_modality

    step = [max(1, n // 64) for n in data.shape]
    return guess_modality(np.asarray(data)[tuple(slice(None, None, s) for s in step)], declared)


def axial_view(canonical: np.ndarray) -> np.ndarray:
    """(X, Y, Z) RAS array -> (Z, rows, cols) radiological axial slices: row 0 anterior, column 0 patient right."""
    return np.ascontiguousarray(np.transpose(canonical[::-1, ::-1, :], (2, 1, 0)))


def from_axial_view(view: np.ndarray, contiguous: bool = True) -> np.ndarray:
    """Inverse of :func:`axial_view`; ``contiguous=False`` returns a strided view of ``view`` (a caller
    that reorients it again copies once instead of twice: 0.2 s for a 512x512x200 label map)."""
    out = np.transpose(view, (2, 1, 0))[::-1, ::-1, :]
    return np.ascontiguousarray(out) if contiguous else out


@dataclass(frozen=True)
class SliceGeometry:
    """Where a slice of ``shape`` (rows, cols) sits in the 256 x 256 model input."""

    shape: tuple[int, int]
    resized: tuple[int, int]  # (rows, cols) inside the 256 frame, before padding

    @classmethod
    def for_slice(cls, shape: tuple[int, int], pixel_mm: tuple[float, float] = (1.0, 1.0)) -> "SliceGeometry":
        """Longest physical side to 256 pixels; the other side in proportion (at least one pixel)."""
        h, w = int(shape[0]), int(shape[1])
        extent = (h * float(pixel_mm[0]), w * float(pixel_mm[1]))
        scale = SAM_SIZE / max(extent)
        resized = (min(SAM_SIZE, max(1, int(round(extent[0] * scale)))),
                   min(SAM_SIZE, max(1, int(round(extent[1] * scale)))))
        return cls(shape=(h, w), resized=resized)

    @property
    def factors(self) -> tuple[float, float]:
        """(row, col) scale from slice pixels to model pixels."""
        return self.resized[0] / self.shape[0], self.resized[1] / self.shape[1]

    def box_to_model(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes (N, 4) as x0, y0, x1, y1 in slice pixels -> the same in the 256 frame."""
        fy, fx = self.factors
        return np.asarray(boxes, np.float32).reshape(-1, 4) * np.array([fx, fy, fx, fy], np.float32)

    def points_to_model(self, points: np.ndarray) -> np.ndarray:
        """Points (N, 2) as x (column), y (row) in slice pixels -> the 256 frame, scaled as boxes are
        (SAM's prompt encoder then adds half a pixel itself)."""
        fy, fx = self.factors
        return np.asarray(points, np.float32).reshape(-1, 2) * np.array([fx, fy], np.float32)


def model_input(slices: np.ndarray, geometry: SliceGeometry) -> torch.Tensor:
    """uint8 slices (B, rows, cols) -> float32 (B, 3, 256, 256): resized, min-max per slice, padded."""
    t = torch.from_numpy(np.ascontiguousarray(slices)).float()[:, None]
    if tuple(t.shape[-2:]) != geometry.resized:
        shrinking = geometry.resized[0] < t.shape[-2] or geometry.resized[1] < t.shape[-1]
        t = F.interpolate(t, size=geometry.resized, mode="bilinear", align_corners=False, antialias=shrinking)
    lo = t.amin(dim=(2, 3), keepdim=True)
    hi = t.amax(dim=(2, 3), keepdim=True)
    t = (t - lo) / (hi - lo).clamp(min=1e-8)
    t = F.pad(t, (0, SAM_SIZE - geometry.resized[1], 0, SAM_SIZE - geometry.resized[0]))
    return t.expand(-1, 3, -1, -1).contiguous()


def logits_to_slice(logits: torch.Tensor, geometry: SliceGeometry) -> torch.Tensor:
    """Model logits (..., 256, 256) -> logits on the slice's own pixels (..., rows, cols); mask is > 0."""
    lead = logits.shape[:-2]
    x = logits.reshape(-1, 1, SAM_SIZE, SAM_SIZE)[..., : geometry.resized[0], : geometry.resized[1]]
    x = F.interpolate(x.float(), size=geometry.shape, mode="bilinear", align_corners=False)
    return x.reshape(*lead, *geometry.shape)
