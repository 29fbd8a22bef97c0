"""MONAI Label infer task for the anatomy prior: the zero-shot model that needs no weights."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medprompt.drafts import Segmentation, draft
from medprompt.infers.draft import DraftInfer

if TYPE_CHECKING:
    from medprompt.io.volume import Volume


class PriorInfer(DraftInfer):
    """Zero-shot drafts from the anatomy prior."""

    def is_valid(self) -> bool:
        # MONAI Label lists only valid models in /info; the prior needs no weight file.
        return True

    def segment(self, volume: Volume, prompts: list[str]) -> tuple[Segmentation, dict[str, Any]]:
        return draft(volume, prompts, model="prior"), {}
