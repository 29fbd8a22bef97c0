"""TaskConfig for the MedPrompt network: which checkpoint it serves, its text encoder, its trainer.

App options (``--conf KEY VALUE``) read here:
  checkpoint    the model file served until this app's training writes one (default: the shipped
                models/medprompt_sam.pt)
  text_encoder  the frozen text encoder for prompts the checkpoint holds no vector for, and for
                training rounds (default: minilm, the offline MiniLM; see medprompt.text)
  adapt         true (default): the model first learns each study its rounds never saw from its teacher
                (a finetuned model only where it agrees with the teacher; medprompt.trainers.study_adaptation;
                kept in memory for that study's re-prompts);
                false: it drafts as it is
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monailabel.interfaces.tasks.train import TrainTask

from medprompt.configs.draft import DraftConfig
from medprompt.catalog import quoted
from medprompt.errors import InputError, WeightsError
from medprompt.infers.medprompt import MedPromptInfer
from medprompt.model.checkpoint import DEFAULT_CHECKPOINT, MAKE_COMMAND
from medprompt.trainers.finetune_task import FinetuneTrainTask
from medprompt.trainers.zero_shot_task import ZeroShotTrainTask

TRAINER = "medprompt_zero_shot"
FINETUNE_TRAINER = "medprompt_finetune"


@dataclass(frozen=True)
class Checkpoints:
    """Where the served weights come from: this app's latest training round, else the start checkpoint.

    A round always wins because it was trained on this datastore after the start checkpoint was
    chosen; the file name is fixed so "latest" never depends on guessing from names or timestamps.
    """

    rounds: Path  # <model_dir>/medprompt: the training rounds' output, stats and work files
    start: Path  # --conf checkpoint, or the shipped default

    @property
    def trained(self) -> Path:
        """The newest round's model file, replaced atomically when a round ends."""
        return self.rounds / "medprompt.pt"

    def served(self) -> Path:
        """The model file to infer with now; WeightsError naming what is missing and how to make it."""
        for path in (self.trained, self.start):
            if path.is_file():
                return path
        raise WeightsError(
            f"no MedPrompt checkpoint: {self.start} does not exist and no {TRAINER} round has written "
            f"{self.trained} yet; make one with `{MAKE_COMMAND.format(path=self.start)}` "
            f"or run the {TRAINER} training from the client"
        )


def flag(value: str, where: str) -> bool:
    """"true"/"false" (case and spaces ignored); InputError naming ``where`` otherwise."""
    choice = str(value).strip().lower()
    if choice not in ("true", "false"):
        raise InputError(f"{where} must be true or false, not '{quoted(str(value))}'")
    return choice == "true"


class MedPromptConfig(DraftConfig):
    """The learned, text-prompted model: infers with the latest checkpoint, trains without labels."""

    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs: Any) -> None:
        super().init(name, model_dir, conf, planner, **kwargs)
        start = Path(conf["checkpoint"]).expanduser().resolve() if conf.get("checkpoint") else DEFAULT_CHECKPOINT
        self.checkpoints = Checkpoints(rounds=Path(model_dir) / "medprompt", start=start)
        # None keeps each library default: MiniLM for training, the checkpoint's own encoder for inference.
        self.text_encoder = conf.get("text_encoder") or None
        self.adapt = flag(conf.get("adapt", "true"), "--conf adapt")
        # Annotators have drafted with this model in this server: only then is adapting it worth the prefetch's
        # CPU (about 20 s a clinical CT on two cores, beside a draft of the prior if that is what they use).
        self.in_use = threading.Event()

    def infer(self) -> MedPromptInfer:
        return MedPromptInfer(
            labels=self.labels,
            default_prompts=self.prompts,
            checkpoints=self.checkpoints,
            text_encoder=self.text_encoder,
            description="MedPrompt network: a text-prompted draft from a model trained without pixel labels, "
                        "drawn by LiteMedSAM",
            refine=self.refine,
            sam_checkpoint=self.sam_checkpoint,
            adapt=self.adapt,
            in_use=self.in_use,
        )

    def prefetch(self, image_path: str, stop: threading.Event) -> int:
        """Next Sample's background work for this model (medprompt.sam.prefetch): the study's LiteMedSAM
        embeddings, then, with ``adapt`` and once annotators have drafted with this model, the served model
        adapted to the study, so the annotator's first draft finds both ready; returns the slices prepared."""
        from medprompt.drafts import predictor, study_localiser
        from medprompt.io.volume import load_volume
        from medprompt.sam import segmenter_factory
        from medprompt.sam.refine import precompute

        volume = load_volume(image_path)
        make = segmenter_factory(self.sam_checkpoint)
        n = precompute(volume, make, stop=stop)
        if self.adapt and self.in_use.is_set() and not stop.is_set():
            study_localiser(predictor(self.checkpoints.served(), self.text_encoder, self.sam_checkpoint), volume, make)
        return n

    def trainer(self) -> dict[str, TrainTask]:
        # MONAI Label names a single trainer after its config; a dict names them as the issues ask.
        return {
            TRAINER: ZeroShotTrainTask(checkpoints=self.checkpoints, text_encoder=self.text_encoder),
            FINETUNE_TRAINER: FinetuneTrainTask(checkpoints=self.checkpoints, text_encoder=self.text_encoder),
        }
