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
        x = F.normalize(self.cell_proj(self.mlp(self.norm(cells))), dim=-1)
        classes = torch.cat([F.normalize(self.background, dim=0)[None], self.text_embed(text)], 0)
        return self.logit_scale.exp().clamp(max=100) * torch.einsum("bnd,kd->bkn", x, classes)


def cell_inputs(emb: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Maps -> per-cell inputs: emb (B, S, 256, h, w) (the slice itself in the middle of S), coords
    (B, 3, h, w) -> (B, h * w, S * 256 + 3)."""
    b, s, c, h, w = emb.shape
    return torch.cat([emb.reshape(b, s * c, h * w), coords.reshape(b, 3, h * w)], 1).transpose(1, 2)
