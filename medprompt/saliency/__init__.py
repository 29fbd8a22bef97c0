"""Text-grounded saliency on 2D images: where on the image does the prompt's class lie?

A saliency method is any function ``(image, entry) -> map``: an :class:`~medprompt.io.image2d.Image2D`
and the resolved :class:`~medprompt.catalog.PromptEntry` in, an (H, W) float map in [0, 1] on the
image's own pixels out, high where the class is. MedCLIP-SAM's gScoreCAM and MedCLIP-SAMv2's M2IB on
BiomedCLIP, and the MedPrompt network's region-text similarity, are such functions; the built-in
``attribute`` method reads the class's 2D attributes (prompts/*.yaml, ``image2d``) against the
image's physics and needs no weights. Methods are registered by name here and chosen with
``medprompt infer --saliency NAME``; :mod:`medprompt.saliency.prompts` turns any map into SAM's
box prompts the same way.

To add one (e.g. from ``medprompt.clip``)::

    from medprompt.saliency import register
    register("gscorecam", my_gscorecam)        # my_gscorecam(image, entry) -> (H, W) in [0, 1]

A method whose weights are missing should raise :class:`~medprompt.errors.WeightsError` naming the
file and how to get it; ``loader`` lets a registration import its heavy module only when chosen.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable

import numpy as np

from medprompt.errors import PromptError

if TYPE_CHECKING:
    from medprompt.catalog import PromptEntry
    from medprompt.io.image2d import Image2D

SaliencyFn = Callable[["Image2D", "PromptEntry"], np.ndarray]
DEFAULT_METHOD = "attribute"

# name -> the function, or "module:attribute" to import when first chosen (keeps start-up light).
_METHODS: dict[str, SaliencyFn | str] = {
    "attribute": "medprompt.saliency.attribute:attribute_saliency",
    # BiomedCLIP (or $MEDPROMPT_CLIP_MODEL) maps; without its weights they raise one message saying how to get them.
    "gscorecam": "medprompt.clip.saliency:gscorecam_saliency",
    "m2ib": "medprompt.clip.saliency:m2ib_saliency",
    # The MedPrompt network on LiteMedSAM features (the default model; `infer --model medprompt --checkpoint`).
    "medprompt": "medprompt.model.sam_predictor:medprompt_saliency",
}


def register(name: str, method: SaliencyFn | str, replace: bool = False) -> None:
    """Make ``method`` (a function, or ``"module:function"`` imported on first use) available as ``name``."""
    key = name.strip().lower()
    if not key or (key in _METHODS and not replace):
        raise ValueError(f"saliency method {name!r} is {'empty' if not key else 'already registered'}")
    _METHODS[key] = method


def available() -> list[str]:
    return sorted(_METHODS)


def get(name: str | None) -> SaliencyFn:
    """The registered method ``name`` (default ``attribute``); PromptError listing the others otherwise."""
    key = (name or DEFAULT_METHOD).strip().lower()
    if key not in _METHODS:
        raise PromptError(f"unknown saliency method '{name}'; available: {', '.join(available())}")
    method = _METHODS[key]
    if isinstance(method, str):
        module, attribute = method.split(":")
        method = _METHODS[key] = getattr(importlib.import_module(module), attribute)
    return method


def checked_map(saliency: np.ndarray, shape: tuple[int, int], name: str) -> np.ndarray:
    """A method's output as float32 (H, W) in [0, 1]; a wrong shape is a bug in the method, said plainly."""
    s = np.asarray(saliency, dtype=np.float32)
    if s.shape != tuple(shape):
        raise ValueError(f"saliency method {name!r} returned shape {s.shape}, expected {tuple(shape)}")
    s = np.nan_to_num(s, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(s, 0.0, 1.0)
