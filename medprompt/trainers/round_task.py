"""What the app's training rounds share as MONAI Label train tasks: parameters, progress, stats.

MONAI Label runs a ``/train/<task>`` in a child process (``python -m monailabel.interfaces.utils.app
-m train``) that builds the app again and calls the task; the server shows the child's last output
lines as the task's ``details``, so progress is logged as whole lines (a tqdm bar would be one
endless line there). MONAI Label's single training worker never runs two rounds at once and
answers 429 to a second /train while one runs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from monailabel.interfaces.tasks.train import TrainTask

from medprompt.catalog import quoted
from medprompt.errors import InputError
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


class RoundTask(TrainTask):
    """A training round of the served MedPrompt model; its last stats are kept in ``stats_file``."""

    summary = ""  # the task's description in /info
    stats_file = "train_stats.json"

    def __init__(self, checkpoints: Checkpoints, text_encoder: str | None) -> None:
        super().__init__(self.summary)
        self.checkpoints = checkpoints
        self.text_encoder = text_encoder

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
