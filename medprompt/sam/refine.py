"""Localise, then segment: a localiser's 3D regions become box prompts, LiteMedSAM draws the masks.

A localiser (the anatomy prior, the learned model, later a saliency map) says *where* each class
is, as a mask on its working grid; it is good at that and poor at boundaries. For every axial
slice the region touches, each of its connected parts becomes a box (plus a margin) and
LiteMedSAM returns logits on the slice's own pixels, within ``keep_within_mm`` of the box (the
class's mask is kept within that of its localiser region anyway). In 3D:
  - only slices inside the localiser's extent are drawn (first to last slice it marks);
  - slices are sampled on a grid about every ``step_mm`` that all classes share (so they share
    embeddings); the slices between, like slices where the localiser has a gap, get SAM's logits
    interpolated from their sampled neighbours, and the extent's ends beyond the grid take the
    nearest sampled slice's logits inside their own boxes;
  - where the localiser votes (``localiser_weight``: MR), every slice adds its *own* localiser mask's
    vote to those logits, drawn or interpolated, so a slice between two drawn ones follows its own
    localiser where SAM is unsure instead of its neighbours';
  - each class's logits are kept inside its localiser region dilated by ``keep_within_mm``, so
    SAM cannot run into a neighbour that looks alike;
  - a one-part organ keeps its largest 3D component;
  - where classes overlap, the higher logit wins.
Axial slices, the box margin, the slack, the sampling step and the fallbacks were chosen by
measuring on real CT and MR (BENCHMARKS.md, ``benchmarks/sam_refine.py``); see RefineSettings.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from tqdm import tqdm

from medprompt.localization import Localization
from medprompt.memo import Memo
from medprompt.prior import geometry
from medprompt.sam.preprocess import axial_view, from_axial_view, modality_of, to_uint8
from medprompt.sam.segmenter import DECODERS_PER_DEVICE

if TYPE_CHECKING:
    from medprompt.catalog import PromptEntry
    from medprompt.io.volume import Volume
    from medprompt.sam.segmenter import SliceSegmenter

OUTSIDE = -1e4  # logit outside a class's allowed region: never wins, never > 0
FALLBACK = 2.0  # logit magnitude of a localiser's own mask where SAM is not trusted: SAM's confident logits beat it


@dataclass(frozen=True)
class RefineSettings:
    """How localiser regions become prompts and SAM's logits a 3D mask (chosen in BENCHMARKS.md)."""

    margin_mm: float = 2.0  # box margin on each side ...
    margin_frac: float = 0.1  # ... plus this share of the box's own height/width (localisers undershoot big organs)
    keep_within_mm: float = 15.0  # SAM's mask is kept inside the localiser's region grown by this
    step_mm: float = 5.0  # SAM runs on slices about this far apart; the ones between are interpolated
    min_area_mm2: float = 20.0  # smaller parts of a localiser's slice get no box of their own
    min_area_ratio: float = 0.5  # SAM's slice mask below this share of the localiser's: keep the localiser's
    # SAM also on each class's first and last slice; off, they take the nearest drawn slice's logits
    # inside their own boxes: Dice within 0.002 on the three cases, 22 % less cold time on a thin-slice CT.
    draw_ends: bool = False
    # Added to SAM's logits inside the localiser's mask and subtracted outside, so the localiser decides
    # where SAM is unsure. None: 0 on CT (SAM's boundaries win), 8 on MR and other modalities, where
    # LiteMedSAM's boundaries were worse than the prior's (opposed-phase fat-water edges, the bright
    # renal sinus inside a dark kidney) and the prior learns its intensities from the image itself.
    localiser_weight: float | None = None

    def weight_for(self, modality: str) -> float:
        if self.localiser_weight is not None:
            return self.localiser_weight
        return 0.0 if modality == "CT" else 8.0


@dataclass
class Refined:
    """The label map on the input grid and, per class, which stages made it."""

    labels: np.ndarray
    stages: dict[str, str] = field(default_factory=dict)
    encoded_slices: int = 0
    cached_slices: int = 0


