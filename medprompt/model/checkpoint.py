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
DEFAULT_CHECKPOINT = REPO_ROOT / "models" / "medprompt_default.pt"
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


def save_model(path: Path, net: MedPromptNet, meta: dict[str, Any]) -> Path:
    """Model file: config + half-precision weights (half the size, no measurable change) + metadata."""
    state = {k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()) for k, v in net.state_dict().items()}
    return atomic_torch_save({"format": FORMAT, "config": net.cfg.to_dict(), "state_dict": state, **meta}, path)


def load_model(path: Path | None = None, device: str | torch.device = "cpu") -> tuple[MedPromptNet, dict[str, Any]]:
    """Rebuild the network from a model file; a missing or foreign file is a WeightsError saying what to do."""
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    if not path.is_file():
        raise WeightsError(
            f"MedPrompt checkpoint not found: {path}; make one with `{MAKE_COMMAND.format(path=path)}` "
            f"(unlabelled volumes are enough)"
        )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # corrupt or not a torch file
        raise WeightsError(f"{path}: not a readable MedPrompt checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise WeightsError(f"{path}: not a MedPrompt checkpoint (expected format {FORMAT})")
    net = MedPromptNet(NetConfig(**blob["config"]))
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()})
    net.to(device).eval()
    meta = {k: v for k, v in blob.items() if k not in ("state_dict",)}
    meta["path"] = str(path)
    return net, meta


def resolve_device(device: str | None) -> torch.device:
    """``auto`` (default): the GPU when there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
