"""LiteMedSAM's mask decoder, computed the way many prompts on few slices want it.

Same weights and maths as segment-anything's ``MaskDecoder`` and ``TwoWayTransformer`` (tested
against them in tests/test_sam.py), arranged for a CPU drawing 8 classes on every sampled slice:

- image tokens are token-major and contiguous from the start (SAM permutes (B, C, H, W) to a strided
  (B, HW, C) view, and the element-wise adds on those views were a third of the decoder's time);
- what does not depend on the prompt is computed once per slice (``SliceContext``): the image tokens
  plus SAM's "no mask" embedding, the positional encoding, and the first layer's three projections
  of the image tokens (keys and values of token-to-image attention, queries of image-to-token);
- attention between the T (about 7) prompt tokens and the 4096 image tokens is re-associated: the
  prompt tokens' projected queries, keys and values (pushed through the weights the image side would
  have used) are multiplied into the image tokens, so no image token is projected per prompt
  (940 -> 440 million multiply-adds per prompt), and the softmax over each image token's T keys
  is written out (torch.softmax over a last dimension of 7 was 4.6 ms of a 26 ms prompt on one core);
- the first layer's token-to-image attention, whose image side is in the context, is PyTorch's fused
  ``scaled_dot_product_attention``;
- only the 64x64 embedding cells under the asked region are upscaled (see ``decode``);
- the two-way transformer may run in bfloat16 (a context made with ``dtype=torch.bfloat16``): on a
  CPU with AMX it takes half the time (see ``decode_groups``); the mask is still made in fp32 from
  its output.
Each step is exact up to float rounding: tests/test_sam.py compares with segment-anything's decoder.
"""

from __future__ import annotations

import copy
import math
import threading
import weakref
from dataclasses import dataclass
from typing import Sequence

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

    @property
    def dtype(self) -> torch.dtype:
        """The precision the two-way transformer runs in for this slice."""
        return self.keys.dtype


@torch.no_grad()
def slice_context(net: torch.nn.Module, image: torch.Tensor, pe: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32) -> SliceContext:
    """``image``: one slice's embedding (1, C, h, w); ``pe``: token-major positional encoding, if already
    made (any precision). ``dtype``: the precision the transformer will run in, and these projections with it."""
    c, h, w = image.shape[1:]
    no_mask = net.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)  # the dense prompt without a mask
    keys = (image + no_mask).flatten(2).transpose(1, 2).contiguous().to(dtype)
    pe = (token_pe(net) if pe is None else pe).to(dtype)
    first = transformer_in(net, dtype).layers[0]
    with_pe = keys + pe
    return SliceContext(keys=keys, pe=pe, k1=first.cross_attn_token_to_image.k_proj(with_pe),
                        v1=first.cross_attn_token_to_image.v_proj(keys),
                        q1=first.cross_attn_image_to_token.q_proj(with_pe), shape=(c, h, w))


_COPIES: "weakref.WeakKeyDictionary[torch.nn.Module, dict[torch.dtype, torch.nn.Module]]" = weakref.WeakKeyDictionary()
_COPIES_LOCK = threading.Lock()


