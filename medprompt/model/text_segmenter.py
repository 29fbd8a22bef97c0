"""LiteMedSAM prompted with text: text + box drafts through today's refine path, and text-only drafts.

- :func:`refine_with_text`: ``medprompt.sam.refine.refine`` unchanged (the localiser's boxes, its
  sampling, interpolation, slack and overlap rules), but every box also carries its class's text
  tokens (medprompt.model.text_tokens); refine names each ask's class.
- :func:`text_only_labels`: no box at all; each class's text tokens alone on the study's sampled
  slices (all of them, or only within a localiser's slice extent), logits interpolated between
  sampled slices, the most probable class above 0 wins, a one-part organ keeps its largest component.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medprompt.model.text_tokens import TextTokens, class_text, low_res_logits, prompt_tokens
from medprompt.sam.decoder import SliceContext, decode_groups, slice_context, token_pe
from medprompt.sam.refine import OUTSIDE

if TYPE_CHECKING:
    from medprompt.catalog import PromptEntry
    from medprompt.io.volume import Volume
    from medprompt.localization import Localization
    from medprompt.sam.refine import RefineSettings
    from medprompt.sam.segmenter import SliceSegmenter


class TextPromptSegmenter:
    """A :class:`SliceSegmenter` whose box prompts also carry their class's text tokens.

    Everything but ``predict_regions`` is the wrapped segmenter's (its embeddings, cache, geometry)."""

    def __init__(self, seg: "SliceSegmenter", model: TextTokens, meta: dict) -> None:
        self.seg = seg
        self.model = model
        self.meta = meta
        self.view = model.sam_view(seg.sam.net)
        self._ctx: dict[int, SliceContext] = {}

    def __getattr__(self, name: str):
        return getattr(self.seg, name)

    def context(self, k: int) -> SliceContext:
        """Slice ``k``'s decoder context: the segmenter's own, or one for this model's finetuned decoder."""
        if self.model.decoder is None:
            return self.seg._context(k)
        ctx = self._ctx.get(k)
        if ctx is None:  # two decoder threads may both make it (refine.py): the same values
            if len(self._ctx) > 8:
                self._ctx.clear()
            image = self.seg.embedding(k).float()[None]
            ctx = slice_context(self.view, image, token_pe(self.view), self.seg.decoder_dtype)
            self._ctx[k] = ctx
        return ctx

    @torch.no_grad()
    def predict_regions(self, k: int, asks: Sequence[tuple[np.ndarray, tuple[int, int, int, int]]],
                        classes: Sequence[str | None] | None = None) -> list[torch.Tensor]:
        """As ``SliceSegmenter.predict_regions``, each ask's boxes with the text tokens of ``classes[i]``
        (None, or a class the model has no vector for: box only)."""
        known = self.meta.get("class_vectors", {})
        names = [n if n in known else None for n in (classes or [None] * len(asks))]
        if not any(names):
            return self.seg.predict_regions(k, asks)
        self.seg.prepare([k])
        g, net = self.seg.geometry, self.seg.sam.net
        out: list[torch.Tensor | None] = [None] * len(asks)
        plain = [i for i, n in enumerate(names) if n is None]
        if plain:
            for i, logits in zip(plain, self.seg.predict_regions(k, [asks[i] for i in plain])):
                out[i] = logits
        texted = [i for i, n in enumerate(names) if n is not None]
        boxes = np.concatenate([np.asarray(asks[i][0], np.float32).reshape(-1, 4) for i in texted])
        rows = [names[i] for i in texted for _ in range(len(np.asarray(asks[i][0]).reshape(-1, 4)))]
        text = class_text(self.meta, rows)
        sparse = prompt_tokens(net, self.model, text, torch.from_numpy(g.box_to_model(boxes)))
        groups = [(asks[i][1], len(np.asarray(asks[i][0]).reshape(-1, 4))) for i in texted]
        for i, (logits, _) in zip(texted, decode_groups(self.view, self.context(k), sparse, g, groups)):
            out[i] = logits.float().cpu()
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def text_only(self, k: int, names: Sequence[str]) -> torch.Tensor:
        """Logits (len(names), 256, 256) on SAM's input frame of slice ``k`` from text tokens alone."""
        image = self.seg.embedding(k).float()[None]
        sparse = prompt_tokens(self.seg.sam.net, self.model, class_text(self.meta, names))
        return low_res_logits(self.seg.sam.net, self.model, image, sparse)


