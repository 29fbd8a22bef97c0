"""The attribute prior in 2D: a saliency map from what the prompt file says a class looks like.

No weights: the class's ``image2d`` attributes (prompts/*.yaml: modality, dark or bright relative
to its surroundings, where its centre lies in the image frame, its area, its number of parts) are
read against what each modality's physics makes of the image:

- **X-ray** (lungs): aerated lung attenuates least, so it is the darkest tissue *inside* the body;
  the air around the patient is as dark but reaches the film's edge, so dark regions connected to
  the border are outside the body, not lung.
- **Ultrasound** (breast tumour): a mass is hypoechoic, darker than the tissue around it, and
  compact; posterior acoustic shadowing and the dark corners outside the probe's sector are dark
  too, but they run into the image border. Speckle is smoothed away first.
- **MR** (brain tumour): the tumour and its oedema are hyperintense on FLAIR relative to normal
  brain; the scalp's fat is bright as well but lies in the head's outer rim, which is peeled
  off. An RGB composite is read as R = pre-contrast T1, G = FLAIR, B = post-contrast T1 (the
  TCGA-LGG convention) and its G channel used; a single-channel image is taken as the FLAIR itself
  (or as whatever sequence the user has, contrast relative to the brain is all that is used).
- **CT** (abdominal organs on one slice): organs are soft tissue, brighter than fat inside the
  body; which soft-tissue blob is which comes from the position and size attributes.

Each map is made at 256 pixels on the long side (speckle and noise are smoothed at that scale,
and it costs a few milliseconds), weighted by the position attribute, and returned on the image's
own pixels in [0, 1]. Candidate regions whose area is outside the size attribute are dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
from scipy import ndimage

from medprompt.errors import PromptError
from medprompt.histogram import otsu
from medprompt.sam.preprocess import HU_LIKE_MIN, sam_pixels

if TYPE_CHECKING:
    from medprompt.catalog import PromptEntry
    from medprompt.io.image2d import Image2D

WORK_SIZE = 256  # long side of the working grid
POSITION_SOFTNESS = 0.12  # fraction of the image over which the position weight falls to 1/e outside its range
# RGB composite MR (TCGA-LGG): which channel holds which sequence.
US_TAIL = 0.3  # ultrasound: where between the two-class split and the maximum a lesion's darkness starts
RGB_MR_CHANNELS = {"T1": 0, "T1PRE": 0, "FLAIR": 1, "T1C": 2, "T1POST": 2}


def modality_for(image: Image2D, entry: PromptEntry) -> str:
    """The modality family the prior reads the image as: the file's own when declared, else the class's.

    PromptError when the class has no 2D attributes, or the image's declared modality is not one
    the class is described on (a mammogram prompted for an ultrasound finding).
    """
    attrs = entry.image2d
    if not attrs:
        with_2d = "lungs, breast_tumor, brain_tumor, liver, kidneys, pancreas"
        raise PromptError(f"class '{entry.name}' has no 2D attributes (image2d in {entry.source}); "
                          f"2D images can be prompted for e.g. {with_2d}")
    family = image.family
    modalities = list(attrs["modalities"])
    if family is None or family in ("OT", "SC"):
        return modalities[0]
    if family not in modalities:
        raise PromptError(f"class '{entry.name}' is described on {', '.join(modalities)} images, and "
                          f"{image.source} is {image.modality}")
    return family


def working_image(image: Image2D, entry: PromptEntry, modality: str) -> np.ndarray:
    """The one channel the prior (and LiteMedSAM) look at: the class's MR sequence of an RGB composite,
    else luminance; float32 on the image's own pixels."""
    if image.is_rgb and modality == "MR":
        sequence = str(entry.image2d.get("sequence", "")).upper().replace("-", "")
        if sequence in RGB_MR_CHANNELS:
            return image.pixels[:, :, RGB_MR_CHANNELS[sequence]]
    return image.grey()


