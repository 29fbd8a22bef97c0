"""Model files of MedPromptNet on LiteMedSAM features: written atomically, self-describing, local only."""

from __future__ import annotations

from pathlib import Path

import torch

from medprompt.errors import WeightsError
from medprompt.model.checkpoint import atomic_torch_save
from medprompt.model.sam_net import SamNetConfig, SamPromptNet

FORMAT = "medprompt-samnet/1"


def save_net(path: Path, net: SamPromptNet, meta: dict) -> Path:
    """Model file: config + half-precision weights + metadata (classes, their text vectors, encoder)."""
    state = {k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu())
             for k, v in net.state_dict().items()}
    return atomic_torch_save({"format": FORMAT, "config": net.cfg.to_dict(), "state_dict": state, **meta}, path)


def load_net(path: Path, device: torch.device | str = "cpu") -> tuple[SamPromptNet, dict]:
    """Rebuild the network from a model file; WeightsError for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"MedPrompt checkpoint not found: {path}; make one with "
                           f"`medprompt train-zero-shot --studies DIR --out {path}` (unlabelled studies are enough)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise WeightsError(f"{path}: not a readable MedPrompt checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise WeightsError(f"{path}: not a MedPrompt checkpoint on LiteMedSAM features (expected format {FORMAT})")
    net = SamPromptNet(SamNetConfig(**blob["config"]))
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()})
    net.to(device).eval()
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    meta["path"] = str(path)
    return net, meta
