"""The network's view of a volume: RAS axial slices at one pixel size, intensities normalised.

Shared by training and inference so that both see exactly the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from medprompt.errors import InputError
from medprompt.prior import geometry
from medprompt.prior.landmarks import guess_modality

if TYPE_CHECKING:
    from medprompt.io.volume import Volume

NET_SPACING_MM = 2.5
CT_WINDOW = (-250.0, 350.0)  # soft-tissue window: every abdominal organ, bone and air saturate


@dataclass
class NetGrid:
    """Raw (for teachers) and normalised (for the network) working-grid arrays of one volume."""

    raw: np.ndarray  # float32 (X, Y, Z), original units (HU for CT)
    image: np.ndarray  # float32 (X, Y, Z), about [-1, 1]
    frame: geometry.WorkFrame
    modality: str

    @property
    def affine(self) -> np.ndarray:
        """A RAS affine for the working grid (origin arbitrary: teachers only need directions and spacing)."""
        return np.diag([*self.frame.work_spacing, 1.0])


def normalise(raw: np.ndarray, modality: str) -> np.ndarray:
    """CT: fixed HU window; MR: the body's 1st-99th percentiles, both to [-1, 1]."""
    if modality == "CT":
        lo, hi = CT_WINDOW
    else:
        fg = raw[raw > np.percentile(raw, 20)]
        lo, hi = (np.percentile(fg, [1, 99]) if fg.size else (float(raw.min()), float(raw.max()) + 1))
    return (np.clip((raw - lo) / max(hi - lo, 1e-6), 0, 1) * 2 - 1).astype(np.float32)


def to_net_grid(volume: "Volume", device: torch.device | None = None) -> NetGrid:
    """The volume on the network's grid; resampled on ``device`` when that is a GPU."""
    data = np.asarray(volume.data)
    if data.ndim != 3 or min(data.shape) < 2:
        raise InputError(f"{volume.source}: expected a 3D volume, got shape {data.shape}")
    if not np.isfinite(data).all():
        data = np.nan_to_num(data, nan=float(np.nanmin(data)))
    raw, frame = geometry.to_work(data, volume.affine, NET_SPACING_MM, exact_inplane=True, device=device)
    modality = guess_modality(raw, volume.modality)
    return NetGrid(raw=raw, image=normalise(raw, modality), frame=frame, modality=modality)


def body_centre(image: np.ndarray) -> tuple[int, int]:
    """In-plane centre (x, y) of the patient (normalised intensity above air), over the whole volume.

    Tiles are placed around it in training and inference alike, so the ViT's position embedding
    means "where in the patient's cross-section": that, not texture, is what tells the liver from
    the spleen.
    """
    fg = image > -0.95
    if not fg.any():
        return image.shape[0] // 2, image.shape[1] // 2
    proj = fg.sum(axis=2)
    xs, ys = np.nonzero(proj)
    w = proj[xs, ys].astype(np.float64)
    return int(round(np.average(xs, weights=w))), int(round(np.average(ys, weights=w)))
