"""A focal lesion on ultrasound: LiteMedSAM proposals ranked by ultrasound physics and breast anatomy.

The attribute prior (:mod:`medprompt.saliency.attribute`) sees a lesion only where it is clearly
darker than its row; an isoechoic mass, one cyst among several, or a dark region outside the probe's
field fool it. Here the image's few most lesion-like places become box prompts (where the sonographer
measured, if caliper cursors are burnt into the image; the prior's own components; dark blobs of
several sizes), LiteMedSAM draws a mask for each on the one image embedding, and each mask is scored
by what a sonographer reads:

- **echogenicity**: how much darker it is than the tissue around it (hypoechoic), compared with a
  ring around the mask at its sides and above it (the tissue below is changed by the lesion itself);
- **shape**: compact and oval (filled ellipse, convex), not a band along a tissue plane; wider than
  tall is fine (benign masses lie parallel to the skin);
- **margin**: its outline lies on an edge of the image (gradient there against the field's mean), as a
  circumscribed mass's does; a mask spilling into the speckle around it has a weak outline;
- **size**: ties of contrast go to the larger mask (area^1/4), a lesion rather than a dark speck in it;
- **place**: inside the acquired field (the probe's sector; the black margins and a no-contact area
  beside the probe, anechoic from the skin down, are outside it), not touching its edge, below the
  skin line;
- **LiteMedSAM's own IoU estimate** and **stability** (SAM's stability score: the mask barely changes
  when its logits are cut at -1 or +1 instead of 0, where its edge is a sharp step in the image);
- **the sonographer's measurement**: where "+" caliper cursors are on the image
  (:mod:`medprompt.saliency.calipers`), they sit on the measured mass's outline; a mask none lies on
  keeps a tenth of its score, and a mask they outline counts as a mass even if it is isoechoic.

Scores multiply (a mask must be plausible on every count); the best mask wins, and how far it beats
the best mask elsewhere is the draft's confidence (weak supervision learns from confident drafts only).
Posterior acoustic features (enhancement or shadowing beneath) were measured too and left out: on the
development images tissue beside a lesion showed them as often as the lesions did. An isoechoic mass
nobody measured scores low on contrast and is usually missed. Settings were chosen on the 10
development images of BUSI (../shared/data/real2d/busi_us2d); see BENCHMARKS.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
from scipy import ndimage

from medprompt.saliency.attribute import _downsample, _normalised
from medprompt.saliency.calipers import caliper_boxes, caliper_support, find_calipers

if TYPE_CHECKING:
    from medprompt.sam.segmenter import SliceSegmenter

# Candidate generation
BLOB_SIGMAS = (0.03, 0.045, 0.065, 0.09, 0.13)  # dark-blob scales, fractions of the field's long side
MAX_CANDIDATES = 8  # boxes shown to LiteMedSAM (each costs one decoder run)
BLOB_BOX = 1.2  # a blob's box half-side, in units of its scale-space radius sigma * sqrt(2): a 20 % margin
LEARNT_PROPOSALS = 2  # extra boxes from a learnt map's components (the weak model's)
NMS_IOU = 0.7  # candidate boxes overlapping more than this are the same place (only near-duplicates)
FIELD_DARK = 0.08  # of the field's 99th percentile: near-black, no echo at all (outside the field)


@dataclass
class Candidate:
    """One proposal: its box (x0, y0, x1, y1: on the working grid until drawn, then in image pixels),
    LiteMedSAM's mask logits on the image's pixels, and what it scored."""

    box: np.ndarray
    source: str
    logits: np.ndarray | None = None
    quality: float = 0.0
    stability: float = 0.0
    features: dict[str, float] = field(default_factory=dict)
    score: float = 0.0


# -- the acquired field ---------------------------------------------------------------------------

def acquired_field(small: np.ndarray) -> np.ndarray:
    """Where the probe imaged tissue, on the working grid: not the black margins, burnt-in text or a
    no-contact area. Near-black pixels (no echo) connected to the image's edge are outside: the margins
    around the sector and, beside a lifted probe, the anechoic band from the skin line down. A cyst is
    as black but enclosed by tissue."""
    s = ndimage.gaussian_filter(small.astype(np.float32), 2.0)
    top = float(np.percentile(s, 99))
    dark = s < FIELD_DARK * max(top, 1e-6)
    labels, n = ndimage.label(dark)
    edge = np.zeros(n + 1, bool)
    for border in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        edge[np.unique(border)] = True
    edge[0] = False
    inside = ~edge[labels]
    inside = ndimage.binary_opening(inside, iterations=2)
    labels, n = ndimage.label(inside)
    if n == 0:
        return np.ones_like(inside)
    biggest = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    return ndimage.binary_fill_holes(biggest)


# -- candidate boxes ------------------------------------------------------------------------------

def dark_blobs(s: np.ndarray, fov: np.ndarray, intensity: str = "dark") -> list[tuple[float, float, float, float]]:
    """Scale-normalised Laplacian-of-Gaussian extrema (response, row, col, radius) on the working grid:
    compact regions darker (or brighter) than their surroundings, at the scales of BLOB_SIGMAS, centred
    inside the field at least a radius from its edge."""
    long_side = max(s.shape)
    depth = ndimage.distance_transform_edt(fov)
    filled = np.where(fov, s, float(s[fov].mean()) if fov.any() else 0.0)
    sign = 1.0 if intensity == "dark" else -1.0
    found = []
    for frac in BLOB_SIGMAS:
        sigma = frac * long_side
        response = sign * sigma ** 2 * ndimage.gaussian_laplace(filled, sigma)
        peaks = (response == ndimage.maximum_filter(response, size=int(2 * sigma) + 1)) & (response > 0)
        peaks &= depth > sigma
        for r, c in zip(*np.nonzero(peaks)):
            found.append((float(response[r, c]), float(r), float(c), float(sigma * np.sqrt(2))))
    found.sort(key=lambda t: -t[0])
    return found


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mask_box(mask: np.ndarray, margin: float = 0.1) -> np.ndarray | None:
    """x0, y0, x1, y1 around ``mask`` with ``margin`` of its size (and two pixels at least) added; None if empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return None
    h, w = mask.shape
    pr = max(2.0, margin * (rows[-1] - rows[0] + 1))
    pc = max(2.0, margin * (cols[-1] - cols[0] + 1))
    return np.array([max(0.0, cols[0] - pc), max(0.0, rows[0] - pr), min(w - 1.0, cols[-1] + pc),
                     min(h - 1.0, rows[-1] + pr)], np.float32)


