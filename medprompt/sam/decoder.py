"""LiteMedSAM's mask decoder, computed the way many prompts on few slices want it.

Same weights and maths as segment-anything's ``MaskDecoder`` and ``TwoWayTransformer`` (tested
against them in tests/test_sam.py), arranged for a CPU drawing 8 classes on every sampled slice:

- image tokens are token-major and contiguous from the start (SAM permutes (B, C, H, W) to a strided
  (B, HW, C) view, and the element-wise adds on those views were a third of the decoder's time);
- what does not depend on the prompt is computed once per slice (``SliceContext``): the image tokens
  plus SAM's "no mask" embedding, the positional encoding, and the first layer's three projections
  of the image tokens (keys and values of token-to-image attention, queries of image-to-token);
- attention is PyTorch's fused ``scaled_dot_product_attention`` (SAM's softmax over 7 prompt tokens
  for each of 4096 image tokens was another fifth);
- only the 64x64 embedding cells under the asked region are upscaled (see ``decode``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medprompt.sam.preprocess import SAM_SIZE, SliceGeometry


@dataclass
class SliceContext:
    """The prompt-independent part of decoding one slice (image tokens first, (1, HW, C))."""

    keys: torch.Tensor  # image embedding + the "no mask" dense embedding
    pe: torch.Tensor  # positional encoding of the image tokens
    k1: torch.Tensor  # first layer, token-to-image attention: keys projected
    v1: torch.Tensor  # ... and values projected
    q1: torch.Tensor  # first layer, image-to-token attention: queries projected
    shape: tuple[int, int, int]  # (C, h, w) of the embedding


@torch.no_grad()
def slice_context(net: torch.nn.Module, image: torch.Tensor, pe: torch.Tensor | None = None) -> SliceContext:
    """``image``: one slice's embedding (1, C, h, w); ``pe``: token-major positional encoding, if already made."""
    c, h, w = image.shape[1:]
    no_mask = net.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)  # the dense prompt without a mask
    keys = (image + no_mask).flatten(2).transpose(1, 2).contiguous()
    if pe is None:
        pe = token_pe(net)
    first = net.mask_decoder.transformer.layers[0]
    with_pe = keys + pe
    return SliceContext(keys=keys, pe=pe, k1=first.cross_attn_token_to_image.k_proj(with_pe),
                        v1=first.cross_attn_token_to_image.v_proj(keys),
                        q1=first.cross_attn_image_to_token.q_proj(with_pe), shape=(c, h, w))


@torch.no_grad()
def token_pe(net: torch.nn.Module) -> torch.Tensor:
    """SAM's dense positional encoding of the image tokens, token-major (1, HW, C)."""
    return net.prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2).contiguous()


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, n_heads, c // n_heads).transpose(1, 2)


