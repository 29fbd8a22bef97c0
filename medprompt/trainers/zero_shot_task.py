"""MONAI Label train task ``medprompt_zero_shot``: a zero-shot round on the datastore's images.

MONAI Label runs ``/train/medprompt_zero_shot`` in a child process (``python -m
monailabel.interfaces.utils.app -m train``) that builds the app again and calls this task; the
server shows the child's last output lines as the task's ``details``, so progress is logged as
whole lines (a tqdm bar would be one endless line there). MONAI Label's single training worker
never runs two rounds at once and answers 429 to a second /train while one runs.

A round trains in ``<model_dir>/medprompt/work/`` and, when it ends, its model file is renamed
over ``<model_dir>/medprompt/medprompt.pt`` (atomic), which the infer task serves from its next
request. An interrupted round leaves its work files, and the next round with the same settings
resumes it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from monailabel.interfaces.tasks.train import TrainTask

from medprompt.errors import InputError, WeightsError

if TYPE_CHECKING:
    from monailabel.interfaces.datastore import Datastore

    from medprompt.configs.medprompt import Checkpoints

logger = logging.getLogger(__name__)

# Steps per round when the request names none: the "small" network takes about 2.3 s a step on a
# 2-core CPU, so a round ends in about 8 minutes there (well under one on a GPU).
DEFAULT_STEPS = 200
LOG_LINES = 20  # progress lines per round (MONAI Label keeps the last 20 as the task's details)


def request_int(request: dict[str, Any], key: str, default: int) -> int:
    """A positive integer request parameter; InputError naming it otherwise."""
    value = request.get(key, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number < 1 or str(number) != str(value).strip():
        raise InputError(f"'{key}' must be a positive whole number, not {value!r}")
    return number


class ZeroShotTrainTask(TrainTask):
    """Train MedPromptNet on the datastore's images with the anatomy prior as teacher; labels are never read."""

    def __init__(self, checkpoints: Checkpoints, text_encoder: str | None) -> None:
        super().__init__("Zero-shot round: MedPromptNet learns from the datastore's images and the prompt text, no labels")
        self.checkpoints = checkpoints
        self.text_encoder = text_encoder

    @property
    def stats_path(self) -> Path:
        return self.checkpoints.rounds / "train_stats.json"

    def config(self) -> dict[str, Any]:
        # Shown (and editable) in the client's training options.
        return {"steps": DEFAULT_STEPS, "text_encoder": self.text_encoder or "minilm", "model_config": "small"}

    def stats(self) -> dict[str, Any]:
        """The last finished round (MONAI Label shows it in /info's train_stats)."""
        try:
            return json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        from medprompt.trainers.zero_shot import ZeroShotConfig, train_zero_shot

        steps = request_int(request, "steps", DEFAULT_STEPS)
        text_encoder = request.get("text_encoder") or self.text_encoder
        model_config = str(request.get("model_config") or "small")
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
        cfg = ZeroShotConfig(studies=images, out=work, steps=steps, model_config=model_config,
                             text_encoder=text_encoder, resume=True, init=init)
        losses: dict[str, float] = {}
        train_zero_shot(cfg, progress=False, on_step=_progress_lines(steps, losses))

        served = self.checkpoints.trained
        os.replace(work, served)  # same folder tree: an atomic rename, the infer task sees old or new
        work.with_name(work.name + ".state").unlink(missing_ok=True)  # the round is done: nothing to resume
        stats = {
            "checkpoint": str(served),
            "steps": steps,
            "model_config": model_config,
            "text_encoder": text_encoder or "minilm",
            "images": len(images),
            "last_losses": losses,
            "start_ts": start_ts,
            "total_time": round(time.time() - begin, 1),
        }
        _write_json(self.stats_path, stats)
        logger.info(f"zero-shot round done in {stats['total_time']} s; serving {served}")
        return stats


def _progress_lines(steps: int, losses: dict[str, float]) -> Callable[[int, dict], None]:
    """An ``on_step`` callback logging about LOG_LINES lines per round and keeping the last losses."""
    every = max(1, steps // LOG_LINES)

    def on_step(step: int, stats: dict) -> None:
        losses.clear()
        losses.update({k: round(float(v), 4) for k, v in stats.items()})
        if step % every == 0 or step == steps:
            logger.info(f"step {step}/{steps} " + " ".join(f"{k} {v:.4f}" for k, v in losses.items()))

    return on_step


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically, so /info never reads half a stats file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