def _dilate_work(mask: np.ndarray, spacing: Sequence[float], mm: float) -> np.ndarray:
    """``mask`` grown by ``mm`` (Euclidean, in millimetres) on its own grid, within its padded bounding box."""
    if mm <= 0 or not mask.any():
        return mask
    pad = [int(math.ceil(mm / s)) + 1 for s in spacing]
    idx = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    box = tuple(slice(max(0, i[0] - p), min(n, i[-1] + p + 1)) for i, p, n in zip(idx, pad, mask.shape))
    out = np.zeros_like(mask)
    out[box] = ndi.distance_transform_edt(~mask[box], sampling=spacing) <= mm
    return out


@dataclass
class _ClassRegion:
    """One class on the axial view grid, within the crop its dilated localiser region spans."""

    value: int
    origin: tuple[int, int, int]  # (slice, row, col) of the crop in the view
    seed: np.ndarray  # localiser mask (Z, rows, cols) in the crop
    allowed: np.ndarray  # seed dilated by keep_within_mm


def _to_view_crop(mask: np.ndarray, frame: geometry.WorkFrame) -> tuple[tuple[int, int, int], np.ndarray] | None:
    placed = geometry.upsample_crop(mask, frame)
    if placed is None:
        return None
    box, up = placed
    nx, ny, _ = frame.canonical_shape
    origin = (box[2].start, ny - box[1].stop, nx - box[0].stop)
    return origin, axial_view(up)


def _region(value: int, seed_work: np.ndarray, frame: geometry.WorkFrame, keep_mm: float) -> _ClassRegion | None:
    allowed = _to_view_crop(_dilate_work(seed_work, frame.work_spacing, keep_mm), frame)
    seed = _to_view_crop(seed_work, frame)
    if allowed is None or seed is None:
        return None
    (az, ar, ac), allowed_crop = allowed
    (sz, sr, sc), seed_crop = seed
    placed = np.zeros_like(allowed_crop)
    dz, dr, dc = sz - az, sr - ar, sc - ac
    if min(dz, dr, dc) < 0:  # cannot happen for a dilation; keep the union if rounding ever disagrees
        return _ClassRegion(value, (sz, sr, sc), seed_crop, seed_crop.copy())
    placed[dz : dz + seed_crop.shape[0], dr : dr + seed_crop.shape[1], dc : dc + seed_crop.shape[2]] = seed_crop
    return _ClassRegion(value, (az, ar, ac), placed, allowed_crop | placed)


def slice_boxes(seed: np.ndarray, pixel_mm: tuple[float, float], settings: RefineSettings) -> np.ndarray:
    """One box (x0, y0, x1, y1 in crop pixels, with margin) per connected part of a slice's mask."""
    lab, n = ndi.label(seed, structure=np.ones((3, 3), bool))
    if n == 0:
        return np.zeros((0, 4), np.float32)
    areas = ndi.sum_labels(seed, lab, index=np.arange(1, n + 1)) * pixel_mm[0] * pixel_mm[1]
    keep = [i for i, a in enumerate(areas) if a >= min(settings.min_area_mm2, areas.max())]
    out = []
    for i, sl in enumerate(ndi.find_objects(lab)):
        if i in keep:
            rows, cols = sl
            my = settings.margin_mm / pixel_mm[0] + settings.margin_frac * (rows.stop - rows.start)
            mx = settings.margin_mm / pixel_mm[1] + settings.margin_frac * (cols.stop - cols.start)
            out.append([cols.start - mx, rows.start - my, cols.stop - 1 + mx, rows.stop - 1 + my])
    return np.asarray(out, np.float32)


def sampled_slices(present: np.ndarray, step: int, offset: int = 0, ends: bool = True) -> list[int]:
    """Slices to run SAM on: the localiser's first and last, and those between on a grid of ``step``
    slices that every class shares (``offset`` places this class's crop on it), so classes reuse
    each other's embeddings instead of each needing its own."""
    ks = np.flatnonzero(present)
    if len(ks) == 0:
        return []
    chosen = {int(k) for k in ks if (k + offset) % step == 0}
    if ends or not chosen:
        chosen.update((int(ks[0]), int(ks[-1])))
    return sorted(chosen)


def sampling_step(slice_mm: float, settings: RefineSettings) -> int:
    """Slices between two drawn ones: about ``settings.step_mm`` apart, at least every slice."""
    return max(1, int(round(settings.step_mm / slice_mm)))


