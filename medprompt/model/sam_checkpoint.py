"""Model files of MedPromptNet on LiteMedSAM features: written atomically, self-describing, local only."""

from __future__ import annotations

from pathlib import Path

import torch

from medprompt.model.checkpoint import read_model_file, restore, write_model_file
from medprompt.model.sam_net import SamNetConfig, SamPromptNet

FORMAT = "medprompt-samnet/1"


def save_net(path: Path, net: SamPromptNet, meta: dict) -> Path:
    return write_model_file(path, FORMAT, net, meta)


def load_net(path: Path, device: torch.device | str = "cpu") -> tuple[SamPromptNet, dict]:
    """Rebuild the network from a model file; WeightsError for a missing or foreign file."""
    path = Path(path)
    blob = read_model_file(path, FORMAT, "MedPrompt checkpoint on LiteMedSAM features")
    return restore(SamPromptNet(SamNetConfig(**blob["config"])), blob, path, device)
