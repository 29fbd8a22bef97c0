"""MONAI Label TaskConfigs, one per model, and the app's choice among them (``--conf models``)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from monailabel.interfaces.config import TaskConfig

from medprompt.configs.click import ClickConfig
from medprompt.configs.medprompt import MedPromptConfig
from medprompt.configs.prior import PriorConfig
from medprompt.errors import MedPromptError

# --conf models name -> (name served in /info and /infer, its TaskConfig). The learned model is the
# product's own, so it is served as plain "medprompt"; the others say which MedPrompt model they are.
CONFIGS: dict[str, tuple[str, type[TaskConfig]]] = {
    "prior": ("medprompt_prior", PriorConfig),
    "medprompt": ("medprompt", MedPromptConfig),
    "click": ("medprompt_click", ClickConfig),  # also serves medprompt_click_3d
}


def task_configs(conf: Mapping[str, str], model_dir: str) -> dict[str, TaskConfig]:
    """TaskConfigs named by ``--conf models a,b`` (default ``all``), keyed by MONAI Label model name.

    ``--conf model_dir DIR`` replaces ``model_dir`` (where training rounds are written). Raises
    MedPromptError for an unknown model or a bad option, so a typo stops start-up with its name.
    """
    wanted = conf.get("models", "all").strip()
    names = list(CONFIGS) if wanted == "all" else [n.strip() for n in wanted.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        raise MedPromptError(
            f"unknown model '{','.join(unknown) or wanted}' in --conf models; available: all, {', '.join(CONFIGS)}"
        )
    model_dir = str(Path(conf.get("model_dir") or model_dir).expanduser().resolve())
    configs = {}
    for short in names:
        served, cls = CONFIGS[short]
        config = cls()
        config.init(served, model_dir, dict(conf), None)
        configs[served] = config
    return configs