def candidate_boxes(saliency_small: np.ndarray, s: np.ndarray, fov: np.ndarray, attrs: Mapping[str, Any],
                    limit: int = MAX_CANDIDATES, measured: list[np.ndarray] | None = None) -> list[Candidate]:
    """Boxes on the working grid: ``measured`` (boxes from caliper cursors: where the sonographer measured)
    first, then the attribute map's components (most salient first), then dark blobs by response;
    near-duplicates dropped, at most ``limit`` in all (each costs one decoder run)."""
    out: list[Candidate] = [Candidate(box=box, source="caliper") for box in (measured or [])[:limit]]

    def add(box: np.ndarray | None, source: str) -> None:
        if box is not None and len(out) < limit and all(box_iou(box, c.box) < NMS_IOU for c in out):
            out.append(Candidate(box=box, source=source))

    for box in _component_boxes(saliency_small, saliency_small > 0, 3):
        add(box, "prior")
    h, w = s.shape
    for _, r, c, radius in dark_blobs(s, fov, str(attrs.get("intensity", "dark"))):
        if len(out) >= limit:
            break
        half = BLOB_BOX * radius
        add(np.array([max(0.0, c - half), max(0.0, r - half), min(w - 1.0, c + half), min(h - 1.0, r + half)],
                     np.float32), "blob")
    return out


