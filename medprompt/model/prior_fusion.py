"""The learned localiser with the anatomy prior as its fallback: per class, the network's region unless
it found too little of the organ.

The network learns where organs are from the prior + LiteMedSAM teacher, trusted only where the two
agree (medprompt.trainers.cells). A class whose teacher was trusted on few cells (the pancreas), or a
study unlike its training studies (another modality or scanner), can leave it with a region far smaller
than the organ, or none; the prior, which needs no training and reads the study's own geometry, still
finds something. So a draft takes, per class, the network's region where it holds at least
``FALLBACK_RATIO`` of the prior's volume, and the prior's region otherwise: the two localisers'
strengths together (the network draws where it has learnt the organ, the prior keeps a class from
vanishing). Chosen from first principles (half the expected organ), not tuned: BENCHMARKS.md shows
the ratio's sensitivity on the development cases.

The prior's region is also taken where less than ``NEAR_RATIO`` of the network's region lies within one
cell of the prior's. The network learnt each class from teacher cells trusted only there (within one
cell of the prior's mask: medprompt.trainers.cells), so a region mostly elsewhere is not something it
was taught: a network taught on one CT put another CT's aorta and stomach in the wrong place
(Dice 0.000 each, BENCHMARKS.md "A region the teacher never taught").

A zero-shot model takes the prior's region of a class the prior finds by its shape (``method: vessel``:
a tube of plausible radius along a smooth centre line, the aorta) whenever the prior found one. The
network learnt that class from the prior's tube, four to six of its cells across; on the study itself
the tube is the more exact of the two (the aorta drawn by LiteMedSAM from the prior's region scored at
or above the network's in every measurement: BENCHMARKS.md "Tubes from the prior"). A model annotators
corrected keeps its own region: a correction outranks a shape model (an aneurysm wider than its tube).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from medprompt.catalog import PromptCatalog, PromptEntry
from medprompt.model.sam_features import SliceStack, label_view
from medprompt.prior import geometry

if TYPE_CHECKING:
    from medprompt.io.volume import Volume

FALLBACK_RATIO = 0.5  # the network's region must hold at least this share of the prior's volume
NEAR_RATIO = 0.5  # and at least this share of it must lie within one cell of the prior's region


def prior_view_masks(volume: "Volume", entries: Sequence[PromptEntry], stack: SliceStack, shape: tuple[int, int],
                     catalog: PromptCatalog | None = None) -> dict[str, np.ndarray]:
    """The anatomy prior's region of each class it supports, on the network's localisation grid:
    every axial view slice of ``stack`` at ``shape`` (rows, cols) pixels; (Z, rows, cols) bool."""
    from medprompt.prior.engine import AnatomyPrior

    supported = [e for e in entries if e.prior_supported]
    if not supported:
        return {}
    loc = AnatomyPrior(catalog).localize(volume, supported)
    labels = geometry.paint_input_labels([(i + 1, loc.masks[e.name]) for i, e in enumerate(supported)], loc.frame)
    view = label_view(labels, stack.frame)
    rows = ((np.arange(shape[0]) + 0.5) * view.shape[1] / shape[0]).astype(int)  # nearest, pixel centres
    cols = ((np.arange(shape[1]) + 0.5) * view.shape[2] / shape[1]).astype(int)
    grid = view[:, rows][:, :, cols]
    return {e.name: grid == i + 1 for i, e in enumerate(supported)}


def tubes(entries: Sequence[PromptEntry], meta: dict) -> frozenset[str]:
    """The classes whose region a model with record ``meta`` takes from the prior's tube (module docstring):
    those the prior finds by shape, unless annotators corrected the model."""
    if meta.get("labelled"):
        return frozenset()
    return frozenset(e.name for e in entries if e.prior.get("method") == "vessel")


def fuse(net: dict[str, np.ndarray], prior: dict[str, np.ndarray], cell_px: float, ratio: float = FALLBACK_RATIO,
         near_ratio: float = NEAR_RATIO, shaped: frozenset[str] = frozenset()
         ) -> tuple[dict[str, np.ndarray], list[str]]:
    """Per class the network's mask (Z, rows, cols), or the prior's where the network's holds less than ``ratio``
    of the prior's volume or has less than ``near_ratio`` of itself within one cell (``cell_px`` pixels in plane)
    of the prior's, and for every class of ``shaped`` (the prior's tubes); also the classes that took the prior's."""
    from scipy import ndimage as ndi

    reach = max(1, round(cell_px))
    out, taken = {}, []
    for name, mask in net.items():
        p = prior.get(name)
        out[name] = mask
        if p is None or not p.any():
            continue  # nothing of the prior's to fall back on
        size = int(mask.sum())
        take = name in shaped or size < ratio * int(p.sum())
        if not take:  # enough of it: is it where the teacher taught it?
            near = ndi.binary_dilation(p, structure=np.ones((1, 3, 3), bool), iterations=reach)
            take = int((mask & near).sum()) < near_ratio * size
        if take:
            out[name] = p
            taken.append(name)
    return out, taken
