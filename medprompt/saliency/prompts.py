"""Saliency map -> SAM prompts, as MedCLIP-SAMv2 turns its maps into boxes.

The map's pixel values are split into two clusters (1D k-means, or a fixed threshold); the
foreground's connected components are ranked by the saliency they hold (not only their area, so a
small bright blob beats a large faint one), the class's number of parts is kept (two for the
lungs), and each becomes one box (``per_part``) or all together one box around them. The point of
highest saliency in each part can go with its box as a positive point. Whatever the saliency
method, this is the one way its map becomes prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

# A second (third, ...) part is kept only when it holds this share of the first part's saliency:
# one lung hidden by an effusion must not pull a speck of noise in as "the other lung".
MIN_PART_SHARE = 0.15
# Added around each region, as a share of the region's own height and width: a thresholded map
# stops short of a structure's faint rim (lung bases behind the diaphragm, a lesion's margin), and
# MedSAM was trained on boxes drawn loosely around the whole structure.
BOX_MARGIN = 0.1


@dataclass
class SamPrompts:
    """Prompts for one class on one image (pixels as displayed): boxes x0, y0, x1, y1, and optional points."""

    boxes: np.ndarray  # (N, 4) float32
    points: np.ndarray | None = None  # (N, 1, 2) x, y: each box's most salient pixel
    regions: list[np.ndarray] = field(default_factory=list)  # the parts' boolean masks

    @property
    def empty(self) -> bool:
        return len(self.boxes) == 0

    @classmethod
    def none(cls) -> "SamPrompts":
        """No prompt: the class is not drawn."""
        return cls(boxes=np.zeros((0, 4), np.float32))


def kmeans_foreground(saliency: np.ndarray, iterations: int = 20) -> np.ndarray:
    """Pixels in the higher of two 1D k-means clusters of the map's values (centres start at min and max)."""
    return saliency > kmeans_split(saliency, iterations)


def kmeans_split(saliency: np.ndarray, iterations: int = 20) -> float:
    """The value between the two 1D k-means clusters of the map (inf for a flat map: nothing is salient)."""
    values = saliency.ravel().astype(np.float64)
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-6:
        return float("inf")
    c0, c1 = lo, hi
    for _ in range(iterations):
        split = (c0 + c1) / 2
        upper = values > split
        new0 = values[~upper].mean() if (~upper).any() else c0
        new1 = values[upper].mean() if upper.any() else c1
        if abs(new0 - c0) < 1e-6 and abs(new1 - c1) < 1e-6:
            break
        c0, c1 = new0, new1
    return (c0 + c1) / 2


def saliency_to_prompts(saliency: np.ndarray, parts: int = 1, per_part: bool = True, threshold: float | None = None,
                        points: bool = False, margin: float = BOX_MARGIN) -> SamPrompts:
    """Boxes (and points) from a map in [0, 1]: k-means (or ``threshold``) foreground, its ``parts``
    most salient components, one box each (``per_part``) or one around all of them."""
    split = kmeans_split(saliency) if threshold is None else threshold
    labels, n = ndimage.label(saliency > split)
    if n == 0:
        return SamPrompts.none()
    mass = ndimage.sum(saliency, labels, index=np.arange(1, n + 1))
    order = np.argsort(-mass)[: max(1, parts)]
    order = [i for i in order if mass[i] >= MIN_PART_SHARE * mass[order[0]]]
    regions = [labels == i + 1 for i in order]
    h, w = saliency.shape
    groups = regions if per_part else [np.logical_or.reduce(regions)]
    boxes, peaks = [], []
    for region in groups:
        rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
        least = 2.0 if margin > 0 else 0.0  # a few pixels at least around a small region
        pad_r = max(least, margin * (rows[-1] - rows[0] + 1))
        pad_c = max(least, margin * (cols[-1] - cols[0] + 1))
        boxes.append([max(0.0, cols[0] - pad_c), max(0.0, rows[0] - pad_r),
                      min(w - 1.0, cols[-1] + pad_c), min(h - 1.0, rows[-1] + pad_r)])
        r, c = np.unravel_index(int(np.argmax(np.where(region, saliency, -1.0))), region.shape)
        peaks.append([[float(c), float(r)]])
    return SamPrompts(boxes=np.asarray(boxes, np.float32),
                      points=np.asarray(peaks, np.float32) if points else None, regions=regions)
