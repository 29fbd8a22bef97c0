"""MedPromptNet on LiteMedSAM features at inference: per-cell class maps -> a localisation for SAM.

For a 3D study the network runs on the sampled slices' cached embeddings (the ones the segmenter
draws on next, so the learned localiser adds only its own small cost), its per-cell probabilities
are brought onto the axial view and interpolated between sampled slices, and each class's region is
where it is the most probable class above 0.5 (the anatomy prior's where that region is under half
the prior's: medprompt.model.prior_fusion). A model file records the modalities it learnt; a study of
another (an MR for a model taught on CT alone) is localised by the prior, which reads any study's own
geometry, until corrected studies of that modality teach the network. For a 2D image the same map is a
saliency map.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medprompt.catalog import PromptCatalog, PromptEntry
from medprompt.localization import Localization
from medprompt.model.sam_features import (
    SliceStack, between_sampled, cells_to_slices, localisation_frame, study_stack, to_cells, view_masks_to_work,
)
from medprompt.model.predictor import encoder_key, stored_or_encoded
from medprompt.model.sam_net import SamPromptNet
from medprompt.model.sam_checkpoint import load_net
from medprompt.sam.preprocess import SliceGeometry

if TYPE_CHECKING:
    from medprompt.io.image2d import Image2D
    from medprompt.io.volume import Volume

log = logging.getLogger(__name__)
WORK_SIDE = 128  # pixels on the longest in-plane side of the localisation grid (cells are 64 across)


class SamNetPredictor:
    """A loaded network and its class vectors; ``localize`` is what drafts call."""

    def __init__(self, net: SamPromptNet, meta: dict, device: torch.device, text_encoder: str | None = None,
                 sam_checkpoint: str | Path | None = None, fuse_prior: bool = True,
                 catalog: PromptCatalog | None = None, source: str = "medprompt"):
        self.net = net
        self.source = source  # what a draft's stages name (trainers.study_adaptation: "adapted medprompt")
        self.fuse_prior = fuse_prior  # 3D drafts: the prior's region where the network finds too little
        self.catalog = catalog
        self.meta = meta
        self.device = device
        self.text_encoder = text_encoder or meta.get("text_encoder")
        self.sam_checkpoint = sam_checkpoint
        self.batch = 16 if device.type == "cpu" else 64

    def class_vectors(self, entries: Sequence[PromptEntry]) -> torch.Tensor:
        """Stored vectors for the checkpoint's classes; others encoded with its text encoder."""
        return stored_or_encoded(entries, self.meta, self.text_encoder, self.net.cfg.text_dim).to(self.device)

    def asked_probabilities(self, stack: SliceStack, entries: Sequence[PromptEntry]) -> torch.Tensor:
        """(K, 1 + P, 64, 64) per cell: "anything else", then each asked prompt. The classes the network was
        trained on that were not asked compete too: trained with them in the softmax, a cell of a class left
        out would otherwise fall to whichever prompt is least unlikely. Each counts for the asked class it is
        a part of (kidney_left for "kidneys"), else as "anything else" (sam_net.channel_owner, as in training)."""
        from medprompt.model.sam_net import channel_owner, merge_probabilities, part_matrix

        asked = {e.name for e in entries}
        others = [(c, np.asarray(v, np.float32)) for c, v in self.meta.get("class_vectors", {}).items()
                  if c not in asked]
        if encoder_key(self.text_encoder) != encoder_key(self.meta.get("text_encoder")):
            others = []  # stored vectors of another encoder cannot share a softmax with these prompts
        text = self.class_vectors(entries)
        if others:
            text = torch.cat([text, torch.from_numpy(np.stack([v for _, v in others])).to(text.device)])
        p = self.cell_probabilities(stack, text)
        n = len(entries)
        names = [e.name for e in entries] + [c for c, _ in others]
        part_of = part_matrix(names, {e.name: e.prior.get("parts", ()) for e in entries})
        stated = torch.tensor([[True] * n + [False] * len(others)])
        owner = channel_owner(stated, part_of).expand(len(p), -1)
        return merge_probabilities(p, owner)[:, : 1 + n]

    def cell_uncertainty_inputs(self, volume: "Volume", entries: Sequence[PromptEntry]) -> tuple[np.ndarray, np.ndarray]:
        """Each prompt's probability per cell of the sampled slices (P, K, 64, 64) and the cells inside the
        body (K, 64, 64): what active learning's uncertainty reads."""
        stack = study_stack(volume, self.segmenter_for(None))
        prob = self.asked_probabilities(stack, entries)[:, 1:].permute(1, 0, 2, 3).numpy()
        return prob, stack.tissue.numpy()

    def segmenter_for(self, segmenter_for: Callable | None = None) -> Callable:
        """The caller's segmenter factory (a draft shares its own), else LiteMedSAM's with the shared cache."""
        if segmenter_for is not None:
            return segmenter_for
        from medprompt.sam import segmenter_factory

        return segmenter_factory(self.sam_checkpoint)

    @torch.no_grad()
    def cell_probabilities(self, stack: SliceStack, text: torch.Tensor) -> torch.Tensor:
        """Softmax over background + prompts per cell (K, 1 + P, 64, 64) for every sampled slice."""
        return cell_softmax(self.net, stack.embeddings, stack.neighbours(self.net.cfg.reach), stack.coords(), text,
                            self.device, self.batch)

    def view_probabilities(self, stack: SliceStack, entries: Sequence[PromptEntry]) -> tuple[np.ndarray, tuple[int, int]]:
        """(1 + P, Z, rows_w, cols_w) float16 on every view slice of a localisation grid."""
        rows, cols = stack.geometry.shape
        s = min(1.0, WORK_SIDE / max(rows, cols))
        shape = (max(1, round(rows * s)), max(1, round(cols * s)))
        cells = self.asked_probabilities(stack, entries)
        sampled = cells_to_slices(cells, stack.geometry, shape).numpy()  # (K, 1 + P, r, c)
        nz = stack.view_shape[0]
        prob = np.zeros((sampled.shape[1], nz, *shape), np.float16)
        prob[0] = 1.0
        for z, j, j2, w in between_sampled(stack.slices, stack.step, nz):
            prob[:, z] = sampled[j] if w == 0 else (1 - w) * sampled[j] + w * sampled[j2]
        return prob, shape

    def unlearnt(self, modality: str) -> bool:
        """Whether the model file says it never learnt studies of ``modality`` (a file without the record: any)."""
        learnt = self.meta.get("modalities")
        return learnt is not None and modality not in learnt

    def localize(self, volume: "Volume", entries: Sequence[PromptEntry], progress: bool = False,
                 segmenter_for: Callable | None = None) -> Localization:
        """Where each class is (most probable above 0.5), for a segmenter to draw (medprompt.sam.refine);
        with ``fuse_prior``, the anatomy prior's region for a class the network found too little of
        (medprompt.model.prior_fusion), and for every class the prior supports on a study of a modality the
        model never learnt."""
        stack = study_stack(volume, self.segmenter_for(segmenter_for), progress)
        prob, (rows, cols) = self.view_probabilities(stack, entries)
        masks = network_regions(prob, entries)
        source = self.source
        # Also for classes annotators corrected: one corrected CT taught the network too little for
        # another study (ct_abdomen_b_dicom's corrections -> ct_abdomen_a: 0.703 without the fallback
        # for its classes, 0.764 with it; BENCHMARKS.md).
        if self.fuse_prior:
            from medprompt.model.prior_fusion import fuse, prior_view_masks, tubes

            prior = prior_view_masks(volume, entries, stack, (rows, cols), self.catalog)
            if self.unlearnt(stack.modality):
                masks = {n: prior.get(n, m) for n, m in masks.items()}
                learnt = ", ".join(self.meta["modalities"]) or "no study"
                source = f"prior (the model learnt {learnt}, not {stack.modality})"
                log.warning(f"{volume.source}: the model learnt {learnt} only, so this {stack.modality} study is "
                            f"localised by the anatomy prior; corrected {stack.modality} studies and a finetune "
                            f"round teach it")
            else:
                # one cell: LiteMedSAM's 64 cells span the slice's longest side, here max(rows, cols) pixels
                masks, taken = fuse(masks, prior, max(rows, cols) / 64, shaped=tubes(entries, self.meta))
                source = f"{source}+prior" if taken else source
        return Localization(masks={n: view_masks_to_work(m) for n, m in masks.items()},
                            frame=localisation_frame(stack, rows, cols), modality=stack.modality, source=source)

    def predict(self, volume: "Volume", entries: Sequence[PromptEntry], progress: bool = False,
                segmenter_for: Callable | None = None) -> np.ndarray:
        """Label map on the input grid from the network's own regions (no SAM boundary)."""
        from medprompt.prior import geometry

        loc = self.localize(volume, entries, progress, segmenter_for)
        return geometry.paint_input_labels([(i + 1, loc.masks[e.name]) for i, e in enumerate(entries)], loc.frame)

    def saliency_2d(self, pixels: np.ndarray, pixel_mm: Sequence[float], entries: Sequence[PromptEntry],
                    modality: str, segmenter_for: Callable | None = None) -> np.ndarray:
        """(P, rows, cols) probabilities of each prompt on a 2D image (uint8 as LiteMedSAM sees it)."""
        from medprompt.model.sam_features import image_stack

        stack = image_stack(pixels, pixel_mm, modality, self.segmenter_for(segmenter_for))
        cells = self.asked_probabilities(stack, entries)
        return cells_to_slices(cells, stack.geometry)[0, 1:].numpy()


