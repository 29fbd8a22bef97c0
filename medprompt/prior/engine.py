"""The anatomy prior: prompt attributes + the image's own geometry -> a label map, no weights.

It is the always-available teacher of the learned model and a usable zero-shot model on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
from scipy import ndimage as ndi
from tqdm import tqdm

from medprompt.catalog import PromptCatalog, PromptEntry, default_catalog
from medprompt.errors import InputError, PromptError
from medprompt.localization import Localization
from medprompt.memo import Memo
from medprompt.prior import geometry
from medprompt.prior.coil_field import coil_field
from medprompt.prior.landmarks import (Landmarks, body_mask, fat_grey, find_landmarks, guess_modality, mr_weighting,
                                       skin_depth)
from medprompt.prior.rules import RULES

if TYPE_CHECKING:
    from medprompt.io.volume import Volume

WORK_SPACING_MM = 2.5


@dataclass
class PriorResult:
    """Masks on the working grid, kept for the learned model's teacher interface."""

    masks: dict[str, np.ndarray]
    landmarks: Landmarks
    frame: geometry.WorkFrame
    modality: str = "CT"


@dataclass
class _Study:
    """The prior's per-study state; the landmarks also collect the anchors (liver, ...) found on demand,
    which depend on the study and the catalog only."""

    smooth: np.ndarray
    landmarks: Landmarks
    frame: geometry.WorkFrame
    modality: str


# The last studies' state, so drafting a study again (another prompt or model) skips about half the
# prior's time (medprompt.memo). Two studies of a 512x512x200 CT hold about 100 MB.
_STUDIES: Memo[_Study] = Memo(entries=2)


def denoise(work: np.ndarray, median: np.ndarray, body: np.ndarray, modality: str) -> np.ndarray:
    """The 3x3x3 ``median`` of ``work``, plus Gaussian smoothing as strong as the image's noise needs.

    Thresholds and erosion break up on noisy (low-dose, thin-slice) studies; only clearly noisy
    ones (residual spread over 24 HU, where routine 3 mm CT measures about 10-18) are smoothed.
    Returns ``median`` itself when no smoothing is needed.
    """
    from medprompt.prior.landmarks import noise_sigma

    sigma = noise_sigma(work, median, body, modality)
    target = 12.0 if modality == "CT" else 0.0
    if target and sigma > 2 * target:
        return ndi.gaussian_filter(median, sigma=min(2.0, 0.5 * (sigma / target - 1)))
    return median


def liver_tip(liver: np.ndarray, lm: Landmarks) -> float | None:
    """Slice of the liver's inferior tip: the craniocaudal anchor for organs below the diaphragm.

    Unknown when the liver is absent or reaches the bottom of the scan (tip outside the field), and when it
    lies within 10 mm of the hip bones' top or below it: the liver ends well above the iliac crests (a
    Riedel's lobe reaches them, rarely further), so a mask that ran down to them took bowel or kidney of
    the liver's grey, and its lowest slice says nothing of the liver (an enhanced study that shows only
    the liver's lowest part placed the kidneys from it: Dice 0.00). Organs then take their height from
    the hips.
    """
    per_slice = liver.sum(axis=(0, 1))
    if per_slice.sum() == 0:
        return None
    big = np.flatnonzero(per_slice > 0.05 * per_slice.max())
    if big[0] <= 0:
        return None
    if lm.hip_top_z is not None and big[0] <= lm.hip_top_z + 10.0 / lm.spacing[2]:
        return None
    return float(big[0])


