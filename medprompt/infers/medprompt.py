"""MONAI Label infer task for the MedPrompt network, served from the latest checkpoint.

The checkpoint is chosen per request (see ``Checkpoints.served``) and the loaded network is reused
while its file is unchanged (``medprompt.drafts.predictor``), so a finished training round is
served by the next request, without a restart. Missing weights are a 503 naming the file and the
command that makes it; the other models keep serving.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Sequence

from medprompt.drafts import Segmentation, draft, predictor
from medprompt.errors import MedPromptError
from medprompt.infers.draft import DraftInfer, sam_problems

if TYPE_CHECKING:
    from medprompt.configs.medprompt import Checkpoints
    from medprompt.io.volume import Volume


class MedPromptInfer(DraftInfer):
    """Drafts from MedPromptNet conditioned on the prompts' text vectors."""

    def __init__(
        self,
        labels: dict[str, int],
        default_prompts: Sequence[str],
        checkpoints: Checkpoints,
        text_encoder: str | None,
        description: str,
        refine: str = "sam",
        sam_checkpoint: str | None = None,
        adapt: bool = True,
        in_use: threading.Event | None = None,
    ) -> None:
        super().__init__(labels, default_prompts, description, refine=refine, sam_checkpoint=sam_checkpoint)
        self.checkpoints = checkpoints
        self.text_encoder = text_encoder
        self.adapt = adapt  # the model learns each new study first (medprompt.trainers.study_adaptation)
        # Set by the first draft: from then on Next Sample's prefetch adapts the model too (MedPromptConfig.prefetch).
        self.in_use = in_use if in_use is not None else threading.Event()

    def is_valid(self) -> bool:
        # Listed in /info even without weights: choosing it in a client shows why it cannot draft
        # (a 503 naming the missing file), and its trainer, listed beside it, can make the file.
        return True

    def segment(self, volume: Volume, prompts: list[str], refine: str) -> tuple[Segmentation, dict[str, Any]]:
        self.in_use.set()
        path = self.checkpoints.served()
        modified = path.stat().st_mtime
        seg = draft(volume, prompts, model="medprompt", checkpoint=path, text_encoder=self.text_encoder,
                    refine=refine, sam_checkpoint=self.sam_checkpoint, adapt=self.adapt)
        return seg, {"checkpoint": {"path": str(path), "mtime": modified}}

    def problems(self) -> list[str]:
        """Find the text encoder's weights and load the served checkpoint now; one line per reason they cannot serve.

        The server calls this once at start-up, so a missing weight is reported in the log within
        seconds rather than on the first request, and the first request does not pay for loading.
        """
        from medprompt.text import get_text_encoder

        found = []
        try:
            path = self.checkpoints.served()  # a stat: reported before anything slow
        except MedPromptError as e:
            found.append(str(e))
            path = None
        try:
            get_text_encoder(self.text_encoder)
        except MedPromptError as e:
            found.append(str(e))
        if path is not None and not found:
            try:
                predictor(path, self.text_encoder)
            except MedPromptError as e:
                found.append(str(e))
        return found + sam_problems(self.refine, self.sam_checkpoint)
