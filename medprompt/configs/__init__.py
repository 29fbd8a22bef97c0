"""MONAI Label TaskConfigs, one per model, and the app's choice among them (``--conf models``)."""

from __future__ import annotations

from typing import Mapping

from monailabel.interfaces.config import TaskConfig

from medprompt.configs.prior import PriorConfig
from medprompt.errors import MedPromptError

CONFIGS: dict[str, type[TaskConfig]] = {"prior": PriorConfig}
MODEL_PREFIX = "medprompt_"


def task_configs(conf: Mapping[str, str], model_dir: str) -> dict[str, TaskConfig]:
    """TaskConfigs named by ``--conf models a,b`` (default ``all``), keyed by MONAI Label model name.

    Raises MedPromptError for an unknown model or a bad option, so a typo stops start-up with its name.
    """
    wanted = conf.get("models", "all").strip()
    names = list(CONFIGS) if wanted == "all" else [n.strip() for n in wanted.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        raise MedPromptError(
            f"unknown model '{','.join(unknown) or wanted}' in --conf models; available: all, {', '.join(CONFIGS)}"
        )
    configs = {}
    for short in names:
        config = CONFIGS[short]()
        config.init(MODEL_PREFIX + short, model_dir, dict(conf), None)
        configs[MODEL_PREFIX + short] = config
    return configs
