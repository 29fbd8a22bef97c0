"""Teachers: where the learned model's targets come from when there are no pixel labels.

A teacher turns an unlabelled volume and the class list into soft targets plus a confidence per
voxel. The anatomy prior is the teacher available everywhere; the MedCLIP-SAM teacher plugs in
through the same interface. Trainers only ever see images and teachers: never a label file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
from scipy import ndimage as ndi

from medprompt.catalog import PromptCatalog, PromptEntry
from medprompt.model.grid import NetGrid


@dataclass
class TeacherTargets:
    """Per-class soft targets and confidences on the network's working grid, (C, X, Y, Z) float32."""

    target: np.ndarray
    weight: np.ndarray


class Teacher(Protocol):
    name: str

    def targets(self, grid: NetGrid, entries: Sequence[PromptEntry]) -> TeacherTargets: ...


class PriorTeacher:
    """The anatomy prior as a teacher: confident deep inside and well outside its masks.

    The prior's borders are its least reliable part, so a band around each mask is left
    unweighted; a class the prior did not find at all teaches nothing (absence is not evidence).
    """

    name = "prior"

    def __init__(self, catalog: PromptCatalog, inner_mm: float = 2.5, outer_mm: float = 7.5):
        self.catalog = catalog
        self.inner_mm = inner_mm
        self.outer_mm = outer_mm

    def targets(self, grid: NetGrid, entries: Sequence[PromptEntry]) -> TeacherTargets:
        from medprompt.io.volume import Volume
        from medprompt.prior.engine import AnatomyPrior

        volume = Volume(data=grid.raw, affine=grid.affine, source="teacher", modality=grid.modality)
        known = [e for e in entries if e.prior_supported]  # e.g. an annotator's new class: no prior
        result = AnatomyPrior(self.catalog).segment_work(volume, known)
        if result.masks and next(iter(result.masks.values())).shape != grid.raw.shape:
            raise RuntimeError("prior working grid differs from the network grid")  # a bug, not user input
        body = result.landmarks.body
        sp = grid.frame.work_spacing
        inner = tuple(max(0, int(round(self.inner_mm / s))) for s in sp)
        outer = tuple(max(1, int(round(self.outer_mm / s))) for s in sp)
        target = np.zeros((len(entries), *grid.raw.shape), np.float32)
        weight = np.zeros_like(target)
        for c, entry in enumerate(entries):
            if entry.name not in result.masks:
                continue  # weight 0: this teacher knows nothing of the class
            mask = result.masks[entry.name]
            if not mask.any():
                weight[c] = ~body  # outside the patient is certain; inside we know nothing
                continue
            core = _erode(mask, inner) if any(inner) else mask
            near = _dilate(mask, outer)
            target[c] = core
            weight[c] = core | ~near
        return TeacherTargets(target=target, weight=weight.astype(np.float32))


def _erode(mask: np.ndarray, radius: tuple[int, int, int]) -> np.ndarray:
    """Binary erosion by a box (outside the array counts as background), as three 1-D passes:
    the same voxels as ``ndi.binary_erosion`` with a box structure, many times faster."""
    return ndi.minimum_filter(mask, size=tuple(2 * r + 1 for r in radius), mode="constant", cval=0)


def _dilate(mask: np.ndarray, radius: tuple[int, int, int]) -> np.ndarray:
    """Binary dilation by a box, separably (see ``_erode``)."""
    return ndi.maximum_filter(mask, size=tuple(2 * r + 1 for r in radius), mode="constant", cval=0)