def refine_with_text(volume: "Volume", loc: "Localization", entries: Sequence["PromptEntry"],
                     segmenter_for: Callable, model: TextTokens, meta: dict,
                     settings: "RefineSettings | None" = None, progress: bool = False):
    """``medprompt.sam.refine.refine`` with text + box prompts for the classes ``meta`` has vectors for."""
    from medprompt.sam.refine import RefineSettings, refine

    def make(slices: np.ndarray, pixel_mm: Sequence[float]) -> TextPromptSegmenter:
        return TextPromptSegmenter(segmenter_for(slices, pixel_mm), model, meta)

    return refine(volume, loc, entries, make, settings or RefineSettings(), progress)


def text_only_labels(volume: "Volume", entries: Sequence["PromptEntry"], segmenter_for: Callable,
                     model: TextTokens, meta: dict, extent: "Localization | None" = None) -> np.ndarray:
    """Label map on the input grid (value i+1 for ``entries[i]``) from text prompts alone.

    Slices: the study's sampled slices (medprompt.model.sam_features.study_stack, about every 5 mm);
    with ``extent``, each class only on the slices its localiser region spans (no in-plane hint)."""
    from medprompt.model.sam_features import between_sampled, label_view, study_stack
    from medprompt.prior import geometry
    from medprompt.sam.preprocess import from_axial_view
    from medprompt.sam.refine import largest_component

    stack = study_stack(volume, segmenter_for)
    seg = TextPromptSegmenter(segmenter_for(_view_of(volume), _pixel_mm(stack)), model, meta)
    names = [e.name for e in entries]
    ks = stack.slices
    low = torch.stack([seg.text_only(k, names) for k in ks]).half()  # (K, C, 256, 256)
    nz = stack.view_shape[0]
    allowed = np.ones((len(names), nz), bool)
    if extent is not None:
        painted = geometry.paint_input_labels([(i + 1, extent.masks[n]) for i, n in enumerate(names)
                                               if n in extent.masks and extent.masks[n].any()], extent.frame)
        present = label_view(painted, stack.frame)
        for i in range(len(names)):
            allowed[i] = (present == i + 1).any(axis=(1, 2))
    g = stack.geometry
    labels = np.zeros(stack.view_shape, np.uint16)
    for z, j, j2, w in between_sampled(ks, stack.step, nz):
        x = low[j].float() if w == 0 else (1 - w) * low[j].float() + w * low[j2].float()
        x = F.interpolate(x[None, :, : g.resized[0], : g.resized[1]], size=g.shape, mode="bilinear",
                          align_corners=False)[0]
        x[torch.from_numpy(~allowed[:, z])] = OUTSIDE
        best, idx = x.max(0)
        labels[z] = np.where(best.numpy() > 0, idx.numpy() + 1, 0)
    for i, e in enumerate(entries):
        if int(e.prior.get("components", 0)) == 1:
            mask = labels == i + 1
            labels[mask & ~largest_component(mask)] = 0
    return np.ascontiguousarray(geometry.canonical_to_input(from_axial_view(labels), stack.frame))


def _view_of(volume: "Volume") -> np.ndarray:
    """The default-window uint8 axial view LiteMedSAM sees (shared with refine and the prefetch)."""
    from medprompt.prior import geometry
    from medprompt.sam.preprocess import modality_of
    from medprompt.sam.refine import uint8_view

    canon, ornt, _ = geometry.to_canonical(np.asarray(volume.data), volume.affine)
    return uint8_view(volume, canon, ornt, modality_of(canon, volume.modality), None)


def _pixel_mm(stack) -> tuple[float, float]:
    sx, sy, _ = stack.frame.canonical_spacing
    return (float(sy), float(sx))