def _attention(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               projected: tuple[bool, bool, bool] = (False, False, False)) -> torch.Tensor:
    """SAM's ``Attention`` (project, split heads, softmax(q k^T / sqrt(d)) v, merge, project out),
    fused; inputs flagged in ``projected`` are already projected and may have batch 1."""
    q = q if projected[0] else attn.q_proj(q)
    k = k if projected[1] else attn.k_proj(k)
    v = v if projected[2] else attn.v_proj(v)
    n = max(q.shape[0], k.shape[0])
    h = attn.num_heads
    q, k, v = (_heads(t, h).expand(n, -1, -1, -1) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    b, _, tokens, c = out.shape
    return attn.out_proj(out.transpose(1, 2).reshape(b, tokens, h * c))


def two_way(transformer: torch.nn.Module, ctx: SliceContext, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's TwoWayTransformer.forward for prompt tokens (N, T, C): (processed tokens, image tokens (N, HW, C))."""
    first, *rest = transformer.layers
    # First layer (SAM skips the positional encoding in its self-attention); image side from ctx.
    queries = first.norm1(first.self_attn(q=tokens, k=tokens, v=tokens))
    attn = _attention(first.cross_attn_token_to_image, queries + tokens, ctx.k1, ctx.v1, projected=(False, True, True))
    queries = first.norm2(queries + attn)
    queries = first.norm3(queries + first.mlp(queries))
    attn = _attention(first.cross_attn_image_to_token, ctx.q1, queries + tokens, queries, projected=(True, False, False))
    keys = first.norm4(ctx.keys + attn)
    for layer in rest:
        q = queries + tokens
        queries = layer.norm1(queries + _attention(layer.self_attn, q, q, queries))
        with_pe = keys + ctx.pe
        queries = layer.norm2(queries + _attention(layer.cross_attn_token_to_image, queries + tokens, with_pe, keys))
        queries = layer.norm3(queries + layer.mlp(queries))
        keys = layer.norm4(keys + _attention(layer.cross_attn_image_to_token, with_pe, queries + tokens, queries))
    attn = _attention(transformer.final_attn_token_to_image, queries + tokens, keys + ctx.pe, keys)
    return transformer.norm_final_attn(queries + attn), keys


def decode(net: torch.nn.Module, ctx: SliceContext, sparse: torch.Tensor, g: SliceGeometry,
           region: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's mask decoder for N prompts (``sparse``: the prompt encoder's (N, P, C) embeddings, no mask
    prompt): logits on ``region`` of the slice only, and SAM's IoU estimate.

    The two-way transformer needs the whole embedding, but everything after it is local: the
    upscaling is two stride-2, kernel-2 transposed convolutions with a per-pixel LayerNorm, the
    mask is a per-pixel product with the mask token's hypernetwork output, and the resize back to
    the slice is bilinear. So only the 64x64 embedding cells under the region are upscaled, which
    for an organ's box is a small part of the 256x256 output. Equal to cropping ``logits_to_slice``
    of the full output. Only the first mask token is used (SAM's single-mask output, as MedSAM is trained).
    """
    dec = net.mask_decoder
    n = sparse.shape[0]
    tokens = torch.cat([torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)[None].expand(n, -1, -1),
                        sparse], dim=1)
    c, h, w = ctx.shape
    hs, src = two_way(dec.transformer, ctx, tokens)
    hyper = dec.output_hypernetworks_mlps[0](hs[:, 1, :])  # (N, C/8)
    quality = dec.iou_prediction_head(hs[:, 0, :])[:, 0]
    src = src.transpose(1, 2).reshape(n, c, h, w)
    r0, r1, c0, c1 = region
    ri0, ri1, rw = _taps(g.resized[0], g.shape[0], r0, r1)
    ci0, ci1, cw = _taps(g.resized[1], g.shape[1], c0, c1)
    scale = SAM_SIZE // h  # 4: one embedding cell -> 4x4 logits
    e_r0, e_r1 = int(ri0.min()) // scale, int(ri1.max()) // scale + 1
    e_c0, e_c1 = int(ci0.min()) // scale, int(ci1.max()) // scale + 1
    up = dec.output_upscaling(src[:, :, e_r0:e_r1, e_c0:e_c1])  # (N, C/8, 4h', 4w')
    logits = torch.einsum("nc,nchw->nhw", hyper, up)
    base_r, base_c = e_r0 * scale, e_c0 * scale
    dev = logits.device
    rw_t = torch.from_numpy(rw).to(dev)[None, :, None]
    logits = (logits[:, torch.from_numpy(ri0 - base_r).to(dev)] * (1 - rw_t)
              + logits[:, torch.from_numpy(ri1 - base_r).to(dev)] * rw_t)
    cw_t = torch.from_numpy(cw).to(dev)[None, None, :]
    return (logits[:, :, torch.from_numpy(ci0 - base_c).to(dev)] * (1 - cw_t)
            + logits[:, :, torch.from_numpy(ci1 - base_c).to(dev)] * cw_t), quality


def _taps(n_in: int, n_out: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps of output rows lo..hi-1 when resizing n_in -> n_out as torch does
    (``align_corners=False``: source position clamped at 0, upper neighbour at the last row)."""
    src = np.maximum((np.arange(lo, hi) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)
