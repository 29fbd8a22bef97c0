"""An open_clip model (BiomedCLIP or any other) with what saliency and finetuning need around it.

Weights are found the way the text encoders find them (``medprompt.text.weights``/``encoders``):
local files only (the Hugging Face cache, a folder, a checkpoint file) unless downloads are
allowed, and a missing BiomedCLIP is one message naming the files and how to get them.
Also here: images to the model's input tensor, the text embedding of a prompt, and where the
ViT's blocks and token grid are (open_clip's own ViT, or a timm trunk as in BiomedCLIP).
"""

from __future__ import annotations

import copy
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from medprompt.errors import InputError, WeightsError
from medprompt.text import weights
# The text encoders' own resolution of model specs, so a spec means the same model everywhere.
from medprompt.text.encoders import (
    BIOMEDCLIP_KEY, _canonical, _open_clip_source, _quiet_transformers, create_open_clip,
)

if TYPE_CHECKING:
    import torch

MODEL_HELP = ("biomedclip, a folder with open_clip_config.json, or open_clip:MODEL:TAG_OR_PATH "
              "(or open_clip:hf-hub:ORG/REPO)")
BIOMEDCLIP_FIX = (f"BiomedCLIP is not on this machine: get it (where there is internet) with "
                  f"`hf download {weights.BIOMEDCLIP_REPO}` (into the Hugging Face cache) or "
                  f"`hf download {weights.BIOMEDCLIP_REPO} --local-dir DIR` and name DIR as the model")


@dataclass
class ClipModel:
    """A loaded open_clip model, its tokenizer and its input normalisation."""

    model: Any                                  # open_clip CLIP / CustomTextCLIP
    tokenizer: Callable[[Sequence[str]], Any]   # texts -> token tensor
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    key: str                                    # canonical spec, for caches and messages
    files: weights.OpenClipFiles
    texts: dict[tuple[str, ...], Any] = field(default_factory=dict, repr=False)  # prompt -> vector, computed once

    def text_vector(self, text: str | Sequence[str]) -> torch.Tensor:
        """``(D,)`` unit vector of a prompt (several phrases: their mean, renormalised); no gradient."""
        import torch

        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise InputError("empty prompt text: give the class name or a sentence describing it")
        key = tuple(texts)
        if key not in self.texts or self.model.training:
            device = next(self.model.parameters()).device
            with torch.no_grad():
                vectors = torch.nn.functional.normalize(
                    self.model.encode_text(self.tokenizer(texts).to(device)).float(), dim=-1)
            if self.model.training:  # weights are changing: nothing to keep
                return torch.nn.functional.normalize(vectors.mean(0), dim=0)
            self.texts[key] = torch.nn.functional.normalize(vectors.mean(0), dim=0)
        return self.texts[key]

    def pixels(self, image: np.ndarray) -> torch.Tensor:
        """``(1, 3, H, W)`` model input of an image (see ``image_to_unit_rgb``), squashed to the model's size.

        Squashed, not cropped: a saliency map must cover the whole image.
        """
        import torch

        rgb = torch.from_numpy(image_to_unit_rgb(image)).permute(2, 0, 1)[None]
        rgb = torch.nn.functional.interpolate(rgb, size=self.image_size, mode="bilinear", antialias=True,
                                              align_corners=False)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((rgb - mean) / std).to(next(self.model.parameters()).device)


