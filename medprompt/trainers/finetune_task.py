"""MONAI Label train task ``medprompt_finetune``: a semi-supervised round on the datastore's corrections.

Runs in MONAI Label's training child process like ``medprompt_zero_shot``. The round starts from
the model in service and writes ``<model_dir>/medprompt/medprompt.pt`` only when the candidate is
no worse on held-out corrected volumes (the shipped default model is never overwritten); every
accepted model is kept under ``versions/``.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monailabel.interfaces.tasks.train import TrainTask

from medprompt.errors import InputError
from medprompt.trainers.zero_shot_task import _progress_lines, _write_json, request_int

if TYPE_CHECKING:
    from monailabel.interfaces.datastore import Datastore

    from medprompt.configs.medprompt import Checkpoints

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 200


class FinetuneTrainTask(TrainTask):
    """Finetune MedPromptNet on saved labels plus unlabelled images; never serves a worse model."""

    def __init__(self, checkpoints: Checkpoints, text_encoder: str | None) -> None:
        super().__init__("Finetune round: corrected labels + unlabelled studies; replaces the model only if no worse")
        self.checkpoints = checkpoints
        self.text_encoder = text_encoder

    @property
    def stats_path(self) -> Path:
        return self.checkpoints.rounds / "finetune_stats.json"

    def config(self) -> dict[str, Any]:
        return {"steps": DEFAULT_STEPS}

    def stats(self) -> dict[str, Any]:
        import json

        try:
            return json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        from medprompt.trainers.finetune import train_finetune

        steps = request_int(request, "steps", DEFAULT_STEPS)
        folder = getattr(datastore, "_datastore_path", None)
        if not folder or not Path(folder).is_dir():
            raise InputError("finetuning needs a local studies folder (a DICOMweb datastore is not supported yet)")
        begin, start_ts = time.time(), datetime.now().isoformat(timespec="seconds")
        served_now = self.checkpoints.served()
        losses: dict[str, float] = {}
        result = train_finetune(Path(folder), self.checkpoints.trained, init=served_now, baseline=served_now,
                                steps=steps, text_encoder=self.text_encoder, progress=False,
                                on_step=_progress_lines(steps, losses))
        stats = {
            "accepted": result.accepted,
            "validation_dice_before": result.previous_score,
            "validation_dice_after": result.candidate_score,
            "validation_images": result.validation,
            "classes": result.classes,
            "checkpoint": str(self.checkpoints.served()),
            "version": str(result.version) if result.version else None,
            "steps": steps,
            "last_losses": losses,
            "start_ts": start_ts,
            "total_time": round(time.time() - begin, 1),
        }
        _write_json(self.stats_path, stats)
        verdict = "serving the new model" if result.accepted else "kept the model in service (candidate was worse)"
        logger.info(f"finetune round done in {stats['total_time']} s: validation Dice "
                    f"{result.previous_score} -> {result.candidate_score:.3f}; {verdict}")
        return stats
