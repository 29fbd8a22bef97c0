"""Losses for learning from teachers instead of pixel labels.

Every term takes a confidence weight: a teacher's uncertain voxels (organ borders, classes it
could not find) must not teach anything, or the student would learn the teacher's mistakes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mask_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Confidence-weighted BCE + soft Dice on soft targets; all tensors (B, P, H, W).

    BCE teaches every confident pixel; Dice keeps small organs from being drowned by background.
    A class with no confident positive pixel in the batch contributes only its BCE.
    """
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    bce = (bce * weight).sum() / weight.sum().clamp(min=1.0)
    prob = torch.sigmoid(logits)
    dims = (0, 2, 3)
    inter = (prob * target * weight).sum(dims)
    denom = (prob * weight).sum(dims) + (target * weight).sum(dims)
    has_pos = (target * weight).sum(dims) > 0
    dice = 1 - (2 * inter + eps) / (denom + eps)
    dice = dice[has_pos].mean() if has_pos.any() else logits.sum() * 0
    return bce + dice


def patch_targets(target: torch.Tensor, weight: torch.Tensor, patch: int, min_fraction: float = 0.5
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Voxel targets (B, P, H, W) -> one class per patch (B, h, w) and its confidence.

    Class 0 is background (confidently nothing), 1..P the prompts. A patch takes the class that
    covers most of it, weighted by that share; mixed or uncertain patches get weight 0.
    """
    conf_pos = F.avg_pool2d(target * weight, patch)  # (B, P, h, w) share of confidently-positive pixels
    conf_neg = F.avg_pool2d((1 - target) * weight, patch).min(dim=1).values  # confidently none of them
    shares = torch.cat([conf_neg[:, None], conf_pos], dim=1)
    share, cls = shares.max(dim=1)
    w = torch.where(share >= min_fraction, share, torch.zeros_like(share))
    return cls, w


def region_text_loss(region_logits: torch.Tensor, cls: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Region-text contrastive loss: each patch against all class text vectors (+ background).

    region_logits (B, 1+P, h, w) are temperature-scaled cosine similarities, so the softmax
    cross-entropy pulls a patch toward its class's text vector and away from the others.
    """
    ce = F.cross_entropy(region_logits, cls, reduction="none")
    return (ce * weight).sum() / weight.sum().clamp(min=1.0)


def consistency_loss(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Two augmented views of one input should give the same masks (mean squared probability gap)."""
    return F.mse_loss(torch.sigmoid(logits_a), torch.sigmoid(logits_b))