def attribute_saliency(image: Image2D, entry: PromptEntry) -> np.ndarray:
    """(H, W) map in [0, 1] of where ``entry`` lies on ``image``, from its 2D attributes alone."""
    modality = modality_for(image, entry)
    grey = working_image(image, entry, modality)
    if modality == "CT" and float(grey.min()) < HU_LIKE_MIN:
        # A slice in Hounsfield units is read through the soft-tissue window, as a radiologist (and
        # LiteMedSAM) reads it: stretched from air to bone, the organs, muscle and fat were a few grey
        # levels apart and merged into one blob larger than any organ. A windowed picture is as it was.
        grey = sam_pixels(grey, "CT").astype(np.float32)
    small, scale = _downsample(grey)
    attrs = entry.image2d
    if modality == "MR" and image.is_rgb and grey is not image.grey():
        # A composite also holds the pre-contrast T1 (R): fat and blood are bright on it, oedema and
        # tumour are not, so FLAIR-bright pixels that are T1-bright too are no tumour.
        t1 = _normalised(_downsample(image.pixels[:, :, RGB_MR_CHANNELS["T1"]])[0])
        sal = _mr(_normalised(small), attrs, t1=t1)
    else:
        make = {"XR": _xray, "US": _ultrasound, "MR": _mr, "CT": _ct, "MG": _ultrasound}[modality]
        sal = make(_normalised(small), attrs)
    if modality != "CT":  # a CT slice weighs position within the body (_ct), not the frame: the table, air
        sal = sal * position_weight(sal.shape, attrs.get("position", {}))
    top = float(sal.max())
    sal = sal / top if top > 0 else sal
    return _upsample(sal.astype(np.float32), grey.shape)


# -- shared helpers ----------------------------------------------------------------------------

def _downsample(grey: np.ndarray) -> tuple[np.ndarray, float]:
    h, w = grey.shape
    scale = min(1.0, WORK_SIZE / max(h, w))
    if scale == 1.0:
        return grey.astype(np.float32), 1.0
    from PIL import Image

    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(grey.astype(np.float32), mode="F").resize(size, Image.BILINEAR,
                                                                                reducing_gap=2.0)), scale


