"""Caliper marks on an ultrasound image: where the sonographer measured the lesion.

A sonographer who finds a mass measures it: the scanner burns small "+" cursors into the picture at
the ends of each diameter (often joined by a dotted line). They sit on the lesion's outline, so their
spread says where the lesion is and how large, whatever its echogenicity -- the one cue left for an
isoechoic mass. A cursor is a thin bright horizontal stroke crossed by a thin bright vertical one:
all four arms brighter than the pixels a few rows (columns) to either side. Tissue makes bright bands
along its planes, not crosses, so on images without cursors nothing is found (on the development images
without cursors the response stays under 0.08, cursors give 0.20-0.63; see BENCHMARKS.md). Only "+" cursors are read; other
styles ("x", small triangles) are not.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

ARM = (2, 7)  # pixels from a cursor's centre its arms are read over (scanner cursors are ~10-16 px wide)
SIDE = 3  # pixels to either side of a stroke the background is read at (strokes are 1-2 px thick)
CROSS_LEVEL = 0.2  # weakest arm's contrast, of the image's 1st-99.9th percentile span, that counts as a cursor
MERGE = 6  # responses closer than this (pixels) are one cursor
ASPECTS = (0.5, 0.75, 1.0)  # a lone diameter's perpendicular extent, as a fraction of it: boxes to propose


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``a`` moved by (dy, dx), edges repeated (no wrap-around: a stroke at one border is no arm at the other)."""
    pad = max(abs(dy), abs(dx))
    if pad == 0:
        return a
    p = np.pad(a, pad, mode="edge")
    h, w = a.shape
    return p[pad - dy:pad - dy + h, pad - dx:pad - dx + w]


def cross_response(grey: np.ndarray) -> np.ndarray:
    """Per pixel: the contrast of the weakest of the four arms of a "+" centred there (0 where any arm is
    missing), as a fraction of the image's intensity span."""
    g = np.asarray(grey, np.float32)
    lo, hi = np.percentile(g, (1, 99.9))
    span = max(float(hi - lo), 1e-6)
    horizontal = g - np.maximum(_shift(g, SIDE, 0), _shift(g, -SIDE, 0))  # brighter than above and below
    vertical = g - np.maximum(_shift(g, 0, SIDE), _shift(g, 0, -SIDE))
    arms = []
    for line, (dy, dx) in ((horizontal, (0, -1)), (horizontal, (0, 1)), (vertical, (-1, 0)), (vertical, (1, 0))):
        acc = np.zeros_like(g)
        for k in range(ARM[0], ARM[1] + 1):
            acc += _shift(line, -dy * k, -dx * k)  # the stroke k pixels along the arm's direction
        arms.append(acc / (ARM[1] - ARM[0] + 1))
    return np.maximum(np.minimum.reduce(arms), 0.0) / span


def find_calipers(grey: np.ndarray, inside: np.ndarray | None = None) -> np.ndarray:
    """(N, 2) row, col of the "+" cursors on ``grey`` (image pixels), strongest first; ``inside``: an (H, W)
    mask the cursors must lie in (the acquired field: rulers and text beside it are no measurement)."""
    score = cross_response(grey)
    peaks = (score == ndimage.maximum_filter(score, size=2 * MERGE + 1)) & (score > CROSS_LEVEL)
    if inside is not None:
        peaks &= inside
    rows, cols = np.nonzero(peaks)
    order = np.argsort(-score[rows, cols])
    kept: list[tuple[int, int]] = []
    for r, c in zip(rows[order], cols[order]):
        if all(abs(r - r2) + abs(c - c2) > MERGE for r2, c2 in kept):  # plateaus give twin maxima
            kept.append((int(r), int(c)))
    return np.asarray(kept, np.float32).reshape(-1, 2)


def caliper_boxes(marks: np.ndarray, shape: tuple[int, int]) -> list[np.ndarray]:
    """Box prompts (x0, y0, x1, y1, image pixels) for the lesion the cursors measure: their bounding box,
    and where they span one diameter only (the box's short side under half its long side) that diameter
    with a perpendicular extent of each of ASPECTS (a mass is rarely taller than wide, often flatter)."""
    if len(marks) < 2:
        return []
    h, w = shape
    r0, c0 = marks.min(axis=0)
    r1, c1 = marks.max(axis=0)
    long_side = max(r1 - r0, c1 - c0)
    if long_side < 2 * MERGE:
        return []
    margin = 0.05 * long_side  # cursors sit on the outline: a little room around it
    out = []
    if min(r1 - r0, c1 - c0) >= 0.5 * long_side:
        out.append((c0 - margin, r0 - margin, c1 + margin, r1 + margin))
    else:
        cr, cc = (r0 + r1) / 2, (c0 + c1) / 2
        for aspect in ASPECTS:
            half = aspect * long_side / 2
            if r1 - r0 >= c1 - c0:  # a vertical diameter: the width is unknown
                out.append((cc - half, r0 - margin, cc + half, r1 + margin))
            else:
                out.append((c0 - margin, cr - half, c1 + margin, cr + half))
    return [np.clip(np.array(b, np.float32), 0, [w - 1, h - 1, w - 1, h - 1]).astype(np.float32) for b in out]


def caliper_support(mask: np.ndarray, marks: np.ndarray, tolerance: float) -> float:
    """Mean over the cursors of how close each lies to ``mask``'s outline: 1 on it, falling to 0 at
    ``tolerance`` pixels away and beyond (inside or outside). Cursors and mask on the same grid."""
    if not len(marks) or not mask.any():
        return 0.0
    outline = mask & ~ndimage.binary_erosion(mask)
    distance = ndimage.distance_transform_edt(~outline)
    rows = np.clip(np.round(marks[:, 0]).astype(int), 0, mask.shape[0] - 1)
    cols = np.clip(np.round(marks[:, 1]).astype(int), 0, mask.shape[1] - 1)
    return float(np.clip(1.0 - distance[rows, cols] / max(tolerance, 1e-6), 0.0, 1.0).mean())
