"""MedPromptNet on LiteMedSAM's features: a region-text head over cached image embeddings.

The image encoder is LiteMedSAM's (frozen, its embeddings cached per slice for every draft
anyway), so a network that learns from a handful of studies on a 2-core CPU starts from features
trained on over a million medical image-mask pairs instead of from scratch (the 3 M-parameter ViT
of medprompt.model.network: 0.556 on a real CT and nothing on a held-out MR). What is learned is
small:

- an adapter (a per-cell MLP) over the slice's embedding, its neighbours' a sampling step below
  and above (through-plane context), and the cell's position in the slice;
- region-text alignment (MedPrompt): cell embeddings and each class's frozen text vector meet in
  one joint space; a learned background vector and temperature make the logits, softmax over
  background + the prompts of the call. Any prompts per call: a class is its text vector, so a
  prompt the network was not trained on still gets a map (weaker, but not nothing).

Its per-cell map says *where* each class is; LiteMedSAM draws the boundary from the boxes around
it (medprompt.sam.refine), as for the anatomy prior.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

EMBED_DIM = 256  # LiteMedSAM's image embedding channels


@dataclass(frozen=True)
class SamNetConfig:
    """Architecture hyper-parameters; stored in every checkpoint so it rebuilds itself."""

    text_dim: int = 384  # the frozen text encoder's output (MiniLM: 384, BiomedCLIP: 512)
    reach: int = 1  # neighbouring sampled slices on each side that enter with a slice
    width: int = 128
    joint_dim: int = 64

    @classmethod
    def preset(cls, name: str, text_dim: int) -> "SamNetConfig":
        from medprompt.errors import InputError

        presets = {"small": dict(), "tiny": dict(reach=1, width=16, joint_dim=8)}
        if name not in presets:
            raise InputError(f"unknown model config '{name}'; available: {', '.join(presets)}")
        return cls(text_dim=text_dim, **presets[name])

    def to_dict(self) -> dict:
        return asdict(self)


class SamPromptNet(nn.Module):
    """Per cell: embeddings of the slice and its neighbours + position -> background + one logit per prompt.

    Cells are independent (a per-cell MLP, no convolution): LiteMedSAM's embedding already holds
    each cell's surroundings (its encoder attends over the whole slice), and independence lets
    training draw a random subset of cells per slice, 4x cheaper on a CPU than whole maps with a
    spatial head, with the same expected loss.
    """

    def __init__(self, cfg: SamNetConfig):
        super().__init__()
        self.cfg = cfg
        slices = 2 * cfg.reach + 1
        self.norm = nn.LayerNorm(slices * EMBED_DIM + 3)
        self.mlp = nn.Sequential(nn.Linear(slices * EMBED_DIM + 3, cfg.width), nn.GELU(),
                                 nn.Linear(cfg.width, cfg.width), nn.GELU())
        self.cell_proj = nn.Linear(cfg.width, cfg.joint_dim)
        self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, cfg.joint_dim), nn.GELU(),
                                       nn.Linear(cfg.joint_dim, cfg.joint_dim))
        self.background = nn.Parameter(torch.randn(cfg.joint_dim) * 0.1)
        self.logit_scale = nn.Parameter(torch.tensor(2.3))  # exp -> 10, learned as in CLIP

    @property
    def in_features(self) -> int:
        return (2 * self.cfg.reach + 1) * EMBED_DIM + 3

    def text_embed(self, text: torch.Tensor) -> torch.Tensor:
        """Frozen text vectors (P, text_dim) -> normalised joint-space vectors (P, joint_dim)."""
        return F.normalize(self.text_proj(text), dim=-1)

    def forward(self, cells: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """cells (B, N, in_features) (see :func:`cell_inputs`), text (P, text_dim) -> logits (B, 1 + P, N):
        background, then one per text vector."""
        return self._logits(self.mlp(self.norm(cells)), self._classes(text))

    @torch.no_grad()
    def slice_logits(self, emb: torch.Tensor, coords: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``forward(cell_inputs(emb, coords), text)`` for inference on whole slices, 1.8x as fast on a CPU.

        Every cell of a slice is 771 inputs: 16 slices' inputs are 200 MB of float32, and the input
        LayerNorm, reading them strided from ``cell_inputs``' transposed view, took half the time of
        scoring a round's unlabelled studies. Here each slice is handled alone (12.6 MB, which stays in
        the CPU's cache) and the LayerNorm is folded into the first linear layer: W (g (x - m) / s + b)
        + c = (W' x - m W' 1) / s + (W b + c) with W' = W diag(g), so the normalised inputs are never
        written; only each cell's mean and variance are. Equal to ``forward`` up to float rounding
        (tests/test_sam_net.py). emb (B, S, 256, h, w) in any float precision, coords (B, 3, h, w)."""
        first = self.mlp[0]
        weight = first.weight * self.norm.weight  # (width, in_features): the LayerNorm's scale folded in
        bias = first.bias + first.weight @ self.norm.bias
        row_sums = weight.sum(1)
        classes = self._classes(text)
        out = []
        for e, c in zip(emb, coords):
            x = cell_inputs(e[None], c[None]).float()  # (1, N, in_features)
            var, mean = torch.var_mean(x, -1, correction=0)  # (1, N): each cell's statistics, as LayerNorm's
            h = x @ weight.T  # (1, N, width)
            h = (h - mean[..., None] * row_sums) * torch.rsqrt(var + self.norm.eps)[..., None] + bias
            out.append(self._logits(self.mlp[1:](h), classes))
        return torch.cat(out)

    def _classes(self, text: torch.Tensor) -> torch.Tensor:
        """Background + each prompt's joint-space vector (1 + P, joint_dim), normalised."""
        return torch.cat([F.normalize(self.background, dim=0)[None], self.text_embed(text)], 0)

    def _logits(self, hidden: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """The adapter's hidden cells (B, N, width) -> logits (B, 1 + P, N) against ``classes`` (:meth:`_classes`)."""
        x = F.normalize(self.cell_proj(hidden), dim=-1)
        return self.logit_scale.exp().clamp(max=100) * torch.einsum("bnd,kd->bkn", x, classes)


def cell_inputs(emb: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Maps -> per-cell inputs: emb (B, S, 256, h, w) (the slice itself in the middle of S), coords
    (B, 3, h, w) -> (B, h * w, S * 256 + 3)."""
    b, s, c, h, w = emb.shape
    return torch.cat([emb.reshape(b, s * c, h * w), coords.reshape(b, 3, h * w)], 1).transpose(1, 2)


def part_matrix(classes: Sequence[str], parts: Mapping[str, Sequence[str]]) -> torch.Tensor:
    """(C, C) bool: [i, j] where class j is one of class i's parts (the catalog's prior.parts:
    kidney_left and kidney_right of "kidneys")."""
    return torch.tensor([[c in parts.get(whole, ()) for c in classes] for whole in classes], dtype=torch.bool)


def channel_owner(stated: torch.Tensor, part_of: torch.Tensor | None = None) -> torch.Tensor:
    """Which channel each channel's probability counts for when a sample (or a call) states only some
    classes: stated (B, C) bool -> (B, 1 + C) channel indices. A stated class is itself; an unstated part
    of a stated class counts for that class (a study labelled "kidneys" has its kidney_left); any other
    unstated class counts as background ("none of the stated classes": a correction that labels the liver
    says a kidney cell is not liver, not that it is no kidney). Partial labels as a marginal, not a
    mask: with the unstated classes left out of the softmax, a study labelling five organs taught
    background on the other three and the network unlearnt them."""
    b, c = stated.shape
    own = torch.arange(1, c + 1, device=stated.device).expand(b, c)
    owner = torch.where(stated, own, torch.zeros_like(own))
    if part_of is not None:
        whole = part_of.to(stated.device).T[None] & stated[:, None, :]  # (B, part j, whole i): i stated
        owner = torch.where(~stated & whole.any(-1), whole.float().argmax(-1) + 1, owner)
    return torch.cat([torch.zeros_like(owner[:, :1]), owner], 1)


def merged_log_softmax(logits: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """log of each channel's probability with the channels it owns added (B, 1 + C, ...); -1e4 in channels
    that count for another."""
    k = logits.shape[1]
    owns = F.one_hot(owner, k).transpose(1, 2).bool()  # (B, owner, channel)
    owns = owns.reshape(*owns.shape, *([1] * (logits.dim() - 2)))
    lp = F.log_softmax(logits, 1)[:, None]
    return torch.logsumexp(lp.masked_fill(~owns, float("-inf")), 2).clamp(min=-1e4)


def merge_probabilities(p: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """Probabilities (B, 1 + C, ...) with each channel added to its owner; 0 in channels that count for another."""
    idx = owner.reshape(*owner.shape, *([1] * (p.dim() - 2))).expand_as(p)
    return torch.zeros_like(p).scatter_add_(1, idx, p)