def _component_boxes(values: np.ndarray, region: np.ndarray, count: int) -> list[np.ndarray]:
    """Boxes (10 % margin) of the ``count`` components of ``region`` holding most of ``values``."""
    labels, n = ndimage.label(region)
    if not n:
        return []
    mass = ndimage.sum(values, labels, index=np.arange(1, n + 1))
    return [b for b in (mask_box(labels == i + 1) for i in np.argsort(-mass)[:count]) if b is not None]


# -- what a mask looks like -----------------------------------------------------------------------

RING = 0.35  # width of the surrounding ring, in units of the mask's equivalent radius (2 pixels at least)
SKIN_GAP = 0.05  # of the field's depth: a mask starting closer than this to the skin line (or ending closer
#                  to the field's bottom, the chest wall and deep shadow) is penalised linearly
MARGIN_POWER = 0.5  # weight of the outline's edge strength (a mask spilling into speckle has a weak one)
AREA_POWER = 0.25  # ties of contrast go to the larger mask: a lesion, not a dark speck inside it
UNSURE = 0.25  # a choice whose confidence is under this was a near tie (the winner within 4/3 of a rival)
AGREEMENT_FLOOR = 0.5  # a learnt map weighs a mask by floor + its mean inside: at most 3x, never to zero
SAME_PLACE = 0.5  # masks sharing more than this of the smaller one are one place (a part is no rival)
STABILITY_OFFSET = 1.0  # logits, as SAM's automatic mask generator
BAND = (0.1, 0.35)  # minor/major axis ratio: below the first a band along a tissue plane, above the second any oval
CALIPER_TOLERANCE = (3.0, 0.3)  # a cursor counts as on a mask's outline within max(3 px, 0.3 equivalent radii)
CALIPER_FLOOR = 0.1  # with cursors on the image, a mask none of them lies on keeps this much of its score
MEASURED_CONTRAST = 0.5  # a mask the cursors outline counts as at least this hypoechoic (x its support): a
#                          measured isoechoic mass is still a mass


def ramp(x: float, lo: float, hi: float) -> float:
    return float(np.clip((x - lo) / (hi - lo), 0.0, 1.0))


def mask_features(mask: np.ndarray, g: np.ndarray, fov: np.ndarray) -> dict[str, float] | None:
    """Sonographic features of ``mask`` on the working grid (``g``: normalised, lightly despeckled image,
    ``fov``: the acquired field); None for a mask of a few pixels."""
    area = int(mask.sum())
    if area < 5 or not fov.any():
        return None
    rows, cols = np.nonzero(mask)
    r_eq = np.sqrt(area / np.pi)
    ring = ndimage.binary_dilation(mask, iterations=max(2, int(RING * r_eq))) & ~mask & fov
    ring[rows.max() + 1:] = False  # beneath the mask is its own posterior echo, not its surroundings
    spread = float(np.std(g[fov])) + 1e-6
    inside = float(np.median(g[mask]))
    contrast = (float(np.median(g[ring])) - inside) / spread if ring.any() else 0.0
    cov = np.cov(np.stack([rows, cols]).astype(np.float64)) + np.eye(2) / 12.0
    eig = np.linalg.eigvalsh(cov)
    fill = min(1.0, area / (4.0 * np.pi * np.sqrt(max(np.linalg.det(cov), 1e-9))))
    hull = _hull_area(rows, cols)
    edge = ndimage.binary_dilation(mask, iterations=2) & ~mask
    field_rows = np.flatnonzero(fov.any(axis=1))
    depth = max(1, field_rows[-1] - field_rows[0] + 1)
    grad = ndimage.gaussian_gradient_magnitude(g, 1.5)
    outline = mask & ~ndimage.binary_erosion(mask)
    margin = float(grad[outline].mean()) / (float(grad[fov].mean()) + 1e-6)
    return {"contrast": contrast, "margin": margin, "area": area / float(fov.sum()),
            "solidity": min(1.0, area / max(hull, 1.0)), "fill": fill, "elongation": float(np.sqrt(eig[0] / eig[1])),
            "outside": float((edge & ~fov).sum() / max(1, edge.sum())),
            "top": (rows.min() - field_rows[0]) / depth, "bottom": (field_rows[-1] - rows.max()) / depth}