def network_regions(prob: np.ndarray, entries: Sequence[PromptEntry]) -> dict[str, np.ndarray]:
    """(1 + P, Z, rows, cols) probabilities -> each class's region: where it is the most probable class
    above 0.5; a single-part organ keeps its largest component."""
    from medprompt.model.predictor import largest_component

    best = prob.argmax(axis=0)
    fg = prob.max(axis=0) > 0.5
    masks = {}
    for i, entry in enumerate(entries):
        mask = fg & (best == i + 1)
        if int(entry.prior.get("components", 0)) == 1 and mask.any():
            mask = largest_component(mask)
        masks[entry.name] = mask
    return masks


@torch.no_grad()
def cell_softmax(net: SamPromptNet, embeddings, neighbours: torch.Tensor, coords: torch.Tensor,
                 text: torch.Tensor, device: torch.device, batch: int = 16,
                 among: torch.Tensor | None = None) -> torch.Tensor:
    """(K, 1 + P, 64, 64) softmax of every slice of a stack (embeddings, a tensor or a round's
    trainers.disk_embeddings, with their neighbour indices); ``among`` (1 + P bool): only those
    channels compete, the others are 0."""
    out = []
    h, w = embeddings.shape[-2:]
    for i in range(0, len(neighbours), batch):
        idx = neighbours[i : i + batch]
        emb = embeddings[idx].to(device)  # read a batch at a time: neighbouring slices repeat
        logits = net.slice_logits(emb, coords.to(device)[None].expand(len(idx), -1, -1, -1), text.to(device)).float()
        if among is not None:
            logits = logits.masked_fill(~among.to(device)[None, :, None], float("-inf"))
        out.append(F.softmax(logits, 1).reshape(len(idx), -1, h, w).cpu())
    return torch.cat(out)