def uint8_view(volume: "Volume", canon: np.ndarray, ornt: np.ndarray, modality: str,
               window: tuple | None) -> np.ndarray:
    """The axial uint8 slices LiteMedSAM sees of ``volume`` (``canon``: its data reoriented by ``ornt``),
    kept for the last studies: shared by the prefetch and every later draft. Read-only."""
    def make() -> np.ndarray:
        view = axial_view(to_uint8(canon, modality, window))
        view.flags.writeable = False
        return view

    return _VIEWS.get_or_make((volume.digest, np.asarray(ornt).tobytes(), modality, window), make)


def precompute(volume: "Volume", segmenter_for: Callable, settings: RefineSettings = RefineSettings(),
               progress: bool = False, stop: threading.Event | None = None) -> int:
    """Compute (or find cached) the embeddings a default draft of ``volume`` will ask for first.

    Those are the slices of the shared sampling grid (``sampled_slices``) in the default window,
    with the same pixels :func:`refine` shows LiteMedSAM, so a later draft reads them from the
    cache; slices with nothing in them are skipped. ``stop`` set: ends after the slice in hand
    (a server shutting down). Returns how many slices were prepared.
    """
    canon, ornt, (sx, sy, sz) = geometry.to_canonical(np.asarray(volume.data), volume.affine)
    view = uint8_view(volume, canon, ornt, modality_of(canon, volume.modality), None)
    step = sampling_step(sz, settings)
    wanted = [k for k in range(view.shape[0]) if k % step == 0 and view[k].any()]
    segmenter = segmenter_for(view, (sy, sx))
    if stop is None:
        segmenter.prepare(wanted, progress=progress)
        return len(wanted)
    for done, k in enumerate(wanted):
        if stop.is_set():
            return done
        segmenter.prepare([k])
    return len(wanted)


def _box_region(box: np.ndarray, reach: tuple[float, float], crop: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Slice rows and columns (r0, r1, c0, c1) whose logits a box prompt (x0, y0, x1, y1) is asked for: the
    box grown by ``reach`` (rows, cols) pixels, within ``crop``, as SAM draws its mask in and around the box."""
    x0, y0, x1, y1 = (float(v) for v in box)
    r0, r1, c0, c1 = crop
    return (max(r0, int(math.floor(y0 - reach[0]))), min(r1, int(math.ceil(y1 + reach[0])) + 1),
            max(c0, int(math.floor(x0 - reach[1]))), min(c1, int(math.ceil(x1 + reach[1])) + 1))


def _class_logits(parts: list[tuple[tuple[int, int, int, int], np.ndarray]], origin: tuple[int, int],
                  shape: tuple[int, int]) -> np.ndarray:
    """One class's logits on its crop (``origin`` (row, col), ``shape``) from its boxes' logits, each on its
    own slice region: the highest where regions overlap; beyond every region, the highest of the boxes'
    lowest logits (SAM's "not here" far from a box, so slices between stay as interpolating SAM's would)."""
    out = np.full(shape, max(float(logits.min()) for _, logits in parts), np.float32)
    for (r0, r1, c0, c1), logits in parts:
        sub = out[r0 - origin[0] : r1 - origin[0], c0 - origin[1] : c1 - origin[1]]
        np.maximum(sub, logits, out=sub)
    return out


def _interpolate_missing(logits: np.ndarray, done: list[int]) -> None:
    """Slices between the first and last drawn slice that were not drawn get logits linearly
    interpolated from the nearest drawn slices on either side (in place)."""
    for a, b in zip(done[:-1], done[1:]):
        for k in range(a + 1, b):
            w = (k - a) / (b - a)
            logits[k] = (1 - w) * logits[a] + w * logits[b]


def _extend_ends(logits: np.ndarray, done: list[int], seed: np.ndarray, pixel_mm: tuple[float, float],
                 settings: RefineSettings) -> None:
    """Localiser slices beyond the first and last drawn one take the nearest drawn slice's logits,
    inside their own boxes (in place)."""
    present = np.flatnonzero(seed.any(axis=(1, 2)))
    if not len(present) or not done:
        return
    for k in [*range(int(present[0]), done[0]), *range(done[-1] + 1, int(present[-1]) + 1)]:
        near = done[0] if k < done[0] else done[-1]
        inside = np.zeros(seed.shape[1:], bool)
        for x0, y0, x1, y1 in slice_boxes(seed[k], pixel_mm, settings):
            inside[max(0, int(y0)) : int(np.ceil(y1)) + 1, max(0, int(x0)) : int(np.ceil(x1)) + 1] = True
        logits[k] = np.where(inside, logits[near], OUTSIDE)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """``mask``'s largest 3D connected part (the mask itself when it has one part)."""
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]  # ndi.sum_labels: 7x longer on a liver-sized crop
    return lab == int(np.argmax(sizes)) + 1


