"""Text-conditioned saliency maps from an open_clip ViT: gScoreCAM (MedCLIP-SAM) and M2IB (MedCLIP-SAMv2).

Both take an image (H x W grey or RGB, uint8 or float) and a prompt text and return an H x W float32
map in [0, 1] where high means "this is what the text names", for the 2D pipeline to turn into boxes.

gScoreCAM (Chen et al. 2022): the gradient of the image-text score ranks the channels of one layer's
patch features; the top k channel maps, each upsampled and min-max scaled, mask the input; the
model's score for each masked image, softmaxed, weights the channel maps. MedCLIP-SAM uses
BiomedCLIP's ``visual.trunk.blocks[11].norm2`` and 300 channels. In a tower that pools the class
token, patch tokens after the last attention never reach the output, so their gradient there is
zero (BiomedCLIP's blocks[11].norm2 included): the ranking then uses the class token's gradient.

M2IB (Wang et al. 2023, as MedCLIP-SAMv2 uses it): after one block, features R become
Z = lambda * R + (1 - lambda) * eps, eps ~ N(0, var), with lambda = sigmoid(alpha) learned per token
and channel for this image and text; the loss is beta * KL[N(lambda R, (1-lambda)^2 var) || N(0, var)]
- cos(image(Z), text), so only what the text needs passes; the map is each patch's KL (information
kept) summed over channels. MedCLIP-SAMv2's settings: block 7 of 12 (zero-based), beta 0.1, var 1,
10 Adam steps at lr 1 on 10 noise samples, alpha starting at 5.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from medprompt.clip.model import (
    ClipModel, batch_first, block_norm2, find_layer, load_clip, resolve_files, tokens_to_grid, unit_map, vit_blocks,
    vit_grid,
)
from medprompt.errors import InputError

METHODS = ("gscorecam", "m2ib")
SaliencyFn = Callable[[np.ndarray, str], np.ndarray]


def _resize_map(grid_map: Any, size: tuple[int, int]) -> np.ndarray:
    import torch

    m = torch.as_tensor(grid_map, dtype=torch.float32)[None, None]
    return unit_map(torch.nn.functional.interpolate(m, size=size, mode="bilinear", align_corners=False)[0, 0].numpy())


def gscorecam(clip: ClipModel, image: np.ndarray, text: str | Sequence[str], layer: str | None = None,
              top_k: int = 300, batch_size: int = 32) -> np.ndarray:
    """gScoreCAM map of ``text`` on ``image``; ``layer`` is a module path (default: the last block's norm2)."""
    import torch
    import torch.nn.functional as F

    if top_k < 1:
        raise InputError(f"top_k must be at least 1, got {top_k}")
    model, visual = clip.model, clip.model.visual
    module = find_layer(model, layer) if layer else block_norm2(vit_blocks(visual)[-1])
    grid, first = vit_grid(visual), batch_first(visual)
    x = clip.pixels(image)
    t = clip.text_vector(text)
    scale = float(model.logit_scale.exp().clamp(max=100.0)) if hasattr(model, "logit_scale") else 100.0
    store: dict[str, torch.Tensor] = {}

    def keep(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_(True)  # the frozen model's only gradient is this layer's
        store["a"] = leaf
        return leaf

    handle = module.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            score = F.normalize(model.encode_image(x).float(), dim=-1) @ t
            score.sum().backward()
    finally:
        handle.remove()
    if "a" not in store:
        raise InputError("the chosen layer is not on the image tower's path")
    tokens, grads = store["a"].detach(), store["a"].grad
    acts = tokens_to_grid(tokens, grid, first)[0].float()  # (C, h, w)
    if grads is None:
        grads = torch.zeros_like(tokens)
    g = tokens_to_grid(grads, grid, first)[0].float().mean(dim=(1, 2))
    if not bool(g.abs().gt(0).any()):
        cls = (grads if first else grads.transpose(0, 1))[0, 0].float()  # class-token gradient per channel
        g = cls if cls.shape[0] == acts.shape[0] else g
    k = min(top_k, acts.shape[0])
    idx = torch.topk(g, k).indices
    maps = acts[idx]
    up = F.interpolate(maps[None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0]
    lo = up.amin(dim=(1, 2), keepdim=True)
    span = up.amax(dim=(1, 2), keepdim=True) - lo
    up = torch.where(span > 1e-8, (up - lo) / span.clamp(min=1e-8), torch.zeros_like(up))
    scores = []
    with torch.no_grad():
        for s in range(0, k, batch_size):
            masked = x * up[s:s + batch_size, None]
            scores.append(F.normalize(model.encode_image(masked).float(), dim=-1) @ t * scale)
    w = torch.softmax(torch.cat(scores), dim=0)
    cam = torch.relu((w[:, None, None] * maps).sum(0))
    return _resize_map(cam, np.asarray(image).shape[:2])


def m2ib_default_block(depth: int) -> int:
    """MedCLIP-SAMv2's block 7 of 12 scaled to the tower's depth, and never the last block (whose
    patch tokens a class-token tower ignores)."""
    return max(0, min(round(7 * depth / 12), depth - 2))


def m2ib(clip: ClipModel, image: np.ndarray, text: str | Sequence[str], layer: int | str | None = None,
         beta: float = 0.1, var: float = 1.0, steps: int = 10, lr: float = 1.0, samples: int = 10,
         seed: int = 0) -> np.ndarray:
    """M2IB map of ``text`` on ``image``; ``layer``: block index (default ``m2ib_default_block``) or module path."""
    import torch
    import torch.nn.functional as F

    if var <= 0 or steps < 1 or samples < 1:
        raise InputError(f"M2IB needs var > 0, steps >= 1 and samples >= 1 (got {var}, {steps}, {samples})")
    model, visual = clip.model, clip.model.visual
    blocks = vit_blocks(visual)
    if layer is None:
        module = blocks[m2ib_default_block(len(blocks))]
    elif isinstance(layer, int):
        if not -len(blocks) <= layer < len(blocks):
            raise InputError(f"block {layer} out of range: the image tower has {len(blocks)} blocks")
        module = blocks[layer]
    else:
        module = find_layer(model, layer)
    first = batch_first(visual)
    x = clip.pixels(image)
    t = clip.text_vector(text)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    state: dict[str, Any] = {}

    def bottleneck(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        r = (output if first else output.transpose(0, 1)).detach().float()  # (1, N, C): one image
        state["r"] = r
        alpha = state.get("alpha")
        if alpha is None:
            return output
        lam = torch.sigmoid(alpha)[None]
        eps = torch.randn((samples, *r.shape[1:]), generator=gen, device=r.device) * math.sqrt(var)
        z = lam * r + (1.0 - lam) * eps  # the noise samples become the batch from here on
        state["kl"] = _capacity(alpha, r, var)
        z = z.to(output.dtype)
        return z if first else z.transpose(0, 1)

    handle = module.register_forward_hook(bottleneck)
    try:
        with torch.no_grad():
            model.encode_image(x)  # the clean features size the mask
        if "r" not in state:
            raise InputError("the chosen layer is not on the image tower's path")
        alpha = torch.full(state["r"].shape[1:], 5.0, device=x.device, requires_grad=True)
        state["alpha"] = alpha
        opt = torch.optim.Adam([alpha], lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                fit = (F.normalize(model.encode_image(x).float(), dim=-1) @ t).mean()
                loss = beta * state["kl"].mean() - fit
                loss.backward()
                opt.step()
    finally:
        handle.remove()
    with torch.no_grad():
        info = _capacity(alpha, state["r"], var)[0].sum(-1)  # (N,) information kept per token
    rows, cols = vit_grid(visual)
    patches = info[info.shape[0] - rows * cols:].reshape(rows, cols)
    return _resize_map(patches, np.asarray(image).shape[:2])


def _capacity(alpha: Any, r: Any, var: float) -> Any:
    """Per-element KL[N(lambda r, (1-lambda)^2 var) || N(0, var)], lambda = sigmoid(alpha) (stable in alpha)."""
    import torch

    lam = torch.sigmoid(alpha)[None]
    keep_noise = torch.sigmoid(-alpha)[None]  # 1 - lambda
    log_noise = torch.nn.functional.logsigmoid(-alpha)[None]  # log(1 - lambda)
    return 0.5 * (keep_noise ** 2 + (lam * r) ** 2 / var - 1.0) - log_noise


def clip_saliency(method: str, model_spec: str = "biomedclip", allow_download: bool = False,
                  **options: Any) -> SaliencyFn:
    """``(image, text) -> H x W map in [0, 1]`` for ``method`` (gscorecam or m2ib) on the model of ``model_spec``.

    The weights are located now, so a missing model (e.g. BiomedCLIP not in the Hugging Face cache)
    is one ``WeightsError`` before any image is read; the model loads on the first call and is kept.
    ``options`` go to the method (``layer``, ``top_k``; ``beta``, ``var``, ``steps``, ...).
    """
    name = method.strip().lower().replace("-", "").replace("_", "")
    if name not in METHODS:
        raise InputError(f"unknown saliency method '{method}': use {' or '.join(METHODS)}")
    resolve_files(model_spec, allow_download)  # fails fast, imports nothing heavy
    run = gscorecam if name == "gscorecam" else m2ib

    def saliency(image: np.ndarray, text: str | Sequence[str]) -> np.ndarray:
        clip = load_clip(model_spec, allow_download)
        return run(clip, image, text, **options)

    saliency.__name__ = f"{name}_saliency"
    return saliency


# --- the 2D pipeline's saliency hook: (Image2D, PromptEntry) -> map ---------------------------------------

MODEL_ENV = "MEDPROMPT_CLIP_MODEL"  # which CLIP the registered methods use (default: BiomedCLIP)
_ENTRY_METHODS: dict[tuple[str, str], SaliencyFn] = {}


def _for_entry(method: str, image: Any, entry: Any) -> np.ndarray:
    """Run ``method`` on a 2D image for a catalog class: all its phrases (name, aliases, descriptions) averaged."""
    import os

    from medprompt.text.encoders import class_texts

    spec = os.environ.get(MODEL_ENV, "").strip() or "biomedclip"
    key = (method, spec)
    if key not in _ENTRY_METHODS:
        _ENTRY_METHODS[key] = clip_saliency(method, spec)
    pixels = getattr(image, "pixels", image)
    return _ENTRY_METHODS[key](pixels, class_texts(entry))


def gscorecam_saliency(image: Any, entry: Any) -> np.ndarray:
    """gScoreCAM for ``medprompt.saliency``'s registry: BiomedCLIP, or the model named by $MEDPROMPT_CLIP_MODEL."""
    return _for_entry("gscorecam", image, entry)


def m2ib_saliency(image: Any, entry: Any) -> np.ndarray:
    """M2IB for ``medprompt.saliency``'s registry: BiomedCLIP, or the model named by $MEDPROMPT_CLIP_MODEL."""
    return _for_entry("m2ib", image, entry)
