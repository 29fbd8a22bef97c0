"""MONAI Label train task ``medprompt_finetune``: a semi-supervised round on the datastore's corrections.

Runs in MONAI Label's training child process like ``medprompt_zero_shot``. The round starts from
the model in service and writes ``<model_dir>/medprompt/medprompt.pt`` only when the candidate is
no worse on held-out corrected volumes (the shipped default model is never overwritten); every
accepted model is kept under ``versions/``.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medprompt.errors import InputError
from medprompt.trainers.defaults import FINETUNE
from medprompt.trainers.round_task import RoundTask, progress_lines, request_gpus, request_int, run_on_gpus

if TYPE_CHECKING:
    from monailabel.interfaces.datastore import Datastore

logger = logging.getLogger(__name__)


class FinetuneTrainTask(RoundTask):
    """Finetune MedPromptNet on saved labels plus unlabelled images; never serves a worse model."""

    summary = "Finetune round: corrected labels + unlabelled studies; replaces the model only if no worse"
    stats_file = "finetune_stats.json"

    def config(self) -> dict[str, Any]:
        return {"steps": FINETUNE[self.served_arch()].steps, "multi_gpu": False, "gpus": "all"}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        from medprompt.trainers.finetune import FinetuneResult, train_finetune

        steps = request_int(request, "steps", FINETUNE[self.served_arch()].steps)
        gpus = request_gpus(request)
        datastore.datalist()  # a DICOMweb datastore fetches its labelled series and reads their SEGs into its cache
        folder = getattr(datastore, "_datastore_path", None)
        if not folder or not Path(folder).is_dir():
            raise InputError("finetuning needs a local studies folder or a DICOMweb datastore")
        begin, start_ts = time.time(), datetime.now().isoformat(timespec="seconds")
        served_now = self.checkpoints.served()
        losses: dict[str, float] = {}
        if gpus:  # the same round as the CLI runs it (baseline = init = the served model), one process per GPU
            report = self.checkpoints.rounds / "finetune_work" / "result.json"
            report.unlink(missing_ok=True)
            run_on_gpus(["train-finetune", "--studies", str(folder), "--model", str(self.checkpoints.trained),
                         "--init", str(served_now), "--steps", str(steps), "--device", "cuda", "--json", str(report),
                         *(["--text-encoder", self.text_encoder] if self.text_encoder else [])], gpus)
            done = json.loads(report.read_text())
            result = FinetuneResult(**{**done, "served": Path(done["served"]),
                                       "version": Path(done["version"]) if done["version"] else None})
        else:
            result = train_finetune(Path(folder), self.checkpoints.trained, init=served_now, baseline=served_now,
                                    steps=steps, text_encoder=self.text_encoder, progress=False,
                                    on_step=progress_lines(steps, losses))
        stats = {
            "accepted": result.accepted,
            "validation_dice_before": result.previous_score,
            "validation_dice_after": result.candidate_score,
            "validation_images": result.validation,
            "classes": result.classes,
            "teacher_cannot_draw": result.details.get("teacher_cannot_draw", []),  # learnt from corrections only
            "checkpoint": str(self.checkpoints.served()),
            "version": str(result.version) if result.version else None,
            "steps": steps,
            "processes": max(1, len(gpus)),
            "last_losses": losses,
            "start_ts": start_ts,
            "total_time": round(time.time() - begin, 1),
        }
        verdict = "serving the new model" if result.accepted else "kept the model in service (candidate was worse)"
        logger.info(f"finetune round done in {stats['total_time']} s: validation Dice "
                    f"{result.previous_score} -> {result.candidate_score:.3f}; {verdict}")
        return self.save_stats(stats)
