"""Training studies for MedPromptNet on LiteMedSAM features: embeddings plus targets per 64 x 64 cell.

A study becomes its sampled slices' embeddings (medprompt.model.sam_features) and, per cell, the
area fraction of background and of each class, with a confidence weight:
- a corrected study (labels/final): its label map, weight 1 on every cell, for the classes it names;
- an unlabelled study: the teacher's draft (anatomy prior + LiteMedSAM) where the prior's own mask
  agrees with it, or where LiteMedSAM drew a class within one cell of the prior's mask of that class
  (SAM found the organ's boundary near where the prior put it: small organs such as the pancreas or
  gallbladder rarely agree cell by cell with a coarse prior mask, and a class without trusted cells is
  never learnt); cells where they disagree get no weight, cells on a boundary a reduced one.
Teacher and prior cells are computed once per study and cached (content-keyed) beside the model; the
weights are derived from them at load, so a change of the trust rule needs no new teacher.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from medprompt.catalog import PromptCatalog
from medprompt.model.sam_features import SliceStack, label_view, study_stack, to_cells
from medprompt.trainers.disk_embeddings import DiskEmbeddings, spilled

CACHE_VERSION = 5  # bump when the cached cells change meaning or the teacher changes (3: the MR vote per slice;
# 4: an MR coil's shading divided out; 5: the classes the teacher drew are kept with its cells)
PURE = 0.9  # a cell this much one class (or background) is a confident target
MIXED_WEIGHT = 0.3  # boundary cells: their soft fractions still teach, less strongly
BALANCE_CAP = 4.0  # the most a rare class's cells are up-weighted (see class_balance)


@dataclass
class CellStudy:
    """One study as the network trains on it (CPU tensors)."""

    name: str
    embeddings: torch.Tensor | DiskEmbeddings  # (K, 256, 64, 64) float16 (trainers.disk_embeddings in a round)
    neighbours: torch.Tensor  # (K, 2 * reach + 1) indices into embeddings
    coords: torch.Tensor  # (3, 64, 64)
    target: torch.Tensor  # (K, 1 + C, 64, 64) float16: background, then each class's share
    weight: torch.Tensor  # (K, 64, 64) float16: how much each cell's target is trusted
    known: torch.Tensor  # (C,) bool: the classes this study says anything about
    labelled: bool = False
    slices: list[int] | None = None  # the view slice of each embedding
    modality: str | None = None  # CT, MR, ...: a model records the modalities it learnt (sam_predictor's gate)
    digest: str | None = None  # the study's Volume.digest: a model records the studies it learnt (study_adaptation)

    def subset(self, keep: Sequence[int]) -> "CellStudy":
        """The same study with only slices ``keep`` (e.g. the ones not held out for validation)."""
        idx = torch.tensor(list(keep), dtype=torch.long)
        remap = {int(o): n for n, o in enumerate(idx)}
        nb = torch.tensor([[remap.get(int(j), n) for j in self.neighbours[int(o)]] for n, o in enumerate(idx)],
                          dtype=torch.long)
        emb = self.embeddings.select(keep) if isinstance(self.embeddings, DiskEmbeddings) else self.embeddings[idx]
        return CellStudy(self.name, emb, nb, self.coords, self.target[idx], self.weight[idx],
                         self.known, self.labelled, [self.slices[i] for i in keep] if self.slices else None,
                         self.modality, self.digest)


def from_labels(name: str, stack: SliceStack, labels_view: np.ndarray, names: dict[str, int],
                classes: Sequence[str], reach: int, labelled: bool = True) -> CellStudy:
    """A study whose label slices (view order, all of ``stack.view_shape``) are trusted everywhere."""
    values = [names.get(c, -1) for c in classes]
    target = to_cells(labels_view[stack.slices], stack.geometry, values)
    known = torch.tensor([c in names for c in classes])
    weight = torch.ones(target.shape[0], *target.shape[-2:])
    return CellStudy(name, stack.embeddings, stack.neighbours(reach), stack.coords(), target.half(), weight.half(),
                     known, labelled, list(stack.slices), stack.modality)


def teacher_weights(teacher: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Confidence of the teacher's cells (K, 1 + C, 64, 64): 1 where the cell is pure and the prior alone
    says the same class or the teacher's class lies within one cell of the prior's mask of it,
    MIXED_WEIGHT on such boundary cells, 0 elsewhere."""
    teacher, prior = teacher.float(), prior.float()
    t_best, p_best = teacher.argmax(1), prior.argmax(1)
    pure = teacher.amax(1) >= PURE
    near = F.max_pool2d(prior[:, 1:], 3, stride=1, padding=1) > 0  # (K, C, h, w): the prior's mask, one cell wider
    near = torch.cat([torch.zeros_like(near[:, :1]), near], 1).gather(1, t_best[:, None])[:, 0]
    agree = (t_best == p_best) | near
    return torch.where(agree, torch.where(pure, 1.0, MIXED_WEIGHT), 0.0)


