"""Full-volume inference with MedPromptNet: slice-batched, tiled, back on the input's own grid."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from scipy import ndimage as ndi
from tqdm import tqdm

from medprompt.catalog import PromptEntry
from medprompt.errors import WeightsError
from medprompt.model.checkpoint import load_model, resolve_device
from medprompt.model.grid import NetGrid, body_centre, to_net_grid
from medprompt.model.network import MedPromptNet
from medprompt.localization import Localization
from medprompt.prior import geometry

if TYPE_CHECKING:
    from medprompt.io.volume import Volume


def centred_starts(size: int, tile: int, centre: int) -> list[int]:
    """Window starts along one axis: the tile centred on the body first, then neighbours outward
    (overlapping by a quarter) until the whole axis is covered."""
    first = min(max(0, centre - tile // 2), max(0, size - tile))
    starts = [first]
    step = max(1, (3 * tile) // 4)
    s = first
    while s > 0:
        s = max(0, s - step)
        starts.insert(0, s)
    s = first
    while s + tile < size:
        s = min(size - tile, s + step)
        starts.append(s)
    return starts


class Predictor:
    """A loaded network plus the text vectors it needs; ``predict`` is what drafts call."""

    def __init__(self, net: MedPromptNet, meta: dict, device: torch.device, text_encoder: str | None = None):
        self.net = net
        self.meta = meta
        self.device = device
        self.text_encoder = text_encoder or meta.get("text_encoder")
        self.batch = 16 if device.type == "cpu" else 64

    def class_vectors(self, entries: Sequence[PromptEntry]) -> torch.Tensor:
        """Text vectors for the prompts: stored in the checkpoint for its classes, encoded for others."""
        return stored_or_encoded(entries, self.meta, self.text_encoder, self.net.cfg.text_dim).to(self.device)

    @torch.no_grad()
    def probabilities(self, grid: NetGrid, text: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """Sigmoid masks (P, X, Y, Z) on the working grid, averaging overlapping tiles, on ``self.device``.

        The volume goes to the device once and stays there: on a GPU, copying every slice batch
        and every tile's masks to and from host memory cost more than the network itself.
        """
        tile = self.net.cfg.tile
        image = grid.image
        nx, ny, nz = image.shape
        cx, cy = body_centre(image)
        # Pad so that a tile centred on the body fits, as in training; wider bodies get more tiles.
        ox, oy = max(0, tile // 2 - cx), max(0, tile // 2 - cy)
        px = max(nx + ox, cx + ox + (tile - tile // 2))
        py = max(ny + oy, cy + oy + (tile - tile // 2))
        padded = np.full((px, py, nz), -1.0, np.float32)  # -1 = air after normalisation
        padded[ox : ox + nx, oy : oy + ny] = image
        windows = [(x, y) for x in centred_starts(px, tile, cx + ox) for y in centred_starts(py, tile, cy + oy)]
        fg = np.argwhere((padded > -0.95).any(axis=2))
        x0, y0 = max(0, cx + ox - tile // 2), max(0, cy + oy - tile // 2)
        if len(fg) and fg[:, 0].min() >= x0 and fg[:, 0].max() < x0 + tile and fg[:, 1].min() >= y0 and fg[:, 1].max() < y0 + tile:
            windows = [(x0, y0)]  # the body fits the centred tile: exactly what training saw
        hits = torch.zeros((px, py), device=self.device)
        for x, y in windows:
            hits[x : x + tile, y : y + tile] += 1
        # Slice-major (Z, X, Y) input and (Z, P, X, Y) output: a batch of slices is one contiguous block.
        volume = torch.from_numpy(np.ascontiguousarray(np.moveaxis(padded, 2, 0))).to(self.device)
        out = torch.zeros((nz, text.shape[0], px, py), device=self.device)
        half = self.net.cfg.in_slices // 2
        for k0 in tqdm(range(0, nz, self.batch), desc="medprompt", unit="batch", disable=not progress, leave=False):
            ks = torch.arange(k0, min(k0 + self.batch, nz), device=self.device)
            # (B, S, X, Y): each slice with its neighbours, edge slices repeated (as TileSampler in training).
            stack = volume[(ks[:, None] + torch.arange(-half, half + 1, device=self.device)).clamp(0, nz - 1)]
            for x, y in windows:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                    logits, _ = self.net(stack[:, :, x : x + tile, y : y + tile].contiguous(), text)
                out[k0 : k0 + len(ks), :, x : x + tile, y : y + tile] += torch.sigmoid(logits.float())
        out /= hits.clamp(min=1)
        return out[:, :, ox : ox + nx, oy : oy + ny].permute(1, 2, 3, 0)

    def work_masks(self, volume: "Volume", entries: Sequence[PromptEntry],
                   progress: bool = False) -> tuple[list[np.ndarray], NetGrid]:
        """Per prompt, where it is the most probable class above 0.5, on the network's grid."""
        grid = to_net_grid(volume, self.device)
        prob = self.probabilities(grid, self.class_vectors(entries), progress)
        best = prob.argmax(dim=0)
        fg = prob.max(dim=0).values > 0.5
        masks = []
        for i, entry in enumerate(entries):
            mask = (fg & (best == i)).cpu().numpy()
            if int(entry.prior.get("components", 0)) == 1 and mask.any():
                mask = largest_component(mask)
            masks.append(mask)
        return masks, grid

    def localize(self, volume: "Volume", entries: Sequence[PromptEntry], progress: bool = False) -> Localization:
        """Where each class is, for a segmenter to draw (see medprompt.sam.refine)."""
        masks, grid = self.work_masks(volume, entries, progress)
        return Localization(masks={e.name: m for e, m in zip(entries, masks)}, frame=grid.frame,
                            modality=grid.modality, source="medprompt")

    def predict(self, volume: "Volume", entries: Sequence[PromptEntry], progress: bool = False) -> np.ndarray:
        """Label map on the input grid: value i+1 where prompt i is the most probable above 0.5."""
        masks, grid = self.work_masks(volume, entries, progress)
        return geometry.paint_input_labels(list(enumerate(masks, start=1)), grid.frame, self.device)