def _hull_area(rows: np.ndarray, cols: np.ndarray) -> float:
    from scipy.spatial import ConvexHull, QhullError

    try:
        return float(ConvexHull(np.stack([rows, cols], 1)).volume)
    except (QhullError, ValueError):
        return float(rows.size)


def lesion_score(f: Mapping[str, float], quality: float, stability: float, intensity: str = "dark") -> float:
    """How lesion-like a mask is: hypoechoic contrast x SAM's IoU estimate x stability x shape x place x
    margin x size, and x how well caliper cursors lie on its outline where the image has any."""
    contrast = f["contrast"] if intensity == "dark" else -f["contrast"]
    if "calipers" in f:  # the sonographer's cursors say where the mass is, whatever its echo
        contrast = max(contrast, MEASURED_CONTRAST * f["calipers"])
    shape = f["solidity"] * f["fill"] * ramp(f["elongation"], *BAND)
    place = (1.0 - f["outside"]) ** 2 * ramp(f["top"], 0.0, SKIN_GAP) * ramp(f["bottom"], 0.0, SKIN_GAP)
    margin = f["margin"] ** MARGIN_POWER if MARGIN_POWER else 1.0
    measured = CALIPER_FLOOR + (1.0 - CALIPER_FLOOR) * f["calipers"] if "calipers" in f else 1.0
    return max(contrast, 0.0) * quality * stability * shape * place * margin * f["area"] ** AREA_POWER * measured


# -- selection ------------------------------------------------------------------------------------

@dataclass
class LesionChoice:
    """The chosen proposal (index into ``candidates``; -1 when none is lesion-like) and every proposal scored."""

    candidates: list[Candidate]
    best: int

    @property
    def chosen(self) -> Candidate | None:
        return None if self.best < 0 else self.candidates[self.best]

    @property
    def confidence(self) -> float:
        """1 - (best score elsewhere) / (winner's score): 0 when another place is as lesion-like (two cysts,
        a shadow as dark as the mass), near 1 when one mask stands out; 0 when nothing was chosen."""
        if self.best < 0:
            return 0.0
        win = self.candidates[self.best]
        mask = win.logits > 0
        rival = 0.0
        for i, c in enumerate(self.candidates):
            if i == self.best or c.logits is None or c.score <= rival:
                continue
            other = c.logits > 0
            if (mask & other).sum() <= SAME_PLACE * max(1, min(mask.sum(), other.sum())):
                rival = c.score
        return float(1.0 - rival / win.score) if win.score > 0 else 0.0


