"""An MR study's receive-coil shading, measured in its subcutaneous fat, for the prior's intensity windows.

A receive coil is more sensitive near its elements, so an MR image is multiplied by a smooth field: one
side or the front of the abdomen brighter than the other by tens of per cent. The MR rules learn each
organ's grey level from the study itself (rules.intensity_window) and expect one level per organ, so a
field that makes the liver's right edge 30 % brighter than its left splits its window: with a +-30 %
left-right gradient added to mr_abdomen, the gallbladder fell from 0.54 to 0.04 (BENCHMARKS.md "A coil's
shading measured in the subcutaneous fat").

General bias correction (ITK's N4) fits a field to the whole image, and on this 35 x 27 cm field of view a
field that smooth still absorbs anatomy: the liver (on the right) darkened, and the pancreas, found by the
liver's grey level, was lost (0.62 -> 0.00), on the unshaded original too. So the field is read from one
tissue only: subcutaneous fat, a single tissue that rings the whole body close to the coils. Its grey level
is the same everywhere but for the coil, and what lies inside the ring (organs of their own brightness)
never enters the fit. The field is first order (log-intensity linear in x, y, z, fitted robustly), the
lowest order the ring can tell apart from anatomy: a shading brighter at the body's centre than at its
edge is the same at every point of the ring and is left alone.

Fat is found as the brighter of the body's two intensity classes (Otsu, in log intensity) within 3 cm of
the skin; only where that bright tissue shows in most directions around the body (a ring) in the layer right
under the skin (2-12 mm) is a field measured at all. On a fat-suppressed sequence the bright tissue near the
skin is the organs against the wall, behind its muscles, and nothing is corrected: on a T2 with fat
suppressed made from mr_abdomen (``medprompt.mr_contrasts``), bright organs showed in 85 % of the directions
within 3 cm of the skin, and a field of 0.55-2.0 fitted to them made the spleen darker than the liver; right
under the skin they show in 46 %, and fat rings on T1 and T2 without suppression in 93-97 %.

A field that stays within 10 % of its median is not applied either: that much the organs' windows absorb, and
it is as much fat's own variation (partial volume in a thin ring, a fold of skin) as shading. On mr_abdomen as
stored the fitted field spans 0.95-1.06 and the image is drawn as before; with a +-30 % gradient added it spans
0.76-1.31 and is divided out.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from medprompt.histogram import otsu
from medprompt.prior.landmarks import UNDER_SKIN_MM, skin_depth

SHELL_MM = 30.0  # subcutaneous fat lies within this depth of the skin (with the abdominal wall's muscles)
MIN_COVERAGE = 0.75  # of the directions around the body where the bright ring shows: fat rings the body;
# organs against the wall (liver, spleen) on a fat-suppressed sequence cover a few sectors only
MIN_FAT_VOXELS = 200
SECTORS = 36
MIN_SHADING = 0.1  # a field nowhere further than 10 % from its median is not applied (module docstring)
MAX_GAIN = 2.0  # the field is clipped to 1/2..2: a coil's shading, not a change of tissue


def coil_field(image: np.ndarray, body: np.ndarray, spacing: Sequence[float],
               depth: np.ndarray | None = None) -> np.ndarray | None:
    """The multiplicative field (``image``'s shape, median 1 over ``body``) that shades ``image``, or None where
    no subcutaneous fat ring shows it (see the module docstring). ``image``: a denoised MR volume (i, j, k),
    ``spacing``: its voxel size in mm; ``depth``: ``skin_depth(body, spacing)`` when the caller has it."""
    if not body.any() or image.ndim != 3:
        return None
    depth = skin_depth(body, spacing) if depth is None else depth
    ring = body & (depth < SHELL_MM)
    logs = np.log(np.maximum(image, 1e-3))
    threshold = otsu(logs[body])
    fat = ring & (logs > threshold)
    fat = ndi.binary_erosion(fat, structure=np.ones((3, 3, 1), bool))  # the fat's core: no partial volume
    under_skin = (depth > UNDER_SKIN_MM[0]) & (depth <= UNDER_SKIN_MM[1])
    if fat.sum() < MIN_FAT_VOXELS or _ring_coverage(fat & under_skin, body) < MIN_COVERAGE:
        return None
    idx = np.argwhere(fat)
    centre = np.array([(n - 1) / 2 for n in image.shape])
    scale = np.asarray(spacing, np.float64) / 100.0  # decimetres: a well-conditioned fit
    design = np.column_stack([np.ones(len(idx)), (idx - centre) * scale])
    y = logs[fat].astype(np.float64)
    keep = np.ones(len(y), bool)
    for _ in range(3):  # drop what is not fat (vessels, skin folds) by its distance from the fitted field
        coef, *_ = np.linalg.lstsq(design[keep], y[keep], rcond=None)
        resid = y - design @ coef
        spread = 1.4826 * float(np.median(np.abs(resid[keep] - np.median(resid[keep])))) + 1e-6
        keep = np.abs(resid - np.median(resid[keep])) < 2.5 * spread
    grids = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(image.shape, centre, scale)], indexing="ij")
    log_field = sum(c * g for c, g in zip(coef[1:], grids))
    log_field -= np.median(log_field[body])
    if float(np.abs(log_field[body]).max()) < np.log1p(MIN_SHADING):
        return None  # within what fat's own variation and the windows' width absorb: the image is left as it is
    return np.exp(np.clip(log_field, -np.log(MAX_GAIN), np.log(MAX_GAIN))).astype(np.float32)


def _ring_coverage(fat: np.ndarray, body: np.ndarray) -> float:
    """Median over slices of the share of ``SECTORS`` directions from the body's centre in which ``fat`` shows."""
    shares = []
    for k in range(fat.shape[2]):
        if not fat[:, :, k].any():
            shares.append(0.0)
            continue
        ci, cj = np.argwhere(body[:, :, k]).mean(0)
        pts = np.argwhere(fat[:, :, k])
        angle = np.arctan2(pts[:, 1] - cj, pts[:, 0] - ci)
        hit = np.unique(((angle + np.pi) / (2 * np.pi) * SECTORS).astype(int) % SECTORS)
        shares.append(len(hit) / SECTORS)
    return float(np.median(shares))
