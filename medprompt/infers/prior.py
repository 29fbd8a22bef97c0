"""MONAI Label infer task for the anatomy prior: the zero-shot model that needs no weights."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medprompt.drafts import Segmentation, draft
from medprompt.infers.draft import DraftInfer, sam_problems

if TYPE_CHECKING:
    from medprompt.io.volume import Volume


class PriorInfer(DraftInfer):
    """Zero-shot drafts from the anatomy prior."""

    def is_valid(self) -> bool:
        # MONAI Label lists only valid models in /info; the prior needs no weight file.
        return True

    def problems(self) -> list[str]:
        """LiteMedSAM's weights, loaded at start-up so a missing file is logged at once (see MedPromptInfer)."""
        return sam_problems(self.refine, self.sam_checkpoint)

    def segment(self, volume: Volume, prompts: list[str], refine: str) -> tuple[Segmentation, dict[str, Any]]:
        return draft(volume, prompts, model="prior", refine=refine, sam_checkpoint=self.sam_checkpoint), {}