class AnatomyPrior:
    """Segments any catalog class whose prompt file says ``prior.supported: true``."""

    def __init__(self, catalog: PromptCatalog | None = None, work_spacing_mm: float = WORK_SPACING_MM):
        self.catalog = catalog or default_catalog()
        self.work_spacing_mm = work_spacing_mm

    def check_supported(self, entries: Sequence[PromptEntry]) -> None:
        bad = [e for e in entries if not e.prior_supported]
        if bad:
            notes = "; ".join(f"{e.name}: {e.prior.get('note', 'no prior attributes')}" for e in bad)
            raise PromptError(f"the anatomy prior cannot segment {', '.join(e.name for e in bad)} ({notes})")

    def segment_work(self, volume: Volume, entries: Sequence[PromptEntry], progress: bool = False) -> PriorResult:
        """Run the rules on the working grid; larger organs claim their voxels first."""
        data = np.asarray(volume.data)
        if data.ndim != 3 or min(data.shape) < 2:
            raise InputError(f"{volume.source}: expected a 3D volume, got shape {data.shape}")
        # The anchors kept with the landmarks come from the catalog's rules: they are part of the key.
        rules = repr(sorted((name, entry.prior) for name, entry in self.catalog.entries.items()))
        study = _STUDIES.get_or_make((volume.digest, self.work_spacing_mm, rules), lambda: self._study(volume))
        smooth, lm, frame, modality = study.smooth, study.landmarks, study.frame, study.modality
        expanded = self._expand(entries)
        # Tubes first (they are found by shape, and organs of equal density must not swallow
        # them), then organs from the largest down.
        order = sorted(
            expanded,
            key=lambda e: (e.prior.get("method") != "vessel", -float(np.mean(e.prior.get("volume_ml", [0, 0])))),
        )
        empty = np.zeros(smooth.shape, bool)

        def run(entry: PromptEntry, taken: np.ndarray) -> np.ndarray:
            # 'exclude' names structures of equal density that the rule must not swallow
            # (the liver and the non-contrast vena cava); they are found first, as anchors.
            for other in entry.prior.get("exclude", []):
                taken = taken | anchor(other)
            mr = entry.prior.get("mr", {})
            # On MR, what rules.intensity_window reads is found first: the class whose grey it shares (like); the
            # series' weighting and fat's greys are read once, below, before the classes are drawn.
            if modality == "MR" and mr.get("like"):
                anchor(mr["like"])
            return RULES[entry.prior.get("method", "organ")](smooth, lm, entry.prior, taken)

        def anchor(name: str) -> np.ndarray:
            if name not in lm.anchors:
                lm.anchors[name] = run(self.catalog[name], empty) if name in self.catalog else empty
            return lm.anchors[name]

        if self._needs_liver(order):
            lm.liver_tip_z = liver_tip(anchor("liver"), lm)
        if modality == "MR" and lm.weighting is None:
            # The weighting (which side of the liver's grey a 'vs_liver' class lies on) and fat's greys (which no
            # class takes: bright fat is apart from the organs' only on T1) are read against the liver, found first
            # without them; once per study (the landmarks are kept with it).
            liver = anchor("liver")
            lm.weighting = mr_weighting(smooth, lm, liver)
            lm.fat = fat_grey(smooth, lm, liver)
        taken = empty.copy()
        masks: dict[str, np.ndarray] = {}
        for entry in tqdm(order, desc="anatomy prior", unit="class", disable=not progress, leave=False):
            mask = run(entry, taken)
            if entry.prior.get("method", "organ") in ("organ", "vessel"):
                taken |= mask
            masks[entry.name] = mask
        for entry in entries:
            if "parts" in entry.prior:
                masks[entry.name] = np.logical_or.reduce([masks[p] for p in entry.prior["parts"]])
        return PriorResult(masks=masks, landmarks=lm, frame=frame, modality=modality)

    def _study(self, volume: Volume) -> _Study:
        """What every class's rule reads: the working grid, smoothed, and the landmarks found on it."""
        data = np.asarray(volume.data)
        if not np.isfinite(data).all():
            data = np.nan_to_num(data, nan=float(np.nanmin(data)))
        work, frame = geometry.to_work(data, volume.affine, self.work_spacing_mm)
        modality = guess_modality(work, volume.modality)
        median = ndi.median_filter(work, size=3)
        body = body_mask(median, modality)
        depth = None
        if modality == "MR":  # one grey level per organ: the receive coil's shading divided out
            depth = skin_depth(body, frame.work_spacing)  # read again by landmarks.mr_weighting
            field = coil_field(median, body, frame.work_spacing, depth)
            if field is not None:
                work, median = work / field, median / field
        smooth = denoise(work, median, body, modality)
        # The body found for the noise estimate is the landmarks' body unless smoothing changed the image.
        same_body = smooth is median
        lm = find_landmarks(smooth, frame.work_spacing, modality, body=body if same_body else None)
        lm.depth = depth if same_body else None
        return _Study(smooth=smooth, landmarks=lm, frame=frame, modality=modality)

    def _needs_liver(self, entries: Sequence[PromptEntry]) -> bool:
        """The liver anchors height (its tip) and neighbours ('near: liver'); find it when used."""
        return "liver" in self.catalog and any(
            "z" in e.prior.get("location", {}) or e.prior.get("near") == "liver" for e in entries
        )

    def _expand(self, entries: Sequence[PromptEntry]) -> list[PromptEntry]:
        """Entries to run: composite classes (``parts``) contribute their parts."""
        out: dict[str, PromptEntry] = {}
        for e in entries:
            for name in e.prior.get("parts", [e.name]):
                out[name] = self.catalog[name] if name != e.name else e
        return list(out.values())

    def localize(self, volume: Volume, entries: Sequence[PromptEntry], progress: bool = False) -> Localization:
        """Where each class is, for a segmenter to draw (see medprompt.sam.refine)."""
        self.check_supported(entries)
        result = self.segment_work(volume, entries, progress)
        return Localization(masks={e.name: result.masks[e.name] for e in entries}, frame=result.frame,
                            modality=result.modality, source="prior")

    def predict(self, volume: Volume, entries: Sequence[PromptEntry], progress: bool = False) -> np.ndarray:
        """Label map on the input grid; value i+1 for ``entries[i]``, smaller classes painted last."""
        self.check_supported(entries)
        result = self.segment_work(volume, entries, progress)
        masks = [(i + 1, result.masks[e.name]) for i, e in enumerate(entries)]
        return geometry.paint_input_labels(masks, result.frame)