def class_area(studies: Sequence[CellStudy], share: Sequence[float] | None = None) -> torch.Tensor:
    """(1 + C,) trusted area of each channel over ``studies`` (cells x confidence); ``share``: the part of
    each study to count (1 / the number of processes that hold it, when a round is spread over several)."""
    area = torch.zeros(studies[0].target.shape[1], dtype=torch.float64)
    for i, st in enumerate(studies):
        area += (st.target.double() * st.weight.double()[:, None]).sum((0, 2, 3)) * (1.0 if share is None else share[i])
    return area


def class_balance(area: torch.Tensor, cap: float = BALANCE_CAP) -> torch.Tensor:
    """(1 + C,) loss weight per channel from the trusted areas (:func:`class_area`): a class with less trusted
    area than the median class gets sqrt(median / its area), at most ``cap``; background and larger classes 1.
    In a softmax a class taught on a few hundred cells among a million background ones never becomes the
    most probable (the pancreas); the square root and the cap keep it from being drawn everywhere instead."""
    fg = area[1:]
    present = fg > 0
    out = torch.ones_like(area)
    if present.any():
        median = fg[present].median()
        out[1:] = torch.where(present, (median / fg.clamp(min=1e-6)).sqrt().clamp(1.0, cap), torch.ones_like(fg))
    return out.float()


def _key(path: Path, classes: Sequence[str], catalog: PromptCatalog) -> str:
    from medprompt.trainers.zero_shot import content_hash

    prompts = [json.dumps([catalog[c].prior, catalog[c].sam], sort_keys=True, default=str) for c in classes]
    raw = json.dumps([content_hash(path), list(classes), prompts, CACHE_VERSION])
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def teacher_study(path: Path, classes: Sequence[str], catalog: PromptCatalog, segmenter_for: Callable,
                  reach: int, cache_dir: Path) -> CellStudy:
    """An unlabelled study with the anatomy prior + LiteMedSAM as teacher (cached on disk)."""
    from medprompt.io.volume import load_volume

    volume = load_volume(path)
    stack = study_stack(volume, segmenter_for)
    cached = cache_dir / f"cells_{_key(path, classes, catalog)}.pt"
    if cached.exists():
        blob = torch.load(cached, map_location="cpu", weights_only=True)
        target, prior, known = blob["target"], blob["prior"], blob["known"].tolist()
    else:
        target, prior, known = taught_cells(volume, stack, classes, catalog, segmenter_for)
        from medprompt.model.checkpoint import atomic_torch_save

        atomic_torch_save({"target": target, "prior": prior, "known": torch.tensor(known)}, cached)
    return taught_study(path.name, volume, stack, target, prior, reach, known)


