"""DHN-NCE: decoupled hard-negative InfoNCE, the loss MedCLIP-SAM finetunes BiomedCLIP with.

For cosine similarities ``s[i, j]`` (image i, text j; pairs on the diagonal) and temperature tau:

    L_v->t = mean_i [ -s_ii/tau + log sum_{j != i} w_ij exp(s_ij/tau) ]
    w_ij   = (N_i) exp(beta1 s_ij/tau) / sum_{k != i} exp(beta1 s_ik/tau)     (N_i negatives of row i)

and L_t->v the same on the transposed matrix with beta2; the loss is L_v->t + L_t->v. The positive
is left out of the denominator ("decoupled"), and the weights, which average 1 over a row's
negatives, push the most similar (hardest) negatives harder. With beta = 0 every weight is 1 and
the loss is decoupled InfoNCE. MedCLIP-SAMv2 trains with tau 0.6 and beta1 = beta2 = 0.15.

Written from the formula: log sum_j w_ij exp(l_ij) = log N_i + LSE_j((1 + beta) l_ij) - LSE_j(beta l_ij)
with l = s/tau, which stays finite at any scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TAU = 0.6
BETA1 = 0.15
BETA2 = 0.15


def _direction(logits: torch.Tensor, beta: float, negatives: torch.Tensor) -> torch.Tensor:
    """Per-row loss of one direction (rows are anchors); rows without a negative give NaN (dropped later)."""
    neg_inf = torch.finfo(logits.dtype).min
    lse_num = torch.logsumexp(((1.0 + beta) * logits).masked_fill(~negatives, neg_inf), dim=1)
    lse_den = torch.logsumexp((beta * logits).masked_fill(~negatives, neg_inf), dim=1)
    count = negatives.sum(dim=1).to(logits.dtype)
    loss = -logits.diagonal() + torch.log(count.clamp(min=1)) + lse_num - lse_den
    return loss.masked_fill(count == 0, float("nan"))


def dhn_nce_from_similarity(similarity: torch.Tensor, tau: float = TAU, beta1: float = BETA1, beta2: float = BETA2,
                            exclude: torch.Tensor | None = None) -> torch.Tensor:
    """DHN-NCE of an ``(N, N)`` image-text cosine similarity matrix whose diagonal holds the pairs.

    ``exclude`` (``(N, N)`` bool) marks off-diagonal pairs that are not negatives (e.g. two crops
    sharing one caption); they leave both the sum and the weights' normalisation. Rows left with no
    negative do not count; a batch with none at all is an error.
    """
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1] or similarity.shape[0] < 2:
        raise ValueError(f"DHN-NCE needs a square similarity matrix of at least 2 pairs, got {tuple(similarity.shape)}")
    if tau <= 0:
        raise ValueError(f"temperature must be positive, got {tau}")
    n = similarity.shape[0]
    negatives = ~torch.eye(n, dtype=torch.bool, device=similarity.device)
    if exclude is not None:
        negatives = negatives & ~exclude.to(device=similarity.device, dtype=torch.bool)
    logits = similarity / tau
    rows = torch.cat([_direction(logits, beta1, negatives), _direction(logits.t(), beta2, negatives.t())])
    per_direction = rows.view(2, n)
    valid = ~torch.isnan(per_direction)
    if not bool(valid.any()):
        raise ValueError("DHN-NCE: no pair in the batch has a negative (all captions identical?)")
    # mean over anchors within each direction, then the two directions added
    sums = torch.where(valid, per_direction, torch.zeros_like(per_direction)).sum(dim=1)
    return (sums / valid.sum(dim=1).clamp(min=1)).sum()


def dhn_nce_loss(image_features: torch.Tensor, text_features: torch.Tensor, tau: float = TAU, beta1: float = BETA1,
                 beta2: float = BETA2, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """DHN-NCE of paired ``(N, D)`` image and text embeddings (any scale: they are L2-normalised here)."""
    if image_features.shape != text_features.shape:
        raise ValueError(f"image and text features differ in shape: {tuple(image_features.shape)} "
                         f"vs {tuple(text_features.shape)}")
    sim = F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).t()
    return dhn_nce_from_similarity(sim, tau, beta1, beta2, exclude)


def same_text_mask(texts: list[str]) -> torch.Tensor:
    """``(N, N)`` bool: pairs i != j with the same caption, which must not be pushed apart as negatives."""
    ids = {t: k for k, t in enumerate(dict.fromkeys(texts))}
    codes = torch.tensor([ids[t] for t in texts])
    mask = codes[:, None] == codes[None, :]
    mask.fill_diagonal_(False)
    return mask


__all__ = ["TAU", "BETA1", "BETA2", "dhn_nce_from_similarity", "dhn_nce_loss", "same_text_mask"]