# The last studies' windowed uint8 slices (about 1 s to make for a 512x512x200 CT, 52 MB each), so
# drafting a study again reads them instead (medprompt.memo).
_VIEWS: Memo[np.ndarray] = Memo(entries=4)


def refine(
    volume: "Volume",
    loc: Localization,
    entries: Sequence["PromptEntry"],
    segmenter_for: Callable,
    settings: RefineSettings = RefineSettings(),
    progress: bool = False,
) -> Refined:
    """Label map on the input grid (value i+1 for ``entries[i]``) drawn by LiteMedSAM inside ``loc``'s regions.

    ``segmenter_for(slices_uint8, pixel_mm)`` returns a :class:`SliceSegmenter` set to those slices
    (one per intensity window in use). Classes whose prompt file says ``sam.refine: false`` keep
    the localiser's mask.
    """
    frame = loc.frame
    canon = nib.orientations.apply_orientation(np.asarray(volume.data), frame.ornt)
    sx, sy, sz = frame.canonical_spacing
    pixel_mm = (float(sy), float(sx))  # view rows run along y, columns along x
    step = sampling_step(float(sz), settings)
    view_shape = (canon.shape[2], canon.shape[1], canon.shape[0])

    regions: dict[str, _ClassRegion] = {}
    stages: dict[str, str] = {}
    for i, entry in enumerate(entries):
        mask = loc.masks.get(entry.name)
        region = _region(i + 1, mask, frame, settings.keep_within_mm) if mask is not None and mask.any() else None
        if region is None:
            stages[entry.name] = f"{loc.source} (nothing found)"
            continue
        regions[entry.name] = region

    # One uint8 view (and one segmenter) per intensity window in use.
    windows: dict[tuple | None, list[str]] = {}
    for entry in entries:
        if entry.name in regions and entry.sam.get("refine", True):
            w = tuple(entry.sam["window"]) if "window" in entry.sam and loc.modality == "CT" else None
            windows.setdefault(w, []).append(entry.name)
    plans = {name: sampled_slices(regions[name].seed.any(axis=(1, 2)), step, regions[name].origin[0],
                                  settings.draw_ends)
             for names in windows.values() for name in names}

    best = np.zeros(view_shape, np.float32)
    labels = np.zeros(view_shape, np.uint16)
    encoded = cached = 0
    by_name = {e.name: e for e in entries}
    kept: dict[str, int] = {}  # class -> slices where the localiser's mask was kept
    weight = settings.weight_for(loc.modality)
    edge = np.array([view_shape[2] - 1, view_shape[1] - 1] * 2, np.float32)  # boxes stay on the slice
    for window, names in windows.items():
        seg: SliceSegmenter = segmenter_for(uint8_view(volume, canon, frame.ornt, loc.modality, window), pixel_mm)
        wanted = sorted({regions[n].origin[0] + k for n in names for k in plans[n]})
        before = seg.encoded
        seg.prepare(wanted, progress=progress)
        encoded += seg.encoded - before
        cached += len(wanted) - (seg.encoded - before)
        drawn_on: dict[int, list[tuple[str, int]]] = {}
        for name in names:
            for k in plans[name]:
                drawn_on.setdefault(regions[name].origin[0] + k, []).append((name, k))
        all_logits = {name: np.full(regions[name].seed.shape, OUTSIDE, np.float32) for name in names}
        # Slice by slice: the classes drawn on a slice share its decoder context and go through the
        # decoder's transformer together (segmenter.predict_regions), each box's logits computed only
        # within reach of it (_box_region: a rib's box does not upscale the whole skeleton's crop; bone's
        # many boxes made the upscaling a quarter of a round's teacher's time) and merged per class
        # (_class_logits); two slices are decoded at a time (segmenter.DECODERS_PER_DEVICE) while this
        # thread places the finished ones.
        reach = (settings.keep_within_mm / pixel_mm[0], settings.keep_within_mm / pixel_mm[1])
        asks: dict[int, list] = {}
        owners: dict[int, list[tuple[str, int]]] = {}  # the class and crop slice of each ask, in order
        for z in sorted(drawn_on):
            for name, k in drawn_on[z]:
                r = regions[name]
                _, r0, c0 = r.origin
                crop = (r0, r0 + r.seed.shape[1], c0, c0 + r.seed.shape[2])
                boxes = np.clip(slice_boxes(r.seed[k], pixel_mm, settings) + np.array([c0, r0, c0, r0], np.float32),
                                0, edge)
                for box in boxes:
                    asks.setdefault(z, []).append((box[None], _box_region(box, reach, crop)))
                    owners.setdefault(z, []).append((name, k))
        with ThreadPoolExecutor(DECODERS_PER_DEVICE, thread_name_prefix="sam-decoder") as pool:
            decoded = pool.map(lambda z: seg.predict_regions(z, asks[z], [n for n, _ in owners[z]]), sorted(asks))
            for z, outs in tqdm(zip(sorted(asks), decoded), total=len(asks), desc="LiteMedSAM masks", unit="slice",
                                disable=not progress, leave=False):
                placed: dict[tuple[str, int], list] = {}
                for owner, (_, region), drawn_logits in zip(owners[z], asks[z], outs):
                    placed.setdefault(owner, []).append((region, drawn_logits[0].numpy()))
                for (name, k), parts in placed.items():
                    r = regions[name]
                    out = _class_logits(parts, r.origin[1:], r.seed.shape[1:])
                    vote = np.where(r.seed[k], weight, -weight) if weight else 0.0
                    drawn = int(((out + vote > 0) & r.allowed[k]).sum())
                    if drawn < settings.min_area_ratio * int(r.seed[k].sum()):
                        # SAM outlined a small part of what the localiser marks (e.g. the bright renal
                        # sinus inside a dark kidney on T1 MR): keep the localiser's slice instead.
                        out = np.where(r.seed[k], FALLBACK, -FALLBACK).astype(np.float32)
                        kept[name] = kept.get(name, 0) + 1
                    all_logits[name][k] = out
        for name in names:
            r = regions[name]
            logits = all_logits.pop(name)
            _interpolate_missing(logits, plans[name])
            _extend_ends(logits, plans[name], r.seed, pixel_mm, settings)
            if weight:  # each slice's own localiser mask votes, drawn or interpolated (in place: crops are big)
                np.add(logits, weight, out=logits, where=r.seed)
                np.subtract(logits, weight, out=logits, where=~r.seed)
            logits[~r.allowed] = OUTSIDE
            fg = logits > 0
            if not fg.any():
                stages[name] = f"{loc.source} (SAM drew nothing; localiser mask kept)"
                logits = np.where(r.seed, 0.5, OUTSIDE).astype(np.float32)
            else:
                if int(by_name[name].prior.get("components", 0)) == 1:
                    logits[fg & ~largest_component(fg)] = OUTSIDE
                stages[name] = f"{loc.source} + LiteMedSAM"
                if kept.get(name):
                    stages[name] += f" ({loc.source}'s own mask kept on {kept[name]} of {len(plans[name])} slices)"
            _merge(best, labels, logits, r)
    for entry in entries:
        if entry.name in regions and entry.name not in stages:
            r = regions[entry.name]
            _merge(best, labels, np.where(r.seed, 0.5, OUTSIDE).astype(np.float32), r)
            stages[entry.name] = f"{loc.source} (SAM refinement off for this class)"
    labels_canon = from_axial_view(labels, contiguous=False)
    return Refined(labels=np.ascontiguousarray(geometry.canonical_to_input(labels_canon, frame)),
                   stages={e.name: stages[e.name] for e in entries}, encoded_slices=encoded, cached_slices=cached)


def _merge(best: np.ndarray, labels: np.ndarray, logits: np.ndarray, r: _ClassRegion) -> None:
    """Paint ``r``'s class where its logit is positive and beats every class painted so far."""
    z0, r0, c0 = r.origin
    nz, nr, nc = logits.shape
    sl = (slice(z0, z0 + nz), slice(r0, r0 + nr), slice(c0, c0 + nc))
    win = logits > best[sl]
    best[sl][win] = logits[win]
    labels[sl][win] = r.value
