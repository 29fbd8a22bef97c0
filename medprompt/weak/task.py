"""MONAI Label train task ``medprompt_weak2d``: weak supervision on the datastore's 2D images.

The datastore's 2D images (labels are never read) are drafted zero-shot for the request's
``prompts`` and the weak model trained on those drafts (:func:`medprompt.weak.train.train_weak`), in
``<model_dir>/medprompt_weak2d/work/``; when training ends its model file is renamed over
``<model_dir>/medprompt_weak2d/weak2d.pt`` (atomic). An interrupted round resumes with the same
settings. Progress is logged as whole lines (see medprompt.trainers.round_task).
"""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monailabel.interfaces.tasks.train import TrainTask

from medprompt.errors import InputError
from medprompt.infers.draft import parse_prompts
from medprompt.io.volume import write_json
from medprompt.trainers.defaults import WEAK
from medprompt.trainers.round_task import progress_lines, request_int

if TYPE_CHECKING:
    from monailabel.interfaces.datastore import Datastore

logger = logging.getLogger(__name__)

NAME = "medprompt_weak2d"


class WeakTrainTask(TrainTask):
    """Train the 2D weak-supervision model on the datastore's unlabelled 2D images."""

    def __init__(self, model_dir: str | Path, prompts: list[str]) -> None:
        super().__init__("Weak supervision (2D): a U-Net learns from the zero-shot drafts of the datastore's "
                         "2D images, with checkpoint ensembling; no labels are read")
        self.folder = Path(model_dir) / NAME
        self.prompts = list(prompts)

    @staticmethod
    def model_path(model_dir: str | Path) -> Path:
        """Where the round's model is served from (the 2D drafts read it from there)."""
        return Path(model_dir) / NAME / "weak2d.pt"

    @property
    def model(self) -> Path:
        return self.model_path(self.folder.parent)

    def config(self) -> dict[str, Any]:
        return {"prompts": ",".join(self.prompts), "steps": WEAK.steps, "size": 256}

    def stats(self) -> dict[str, Any]:
        import json

        try:
            return json.loads((self.folder / "train_stats.json").read_text())
        except (OSError, ValueError):
            return {}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        from medprompt.io.image2d import is_image2d
        from medprompt.weak.train import WeakConfig, train_weak

        steps = request_int(request, "steps", WEAK.steps)
        size = request_int(request, "size", 256)
        prompts = parse_prompts(request["prompts"]) if request.get("prompts") else self.prompts
        images = [Path(datastore.get_image_uri(i)) for i in sorted(datastore.list_images())]
        images = [p for p in images if is_image2d(p)]
        if not images:
            raise InputError("the datastore holds no 2D images to train the weak model on")
        work = self.folder / "work" / "weak2d.pt"
        begin, start_ts = time.time(), datetime.now().isoformat(timespec="seconds")
        logger.info(f"{NAME}: {steps} steps on {len(images)} 2D images for {', '.join(prompts)} -> {work}")
        losses: dict[str, float] = {}
        result = train_weak(WeakConfig(images=images, prompts=prompts, out=work, steps=steps, size=size),
                            progress=False, on_step=progress_lines(steps, losses))
        os.replace(work, self.model)  # same folder tree: atomic; a draft sees the old model or the new
        work.with_name(work.name + ".state").unlink(missing_ok=True)
        stats = {"checkpoint": str(self.model), "steps": steps, "images": len(images), "prompts": prompts,
                 "excluded_pixels": result.excluded, "last_losses": losses, "start_ts": start_ts,
                 "total_time": round(time.time() - begin, 1)}
        write_json(self.folder / "train_stats.json", stats)
        return stats
