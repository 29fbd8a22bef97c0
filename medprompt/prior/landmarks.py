"""Patient landmarks that every organ rule is expressed against: body, spine, lungs, modality.

Organ positions are remarkably stable in millimetres from the spine (checked on CT and MR of
different patients), far more than in fractions of the field of view, which is often cropped.
So the frame is: origin at the spinal column's centre in the axial plane, +x patient right,
+y anterior, millimetres, scaled mildly by body size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from medprompt.io.volume import looks_like_hu

TYPICAL_AP_MM = 240.0  # adult abdominal anterior-posterior diameter, to scale organ offsets
LUNG_SLICE_MM2 = 500.0  # 5 cm^2 of lung makes a slice part of the chest


@dataclass
class Landmarks:
    """What the organ rules need to know about this patient, all on the working grid."""

    modality: str
    body: np.ndarray  # bool
    spine_xy: tuple[np.ndarray, np.ndarray]  # per axial slice, voxel (i, j) of the spinal column centre
    scale: float  # body size relative to a typical adult
    lungs: np.ndarray  # bool, air in the chest (empty outside the thorax)
    spacing: tuple[float, float, float]
    upper_z: tuple[int, int] | None = None  # slices of the upper abdomen (where the liver is seeded)
    liver_tip_z: float | None = None  # slice index of the liver's inferior tip, when in the scan
    hip_top_z: int | None = None  # top slice of the hip bones, when the study reaches above them (CT)
    below_abdomen: bool = False  # the study ends below the upper abdomen: within 85 mm above the hip bones
    anchors: dict = field(default_factory=dict)  # organ masks other rules refer to ("near: liver")
    weighting: str | None = None  # MR: "T1" or "T2", read from the image before the classes are drawn (engine)
    fat: tuple[float, float] | None = None  # MR: fat's greys, which no organ takes (``fat_grey``; engine)
    depth: np.ndarray | None = None  # MR: ``skin_depth(body, spacing)``, kept from the coil field's reading

    def offsets_mm(self, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Per-voxel (x right, y anterior) millimetre offsets from the spine, as broadcastable grids."""
        x = (np.arange(shape[0], dtype=np.float32)[:, None] - self.spine_xy[0][None, :]) * self.spacing[0]
        y = (np.arange(shape[1], dtype=np.float32)[:, None] - self.spine_xy[1][None, :]) * self.spacing[1]
        return x[:, None, :], y[None, :, :]


def guess_modality(data: np.ndarray, declared: str | None) -> str:
    """CT when declared or when the values look like Hounsfield units (air near -1000)."""
    if declared:
        d = declared.upper()
        if d in ("CT", "MR"):
            return d
        if d in ("MRI", "MR"):
            return "MR"
    return "CT" if looks_like_hu(data) else "MR"


def body_mask(data: np.ndarray, modality: str) -> np.ndarray:
    """The patient: foreground threshold, largest component, holes (bowel gas, lungs) filled per slice."""
    if modality == "CT":
        fg = data > -400
    else:
        lo, hi = np.percentile(data, [2, 98])
        fg = data > lo + 0.08 * (hi - lo)
    fg = ndi.binary_opening(fg, structure=np.ones((3, 3, 1), bool))
    lab, n = ndi.label(fg)
    if n == 0:
        return fg
    sizes = ndi.sum(fg, lab, index=np.arange(1, n + 1))
    body = lab == (int(np.argmax(sizes)) + 1)
    for k in range(body.shape[2]):
        body[:, :, k] = ndi.binary_fill_holes(body[:, :, k])
    return body


