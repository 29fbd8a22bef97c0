"""A class's frozen text vector as prompt tokens of LiteMedSAM's mask decoder (text prompts for SAM).

As MedSAM's text-prompt extension feeds a frozen CLIP text vector through a linear layer into SAM's
sparse prompt embeddings, :class:`TextTokens` maps each class's frozen text vector (MiniLM 384-d,
BiomedCLIP 512-d) to ``k`` tokens of SAM's prompt width (256) that join the prompt encoder's sparse
embeddings: alone they ask the decoder for the class on the whole slice (a text prompt gives a mask),
beside a box's two corner tokens they tell the decoder which organ the box is about (text + box
refines one). Any prompts per call: one row of tokens per prompt, boxes or not.

The map is tiny (linear, or a one-hidden-layer MLP) and a learned offset per token (the "text"
prompt type, as SAM learns one per point/corner type). Optionally the decoder's own weights are
finetuned with it and stored in the same file (``TextTokenConfig.decoder``); LiteMedSAM's decoder
in ``medprompt.sam`` is never changed, so box-only drafts stay as they are.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from medprompt.model.checkpoint import read_model_file, restore, write_model_file

FORMAT = "medprompt-sam-text/1"
PROMPT_DIM = 256  # SAM's prompt token width
MAKE = (".venv/bin/python benchmarks/text_prompt_sam.py --variants k2dec --transductive "
        "(writes ~/.cache/medprompt/text_prompt_sam/k2dec_s120_all.pt; BENCHMARKS.md, issue 9)")


@dataclass(frozen=True)
class TextTokenConfig:
    """Architecture of the text-to-token map; stored in every model file so it rebuilds itself."""

    text_dim: int = 384
    tokens: int = 2  # k prompt tokens per text vector
    hidden: int = 0  # 0: a linear map; > 0: an MLP with one hidden layer this wide
    decoder: bool = False  # the mask decoder's weights are finetuned and stored with the map

    def to_dict(self) -> dict:
        return asdict(self)


class TextTokens(nn.Module):
    """Frozen text vectors (P, text_dim) -> prompt tokens (P, k, 256); with ``cfg.decoder``, also a
    copy of SAM's mask decoder to finetune (``decoder``), else None (LiteMedSAM's own is used)."""

    def __init__(self, cfg: TextTokenConfig, mask_decoder: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        out = cfg.tokens * PROMPT_DIM
        if cfg.hidden > 0:
            self.map = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, cfg.hidden), nn.GELU(),
                                     nn.Linear(cfg.hidden, out))
        else:
            self.map = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, out))
        # SAM's own prompt embeddings have a spread of about 1; start the text tokens small so an
        # untrained map barely moves a box's mask.
        nn.init.normal_(self.map[-1].weight, std=0.02)
        nn.init.zeros_(self.map[-1].bias)
        self.offset = nn.Parameter(torch.randn(cfg.tokens, PROMPT_DIM) * 0.02)
        if cfg.decoder:
            if mask_decoder is None:
                from medprompt.sam.weights import build_architecture

                mask_decoder = build_architecture().mask_decoder  # weights come from the model file
            self.decoder = copy.deepcopy(mask_decoder)
        else:
            self.decoder = None

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.map(text).reshape(-1, self.cfg.tokens, PROMPT_DIM) + self.offset

    def sam_view(self, sam_net: nn.Module) -> nn.Module | SimpleNamespace:
        """What ``medprompt.sam.decoder`` reads (``prompt_encoder``, ``mask_decoder``): LiteMedSAM itself,
        or its prompt encoder with this model's finetuned decoder."""
        if self.decoder is None:
            return sam_net
        return SimpleNamespace(prompt_encoder=sam_net.prompt_encoder, mask_decoder=self.decoder)


def prompt_tokens(sam_net: nn.Module, text_tokens: TextTokens, text: torch.Tensor,
                  boxes_model: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse prompt embeddings (N, T, 256) for N prompts: each row's text tokens (``text``: (N, text_dim)),
    after its box's two corner tokens where ``boxes_model`` (N, 4, SAM's 256 frame) is given."""
    tokens = text_tokens(text)
    if boxes_model is None:
        return tokens
    sparse, _ = sam_net.prompt_encoder(points=None, boxes=boxes_model, masks=None)
    return torch.cat([sparse, tokens], dim=1)


def low_res_logits(sam_net: nn.Module, text_tokens: TextTokens, image: torch.Tensor,
                   sparse: torch.Tensor) -> torch.Tensor:
    """SAM's mask decoder (its own ``forward``, differentiable) on one slice's embedding ``image``
    (1, 256, 64, 64) for prompts ``sparse`` (N, T, 256): logits (N, 256, 256) on SAM's input frame."""
    view = text_tokens.sam_view(sam_net)
    pe = sam_net.prompt_encoder.get_dense_pe()
    dense = sam_net.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, *image.shape[-2:])
    low, _ = view.mask_decoder(image_embeddings=image, image_pe=pe, sparse_prompt_embeddings=sparse,
                               dense_prompt_embeddings=dense, multimask_output=False)
    return low[:, 0]


def save_text_tokens(path: Path, model: TextTokens, meta: dict) -> Path:
    """Model file (atomic, half precision; medprompt.model.checkpoint); ``meta`` should name the text
    encoder and hold the class vectors it was trained with."""
    return write_model_file(Path(path), FORMAT, model, meta)


def load_text_tokens(path: Path, device: torch.device | str = "cpu") -> tuple[TextTokens, dict]:
    """Rebuild the map (and finetuned decoder) from a model file; WeightsError for a missing or foreign one."""
    path = Path(path)
    blob = read_model_file(path, FORMAT, "text-prompt model for LiteMedSAM", make=MAKE)
    return restore(TextTokens(TextTokenConfig(**blob["config"])), blob, path, device)


def class_text(meta: dict, names: Sequence[str]) -> torch.Tensor:
    """The stored text vectors (len(names), text_dim) of ``names``; KeyError names a class it lacks."""
    vectors = meta.get("class_vectors", {})
    missing = [n for n in names if n not in vectors]
    if missing:
        raise KeyError(f"no text vector for {', '.join(missing)} in {meta.get('path', 'the model')}")
    return torch.from_numpy(np.stack([np.asarray(vectors[n], np.float32) for n in names]))
