"""Drafts from a weakly supervised model: alone (``refine="none"``) or as the saliency that prompts LiteMedSAM.

``medprompt infer IMAGE.png OUT.png --model weak:MODEL.pt`` comes here. With ``--refine none`` the
network's own argmax is the label map; with ``--refine sam`` (the default) each class's probability
map goes through the zero-shot path's box extraction and LiteMedSAM draws the mask
(:func:`medprompt.drafts2d.draft2d`), the model registered as saliency method ``weak:<path>``. For a
focal lesion on ultrasound the physics ranking of LiteMedSAM proposals still chooses, and the model's
map only proposes its own places and decides where that choice was a near tie
(:func:`medprompt.saliency.lesion.select_lesion`): a model learnt from a few confident drafts breaks the
zero-shot path's coin flips without overruling its clear answers.
"""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from medprompt.drafts import refine_choice
from medprompt.drafts2d import Draft2D, draft2d
from medprompt.errors import PromptError
from medprompt.io.image2d import Image2D
from medprompt.weak.data import resolve_classes
from medprompt.weak.model import WeakModel

PREFIX = "weak:"


def is_weak_spec(spec: str | None) -> bool:
    return bool(spec) and str(spec).lower().startswith(PREFIX)


@lru_cache(maxsize=4)
def _load(path: str, mtime: float) -> WeakModel:
    return WeakModel.load(path)


def load_model(path: str | Path) -> WeakModel:
    """The model at ``path``, loaded once per file version."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        return WeakModel.load(path)  # raises the WeightsError that names it
    return _load(str(path), path.stat().st_mtime)


def chosen_classes(model: WeakModel, prompts: Sequence[str] | None) -> list[str]:
    """The model's classes the prompts name (all of them for no prompts); PromptError for one it never learnt."""
    if not prompts:
        return list(model.classes)
    wanted = resolve_classes(prompts)
    unknown = [c for c in wanted if c not in model.classes]
    if unknown:
        raise PromptError(f"the weak model was trained on {', '.join(model.classes)}, not {', '.join(unknown)}")
    return wanted


def serving_method(model_path: str | Path, prompts: Sequence[str]) -> str | None:
    """The saliency name under which the weak model at ``model_path`` is registered, when the file exists
    and was trained on every class ``prompts`` name; None otherwise (the attribute prior serves)."""
    from medprompt.saliency import register

    path = Path(model_path).expanduser().resolve()
    if not path.is_file():
        return None
    model = load_model(path)
    try:
        chosen_classes(model, prompts)
    except PromptError:
        return None
    name = f"{PREFIX}{path}"
    register(name, weak_saliency(model), replace=True)
    return name


def draft_weak(image: Image2D, model_path: str | Path, prompts: Sequence[str] | None = None,
               refine: str = "sam", sam_checkpoint: str | Path | None = None) -> Draft2D:
    """Segment ``image`` with the weak model (see the module docstring)."""
    start = time.perf_counter()
    refine = refine_choice(refine)
    model = load_model(model_path)
    classes = chosen_classes(model, prompts)
    if refine == "sam":
        name = serving_method(model_path, classes)
        result = draft2d(image, classes, saliency=name, refine="sam", sam_checkpoint=sam_checkpoint)
        result.stages = {c: "weak model + LiteMedSAM" if "LiteMedSAM" in s else f"weak model: {s.split(': ')[-1]}"
                         for c, s in result.stages.items()}
        return result
    probs, _ = model.probabilities(image)
    names = {c: i for i, c in enumerate(classes, start=1)}
    index = [0] + [model.classes.index(c) + 1 for c in classes]
    winner = probs[index].argmax(0)  # classes not asked for do not compete
    labels = winner.astype(np.uint8)
    out = Draft2D(labels=labels, names=names, resolved={c: c for c in classes},
                  stages={c: "weak model" for c in classes},
                  saliency={c: probs[model.classes.index(c) + 1] for c in classes})
    out.seconds = time.perf_counter() - start
    return out


def weak_saliency(model: WeakModel):
    """A saliency function (image, entry) -> the model's probability of ``entry``'s class; the last image's
    probabilities are kept, so several classes of one image run the network once."""
    last: dict[str, object] = {}

    def saliency(image: Image2D, entry) -> np.ndarray:
        if entry.name not in model.classes:
            raise PromptError(f"the weak model was trained on {', '.join(model.classes)}, not {entry.name}")
        if last.get("image") is not image:
            last["image"], last["probs"] = image, model.probabilities(image)[0]
        return last["probs"][model.classes.index(entry.name) + 1]

    return saliency


def draft_weak_file(source: str | Path, target: str | Path, prompts: Sequence[str] | None, model_spec: str,
                    refine: str = "sam", sam_checkpoint: str | Path | None = None) -> Draft2D:
    """The CLI's path for ``--model weak:PATH`` on a 2D image: read, draft, write label map + sidecar."""
    from medprompt.io.image2d import load_image2d, save_label2d

    path = str(model_spec)[len(PREFIX):]
    image = load_image2d(source)
    result = draft_weak(image, path, prompts, refine=refine, sam_checkpoint=sam_checkpoint)
    save_label2d(target, result.labels, image, result.names,
                 extra={"stages": result.stages, "model": str(model_spec), "seconds": round(result.seconds, 3)})
    return result