def transformer_in(net: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``net``'s two-way transformer with its weights in ``dtype``: the module itself when it already
    is, else a copy made once per network (the served weights are frozen, so the copy stays valid)."""
    transformer = net.mask_decoder.transformer
    if next(transformer.parameters()).dtype == dtype:
        return transformer
    with _COPIES_LOCK:
        copies = _COPIES.setdefault(transformer, {})
        if dtype not in copies:
            copies[dtype] = copy.deepcopy(transformer).to(dtype)
        return copies[dtype]


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


def _per_head(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(N, T, H*d) prompt-token projections -> block-diagonal (N, H*T, H*d): row h*T + t holds token
    t's head-h part in head h's columns, zeros elsewhere, so one matrix product serves every head."""
    n, t, c = x.shape
    d = c // n_heads
    eye = torch.eye(n_heads, dtype=x.dtype, device=x.device)
    return torch.einsum("nthd,hg->nhtgd", x.reshape(n, t, n_heads, d), eye).reshape(n, n_heads * t, c)


def _softmax_groups(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Softmax over consecutive groups of ``group`` columns (in place). torch.softmax over a last
    dimension of 7 took 4.6 ms for one layer's 4096 x 8 groups on this CPU; these four passes 0.7 ms."""
    g = scores.view(*scores.shape[:-1], -1, group)
    g.sub_(g.amax(dim=-1, keepdim=True)).exp_()
    g.div_(g.sum(dim=-1, keepdim=True))
    return scores


def _image_to_token(attn: torch.nn.Module, scores: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """SAM's image-to-token attention output (out_proj included) from the image tokens' ``scores``
    against the prompt tokens' keys (N, HW, H*T), already scaled: softmax per head over the T keys,
    then one product with the T values pushed through out_proj, never the 4096 image tokens'."""
    h = attn.num_heads
    t = values.shape[1]
    # In fp32 whatever the transformer's precision: these element-wise passes took twice as long on
    # bf16 as converting, computing in fp32 and converting back (8.3 vs 4.5 ms per 4 prompts).
    probs = _softmax_groups(scores.float(), t).to(values.dtype)
    v = _per_head(attn.v_proj(values), h)  # (N, H*T, Ci)
    # Each image token's probabilities sum to 1 per head, H per row: out_proj's bias enters as bias/H.
    mixed = F.linear(v, attn.out_proj.weight, attn.out_proj.bias / h)  # (N, H*T, C)
    return probs @ mixed


def _image_keys(attn: torch.nn.Module, queries: torch.Tensor) -> torch.Tensor:
    """Prompt tokens' keys for image-to-token attention, (N, Ci, H*T), scaled by 1/sqrt(d)."""
    k = attn.k_proj(queries)
    return _per_head(k, attn.num_heads).transpose(1, 2) / math.sqrt(k.shape[-1] // attn.num_heads)


def _token_to_image(attn: torch.nn.Module, queries: torch.Tensor, with_pe: torch.Tensor,
                    keys: torch.Tensor) -> torch.Tensor:
    """SAM's token-to-image attention (out_proj included) for prompt ``queries`` (N, T, C) over the
    image tokens, keys ``with_pe`` and values ``keys`` (N or 1, HW, C), without projecting them:
    q.(W_k x + b_k) = (W_k^T q).x + const (the constant cancels in the softmax), and softmax-weighted
    sums of W_v x + b_v are W_v (weighted sums of x) + b_v."""
    h = attn.num_heads
    n, t, _ = queries.shape
    q = attn.q_proj(queries)
    d = q.shape[-1] // h
    # Row h*T + t: query t of head h, pushed back through head h's key weights.
    folded = _per_head(q, h) @ attn.k_proj.weight / math.sqrt(d)  # (N, H*T, C)
    probs = torch.softmax(folded @ with_pe.transpose(1, 2), dim=-1)  # (N, H*T, HW)
    pooled = (probs @ keys).reshape(n, h, t, -1)  # (N, H, T, C): each head's weighted image tokens
    out = torch.einsum("nhtc,hdc->nthd", pooled, attn.v_proj.weight.reshape(h, d, -1)).reshape(n, t, h * d)
    return attn.out_proj(out + attn.v_proj.bias)


def two_way(transformer: torch.nn.Module, ctx: SliceContext, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's TwoWayTransformer.forward for prompt tokens (N, T, C): (processed tokens, image tokens (N, HW, C)).

    Attention between the T prompt tokens and the 4096 image tokens is computed re-associated (see
    :func:`_token_to_image`, :func:`_image_to_token`): the small matrices built from the prompt
    tokens are multiplied into the image tokens instead of projecting every image token, about half
    the multiply-adds and none of the (4096, 128) head splits and merges."""
    first, *rest = transformer.layers
    # First layer (SAM skips the positional encoding in its self-attention); image side from ctx.
    queries = first.norm1(first.self_attn(q=tokens, k=tokens, v=tokens))
    attn = _attention(first.cross_attn_token_to_image, queries + tokens, ctx.k1, ctx.v1, projected=(False, True, True))
    queries = first.norm2(queries + attn)
    queries = first.norm3(queries + first.mlp(queries))
    i2t = first.cross_attn_image_to_token
    scores = ctx.q1 @ _image_keys(i2t, queries + tokens)  # (N, HW, H*T)
    keys = first.norm4(ctx.keys + _image_to_token(i2t, scores, queries))
    for layer in rest:
        q = queries + tokens
        queries = layer.norm1(queries + _attention(layer.self_attn, q, q, queries))
        with_pe = keys + ctx.pe
        queries = layer.norm2(queries + _token_to_image(layer.cross_attn_token_to_image, queries + tokens, with_pe, keys))
        queries = layer.norm3(queries + layer.mlp(queries))
        i2t = layer.cross_attn_image_to_token
        # Image tokens' queries q_proj(with_pe) never made: W_q folded into the prompt tokens' keys.
        prompt_keys = _image_keys(i2t, queries + tokens)  # (N, Ci, H*T)
        scores = torch.baddbmm((i2t.q_proj.bias @ prompt_keys)[:, None], with_pe, i2t.q_proj.weight.t() @ prompt_keys)
        keys = layer.norm4(keys + _image_to_token(i2t, scores, queries))
    attn = _token_to_image(transformer.final_attn_token_to_image, queries + tokens, keys + ctx.pe, keys)
    return transformer.norm_final_attn(queries + attn), keys


def decode(net: torch.nn.Module, ctx: SliceContext, sparse: torch.Tensor, g: SliceGeometry,
           region: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's mask decoder for N prompts (``sparse``: the prompt encoder's (N, P, C) embeddings, no mask
    prompt): logits on ``region`` of the slice only, and SAM's IoU estimate. See :func:`decode_groups`."""
    return decode_groups(net, ctx, sparse, g, [(region, sparse.shape[0])])[0]


def decode_groups(net: torch.nn.Module, ctx: SliceContext, sparse: torch.Tensor, g: SliceGeometry,
                  groups: Sequence[tuple[tuple[int, int, int, int], int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """SAM's mask decoder for consecutive groups of prompts on one slice, each group with its own region:
    ``groups`` lists (region, number of prompts) in the order of ``sparse``'s rows; per group, the
    logits (n, rows, cols) on its region and SAM's IoU estimates (n,).

    The prompts go through the two-way transformer together (one class's boxes and the other
    classes' on the same slice: 15.6 -> 10.8 ms per prompt in batches of 4 on the 2-core CPU;
    batches of 8 were slower again, 14.6 ms, so larger calls are split), in the context's precision
    (bfloat16 halves its time again on a CPU with AMX: BENCHMARKS.md, issue 8). Everything after it is
    local: the upscaling is two stride-2, kernel-2 transposed convolutions with a per-pixel
    LayerNorm, the mask is a per-pixel product with the mask token's hypernetwork output, and the
    resize back to the slice is bilinear. So only the 64x64 embedding cells under a group's region
    are upscaled, which for an organ's box is a small part of the 256x256 output. Equal to cropping
    ``logits_to_slice`` of the full output. Only the first mask token is used (SAM's single-mask
    output, as MedSAM is trained).
    """
    dec = net.mask_decoder
    n = sparse.shape[0]
    if sum(count for _, count in groups) != n:
        raise ValueError(f"groups hold {sum(c for _, c in groups)} prompts, sparse has {n}")
    tokens = torch.cat([torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)[None].expand(n, -1, -1),
                        sparse], dim=1)
    transformer = transformer_in(net, ctx.dtype)
    tokens = tokens.to(ctx.dtype)
    parts = [two_way(transformer, ctx, tokens[i : i + BATCH]) for i in range(0, n, BATCH)]
    hs = (torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]).float()
    src = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]  # back to fp32 per region below
    hyper = dec.output_hypernetworks_mlps[0](hs[:, 1, :])  # (N, C/8)
    quality = dec.iou_prediction_head(hs[:, 0, :])[:, 0]
    c, h, w = ctx.shape
    src = src.reshape(n, h, w, c)  # channels last, as the tokens come
    out, start = [], 0
    for region, count in groups:
        rows = slice(start, start + count)
        out.append((_region_logits(dec, src[rows], hyper[rows], g, region, SAM_SIZE // h), quality[rows]))
        start += count
    return out


BATCH = 4  # prompts per two-way transformer call (see decode_groups)


def _region_logits(dec: torch.nn.Module, src: torch.Tensor, hyper: torch.Tensor, g: SliceGeometry,
                   region: tuple[int, int, int, int], scale: int) -> torch.Tensor:
    """Mask logits on ``region`` of the slice from the transformer's channels-last image tokens ``src``
    (n, h, w, C); ``scale``: logits per embedding cell along each side (4)."""
    r0, r1, c0, c1 = region
    ri0, ri1, rw = _taps(g.resized[0], g.shape[0], r0, r1)
    ci0, ci1, cw = _taps(g.resized[1], g.shape[1], c0, c1)
    e_r0, e_r1 = int(ri0.min()) // scale, int(ri1.max()) // scale + 1
    e_c0, e_c1 = int(ci0.min()) // scale, int(ci1.max()) // scale + 1
    up = _upscale(dec.output_upscaling, src[:, e_r0:e_r1, e_c0:e_c1].float())  # (n, 4h', 4w', C/8)
    logits = torch.einsum("nc,nhwc->nhw", hyper, up)
    base_r, base_c = e_r0 * scale, e_c0 * scale
    dev = logits.device
    rw_t = torch.from_numpy(rw).to(dev)[None, :, None]
    logits = (logits[:, torch.from_numpy(ri0 - base_r).to(dev)] * (1 - rw_t)
              + logits[:, torch.from_numpy(ri1 - base_r).to(dev)] * rw_t)
    cw_t = torch.from_numpy(cw).to(dev)[None, None, :]
    return (logits[:, :, torch.from_numpy(ci0 - base_c).to(dev)] * (1 - cw_t)
            + logits[:, :, torch.from_numpy(ci1 - base_c).to(dev)] * cw_t)


def _upscale(layers: torch.nn.Sequential, cells: torch.Tensor) -> torch.Tensor:
    """SAM's ``output_upscaling`` (transposed conv 2x2 stride 2, LayerNorm2d, GELU, transposed conv,
    GELU) on channels-last cells (N, h, w, C) -> (N, 4h, 4w, C/8): each stride-2 kernel-2 transposed
    convolution is one matrix product per cell then a 2x2 unfold, no (N, C, h, w) copy of the tokens."""
    up1, norm, act1, up2, act2 = layers
    x = act1(F.layer_norm(_unpool(cells, up1), (norm.weight.shape[0],), norm.weight, norm.bias, norm.eps))
    return act2(_unpool(x, up2))


def _unpool(x: torch.Tensor, conv: torch.nn.ConvTranspose2d) -> torch.Tensor:
    """``conv`` (kernel 2, stride 2, no padding) on channels-last (N, h, w, Cin) -> (N, 2h, 2w, Cout)."""
    n, h, w, _ = x.shape
    cin, cout = conv.weight.shape[:2]
    weight = conv.weight.permute(2, 3, 1, 0).reshape(4 * cout, cin)  # rows (a, b, out): out[2i+a, 2j+b]
    y = F.linear(x, weight, conv.bias.repeat(4)).reshape(n, h, w, 2, 2, cout)
    return y.permute(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, cout)


def _taps(n_in: int, n_out: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps of output rows lo..hi-1 when resizing n_in -> n_out as torch does
    (``align_corners=False``: source position clamped at 0, upper neighbour at the last row)."""
    src = np.maximum((np.arange(lo, hi) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)