def _upsample(sal: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if sal.shape == tuple(shape):
        return sal
    from PIL import Image

    out = np.asarray(Image.fromarray(sal, mode="F").resize((shape[1], shape[0]), Image.BILINEAR))
    return np.clip(out, 0.0, 1.0)


def _normalised(x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """0..1 by the 1st-99th percentiles (of ``mask``'s pixels, default all)."""
    sample = x[mask] if mask is not None and mask.any() else x
    lo, hi = np.percentile(sample, (1, 99))
    return np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


def position_weight(shape: tuple[int, int], position: Mapping[str, Any],
                    frame: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """1 where the class's centre may lie (``position`` x/y ranges, fractions of the width/height of the
    image, or of ``frame`` = row0, row1, col0, col1), falling off smoothly outside: a soft prior, so a
    structure a little off its usual place is still found."""
    h, w = shape
    r0, r1, c0, c1 = frame or (0, h, 0, w)
    weight = np.ones(shape, np.float32)
    for axis, n, start, stop in (("y", h, r0, r1), ("x", w, c0, c1)):
        if axis not in position:
            continue
        lo, hi = position[axis]
        t = (np.arange(n, dtype=np.float32) + 0.5 - start) / max(stop - start, 1)
        d = np.maximum(0.0, np.maximum(lo - t, t - hi)) / POSITION_SOFTNESS
        f = np.exp(-d ** 2)
        weight *= f[:, None] if axis == "y" else f[None, :]
    return weight


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius ** 2


def _touches_border(labels: np.ndarray, n: int, margin: int = 1) -> np.ndarray:
    """Per component 1..n: whether it reaches within ``margin`` pixels of the image edge."""
    edge = np.zeros(labels.shape, bool)
    edge[:margin], edge[-margin:], edge[:, :margin], edge[:, -margin:] = True, True, True, True
    touching = np.zeros(n + 1, bool)
    touching[np.unique(labels[edge])] = True
    return touching


def _keep_components(candidate: np.ndarray, score: np.ndarray, area_range: tuple[float, float],
                     field_area: float, drop_border: bool) -> np.ndarray:
    """``score`` kept on the components of ``candidate`` whose area (fraction of ``field_area``) is in range
    and, with ``drop_border``, that do not reach the image edge; zero elsewhere."""
    labels, n = ndimage.label(candidate)
    if n == 0:
        return np.zeros_like(score)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:] / max(field_area, 1.0)
    keep = np.zeros(n + 1, bool)
    keep[1:] = (areas >= area_range[0] * 0.5) & (areas <= area_range[1] * 1.5)
    if drop_border:
        keep &= ~_touches_border(labels, n)
    return np.where(keep[labels], score, 0.0)


# -- per modality -------------------------------------------------------------------------------

def _contrast(g: np.ndarray, attrs: Mapping[str, Any]) -> np.ndarray:
    """How much darker (``intensity: dark``) or brighter than average the pixel is, 0..1."""
    return (1.0 - g) if attrs.get("intensity") == "dark" else g


def _xray(g: np.ndarray, attrs: Mapping[str, Any]) -> np.ndarray:
    """Dark (or bright) regions inside the body: the air around the patient is found first (the darkest
    class, reaching the film's edge), then the body's own pixels are split in two."""
    s = ndimage.gaussian_filter(g, 1.5)
    body = ~_outside(s)
    if body.sum() < 0.1 * body.size:
        body = np.ones_like(body)
    c = _contrast(s, attrs)
    # The body's outer few percent (thin soft tissue at the skin line, dark on the film) is no organ.
    inner = ndimage.distance_transform_edt(body) > 0.03 * max(g.shape)
    candidate = (c > otsu(c[body])) & inner
    # Thin dark bridges (the chest wall's thin soft tissue, the trachea) join the lungs to the edge; a
    # lung is a fifth of the film wide, so an opening of a few percent of it cuts them and keeps it.
    candidate = ndimage.binary_opening(candidate, structure=_disk(max(2, round(0.02 * max(g.shape)))))
    # Components reaching the film's edge are kept: a neck or shoulder joined to a lung apex is cut
    # off by the opening above, and dropping them lost whole lungs on tightly collimated films.
    return _keep_components(candidate, c, _size(attrs), float(body.sum()), drop_border=False)


def _outside(s: np.ndarray) -> np.ndarray:
    """The air around the patient on a radiograph: the darkest class, where it reaches the film's edge."""
    dark = s < otsu(s) * 0.6
    labels, n = ndimage.label(dark)
    touching = _touches_border(labels, n)
    touching[0] = False
    return touching[labels]


def _ultrasound(g: np.ndarray, attrs: Mapping[str, Any]) -> np.ndarray:
    """Hypoechoic, compact, darker than the tissue at its own depth, clear of the image edge.

    Echoes weaken with depth (attenuation), so brightness is compared within each row (the depth):
    a mass is darker than the rest of its row, while the deep field is dark everywhere. Shadows
    behind a mass and the black margins outside the probe's sector reach the image's edge.
    """
    s = ndimage.median_filter(g, size=5)
    s = ndimage.gaussian_filter(s, 2.0)
    row_level = ndimage.gaussian_filter1d(np.median(s, axis=1), 3.0)[:, None]
    surround = ndimage.gaussian_filter(s, 0.08 * max(g.shape))
    if attrs.get("intensity") == "dark":
        depth_rel, local = row_level - s, surround - s
    else:
        depth_rel, local = s - row_level, s - surround
    score = np.clip(depth_rel, 0, None) + np.clip(local, 0, None)
    score = score / max(float(np.percentile(score, 99.5)), 1e-6)
    # The two-class split of speckled tissue still takes in tissue planes and fat lobules; a lesion
    # lies in the dark tail, so the cut is placed a third of the way from the split to the maximum.
    split = otsu(score)
    candidate = score > split + US_TAIL * (1.0 - split)
    candidate = ndimage.binary_opening(candidate, structure=_disk(2))
    candidate = ndimage.binary_fill_holes(candidate)
    kept = _keep_components(candidate, np.clip(score, 0, 1), _size(attrs), float(g.size), drop_border=True)
    return _by_shape(kept)


def _by_shape(sal: np.ndarray) -> np.ndarray:
    """Each component's values scaled by how mass-like its shape is: filled (its area against the
    ellipse of the same second moments) and not a thin band (minor over major axis). Tissue
    planes and shadows run as long bands; a lesion is a compact blob."""
    labels, n = ndimage.label(sal > 0)
    if n == 0:
        return sal
    out = np.zeros_like(sal)
    for i, region in enumerate(ndimage.find_objects(labels), start=1):
        mask = labels[region] == i
        rows, cols = np.nonzero(mask)
        if rows.size < 5:
            continue
        cov = np.cov(np.stack([rows, cols]).astype(np.float64)) + np.eye(2) / 12.0
        eig = np.linalg.eigvalsh(cov)
        fill = min(1.0, rows.size / (4.0 * np.pi * np.sqrt(max(np.linalg.det(cov), 1e-9))))
        elongation = np.sqrt(eig[0] / eig[1])
        # Divided by area^(1/4): ranked by saliency mass, a lesion then counts as mean * area^(3/4), so
        # a small anechoic cyst is not outweighed by a wide faint band.
        out[region][mask] = sal[region][mask] * fill * np.sqrt(elongation) / rows.size ** 0.25
    return out


def _mr(g: np.ndarray, attrs: Mapping[str, Any], t1: np.ndarray | None = None) -> np.ndarray:
    """Hyperintense (or hypointense) relative to the brain: the head's outer rim (scalp, skull) peeled off."""
    s = ndimage.gaussian_filter(g, 1.0)
    head = s > 0.1
    labels, n = ndimage.label(head)
    if n == 0:
        return np.zeros_like(g)
    head = labels == (1 + int(np.argmax(np.bincount(labels.ravel())[1:])))
    head = ndimage.binary_fill_holes(head)
    radius = np.sqrt(head.sum() / np.pi)
    depth = ndimage.distance_transform_edt(head)
    brain = depth > 0.12 * radius
    if not brain.any():
        return np.zeros_like(g)
    inside = s[brain]
    median = float(np.median(inside))
    spread = float(np.median(np.abs(inside - median))) * 1.4826 + 1e-3
    z = (s - median) / spread
    if attrs.get("intensity") == "dark":
        z = -z
    score = np.where(brain, 1.0 / (1.0 + np.exp(-(z - 3.0))), 0.0)
    if t1 is not None:
        t = ndimage.gaussian_filter(t1, 1.0)
        t_in = t[brain]
        t_med = float(np.median(t_in))
        t_z = (t - t_med) / (float(np.median(np.abs(t_in - t_med))) * 1.4826 + 1e-3)
        score = score / (1.0 + np.exp(t_z - 3.0))
    candidate = score > 0.5
    candidate = ndimage.binary_opening(candidate, iterations=1)
    return _keep_components(candidate, score, _size(attrs), float(brain.sum()), drop_border=False)


def _ct(g: np.ndarray, attrs: Mapping[str, Any]) -> np.ndarray:
    """Soft tissue brighter than the fat around it, inside the body (air outside is the darkest class)."""
    s = ndimage.gaussian_filter(g, 1.0)
    labels, n = ndimage.label(s > otsu(s) * 0.5)
    if n == 0:
        return np.zeros_like(g)
    body = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:])))  # not the table
    inside = s[body]
    c = _contrast(s, attrs)
    threshold = otsu(c[body]) if body.any() else otsu(c)
    candidate = ndimage.binary_opening((c > threshold) & body, structure=_disk(max(2, round(0.01 * max(g.shape)))))
    if not inside.size or not body.any():
        return np.zeros_like(g)
    rows, cols = np.flatnonzero(body.any(axis=1)), np.flatnonzero(body.any(axis=0))
    weight = position_weight(g.shape, attrs.get("position", {}), (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1))
    return _keep_components(candidate, c * weight, _size(attrs), float(body.sum()), drop_border=True)


def _size(attrs: Mapping[str, Any]) -> tuple[float, float]:
    lo, hi = attrs.get("size", (0.0, 1.0))
    return float(lo), float(hi)