def image_to_unit_rgb(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` float32 in [0, 1] from a grey or RGB(A) image, uint8/uint16/bool/float.

    uint8 is divided by 255; floats already in [0, 1] are kept; anything else (CT numbers, uint16,
    MR at any scale) is stretched between its 0.5th and 99.5th percentiles.
    """
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3) or min(a.shape[:2]) < 2:
        raise InputError(f"expected a 2D grey or RGB image (H x W or H x W x 3), got shape {a.shape}")
    if a.dtype == np.uint8:
        out = a.astype(np.float32) / 255.0
    else:
        out = a.astype(np.float32)
        if not np.isfinite(out).all():
            finite = out[np.isfinite(out)]
            out = np.where(np.isfinite(out), out, finite.min() if finite.size else 0.0)
        lo, hi = float(out.min()), float(out.max())
        if a.dtype == np.bool_ or not (lo >= 0.0 and hi <= 1.0):
            lo, hi = (float(v) for v in np.percentile(out, (0.5, 99.5)))
            out = np.clip((out - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)
    return np.ascontiguousarray(out, dtype=np.float32)


def resolve_files(spec: str, allow_download: bool = False) -> tuple[weights.OpenClipFiles, str]:
    """Local files and canonical key of an open_clip model spec (see ``MODEL_HELP``); nothing heavy is imported."""
    canonical = _canonical(spec)
    allow = weights.downloads_allowed(allow_download)
    what = f"CLIP model '{spec}'"
    repo = weights.BIOMEDCLIP_REPO if canonical == BIOMEDCLIP_KEY else (
        canonical[len("open_clip:hf-hub:"):] if canonical.startswith("open_clip:hf-hub:") else None)
    if repo is not None:
        folder = weights.hf_snapshot(repo, (weights.OPEN_CLIP_CONFIG, weights.OPEN_CLIP_WEIGHTS), allow, what,
                                     fix=BIOMEDCLIP_FIX if repo == weights.BIOMEDCLIP_REPO else None)
        return weights.open_clip_folder(folder, allow, what), canonical
    source = _open_clip_source(canonical, allow)
    if source is None:
        raise WeightsError(f"{what}: not an open_clip model (no {weights.OPEN_CLIP_CONFIG} there); use {MODEL_HELP}")
    return source


def build_tokenizer(files: weights.OpenClipFiles) -> Callable[[Sequence[str]], Any]:
    """The model's own tokenizer from local files (a Hugging Face folder, or open_clip's bundled BPE)."""
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    text_cfg = files.model_cfg["text_cfg"]
    context = int(text_cfg.get("context_length", 77))
    if files.tokenizer_folder is not None:
        return HFTokenizer(str(files.tokenizer_folder), context_length=context, local_files_only=True,
                           **text_cfg.get("tokenizer_kwargs", {}))
    return open_clip.get_tokenizer(files.model_name, context_length=context)


_LOCK = threading.Lock()
_LOADED: dict[tuple[str, bool], ClipModel] = {}


def load_clip(spec: str, allow_download: bool = False, device: str | None = None, fresh: bool = False) -> ClipModel:
    """The model of ``spec``, frozen and in eval mode, one instance per process (``fresh``: a new, private copy)."""
    files, key = resolve_files(spec, allow_download)
    cache_key = (f"{key}|{weights.fingerprint(files.checkpoint)}|{device or 'cpu'}", fresh)
    with _LOCK:
        if not fresh and cache_key in _LOADED:
            return _LOADED[cache_key]
        import open_clip
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        model = create_open_clip(files, key)
        if device:
            model = model.to(device)
        with _quiet_transformers():
            tokenizer = build_tokenizer(files)
        pre = open_clip.get_model_preprocess_cfg(model)
        size = getattr(model.visual, "image_size", None) or pre.get("size") or 224
        size = (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))
        loaded = ClipModel(model, tokenizer, size, tuple(pre.get("mean") or OPENAI_DATASET_MEAN),
                           tuple(pre.get("std") or OPENAI_DATASET_STD), key, files)
        if not fresh:
            _LOADED[cache_key] = loaded
        return loaded


# --- where things are inside the vision tower -------------------------------------------------------------

def vit_blocks(visual: Any) -> list[Any]:
    """The transformer blocks of a ViT image tower: open_clip's own, or a timm trunk's (BiomedCLIP)."""
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(trunk, "blocks"):
        return list(trunk.blocks)
    transformer = getattr(visual, "transformer", None)
    if transformer is not None and hasattr(transformer, "resblocks"):
        return list(transformer.resblocks)
    raise InputError(f"saliency needs a ViT image tower; {type(visual).__name__} is not one")


def vit_grid(visual: Any) -> tuple[int, int]:
    """Patch-token grid (rows, cols) of a ViT image tower."""
    trunk = getattr(visual, "trunk", None)
    grid = getattr(getattr(trunk, "patch_embed", None), "grid_size", None) if trunk is not None else None
    grid = grid or getattr(visual, "grid_size", None)
    if grid is None:
        raise InputError(f"cannot tell the patch grid of {type(visual).__name__}")
    return int(grid[0]), int(grid[1])


def block_norm2(block: Any) -> Any:
    """The second LayerNorm of a block (before its MLP): ``norm2`` in timm, ``ln_2`` in open_clip."""
    for name in ("norm2", "ln_2"):
        if hasattr(block, name):
            return getattr(block, name)
    raise InputError(f"{type(block).__name__} has no norm2/ln_2 layer")


def find_layer(model: Any, path: str) -> Any:
    """A submodule by path, as MedCLIP-SAM writes it (``visual.trunk.blocks[11].norm2``) or dotted."""
    dotted = path.replace("[", ".").replace("]", "").strip(".")
    try:
        return model.get_submodule(dotted)
    except AttributeError:
        raise InputError(f"the model has no layer '{path}'") from None


def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int], batch_first: bool = True) -> torch.Tensor:
    """``(B, N, C)`` (or ``(N, B, C)``) block output -> ``(B, C, rows, cols)`` patch features, prefix tokens dropped."""
    if not batch_first:
        tokens = tokens.transpose(0, 1)
    rows, cols = grid
    patches = tokens[:, tokens.shape[1] - rows * cols:, :]
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], rows, cols)


def batch_first(visual: Any) -> bool:
    transformer = getattr(visual, "transformer", None)
    return bool(getattr(transformer, "batch_first", True)) if transformer is not None else True


def unit_map(values: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] float32; a constant map is all zeros (no place stands out)."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float32))
    lo, hi = float(values.min()), float(values.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(values, dtype=np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)


def write_model_folder(folder: str | os.PathLike, model: Any, model_cfg: dict[str, Any],
                       mean: Sequence[float], std: Sequence[float], tokenizer_folder: Path | None = None) -> Path:
    """Save an open_clip model as a folder in BiomedCLIP's layout, which every model spec accepts.

    ``open_clip_pytorch_model.bin`` (weights) + ``open_clip_config.json`` (architecture and input
    normalisation); a Hugging Face text tower's config and tokenizer files are copied in beside them,
    so the folder loads offline wherever it is moved. Each file is written atomically.
    """
    from medprompt.io.volume import write_json
    from medprompt.model.checkpoint import atomic_torch_save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(model_cfg)
    text_cfg = cfg.get("text_cfg", {})
    if tokenizer_folder is not None and Path(tokenizer_folder).resolve() != folder.resolve():
        for f in Path(tokenizer_folder).iterdir():
            if f.is_file() and f.suffix in (".json", ".txt", ".model") and f.name != weights.OPEN_CLIP_CONFIG:
                shutil.copyfile(f, folder / f.name)
    for name in ("hf_model_name", "hf_tokenizer_name"):
        if name in text_cfg:
            text_cfg[name] = str(folder.resolve())  # also found as "the model's own folder" once moved
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save(state, folder / weights.OPEN_CLIP_WEIGHTS[1])
    (folder / weights.OPEN_CLIP_WEIGHTS[0]).unlink(missing_ok=True)  # it would be read before ours
    write_json(folder / weights.OPEN_CLIP_CONFIG,
               {"model_cfg": cfg, "preprocess_cfg": {"mean": list(mean), "std": list(std)}})
    return folder