def load_sam_predictor(path: Path | str, device: str = "auto", text_encoder: str | None = None,
                       sam_checkpoint: str | Path | None = None, fuse_prior: bool = True) -> SamNetPredictor:
    """``fuse_prior``: False gives the network's regions alone (benchmarks of the network itself)."""
    from medprompt.model.checkpoint import resolve_device

    dev = resolve_device(device)
    net, meta = load_net(Path(path), dev)
    return SamNetPredictor(net, meta, dev, text_encoder, sam_checkpoint, fuse_prior)


def saliency_method(checkpoint: str | Path | None = None, sam_checkpoint: str | Path | None = None) -> Callable:
    """The network's class map as a 2D saliency method (medprompt.saliency): ``--model medprompt`` on an image."""
    def medprompt_saliency(image, entry: PromptEntry) -> np.ndarray:
        from medprompt.drafts import predictor
        from medprompt.errors import PromptError
        from medprompt.model.sam_features import image_pixels

        pred = predictor(checkpoint, None, sam_checkpoint)
        if not isinstance(pred, SamNetPredictor):
            raise PromptError(f"{pred.meta.get('path')} is a model on pixels (vit), for volumes; a 2D image is "
                              "localised by a saliency method (--saliency), --model weak:MODEL.pt, or --model "
                              "medprompt with a model on LiteMedSAM features (`medprompt train-finetune` on a 2D "
                              "datastore makes one)")
        pixels, pixel_mm, modality = image_pixels(image)
        return pred.saliency_2d(pixels, pixel_mm, [entry], modality)[0]

    medprompt_saliency.probability = True  # a softmax: drafts2d reads it at 0.5, not by k-means
    medprompt_saliency.perfect = perfect_map
    return medprompt_saliency


def perfect_map(image: "Image2D", mask: np.ndarray) -> np.ndarray:
    """What a perfect network would map for ``mask`` on a 2D image: each cell of LiteMedSAM's frame holds
    the mask's share of it (as training targets do, sam_features.to_cells), brought back to the image's
    pixels as the network's map is. Below 1 along the rim, so a thin organ's never reaches 1 (drafts2d)."""
    g = SliceGeometry.for_slice(mask.shape, tuple(image.pixel_mm))
    return cells_to_slices(to_cells(mask[None].astype(np.int32), g, [1])[:, 1:], g)[0, 0].numpy()


medprompt_saliency = saliency_method()  # the default model; registered in medprompt.saliency as "medprompt"
