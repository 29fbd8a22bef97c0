"""MR contrasts made by spin-echo physics from a labelled MR: how the prior's MR rules are tested on weightings
that no labelled scan here has (T2 with and without fat suppression, T1 with it).

Each tissue of the reference gets its spin-echo signal S = PD (1 - exp(-TR/T1)) exp(-TE/T2) at 1.5 T
(relaxation times from de Bazelaire et al., Radiology 2004, and Stanisz et al., MRM 2005), and the scan's texture
within each tissue is kept. The boundaries are the reference's own, so Dice on a made contrast says whether a rule
follows the physics (the liver is darker than the spleen on T2, brighter on T1), not how good a draft is.
"""

from __future__ import annotations

from math import exp

import numpy as np
from scipy import ndimage as ndi

# name -> (title, TR ms, TE ms, fat's signal kept): a T2-weighted fast spin echo with spectral fat suppression
# (T2-SPIR), one without it (HASTE-like: fat stays bright), a spin-echo T1, and a T1 with fat suppressed.
CONTRASTS = {
    "t2fs": ("T2, fat suppressed (made)", 1700.0, 80.0, 0.1),
    "t2": ("T2, fat not suppressed (made)", 2000.0, 90.0, 1.0),
    "t1se": ("T1 spin echo (made)", 500.0, 12.0, 1.0),
    "t1fs": ("T1, fat suppressed (made)", 500.0, 12.0, 0.1),
}
# proton density (relative), T1 and T2 (ms) at 1.5 T
TISSUE = {
    "liver": (0.70, 586, 46), "pancreas": (0.72, 584, 46), "spleen": (0.80, 1057, 79),
    "kidney_left": (0.85, 1190, 86), "kidney_right": (0.85, 1190, 86),  # cortex and medulla averaged
    "gallbladder": (0.95, 2800, 500), "stomach": (0.85, 1500, 150),  # bile; fluid-filled lumen and wall
    "adrenal_gland_left": (0.70, 800, 60), "adrenal_gland_right": (0.70, 800, 60),
    "small_bowel": (0.80, 1000, 90), "duodenum": (0.80, 1000, 90), "colon": (0.80, 1000, 80),
    "spinal_cord": (0.75, 745, 74), "intervertebral_discs": (0.80, 1100, 110),
    "autochthon_left": (0.70, 856, 27), "autochthon_right": (0.70, 856, 27),
    "iliopsoas_left": (0.70, 856, 27), "iliopsoas_right": (0.70, 856, 27), "lung_right": (0.10, 1200, 40),
}
URINE = (1.00, 3000, 1200)
# TotalSegmentator classes that share a tissue above (CT references name muscles, bones and vessels one by one)
ALSO = {"urinary_bladder": URINE, "prostate": (0.75, 1400, 90), "gluteus": TISSUE["autochthon_left"],
        "lung": TISSUE["lung_right"], "costal_cartilages": (0.70, 1000, 30)}
FLOW_VOID = {"aorta": 0.02, "inferior_vena_cava": 0.02, "portal_vein_and_splenic_vein": 0.08,  # slow flow greyer
             "iliac_artery": 0.02, "iliac_vena": 0.04}
BONES = ("vertebrae", "sacrum", "hip", "femur", "rib")
CT_TEXTURE = 0.003  # of the liver's made grey per HU: CT's 10-15 HU of noise become 3-5 %
FAT = (0.90, 343, 58)
SOFT = (0.70, 856, 35)  # unlabelled soft tissue: muscle-like
CSF = (1.00, 4000, 2000)
MARROW_FAT = 0.5  # an adult vertebra's marrow is about half fat
FAT_T1_ABOVE, SOFT_T1_ABOVE = 300, 40  # grey on mr_abdomen's T1 scan that marks unlabelled fat and soft tissue
CSF_MM = 9.0  # the spinal canal's fluid: dark unlabelled voxels this close to the cord


def signal(pd: float, t1: float, t2: float, tr: float, te: float) -> float:
    """Spin-echo signal at repetition time ``tr`` and echo time ``te``."""
    return pd * (1 - exp(-tr / t1)) * exp(-te / t2)


def _greys(names: dict[str, int], tr: float, te: float, fat_kept: float) -> tuple[dict[int, float], float, float]:
    """Each class value's grey (a class of no tissue above: soft tissue), and the greys of fat and soft tissue."""
    fat, soft = signal(*FAT, tr, te) * fat_kept, signal(*SOFT, tr, te)

    def named(name: str, key: str) -> bool:
        return name == key or name.startswith(key + "_")

    def grey(name: str) -> float:
        for table in (TISSUE, ALSO):
            for key, params in table.items():
                if named(name, key):
                    return signal(*params, tr, te)
        for key, value in FLOW_VOID.items():
            if named(name, key):
                return value
        if any(named(name, b) for b in BONES):
            return MARROW_FAT * fat + (1 - MARROW_FAT) * soft
        return soft

    return {value: grey(name) for name, value in names.items()}, fat, soft


