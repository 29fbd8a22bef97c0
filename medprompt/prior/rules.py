"""Turning one prompt entry's attributes into a mask, given the patient's landmarks.

Every rule is the same few radiological facts read from the prompt file: what the structure looks
like (an intensity window, in HU for CT; learned from the image itself at the expected place for
MR), where it lies (millimetres from the spine, right/anterior positive), how big it is, and how
many pieces it has. Erosion splits touching organs of similar intensity, the component with the
most mass where the organ should be wins, and dilation within the window gives the border back.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from scipy import ndimage as ndi

from medprompt.prior.landmarks import Landmarks, grey_mode, mr_min_half


def ball(radius_vox: tuple[int, int, int]) -> np.ndarray:
    """Ellipsoidal structuring element with per-axis radius in voxels (anisotropy aware)."""
    r = [max(0, int(v)) for v in radius_vox]
    grids = np.ogrid[tuple(slice(-v, v + 1) for v in r)]
    dist = sum((g / max(v, 1e-6)) ** 2 if v > 0 else g.astype(float) ** 2 * 1e6 for g, v in zip(grids, r))
    return dist <= 1.0


def spatial_weight(lm: Landmarks, shape, location: Mapping[str, Any]) -> np.ndarray:
    """Gaussian likelihood of the in-plane position, from the [low, high] mm ranges in the prompt file.

    The range is read as a ~95 % interval (mean +- 2 sd), scaled by the patient's body size.
    Height: ``z`` is millimetres above the liver's inferior tip, ``z_hip`` above the hip bones' top, each
    usable when its landmark is in the study. Given both, the nearer landmark is read (the range whose
    middle is closer to it): heights spread with distance, so the bladder is placed from the pelvis and
    a kidney from the liver's tip, and a kidney still has a height when the liver is not in the study.
    """
    x, y = lm.offsets_mm(shape)
    w = np.ones((shape[0], shape[1], 1), np.float32)
    axes = [("x", x), ("y", y)]
    heights = [(key, origin) for key, origin in (("z", lm.liver_tip_z), ("z_hip", lm.hip_top_z))
               if key in location and origin is not None]
    if heights:
        z_key, origin = min(heights, key=lambda h: abs(sum(location[h[0]])))
        z = (np.arange(shape[2], dtype=np.float32) - origin) * lm.spacing[2]
        axes.append((z_key, z[None, None, :]))
    for key, grid in axes:
        if key in location:
            lo, hi = (v * lm.scale for v in location[key])
            mu, sd = (lo + hi) / 2, max((hi - lo) / 4, 5.0)
            w = w * np.exp(-0.5 * ((grid - mu) / sd) ** 2)
    return w


def absent_here(lm: Landmarks, attrs: Mapping[str, Any]) -> bool:
    """A structure of the upper abdomen (``above_pelvis: true``) on a study that ends below it
    (``Landmarks.below_abdomen``): not drawn, whatever of its intensity the pelvis holds at its place."""
    return bool(attrs.get("above_pelvis")) and lm.below_abdomen


def above_the_hips(mask: np.ndarray, lm: Landmarks, attrs: Mapping[str, Any]) -> np.ndarray:
    """An organ of the upper abdomen (``above_pelvis: true``) cut at the hip bones' top, when the study
    shows it (``Landmarks.hip_top_z``): the liver's tip, the kidneys' lower poles and the spleen all end
    above the iliac crests, and the top found lies at or below the crest. What runs on below is bowel or
    muscle of the organ's grey. When that is most of the mask, the organ's grey was learnt where the organ
    is not (a study that starts below its bulk) and nothing of it is kept.
    """
    if not attrs.get("above_pelvis") or lm.hip_top_z is None or not mask.any():
        return mask
    below = int(np.count_nonzero(mask[:, :, : lm.hip_top_z]))
    if below == 0:
        return mask
    if 2 * below >= int(np.count_nonzero(mask)):
        return np.zeros_like(mask)
    out = mask.copy()
    out[:, :, : lm.hip_top_z] = False
    return out


def intensity_window(
    smooth: np.ndarray, cand_region: np.ndarray, lm: Landmarks, attrs: Mapping[str, Any], avoid_fat: bool = True
) -> tuple[float, float] | None:
    """Window of the organ's intensity: the mode near the expected place, +- a robust spread.

    For CT the prompt's HU range bounds the search; for MR (arbitrary units) the mode is taken
    from the image itself, which adapts to the sequence, away from fat's greys (``lm.fat``) unless
    ``avoid_fat`` is False: a flow void may be as dark as suppressed fat.
    """
    fat = lm.fat if avoid_fat else None  # read on MR only (engine)
    ct = attrs.get("ct", {})
    if lm.modality == "CT" and "hu" in ct:
        lo, hi = ct["hu"]
        vals = smooth[cand_region & (smooth >= lo) & (smooth <= hi)]
    else:
        mr = attrs.get("mr", {})
        like = lm.anchors.get(mr.get("like", ""))
        # like: an organ of the same relaxation times (the pancreas has the liver's T1 and T2 at 1.5
        # and 3 T), so of the same intensity on any unenhanced sequence: its window is that organ's.
        vals = smooth[like] if like is not None and like.any() else smooth[cand_region]
        band = mr_band(smooth, lm, mr)
        if band is None:
            return None
        lo, hi = band
        vals = vals[(vals >= lo) & (vals <= hi)]
        if fat is not None:  # no organ has fat's grey where fat's grey is apart from the organs' (fat_grey)
            vals = vals[(vals < fat[0]) | (vals > fat[1])]
    if vals.size < 20:
        return None
    mode, sd, hist, edges = grey_mode(vals)
    tol = float(ct.get("tol", [2.5])[0]) if lm.modality == "CT" and "tol" in ct else 2.5
    min_half = 30.0 if lm.modality == "CT" else mr_min_half(smooth, lm.body)
    half = max(tol * sd, min_half)
    top = mode + half
    if lm.modality == "CT" and ct.get("cortex"):
        cortex = cortex_grey(vals, hist, edges, mode, min_half)
        if cortex is not None:
            top = cortex + min_half
    if fat is not None:
        lo, hi = (max(lo, fat[1]), hi) if mode > fat[1] else (lo, min(hi, fat[0]))
    return max(lo, mode - half), min(hi, top)


LIVER_MARGIN = 0.1  # greys within 10 % of the liver's are the liver's, not those of an organ that differs from it


def mr_band(smooth: np.ndarray, lm: Landmarks, mr: Mapping[str, Any]) -> tuple[float, float] | None:
    """The greys an MR organ's window is searched in; None when the study has no body to place it in.

    ``vs_liver: longer``: T1 and T2 longer than the liver's (the spleen, fluid), so darker than the liver on a
    T1-weighted series and brighter on a T2-weighted one (``Landmarks.weighting``); ``shorter`` the other way
    round. The liver (``lm.anchors``, found first by the engine) holds its place on either. ``weightings`` (default
    both) names where the band is read: a kidney is 2-3 times the liver's grey on T2 but 0.8 of it on T1, within
    ``LIVER_MARGIN`` of the band's edge, which would cut it. ``rel``: a fixed band
    of the body's intensity distribution (quantiles), for a grey that does not depend on the weighting (flow
    voids, bright inflow). Neither: any grey.
    """
    if "rel" in mr or "vs_liver" in mr:
        if not lm.body.any():
            return None  # a blank study: no body, no distribution to place the organ in
    if "rel" in mr:
        q = np.percentile(smooth[lm.body], [1, 99])
        lo, hi = q[0] + np.array(mr["rel"]) * (q[1] - q[0])
        return float(lo), float(hi)
    liver = lm.anchors.get("liver")
    if "vs_liver" in mr and lm.weighting in mr.get("weightings", ["T1", "T2"]) and liver is not None and liver.any():
        grey = float(np.median(smooth[liver]))
        if (lm.weighting == "T2") == (mr["vs_liver"] == "longer"):
            return grey * (1 + LIVER_MARGIN), np.inf
        return -np.inf, grey * (1 - LIVER_MARGIN)
    return -np.inf, np.inf


def cortex_grey(vals: np.ndarray, hist: np.ndarray, edges: np.ndarray, mode: float, half: float) -> float | None:
    """The grey of an organ's enhancing cortex, when it shows one: the brightest peak of the (smoothed)
    histogram ``hist`` at least two half-windows above the main ``mode`` with 15 % of ``vals`` within a
    half-window of it. In the arterial phase a kidney's cortex (150-250 HU) is far brighter than its medulla
    (60-110 HU), and the medulla (with the psoas beside it) holds the mode; a window about the mode alone
    leaves the thin cortex out, and the kidney, once eroded, is lost. None when there is no such peak
    (unenhanced, or a nephrographic phase: one grey)."""
    centres = (edges[:-1] + edges[1:]) / 2
    peaks = [i for i in range(1, len(hist) - 1)
             if hist[i] >= hist[i - 1] and hist[i] >= hist[i + 1] and centres[i] >= mode + 2 * half]
    held = [centres[i] for i in peaks if np.mean(np.abs(vals - centres[i]) < half) >= 0.15]
    return max(held) if held else None


def organ(smooth: np.ndarray, lm: Landmarks, attrs: Mapping[str, Any], taken: np.ndarray) -> np.ndarray:
    """The generic organ rule (see module docstring)."""
    shape = smooth.shape
    if absent_here(lm, attrs):
        return np.zeros(shape, bool)
    w = spatial_weight(lm, shape, attrs.get("location", {}))
    region = lm.body & ~taken & ~lm.lungs
    seed = region & (w > 0.6)
    if "z" not in attrs.get("location", {}) and lm.upper_z is not None:
        # No height anchor of its own (the liver): learn its intensity in the upper abdomen, not in
        # pelvic slices where bowel fills the same in-plane place.
        seed[:, :, : lm.upper_z[0]] = False
        seed[:, :, lm.upper_z[1] :] = False
    window = intensity_window(smooth, seed, lm, attrs)
    if window is None:
        return np.zeros(shape, bool)
    cand = region & (smooth >= window[0]) & (smooth <= window[1]) & (w > 0.02)
    if "near" in attrs and lm.anchors.get(attrs["near"]) is not None:
        # e.g. the gallbladder sits in the liver's fossa: only within a centimetre of the liver.
        reach = tuple(max(1, int(round(12.0 / s))) for s in lm.spacing)
        cand &= dilate(lm.anchors[attrs["near"]], ball(reach))
    r_mm = float(attrs.get("erode_mm", 5.0))
    # A slab of a few slices (a 3-slice series, a thick-slab MR) cannot be eroded through its
    # thickness without erasing everything: erode along an axis at most a quarter of its extent.
    rad = tuple(min(int(round(r_mm / s)), max(0, (n - 1) // 4)) for s, n in zip(lm.spacing, shape))
    se = ball(rad)
    core = ndi.binary_erosion(cand, structure=se) if any(rad) else cand
    lab, n = ndi.label(core)
    if n == 0:
        return np.zeros(shape, bool)
    score = component_sums(w, lab, n)
    voxel_ml = float(np.prod(lm.spacing)) / 1000
    vmin, vmax = attrs.get("volume_ml", [0, np.inf])
    keep = []
    order = np.argsort(score)[::-1]
    for c in order[: int(attrs.get("components", 1))]:
        if score[c] <= 0:
            continue
        keep.append(c + 1)
    chosen = np.isin(lab, keep)
    mask = dilate(chosen, se) & cand if any(rad) else chosen
    mask = above_the_hips(mask, lm, attrs)
    mask = trim_thin_ends(fill_holes(mask))
    if mask.sum() * voxel_ml > vmax:
        mask = trim_to_volume(mask, np.broadcast_to(w, shape), int(vmax / voxel_ml))
    # Too small to be the organ, unless the scan covers only a slab of it (organs span 60-200 mm).
    coverage = min(1.0, shape[2] * lm.spacing[2] / 150.0)
    if mask.sum() * voxel_ml < 0.1 * vmin * coverage:
        return np.zeros(shape, bool)
    return mask


def trim_thin_ends(mask: np.ndarray, frac: float = 0.05, neck: float = 0.15) -> np.ndarray:
    """Cut the organ along z where it becomes a sliver or passes through a narrow neck.

    Walking up and down from the largest cross-section, the organ ends at the first slice
    smaller than ``frac`` of the largest, or at a neck (a local minimum under ``neck`` of the
    largest after which the area doubles): a solid organ tapers once; a leak into a neighbour
    of the same density (psoas, abdominal wall, bowel) narrows and widens again.
    """
    area = mask.sum(axis=(0, 1)).astype(float)
    if area.max() == 0:
        return mask
    top = int(np.argmax(area))
    keep = [top, top]
    for direction, end in ((-1, -1), (1, len(area))):
        k, run_min, run_k = top, area[top], top
        last = top
        while True:
            k += direction
            if k == end or area[k] < frac * area[top]:
                break
            if area[k] < run_min:
                run_min, run_k = area[k], k
            elif run_min < neck * area[top] and area[k] > 2 * run_min:
                last = run_k
                break
            last = k
        keep[0 if direction < 0 else 1] = last
    out = mask.copy()
    out[:, :, : keep[0]] = False
    out[:, :, keep[1] + 1 :] = False
    return out


def trim_to_volume(mask: np.ndarray, weight: np.ndarray, max_voxels: int) -> np.ndarray:
    """Drop the least likely voxels (by position) of an oversized mask, keep the largest piece.

    An organ several times its largest plausible size has leaked into a neighbour of the same
    intensity; the leak is where the organ is not expected.
    """
    vals = weight[mask]
    cut = np.partition(vals, len(vals) - max_voxels)[len(vals) - max_voxels]
    trimmed = mask & (weight >= cut)
    lab, n = ndi.label(trimmed)
    if n > 1:
        sizes = component_sums(trimmed, lab, n)
        trimmed = lab == (int(np.argmax(sizes)) + 1)
    return trimmed


def component_sums(values: np.ndarray, lab: np.ndarray, n: int) -> np.ndarray:
    """Sum of ``values`` (broadcast to ``lab``'s shape) over each of components 1..n: ``ndimage.sum``
    visiting the labelled voxels only, with no full-volume copy of a broadcast weight."""
    fg = lab > 0
    return np.bincount(lab[fg], weights=np.broadcast_to(values, lab.shape)[fg], minlength=n + 1)[1:]


def bounding_box(mask: np.ndarray, margin: tuple[int, ...] | int = 0) -> tuple[slice, ...] | None:
    """Slices of ``mask``'s bounding box grown by ``margin`` voxels per axis (clipped); None when empty."""
    margin = (margin,) * mask.ndim if isinstance(margin, int) else margin
    box = []
    for ax, m in enumerate(margin):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        if idx.size == 0:
            return None
        box.append(slice(max(int(idx[0]) - m, 0), min(int(idx[-1]) + 1 + m, mask.shape[ax])))
    return tuple(box)


def dilate(mask: np.ndarray, se: np.ndarray) -> np.ndarray:
    """``binary_dilation(mask, se)`` computed on the mask's bounding box grown by the element's reach:
    the same voxels, without visiting the rest of the volume (an organ is a small part of a scan)."""
    box = bounding_box(mask, tuple(n // 2 for n in se.shape))
    out = np.zeros_like(mask, dtype=bool)
    if box is not None:
        out[box] = ndi.binary_dilation(mask[box], structure=se)
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed holes (vessels, lesions) in 3D and then per axial slice.

    As ``binary_fill_holes`` (background connected face-to-face to the border stays; in 3D, then
    within each slice), but by labelling the background of the mask's bounding box once per pass
    instead of growing it from the border one voxel per iteration: 10x faster on organ masks.
    """
    box = bounding_box(mask)
    if box is None:
        return mask.copy()
    crop = np.pad(mask[box], 1)  # a background ring: everything outside the box reaches the border
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, :, 1] = ndi.generate_binary_structure(2, 1)
    for structure, faces in ((None, (0, 1, 2)), (in_plane, (0, 1))):
        lab, _ = ndi.label(~crop, structure=structure)
        border = np.unique(np.concatenate([np.take(lab, i, axis=a).ravel() for a in faces for i in (0, -1)]))
        crop = crop | ~np.isin(lab, border)
    out = np.zeros_like(mask, dtype=bool)
    out[box] = crop[1:-1, 1:-1, 1:-1]
    return out


def body(smooth: np.ndarray, lm: Landmarks, attrs: Mapping[str, Any], taken: np.ndarray) -> np.ndarray:
    return lm.body.copy()


def lungs(smooth: np.ndarray, lm: Landmarks, attrs: Mapping[str, Any], taken: np.ndarray) -> np.ndarray:
    return lm.lungs.copy()


CANCELLOUS_REACH_MM = 10.0  # in-plane reach of low-density trabecular bone from the dense bone around it


def bone(smooth: np.ndarray, lm: Landmarks, attrs: Mapping[str, Any], taken: np.ndarray) -> np.ndarray:
    """Bone on CT: dense bone by its HU (``ct.hu``: cortex and trabecular bone of normal density), opened
    so that isolated bright voxels do not count; then trabecular bone of low density (``ct.cancellous_hu``)
    where it is reached from that dense bone within CANCELLOUS_REACH_MM in the slice's plane, through
    voxels of that density.

    Why: the marrow spaces of the vertebral bodies, pelvis and ribs of older patients measure only
    120-180 HU (half of ct_abdomen_a's reference bone is below 180 HU), so a single cut found one bone
    voxel in five there. A second, global cut at 120 HU would take in enhanced vessels and organs; low
    density is bone only inside or against its denser shell. The 120 HU floor lies above
    portal-venous liver and spleen (about 100-120 HU), so an enhanced organ touching a rib stays out;
    enhanced blood (150-450 HU) is not, so the growth does not enter ``taken`` (the catalog's
    ``exclude``: the aorta, which lies against the vertebral bodies).
    """
    if lm.modality != "CT":
        return np.zeros_like(lm.body)
    ct = attrs.get("ct", {})
    lo, hi = ct.get("hu", [180, 3000])
    mask = ndi.binary_opening((smooth >= lo) & (smooth <= hi) & lm.body)
    if "cancellous_hu" not in ct:
        return mask
    c_lo, c_hi = ct["cancellous_hu"]
    reach = (smooth >= c_lo) & (smooth <= max(c_hi, hi)) & lm.body & ~taken
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, :, 1] = True
    steps = int(round(CANCELLOUS_REACH_MM / max(lm.spacing[0], lm.spacing[1])))
    if steps < 1:  # iterations=0 would mean "until nothing changes"
        return mask
    # Geodesic growth: one in-plane voxel per step, only into voxels of bone density (``mask=``: the rest,
    # dense bone in ``taken`` included, keeps its value).
    return ndi.binary_dilation(mask, structure=in_plane, iterations=steps, mask=reach)


FLOW_WINDOWS = ([0.0, 0.15], [0.45, 1.0])  # flow void / bright blood, as fractions of the body's intensity range


def vessel(smooth: np.ndarray, lm: Landmarks, attrs: Mapping[str, Any], taken: np.ndarray) -> np.ndarray:
    """Great vessels as a tube: per-slice round blob at the expected place, centre line smoothed.

    Without contrast the aorta and vena cava have the density of the liver and the crura they
    touch, so intensity alone leaks; a tube of plausible radius along a smooth centre line does not.
    On MR, fast arterial flow (``mr: {flow: fast}``) is not tissue-grey: a flow void on spin-echo
    sequences, bright on gradient-echo inflow or after contrast. The dark and the bright window are
    tried besides the tissue mode, and the tube that runs through more slices and stands out more
    from its surroundings wins.
    """
    shape = smooth.shape
    if absent_here(lm, attrs):
        return np.zeros(shape, bool)
    w = np.broadcast_to(spatial_weight(lm, shape, attrs.get("location", {})), shape)
    region = lm.body & ~lm.lungs
    seed = region & (w > 0.6)
    tries, avoid = [attrs], (True,)
    if lm.modality != "CT" and attrs.get("mr", {}).get("flow") == "fast":
        # A flow void is as dark as suppressed fat on some series and darker on others: each window is tried
        # away from fat's greys and not.
        tries, avoid = [attrs, *({**attrs, "mr": {"rel": rel}} for rel in FLOW_WINDOWS)], (True, False)
    windows = [intensity_window(smooth, seed, lm, a, avoid_fat=av) for a in tries for av in avoid]
    best, best_score = np.zeros(shape, bool), -1.0
    for window in windows:
        if window is None:
            continue
        cand = region & (smooth >= window[0]) & (smooth <= window[1]) & (w > 0.05)
        mask = _tube(cand, w, lm, attrs)
        score = _tube_score(mask, cand) if len(windows) > 1 else 0.0
        if score > best_score:
            best, best_score = mask, score
    return best


def _tube(cand: np.ndarray, w: np.ndarray, lm: Landmarks, attrs: Mapping[str, Any]) -> np.ndarray:
    """The vessel within one intensity window's candidates (see :func:`vessel`)."""
    shape = cand.shape
    r_lo, r_hi = attrs.get("radius_mm", [7.0, 15.0])
    px_mm2 = lm.spacing[0] * lm.spacing[1]
    # Erode only when a voxel is small against the vessel: on coarse grids erosion erases it.
    erode = r_lo / max(lm.spacing[0], lm.spacing[1]) >= 2.5
    # In-plane erosion of every slice at once (the element is one slice thick).
    eroded = ndi.binary_erosion(cand, structure=ball((1, 1, 0))) if erode else cand
    min_area = 0.3 * np.pi * r_lo**2
    centres = np.full((shape[2], 2), np.nan)
    radii = np.full(shape[2], np.nan)
    for k in range(shape[2]):
        lab, n = ndi.label(eroded[:, :, k])
        if n == 0:
            continue
        score = component_sums(w[:, :, k], lab, n)
        best = int(np.argmax(score)) + 1
        pts = np.argwhere(lab == best)
        # A blob that is small or mostly away from the expected place is not the vessel.
        if len(pts) * px_mm2 < (min_area / 3 if erode else min_area) or score[best - 1] < 0.2 * len(pts):
            continue
        centres[k] = pts.mean(0)
        area = len(pts) * px_mm2
        if erode:
            area += 2 * np.sqrt(area * np.pi) * lm.spacing[0]  # give back the eroded rim
        radii[k] = np.sqrt(area / np.pi)
    ok = np.isfinite(radii)
    if ok.sum() < 2:
        return np.zeros(shape, bool)
    ks = np.arange(shape[2])
    cz = ndi.median_filter(np.where(ok, 1, 0), size=3, mode="nearest") > 0  # drop isolated slices
    cx = ndi.median_filter(np.interp(ks, ks[ok], centres[ok, 0]), size=5, mode="nearest")
    cy = ndi.median_filter(np.interp(ks, ks[ok], centres[ok, 1]), size=5, mode="nearest")
    r = float(np.clip(np.median(radii[ok]), r_lo, r_hi))
    i = np.arange(shape[0])[:, None] * lm.spacing[0]
    j = np.arange(shape[1])[None, :] * lm.spacing[1]
    mask = np.zeros(shape, bool)
    for k in np.flatnonzero(cz & ok):
        disk = (i - cx[k] * lm.spacing[0]) ** 2 + (j - cy[k] * lm.spacing[1]) ** 2 <= r**2
        mask[:, :, k] = disk & cand[:, :, k]
    # Keep the longest run along z: the vessel is one continuous tube.
    lab, n = ndi.label(mask)
    if n > 1:
        sizes = component_sums(mask, lab, n)
        mask = lab == (int(np.argmax(sizes)) + 1)
    return mask


def _tube_score(mask: np.ndarray, cand: np.ndarray) -> float:
    """How much a found tube looks like a vessel: slices it runs through, times how little of a
    two-voxel ring around it shares its intensity window (a piece of a larger tissue has a full ring)."""
    slices = np.flatnonzero(mask.any(axis=(0, 1)))
    if slices.size == 0:
        return 0.0
    ring = [cand[:, :, k][ndi.binary_dilation(mask[:, :, k], iterations=2) & ~mask[:, :, k]].mean() for k in slices]
    return float(slices.size * (1.0 - np.mean(ring)))


RULES = {"organ": organ, "vessel": vessel, "body": body, "lungs": lungs, "bone": bone}