def select_lesion(seg: "SliceSegmenter", grey: np.ndarray, saliency: np.ndarray, attrs: Mapping[str, Any],
                  limit: int = MAX_CANDIDATES, agreement: np.ndarray | None = None) -> LesionChoice:
    """Propose, draw with LiteMedSAM (slice 0 of ``seg``, the image's own pixels), score, choose. ``grey``:
    the image LiteMedSAM sees (before uint8); ``saliency``: the attribute map, whose components are
    proposed first, on the image's pixels.

    ``agreement`` (a learnt probability map, e.g. the weak model's) speaks only where physics is unsure
    (the choice's confidence under UNSURE): its own components are proposed too, and every score is
    weighed by AGREEMENT_FLOOR + the map's mean inside the mask. A model learnt from a few confident
    drafts then decides the coin flips and never overrules a clear lesion."""
    small, _ = _downsample(grey)
    fov = acquired_field(small)
    g = _normalised(small, fov)
    blob_image = ndimage.gaussian_filter(ndimage.median_filter(g, size=5), 1.5)
    feature_image = ndimage.median_filter(g, size=3)
    sal_small = _resize(saliency.astype(np.float32), small.shape)
    to_small = np.array([small.shape[1] / grey.shape[1], small.shape[0] / grey.shape[0]] * 2, np.float32)
    marks = find_calipers(grey, inside=_resize(fov.astype(np.float32), grey.shape) > 0.5)
    measured = [box * to_small for box in caliper_boxes(marks, grey.shape)]
    marks_small = marks * to_small[[1, 0]]
    cands = candidate_boxes(sal_small, blob_image, fov, attrs, limit, measured)
    intensity = str(attrs.get("intensity", "dark"))
    _draw_and_score(seg, cands, small.shape, feature_image, fov, intensity, marks_small)
    choice = LesionChoice(cands, _best(cands))
    if agreement is None or (choice.best >= 0 and choice.confidence >= UNSURE):
        return choice
    # Physics could not tell places apart: the learnt map adds its places and decides between them.
    agree_small = _resize(agreement.astype(np.float32), small.shape)
    known = len(cands)
    to_image = np.array([grey.shape[1] / small.shape[1], grey.shape[0] / small.shape[0]] * 2, np.float32)
    for box in _component_boxes(agree_small, agree_small > 0.5, LEARNT_PROPOSALS):
        if all(box_iou(box * to_image, c.box) < NMS_IOU for c in cands):  # drawn ones hold image pixels
            cands.append(Candidate(box=box, source="learnt"))
    _draw_and_score(seg, cands[known:], small.shape, feature_image, fov, intensity, marks_small)
    for c in cands:
        if c.features:
            c.features["agreement"] = float(agree_small[_resize(c.logits > 0, small.shape) > 0.5].mean())
            c.score *= AGREEMENT_FLOOR + c.features["agreement"]
    choice.best = _best(cands)
    return choice


def _draw_and_score(seg: "SliceSegmenter", cands: list[Candidate], small_shape: tuple[int, int],
                    feature_image: np.ndarray, fov: np.ndarray, intensity: str,
                    marks: np.ndarray | None = None) -> None:
    """LiteMedSAM's mask for each candidate's box (given on the working grid, kept in image pixels), its
    features and score; ``marks``: caliper cursors (row, col on the working grid), if any."""
    if not cands:
        return
    h, w = seg.geometry.shape
    fy, fx = h / small_shape[0], w / small_shape[1]
    boxes = np.stack([c.box * np.array([fx, fy, fx, fy], np.float32) for c in cands]).astype(np.float32)
    logits = seg.predict(0, boxes=boxes).numpy()
    quality = seg.last_quality.numpy()
    for i, c in enumerate(cands):
        c.box, c.logits, c.quality = boxes[i], logits[i], float(quality[i])
        c.stability = stability_score(logits[i])
        small_mask = _resize((logits[i] > 0).astype(np.float32), small_shape) > 0.5
        f = mask_features(small_mask, feature_image, fov)
        if f is not None:
            if marks is not None and len(marks):
                tolerance = max(CALIPER_TOLERANCE[0], CALIPER_TOLERANCE[1] * np.sqrt(small_mask.sum() / np.pi))
                f["calipers"] = caliper_support(small_mask, marks, tolerance)
            c.features = f
            c.score = lesion_score(f, c.quality, c.stability, intensity)


def _best(cands: list[Candidate]) -> int:
    scores = [c.score for c in cands]
    return int(np.argmax(scores)) if scores and max(scores) > 0 else -1


def stability_score(logits: np.ndarray, offset: float = STABILITY_OFFSET) -> float:
    """SAM's stability score (Kirillov et al. 2023): IoU of the mask thresholded at +offset and at -offset.
    A mask whose edge is a sharp step in the image hardly moves; one SAM is unsure of grows or shrinks."""
    outer = int((logits > -offset).sum())
    return float((logits > offset).sum()) / outer if outer else 0.0


def _resize(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if x.shape == tuple(shape):
        return x
    return np.asarray(Image.fromarray(x.astype(np.float32), mode="F").resize(
        (shape[1], shape[0]), Image.BILINEAR))
