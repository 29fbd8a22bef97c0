"""Checkpoint files of MedPromptNet: written atomically, self-describing, loaded from local paths only."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from medprompt.errors import WeightsError
from medprompt.model.network import MedPromptNet, NetConfig

FORMAT = "medprompt-net/1"
REPO_ROOT = Path(__file__).resolve().parents[2]
# The shipped model: MedPromptNet on LiteMedSAM's features (issue 9; ct_abdomen_a with LiteMedSAM 0.786
# where the ViT below reaches 0.556). The ViT trained from pixels stays for `--arch vit`.
DEFAULT_CHECKPOINT = REPO_ROOT / "models" / "medprompt_sam.pt"
VIT_CHECKPOINT = REPO_ROOT / "models" / "medprompt_vit.pt"
MAKE_COMMAND = "medprompt train-zero-shot --studies DIR --out {path}"


def atomic_torch_save(obj: Any, path: Path) -> Path:
    """Write to a temporary file beside ``path`` and rename: a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a checkpoint is shared with the server
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_model_file(path: Path, fmt: str, net: torch.nn.Module, meta: dict[str, Any]) -> Path:
    """Model file of format ``fmt``: config + half-precision weights (half the size, no measurable
    change) + metadata (classes, their text vectors, encoder), written atomically."""
    state = {k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()) for k, v in net.state_dict().items()}
    return atomic_torch_save({"format": fmt, "config": net.cfg.to_dict(), "state_dict": state, **meta}, path)


def read_model_file(path: Path, fmt: str, what: str, make: str | None = None) -> dict[str, Any]:
    """A model file's contents; a missing, unreadable or other-format file is a WeightsError naming the
    file and what to do (``what``: the kind of model expected; ``make``: the command that makes one)."""
    if not path.is_file():
        how = f"`{make}`" if make else f"`{MAKE_COMMAND.format(path=path)}` (unlabelled studies are enough)"
        raise WeightsError(f"{what} not found: {path}; make one with {how}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: pickle/zip errors of any kind
        raise WeightsError(f"{path}: not a readable {what} ({type(e).__name__}: {e})") from None
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        raise WeightsError(f"{path}: not a {what} (expected format {fmt})")
    return blob


def restore(net: torch.nn.Module, blob: dict[str, Any], path: Path, device: str | torch.device) -> tuple[Any, dict[str, Any]]:
    """``net`` (built from ``blob``'s config) with the file's weights, in eval mode on ``device``, and
    the file's metadata (plus its path)."""
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()})
    net.to(device).eval()
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    meta["path"] = str(path)
    return net, meta


def save_model(path: Path, net: MedPromptNet, meta: dict[str, Any]) -> Path:
    return write_model_file(path, FORMAT, net, meta)


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[MedPromptNet, dict[str, Any]]:
    """Rebuild the ViT from a model file (e.g. ``VIT_CHECKPOINT``; the shipped default is on LiteMedSAM's
    features, ``sam_checkpoint.load_net``); a missing or foreign file is a WeightsError saying what to do."""
    path = Path(path)
    blob = read_model_file(path, FORMAT, "MedPrompt checkpoint")
    return restore(MedPromptNet(NetConfig(**blob["config"])), blob, path, device)


def resolve_device(device: str | None) -> torch.device:
    """``auto`` (default): the GPU when there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
