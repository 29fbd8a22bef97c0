"""TaskConfig for the anatomy prior: the zero-shot model that needs no weights; on 2D studies its drafts
teach the weak-supervision model (``medprompt_weak2d``), which then localises them."""

from __future__ import annotations

from medprompt.configs.draft import DraftConfig
from medprompt.infers.prior import PriorInfer
from medprompt.weak.task import NAME as WEAK_TRAINER
from medprompt.weak.task import WeakTrainTask


class PriorConfig(DraftConfig):
    def infer(self) -> PriorInfer:
        task = PriorInfer(
            labels=self.labels,
            default_prompts=self.prompts,
            description="Anatomy prior: a zero-shot draft from the prompt's intensity, position and size (no weights), "
                        "drawn by LiteMedSAM",
            refine=self.refine,
            sam_checkpoint=self.sam_checkpoint,
        )
        task.weak_model = str(WeakTrainTask.model_path(self.model_dir))
        return task

    def trainer(self) -> dict[str, WeakTrainTask]:
        """The prior learns nothing; its 2D drafts are what the weak-supervision round learns from."""
        return {WEAK_TRAINER: WeakTrainTask(self.model_dir, self.prompts)}