def tube_spread(slice_mm: float) -> float | None:
    """Largest grey spread (HU, max - min) along 40 mm that still reads as one vessel's blood, for slices
    ``slice_mm`` apart; None where the test cannot tell a vessel from a vertebra.

    Up to 4 mm some slice lies within each disc, and the column dips there by far more than 40 HU. Slices of
    5-6 mm (the common clinical reconstruction) average each disc with bone, and osteoporotic bone (130-170
    HU) dips less: ct_abdomen_a in 6 mm slices has 165 column voxels of spread under 40 HU, 16 under 20,
    while 80 % of its enhanced vessels' voxels stay under 20. Thicker slices blur the discs away: no test.
    """
    if slice_mm <= 4.0:
        return 40.0
    if slice_mm <= 6.5:
        return 20.0
    return None


def spine_centre(data: np.ndarray, body: np.ndarray, modality: str, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice axial centre of the spinal column in voxels (i right-ward, j anterior-ward).

    Per slice, because lordosis moves the column by centimetres along the abdomen and the
    aorta hugs it. CT: dense bone near the posterior midline, smoothed along z and filled in
    where a slice has none. MR (bone is not bright): the body's left-right centre and a fixed
    fraction of its anterior-posterior depth.
    """
    nz = data.shape[2]
    idx = np.argwhere(body)
    if len(idx) == 0:
        return np.full(nz, data.shape[0] / 2, np.float32), np.full(nz, data.shape[1] / 2, np.float32)
    i_lo, i_hi = np.percentile(idx[:, 0], [1, 99])
    j_lo, j_hi = np.percentile(idx[:, 1], [1, 99])
    i_mid = (i_lo + i_hi) / 2
    fallback = (np.full(nz, i_mid, np.float32), np.full(nz, j_lo + 0.3 * (j_hi - j_lo), np.float32))
    if modality != "CT":
        return fallback
    # Cancellous vertebral bone is often only 120-200 HU in older patients; a higher cut keeps
    # just the posterior elements and pulls the centre backwards.
    bone = (data > 130) & body
    # Contrast-enhanced blood (aorta, vena cava: 130-400 HU in any phase) passes that cut too, and
    # where the vertebrae are sparse at it (osteoporosis) it pulls the centre forwards by centimetres.
    # Vessels run along the body and their blood is one grey; a vertebra's bone is broken by a disc
    # (8-12 mm) every 35-40 mm. So a point dense and of one grey (``tube_spread``) all along the 40 mm
    # around it is a vessel's lumen, and the ring next to it its wall.
    spread_hu = tube_spread(float(spacing[2]))
    if spread_hu is not None:
        size = 2 * max(1, int(round(20.0 / spacing[2]))) + 1
        along = ndi.uniform_filter1d(bone.astype(np.float32), size=size, axis=2, mode="constant")
        spread = (ndi.maximum_filter1d(data, size=size, axis=2, mode="nearest")
                  - ndi.minimum_filter1d(data, size=size, axis=2, mode="nearest"))
        tubes = ndi.binary_dilation((along >= 0.999) & (spread < spread_hu), structure=np.ones((3, 3, 1), bool))
        bone &= ~tubes
    half_w = 45.0 / spacing[0]
    i = np.arange(data.shape[0])[:, None]
    j = np.arange(data.shape[1])[None, :]
    window = (np.abs(i - i_mid) < half_w) & (j < (j_lo + 0.6 * (j_hi - j_lo)))
    ci = np.full(nz, np.nan)
    cj = np.full(nz, np.nan)
    min_vox = 150.0 / (spacing[0] * spacing[1])  # a vertebral cross-section is several cm^2
    depth = body.any(axis=0)  # (j, k): the body's anterior-posterior extent per slice
    for k in range(nz):
        pts = np.argwhere(bone[:, :, k] & window)
        if len(pts) < min_vox:
            continue
        c0 = np.median(pts[:, 0])
        near = pts[np.abs(pts[:, 0] - c0) < 30.0 / spacing[0]]
        rows = np.flatnonzero(depth[:, k])
        centre_j = np.median(near[:, 1])
        if centre_j > rows[0] + 0.5 * (rows[-1] - rows[0]):
            # The column lies in the back half of the body: below the sacrum, midline bone in front of
            # that is the pubic symphysis (in front of the bladder); the column is carried from above.
            continue
        ci[k], cj[k] = np.median(near[:, 0]), centre_j
    ok = np.isfinite(ci)
    if ok.sum() < max(1, nz // 10):
        return fallback
    ks = np.arange(nz)
    out = []
    for c in (ci, cj):
        filled = np.interp(ks, ks[ok], c[ok])
        # Median then mean along z: robust to a rib or the pelvis captured in a single slice.
        sz = max(1, int(round(15.0 / spacing[2])))
        filled = ndi.median_filter(filled, size=2 * sz + 1, mode="nearest")
        out.append(ndi.uniform_filter1d(filled, size=sz + 1, mode="nearest").astype(np.float32))
    return out[0], out[1]


def body_scale(body: np.ndarray, spacing) -> float:
    """Anterior-posterior body depth relative to a typical adult, clipped to a sane range."""
    per_slice = body.any(axis=0)  # (j, k)
    depth = per_slice.sum(axis=0).astype(float) * spacing[1]
    depth = depth[depth > 0]
    if len(depth) == 0:
        return 1.0
    return float(np.clip(np.percentile(depth, 75) / TYPICAL_AP_MM, 0.75, 1.3))


def lung_mask(data: np.ndarray, body: np.ndarray, modality: str, spacing) -> np.ndarray:
    """Lungs on CT: air inside the body that is either very large, or reaches the top of the scan
    from the back of the body with the density of aerated lung rather than of gas.

    A supine patient's bowel and stomach gas rises to the front and is nearly pure air
    (about -1000 HU); lung bases sit in the posterior recesses at about -850 HU.
    """
    if modality != "CT":
        return np.zeros_like(body)
    air = (data < -500) & body
    air = ndi.binary_opening(air, iterations=1)
    lab, n = ndi.label(air)
    if n == 0:
        return air
    out = np.zeros_like(air)
    voxel_ml = float(np.prod(spacing)) / 1000
    objs = ndi.find_objects(lab)
    sizes = ndi.sum(air, lab, index=np.arange(1, n + 1))
    medians = ndi.median(data, lab, index=np.arange(1, n + 1))
    j_body = np.argwhere(body.any(axis=(0, 2)))
    j_mid = float(j_body.mean()) if len(j_body) else data.shape[1] / 2
    for comp, (sl, size, med) in enumerate(zip(objs, sizes, medians), start=1):
        ml = size * voxel_ml
        if ml > 400:
            out |= lab == comp
            continue
        top = sl[2].stop >= data.shape[2] - 1
        if ml > 20 and top and med > -970:
            j_centre = float(np.argwhere(lab[sl] == comp)[:, 1].mean()) + sl[1].start
            if j_centre < j_mid:  # posterior half (j grows anteriorly in RAS)
                out |= lab == comp
    return out


def lung_slices(lungs: np.ndarray, spacing) -> np.ndarray:
    """Indices of the slices that are part of the chest (LUNG_SLICE_MM2 of lung or more)."""
    return np.flatnonzero(lungs.sum(axis=(0, 1)) * spacing[0] * spacing[1] > LUNG_SLICE_MM2)


def upper_abdomen(lungs: np.ndarray, body: np.ndarray, spacing, depth_mm: float = 75.0,
                  hip_top: int | None = None) -> tuple[int, int]:
    """Slices where the liver should dominate the right upper quadrant: just below the lung bases
    when lungs are in the scan, else the top of an abdominal scan (which starts at the diaphragm),
    but not within 60 mm above the hip bones' top ``hip_top``: the iliac crests lie at L4, the liver's
    tip one or two vertebrae higher and its bulk higher still (the top found may lie up to 30 mm below
    the crest, where older patients' bone is less dense). Empty (lo == hi) when the study does not reach
    it by 25 mm: the liver's grey is not learnt from a sliver at the study's edge.
    """
    nz = body.shape[2]
    span = int(round(depth_mm / spacing[2]))
    with_lung = lung_slices(lungs, spacing)
    if len(with_lung):
        base = int(with_lung[0])
        return max(0, base - span), min(nz, base + int(round(30.0 / spacing[2])))
    has_body = np.flatnonzero(body.any(axis=(0, 1)))
    top = int(has_body[-1]) + 1 if len(has_body) else nz
    lo = max(0, top - span)
    if hip_top is not None:
        lo = max(lo, min(top, hip_top + int(round(60.0 / spacing[2]))))
        if (top - lo) * spacing[2] < 25.0:  # a sliver at the study's edge: no window to learn there
            lo = top
    return lo, top


def hip_bones(data: np.ndarray, body: np.ndarray, spine_xy, lungs: np.ndarray, spacing, scale: float) -> int | None:
    """The top slice of the hip bones on a CT, sought below the lungs; None when they are not found.

    Two uses. Without lungs in the scan the upper abdomen is taken to begin at the top of the study
    (:func:`upper_abdomen`), so a pelvic CT asked for the liver would find one among bowel and muscle;
    and the bladder's height is better read from the pelvis than from the liver's tip (``z_hip``).
    The hip bones tell where the study lies: beside the spine on each side, one large piece of bone
    density that is broad in the axial plane somewhere (the iliac wing) and wrapped in muscle
    (iliacus within, the glutei without). Bone density is 150 HU, as the iliac wings of older patients
    are not denser; what else reaches it beside the spine is told apart: a rib is small, an arm lies
    further out, and an enhanced kidney (150-250 HU) lies in fat. Only slices below the lungs are
    searched, so a scapula beside the chest is never taken for a hip bone.
    """
    with_lung = lung_slices(lungs, spacing)
    below_lungs = int(with_lung[0]) if len(with_lung) else data.shape[2]
    if below_lungs < 2:
        return None
    x = (np.arange(data.shape[0], dtype=np.float32)[:, None] - spine_xy[0][None, :]) * spacing[0]  # (i, k)
    lateral = np.abs(x) > 40.0  # the sacrum and the vertebrae stay out
    in_plane = np.ones((3, 3, 1), bool)
    bone = ndi.binary_opening((data >= 150.0) & body, structure=in_plane) & lateral[:, None, :]
    bone[:, :, below_lungs:] = False
    lab, _ = ndi.label(bone, structure=np.ones((3, 3, 3), bool))
    sizes_ml = np.bincount(lab.ravel()) * float(np.prod(spacing)) / 1000
    tops: dict[int, list[int]] = {1: [], -1: []}  # side -> top slices of its hip bone pieces
    for comp, sl in enumerate(ndi.find_objects(lab), start=1):
        if sizes_ml[comp] < 50.0 * scale**3:
            continue
        # The piece on its box grown by the 5 mm shell the wrapping is read in.
        box = tuple(slice(max(0, a.start - 2), a.stop + 2) for a in sl[:2]) + (sl[2],)
        piece = lab[box] == comp
        side = float(np.median(np.broadcast_to(x[box[0], None, box[2]], piece.shape)[piece]))
        if abs(side) > 150.0 * scale:  # an arm at the body's side
            continue
        broad = max(
            float(np.hypot(*(np.ptp(np.argwhere(piece[:, :, k]), axis=0) * spacing[:2])))
            for k in range(piece.shape[2]) if piece[:, :, k].any()
        )
        shell = ndi.binary_dilation(piece, structure=in_plane, iterations=2) & ~piece & body[box]
        fat = float(np.mean(data[box][shell] < -30.0)) if shell.any() else 1.0
        if broad >= 80.0 and fat <= 0.3:
            tops[1 if side > 0 else -1].append(sl[2].stop - 1)
    return min(max(tops[1]), max(tops[-1])) if tops[1] and tops[-1] else None


UNDER_SKIN_MM = (2.0, 12.0)  # the layer right under the skin: subcutaneous fat, thin patients' included; organs
# against the abdominal wall lie behind its muscles
DEEP_MM = 20.0  # deeper than the abdominal wall
FLUID_OVER_LIVER = 2.0  # fluid (T2 500-4000 ms) against the liver (46 ms) on T2: 3-10 times; on T1 only fat reaches 2
FLUID_OVER_FAT = 1.15  # deep fat against the fat under the skin, one tissue: 0.7-1.05 (brightest deep voxels against
# the layer's 90th percentile); fluid against fat on T2 without fat suppression: 1.2-3


FAT_APART = (0.5, 1.5)  # fat's grey against the liver's where no organ shares it: suppressed fat under half of it
# (made and real: 0.25-0.3), T1 fat over 1.5 times (2-5); the organs, and muscle (thin patients' layer), 0.6-1.2 on T1


def grey_mode(vals: np.ndarray) -> tuple[float, float, np.ndarray, np.ndarray]:
    """The commonest grey of ``vals`` (smoothed 64-bin histogram), the robust spread of the values near it, and
    the histogram with its edges: one tissue's level and width among others'."""
    hist, edges = np.histogram(vals, bins=64)
    hist = ndi.gaussian_filter1d(hist.astype(float), 1.5)
    mode = float((edges[np.argmax(hist)] + edges[np.argmax(hist) + 1]) / 2)
    near = vals[np.abs(vals - mode) < (np.percentile(vals, 75) - np.percentile(vals, 25) + 1e-3)]
    sd = 1.4826 * float(np.median(np.abs(near - np.median(near)))) if near.size else 0.0
    return mode, sd, hist, edges


def fat_grey(smooth: np.ndarray, lm: Landmarks, liver: np.ndarray) -> tuple[float, float] | None:
    """The greys of fat on an MR series, which no organ rule may take; None where organs share them.

    Fat fills the boxes the organs are sought in, and where an organ's box holds more fat than organ its
    commonest grey is fat's (a made fat-suppressed T1: spleen, right kidney and stomach drawn as suppressed fat).
    It is read where it is commonest, in the layer under the skin (``UNDER_SKIN_MM``): its mode +- 2.5 robust
    spreads, and at least an organ window's narrowest half (``mr_min_half``: fat made from CT, or denoised, may
    spread far less than its grey varies over the body). It is apart from every organ's grey when suppressed
    (darker than half the liver's) or on a T1-weighted series (brighter than 1.5 times: fat's T1 of 260 ms is
    the body's shortest). On a T2-weighted series without suppression fat is as bright as the spleen and
    kidneys, and a thin patient's layer may be muscle, of an organ's grey on either weighting: None.
    """
    if not liver.any() or not lm.body.any():
        return None
    depth = skin_depth(lm.body, lm.spacing) if lm.depth is None else lm.depth
    shell = smooth[lm.body & (depth > UNDER_SKIN_MM[0]) & (depth <= UNDER_SKIN_MM[1])]
    if shell.size < 100:
        return None
    lo, hi = np.percentile(shell, [1, 99])
    mode, sd, _, _ = grey_mode(shell[(shell >= lo) & (shell <= hi)])
    ratio = mode / max(float(np.median(smooth[liver])), 1e-6)
    if not (ratio < FAT_APART[0] or (ratio > FAT_APART[1] and lm.weighting == "T1")):
        return None
    half = max(2.5 * sd, mr_min_half(smooth, lm.body))
    return mode - half, mode + half


def mr_min_half(smooth: np.ndarray, body: np.ndarray) -> float:
    """The narrowest half-window of one tissue's grey on an MR series: 8 % of the body's range (2nd-98th
    percentile). One tissue's grey varies this much over a field of view once the coil's shading is divided
    out, though its noise alone may be far smaller (a thin slab, a denoised series)."""
    return 0.08 * float(np.ptp(np.percentile(smooth[body], [2, 98])))


def skin_depth(body: np.ndarray, spacing) -> np.ndarray:
    """Per voxel of ``body``, millimetres in-plane to the nearest skin in view (0 outside; the image's edge, where
    a field of view cuts the body, is no skin)."""
    return np.stack([ndi.distance_transform_edt(body[:, :, k], sampling=spacing[:2])
                     for k in range(body.shape[2])], axis=-1)


def mr_weighting(smooth: np.ndarray, lm: Landmarks, liver: np.ndarray) -> str:
    """"T2" when an MR series is T2-weighted, else "T1", read from what its brightest tissue is.

    On a T2-weighted series the brightest tissue deep in the body is fluid (spinal fluid, bile, urine, gastric
    fluid: T2 of 500-4000 ms against the liver's 46), several times the liver's grey and clearly brighter than the
    fat under the skin, suppressed or not. On a T1-weighted one it is fat, no brighter deep in the body than under
    the skin, or, with fat suppressed, enhancing or short-T1 tissue within twice the liver's grey. The brightest
    deep tissue: the 99.5th percentile of voxels over ``DEEP_MM`` under the skin; the fat under the skin: the 90th
    percentile of the ``UNDER_SKIN_MM`` layer (fat a tenth of it thick counts), depths from the skin in view
    (``skin_depth``). T1 when the liver, the body or the skin is missing: the rules' assumption before they
    read the weighting. DICOM headers do not settle it: sequence names and echo times vary by vendor and are
    lost on conversion.
    """
    if not liver.any() or not lm.body.any():
        return "T1"
    depth = skin_depth(lm.body, lm.spacing) if lm.depth is None else lm.depth
    deep = lm.body & (depth > DEEP_MM)
    shell = lm.body & (depth > UNDER_SKIN_MM[0]) & (depth <= UNDER_SKIN_MM[1])
    if deep.sum() < 100 or shell.sum() < 100:
        return "T1"
    brightest = float(np.percentile(smooth[deep], 99.5))
    fat = float(np.percentile(smooth[shell], 90))
    liver_grey = float(np.median(smooth[liver]))
    return "T2" if brightest >= FLUID_OVER_LIVER * liver_grey and brightest >= FLUID_OVER_FAT * fat else "T1"


def noise_sigma(data: np.ndarray, median3: np.ndarray, body: np.ndarray, modality: str) -> float:
    """Noise of soft tissue: robust spread of the image minus its 3x3x3 median, in image units."""
    sel = body & ((data > -100) & (data < 200) if modality == "CT" else body)
    if sel.sum() < 100:
        return 0.0
    resid = (data - median3)[sel]
    return float(1.4826 * np.median(np.abs(resid - np.median(resid))))


def find_landmarks(data: np.ndarray, spacing, modality: str, body: np.ndarray | None = None) -> Landmarks:
    """Landmarks of ``data``; ``body`` may be passed when the caller already has ``body_mask(data)``."""
    body = body_mask(data, modality) if body is None else body
    spine = spine_centre(data, body, modality, spacing)
    lungs = lung_mask(data, body, modality, spacing)
    scale = body_scale(body, spacing)
    hip_top = hip_bones(data, body, spine, lungs, spacing, scale) if modality == "CT" else None
    upper_z = upper_abdomen(lungs, body, spacing, hip_top=hip_top)
    has_body = np.flatnonzero(body.any(axis=(0, 1)))
    # The hip bones' top anchors pelvic organs only when the study reaches above it: bones that run on
    # to the study's top (within 25 mm: the top found may lie that far below the crest) end out of view.
    seen = hip_top is not None and len(has_body) > 0 and hip_top < has_body[-1] - round(25.0 / spacing[2])
    return Landmarks(
        modality=modality,
        body=body,
        spine_xy=spine,
        scale=scale,
        lungs=lungs,
        spacing=tuple(spacing),
        upper_z=upper_z,
        hip_top_z=hip_top if seen else None,
        below_abdomen=hip_top is not None and upper_z[0] >= upper_z[1],
    )