def teachable(classes: Sequence[str], catalog: PromptCatalog) -> list[str]:
    """The classes of ``classes`` the teacher draws: those the anatomy prior supports. A finetune round's
    other classes (a tumour, an annotator's own class) go unstated in a taught study (sam_net.channel_owner):
    the corrections teach them, and asking the prior for them would stop the round."""
    return [c for c in classes if c in catalog and catalog[c].prior_supported]


def widened(cells: torch.Tensor, classes: Sequence[str], taught: Sequence[str]) -> torch.Tensor:
    """Cells (K, 1 + len(taught), h, w) over background + ``taught`` as (K, 1 + len(classes), h, w), the
    untaught classes' channels empty."""
    if list(taught) == list(classes):
        return cells
    out = cells.new_zeros(cells.shape[0], 1 + len(classes), *cells.shape[2:])
    out[:, 0] = cells[:, 0]
    for i, c in enumerate(taught):
        out[:, 1 + list(classes).index(c)] = cells[:, 1 + i]
    return out


def taught_study(name: str, volume, stack: SliceStack, target: torch.Tensor, prior: torch.Tensor,
                 reach: int, known: Sequence[bool] | None = None) -> CellStudy:
    """An unlabelled study with its teacher's and prior's cells (:func:`taught_cells`), trusted by
    :func:`teacher_weights`; ``known``: the classes the teacher drew (default all)."""
    stated = torch.ones(target.shape[1] - 1, dtype=torch.bool) if known is None else torch.tensor(list(known))
    return CellStudy(name, stack.embeddings, stack.neighbours(reach), stack.coords(), target,
                     teacher_weights(target, prior).half(), stated, False, list(stack.slices), stack.modality,
                     volume.digest)


def taught_cells(volume, stack: SliceStack, classes: Sequence[str], catalog: PromptCatalog,
                 segmenter_for: Callable) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """The teacher's and the prior's cells (K, 1 + C, 64, 64) over background + every class of ``classes``, and
    which classes the teacher drew: :func:`teach` asked for the :func:`teachable` ones only, the others' channels
    left empty (a taught study does not state them)."""
    drawn = teachable(classes, catalog)
    target, prior = (widened(t, classes, drawn) for t in teach(volume, stack, drawn, catalog, segmenter_for))
    return target, prior, [c in drawn for c in classes]


def teach(volume, stack: SliceStack, classes: Sequence[str], catalog: PromptCatalog,
          segmenter_for: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's (prior + LiteMedSAM) and the prior's own per-cell class fractions (K, 1 + C, 64, 64)."""
    from medprompt.prior import geometry
    from medprompt.prior.engine import AnatomyPrior
    from medprompt.sam.refine import refine

    entries = [catalog[c] for c in classes]
    loc = AnatomyPrior(catalog).localize(volume, entries)
    drawn = refine(volume, loc, entries, segmenter_for).labels
    prior = geometry.paint_input_labels([(i + 1, loc.masks[e.name]) for i, e in enumerate(entries)
                                         if e.name in loc.masks], loc.frame)
    values = list(range(1, len(classes) + 1))
    t = to_cells(label_view(drawn, stack.frame)[stack.slices], stack.geometry, values)
    p = to_cells(label_view(prior, stack.frame)[stack.slices], stack.geometry, values)
    return t.half(), p.half()


def teacher_studies(paths: Sequence[Path], classes: Sequence[str], catalog: PromptCatalog, segmenter_for: Callable,
                    reach: int, cache_dir: Path, progress: bool = True, spill_to: Path | None = None,
                    desc: str = "teacher (prior + LiteMedSAM)") -> list[CellStudy]:
    """Teacher studies of ``paths``; with ``spill_to``, each one's embeddings go to disk as it is made
    (trainers.disk_embeddings), so only one study's are in memory at a time."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    return [spilled(teacher_study(p, classes, catalog, segmenter_for, reach, cache_dir), spill_to)
            for p in tqdm(paths, desc=desc, unit="study", disable=not progress)]