def stored_or_encoded(entries: Sequence[PromptEntry], meta: dict, text_encoder: str | None,
                      text_dim: int) -> torch.Tensor:
    """Text vectors (P, text_dim) for prompts: a checkpoint's stored vector for the classes it was trained
    on (when the encoder is the same), the text encoder's for the others; WeightsError if it cannot match."""
    stored = meta.get("class_vectors", {})
    same_encoder = encoder_key(text_encoder) == encoder_key(meta.get("text_encoder"))
    vecs = []
    encoder = None
    for e in entries:
        if same_encoder and e.name in stored:
            vecs.append(np.asarray(stored[e.name], np.float32))
            continue
        if encoder is None:
            from medprompt.text import get_text_encoder

            encoder = get_text_encoder(text_encoder)
            if encoder.dim != text_dim:
                raise WeightsError(
                    f"text encoder '{encoder.key}' gives {encoder.dim}-d vectors but the checkpoint "
                    f"{meta.get('path')} was trained with '{meta.get('text_encoder')}' ({text_dim}-d)"
                )
        from medprompt.text import class_embedding

        vecs.append(class_embedding(e, encoder))
    return torch.from_numpy(np.stack(vecs))


def encoder_key(spec: str | None) -> str | None:
    """The default encoder has several spellings; compare them as one."""
    from medprompt.text.encoders import MINILM_KEY

    return MINILM_KEY if spec is None or str(spec).lower() in ("minilm", "all-minilm-l6-v2", MINILM_KEY) else spec


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Single-part organs: stray islands far from the organ are false positives."""
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = ndi.sum(mask, lab, index=np.arange(1, n + 1))
    return lab == (int(np.argmax(sizes)) + 1)


def load_checkpoint(path: Path | str, device: str = "auto", text_encoder: str | None = None) -> Predictor:
    """A Predictor for a ViT model file (``drafts.predictor`` loads either kind, the shipped one by
    default); WeightsError names a missing file. The path is required: a default here would be the ViT,
    which is not the shipped model."""
    dev = resolve_device(device)
    net, meta = load_model(Path(path), dev)
    return Predictor(net, meta, dev, text_encoder)
