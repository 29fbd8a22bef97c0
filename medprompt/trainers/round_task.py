"""What the app's training rounds share as MONAI Label train tasks: parameters, progress, stats.

MONAI Label runs a ``/train/<task>`` in a child process (``python -m monailabel.interfaces.utils.app
-m train``) that builds the app again and calls the task; the server shows the child's last output
lines as the task's ``details``, so progress is logged as whole lines (a tqdm bar would be one
endless line there). MONAI Label's single training worker never runs two rounds at once and
answers 429 to a second /train while one runs.

MONAI Label's multi-GPU option (request ``multi_gpu: true``, ``gpus: "all"`` or ``"0,2"``, as its
BasicTrainTask takes them) runs the round with torchrun in one process per GPU (DDP, NCCL; see
medprompt/distributed.py) instead of in this child; without CUDA, or with one GPU, the round
runs in this one process as usual and the log says so.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from monailabel.interfaces.tasks.train import TrainTask

from medprompt.catalog import quoted
from medprompt.errors import InputError, WeightsError
from medprompt.io.volume import write_json

if TYPE_CHECKING:
    from medprompt.configs.medprompt import Checkpoints

logger = logging.getLogger(__name__)

LOG_LINES = 20  # progress lines per round (MONAI Label keeps the last 20 as the task's details)


def request_int(request: dict[str, Any], key: str, default: int) -> int:
    """A positive integer request parameter; InputError naming it otherwise."""
    value = request.get(key, default)
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):  # None, "ten", inf
        number = 0
    if isinstance(value, bool) or number < 1 or str(number) != str(value).strip():
        raise InputError(f"'{key}' must be a positive whole number, not {quoted(str(value))}")
    return number


def progress_lines(steps: int, losses: dict[str, float]) -> Callable[[int, dict], None]:
    """An ``on_step`` callback logging about LOG_LINES lines per round and keeping the last losses."""
    every = max(1, steps // LOG_LINES)

    def on_step(step: int, stats: dict) -> None:
        losses.clear()
        losses.update({k: round(float(v), 4) for k, v in stats.items()})
        if step % every == 0 or step == steps:
            logger.info(f"step {step}/{steps} " + " ".join(f"{k} {v:.4f}" for k, v in losses.items()))

    return on_step


def request_gpus(request: dict[str, Any]) -> list[int]:
    """The GPUs a multi-GPU request asks for; [] = train in this one process (the default)."""
    import torch

    multi = request.get("multi_gpu", False)
    if isinstance(multi, str) and multi.strip().lower() in ("true", "false"):
        multi = multi.strip().lower() == "true"
    if not isinstance(multi, bool):
        raise InputError(f"'multi_gpu' must be true or false, not {quoted(str(multi))}")
    if not multi:
        return []
    if not torch.cuda.is_available():
        logger.info("multi_gpu asked, but there is no CUDA GPU here: the round runs in one process")
        return []
    count = torch.cuda.device_count()
    gpus = request.get("gpus", "all")
    if gpus is None or str(gpus).strip().lower() in ("", "all"):
        ids = list(range(count))
    else:
        try:
            ids = [int(g) for g in str(gpus).split(",")]
        except ValueError:
            ids = []
        if not ids or len(set(ids)) != len(ids) or not all(0 <= g < count for g in ids):
            raise InputError(f"'gpus' must be \"all\" or distinct GPU numbers below {count} such as \"0,1\", "
                             f"not {quoted(str(gpus))}")
    if len(ids) < 2:
        logger.info(f"multi_gpu asked with {len(ids)} GPU: the round runs in one process")
        return []
    logger.info(f"multi_gpu: the round runs with torchrun in {len(ids)} processes on GPUs {ids}")
    return ids


def run_on_gpus(args: list[str], gpus: list[int]) -> None:
    """``medprompt ARGS`` with torchrun, one process per GPU in ``gpus``; its output becomes log lines."""
    from medprompt.distributed import run_torchrun

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [n.strip() for n in visible.split(",")] if visible else [str(g) for g in range(max(gpus) + 1)]
    run_torchrun(args, len(gpus), env={"CUDA_VISIBLE_DEVICES": ",".join(names[g] for g in gpus)}, on_line=logger.info)


class RoundTask(TrainTask):
    """A training round of the served MedPrompt model; its last stats are kept in ``stats_file``."""

    summary = ""  # the task's description in /info
    stats_file = "train_stats.json"

    def __init__(self, checkpoints: Checkpoints, text_encoder: str | None) -> None:
        super().__init__(self.summary)
        self.checkpoints = checkpoints
        self.text_encoder = text_encoder

    def served_arch(self) -> str:
        """The kind of the model in service ("sam" or "vit"; "sam" while there is none), which picks the
        round's defaults from trainers.defaults."""
        from medprompt.drafts import checkpoint_arch

        try:
            return checkpoint_arch(self.checkpoints.served())
        except WeightsError:
            return "sam"

    @property
    def stats_path(self) -> Path:
        return self.checkpoints.rounds / self.stats_file

    def stats(self) -> dict[str, Any]:
        """The last finished round (MONAI Label shows it in /info's train_stats)."""
        try:
            return json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {}

    def save_stats(self, stats: dict[str, Any]) -> dict[str, Any]:
        """Atomically, so /info never reads half a stats file; returns ``stats``."""
        write_json(self.stats_path, stats)
        return stats