def _near_cord(label: np.ndarray, names: dict[str, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """Where the spinal canal's fluid may be: within ``CSF_MM`` of the cord (nowhere without one)."""
    if "spinal_cord" not in names:
        return np.zeros(label.shape, bool)
    return ndi.distance_transform_edt(label != names["spinal_cord"], sampling=spacing) <= CSF_MM


def _scaled(out: np.ndarray, seed: int) -> np.ndarray:
    """``out`` scaled to 0-800 with the magnitude image's noise floor."""
    noise = np.abs(np.random.default_rng(seed).normal(0, 8, out.shape))
    return (out / out.max() * 800 + noise).astype(np.int16)


def made_contrast(image: np.ndarray, label: np.ndarray, names: dict[str, int], contrast: str,
                  spacing: tuple[float, float, float] = (3.0, 3.0, 3.0), seed: int = 0) -> np.ndarray:
    """The image of the tissues in ``label`` (a T1 scan's reference, class -> value ``names``) on the spin-echo
    ``contrast`` (``CONTRASTS``), with ``image``'s texture, scaled to 0-800.

    The texture is the scan's deviation from each tissue's median, scaled as the liver's grey is scaled or as the
    tissue's own, whichever is less: MR noise is additive, so a tissue dark on the scan (the spleen at a quarter
    of the liver's grey) must not carry its deviations multiplied into a bright tissue of the made contrast, and
    a tissue bright on the scan (fat, whose grey spans 300-700 with partial volume) must not spread wider than
    its own grey. Unlabelled voxels are fat, soft tissue or, next to the spinal cord, spinal fluid, by their
    grey on the T1 scan.
    """
    _, tr, te, fat_kept = CONTRASTS[contrast]
    a = image.astype(float)
    out = np.zeros_like(a)
    scale = signal(*TISSUE["liver"], tr, te) / (float(np.median(a[label == names["liver"]])) or 1.0)

    def put(mask: np.ndarray, s: float) -> None:
        if mask.any():
            med = float(np.median(a[mask]))
            out[mask] = np.maximum(s + (a[mask] - med) * min(scale, s / (med or 1.0)), 0.0)

    greys, fat, soft = _greys(names, tr, te, fat_kept)
    for value, grey in greys.items():
        put(label == value, grey)
    free = label == 0
    put(free & (a > FAT_T1_ABOVE), fat)
    put(free & (a > SOFT_T1_ABOVE) & (a <= FAT_T1_ABOVE), soft)
    put(free & _near_cord(label, names, spacing) & (a <= SOFT_T1_ABOVE), signal(*CSF, tr, te))
    return _scaled(out, seed)


def made_from_ct(hu: np.ndarray, label: np.ndarray, names: dict[str, int], contrast: str,
                 spacing: tuple[float, float, float] = (3.0, 3.0, 3.0), seed: int = 0) -> np.ndarray:
    """The MR image on ``contrast`` of a CT (``hu``) and its TotalSegmentator reference (class -> value
    ``names``): a second anatomy, with the pelvis, for the MR rules. Each class gets its tissue's spin-echo grey
    (``TISSUE``, ``ALSO``; vessels flow voids; bones half-fat marrow), unlabelled voxels fat (-200 to -30 HU),
    air (below -200) or soft tissue, and spinal fluid next to the cord; the texture is the CT's deviation from each
    tissue's median (``CT_TEXTURE``). Scaled to 0-800."""
    _, tr, te, fat_kept = CONTRASTS[contrast]
    a = hu.astype(float)
    out = np.zeros_like(a)
    gain = CT_TEXTURE * signal(*TISSUE["liver"], tr, te)

    def put(mask: np.ndarray, s: float) -> None:
        if mask.any():
            out[mask] = np.maximum(s + (a[mask] - float(np.median(a[mask]))) * gain, 0.0)

    greys, fat, soft = _greys(names, tr, te, fat_kept)
    for value, grey in greys.items():
        put(label == value, grey)
    free = label == 0
    put(free & (a >= -200) & (a < -30), fat)
    put(free & (a >= -30), soft)
    put(free & _near_cord(label, names, spacing) & (a >= -30) & (a < 25), signal(*CSF, tr, te))
    return _scaled(out, seed)
