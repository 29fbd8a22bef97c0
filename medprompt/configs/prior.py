"""TaskConfig for the anatomy prior: the zero-shot model that needs no weights and has no trainer."""

from __future__ import annotations

from medprompt.configs.draft import DraftConfig
from medprompt.infers.prior import PriorInfer


class PriorConfig(DraftConfig):
    def infer(self) -> PriorInfer:
        return PriorInfer(
            labels=self.labels,
            default_prompts=self.prompts,
            description="Anatomy prior: a zero-shot draft from the prompt's intensity, position and size (no weights), "
                        "drawn by LiteMedSAM",
            refine=self.refine,
            sam_checkpoint=self.sam_checkpoint,
        )

    def trainer(self) -> None:
        return None
