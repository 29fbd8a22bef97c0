"""MONAI Label train task ``medprompt_zero_shot``: a zero-shot round on the datastore's images.

How MONAI Label runs it (child process, progress lines, one round at a time): see round_task.py.
A round trains in ``<model_dir>/medprompt/work/`` and, when it ends, its model file is renamed
over ``<model_dir>/medprompt/medprompt.pt`` (atomic), which the infer task serves from its next
request. An interrupted round leaves its work files, and the next round with the same settings
resumes it.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medprompt.errors import InputError, WeightsError
from medprompt.trainers.defaults import ZERO_SHOT
from medprompt.trainers.round_task import RoundTask, progress_lines, request_gpus, request_int, run_on_gpus

if TYPE_CHECKING:
    from monailabel.interfaces.datastore import Datastore

logger = logging.getLogger(__name__)


class ZeroShotTrainTask(RoundTask):
    """Train MedPromptNet on the datastore's images with the anatomy prior as teacher; labels are never read."""

    summary = "Zero-shot round: MedPromptNet learns from the datastore's images and the prompt text, no labels"

    def config(self) -> dict[str, Any]:
        # Shown (and editable) in the client's training options.
        return {"steps": ZERO_SHOT[self.served_arch()].steps, "text_encoder": self.text_encoder or "minilm",
                "model_config": "small", "multi_gpu": False, "gpus": "all"}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        import torch

        from medprompt.trainers.zero_shot import ZeroShotConfig, train_zero_shot

        arch = self.served_arch()
        steps = request_int(request, "steps", ZERO_SHOT[arch].steps)
        text_encoder = request.get("text_encoder") or self.text_encoder
        model_config = str(request.get("model_config") or "small")
        gpus = request_gpus(request)
        # Image ids resolve to image files (or DICOM series folders): the labels beside them are never listed.
        images = [Path(datastore.get_image_uri(image_id)) for image_id in sorted(datastore.list_images())]
        if not images:
            raise InputError("the datastore holds no images to train on")

        work = self.checkpoints.rounds / "work" / "medprompt.pt"
        start_ts = datetime.now().isoformat(timespec="seconds")
        begin = time.time()
        logger.info(f"zero-shot round: {steps} steps on {len(images)} images ({model_config} network) -> {work}")
        # Continue from the model in service (fine-tuning), so a short round refines it rather than
        # replacing it with a network trained from scratch for a few steps.
        try:
            init: Path | None = self.checkpoints.served()
        except WeightsError:
            init = None  # nothing in service yet: train from scratch
        losses: dict[str, float] = {}
        if gpus:  # the same round as the CLI runs it, in one process per GPU
            run_on_gpus(["train-zero-shot", "--studies", *map(str, images), "--out", str(work), "--steps", str(steps),
                         "--model-config", model_config, "--device", "cuda",
                         *(["--text-encoder", text_encoder] if text_encoder else []),
                         *(["--init", str(init)] if init else [])], gpus)
            blob = torch.load(work, map_location="cpu", weights_only=False)
            losses.update({k: round(float(v), 4) for k, v in (blob.get("last_losses") or {}).items()})
        elif arch == "sam":  # a model on LiteMedSAM features
            from medprompt.trainers.sam_rounds import zero_shot_sam
            from medprompt.trainers.zero_shot import DEFAULT_CLASSES

            zero_shot_sam(images, work, DEFAULT_CLASSES, steps=steps, text_encoder=text_encoder,
                          model_config=model_config, init=init, progress=False,
                          on_step=progress_lines(steps, losses))
        else:
            cfg = ZeroShotConfig(studies=images, out=work, steps=steps, model_config=model_config,
                                 text_encoder=text_encoder, resume=True, init=init)
            train_zero_shot(cfg, progress=False, on_step=progress_lines(steps, losses))

        served = self.checkpoints.trained
        os.replace(work, served)  # same folder tree: an atomic rename, the infer task sees old or new
        work.with_name(work.name + ".state").unlink(missing_ok=True)  # the round is done: nothing to resume
        stats = {
            "checkpoint": str(served),
            "steps": steps,
            "model_config": model_config,
            "text_encoder": text_encoder or "minilm",
            "images": len(images),
            "processes": max(1, len(gpus)),
            "last_losses": losses,
            "start_ts": start_ts,
            "total_time": round(time.time() - begin, 1),
        }
        logger.info(f"zero-shot round done in {stats['total_time']} s; serving {served}")
        return self.save_stats(stats)

