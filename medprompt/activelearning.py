"""Active learning: which unlabelled study is most worth correcting next.

Two per-image scores of the served MedPrompt model on the app's default prompts:

* ``uncertainty``: mean binary entropy (bits, 0 = certain, 1 = coin flip) of the model's per-class
  masks over the patient's body on the network's working grid. High where the model hesitates.
* ``disagreement``: 1 - mean Dice between the anatomy prior's draft and the model's draft (classes
  empty in both ignored). High where the model has drifted from, or not yet learned, the anatomy.

A study of a modality the served model never learnt (an MR for a model taught on CT alone) scores the
maximum of both, 1: its drafts come from the anatomy prior (medprompt.model.sam_predictor), so the model
would look neither unsure nor in disagreement there, and its corrections are what teach the model that
modality.

Each is a MONAI Label scoring method (``POST /scoring/<name>``, run by MONAI Label's background task
runner over the unlabelled images) and a strategy (``POST /activelearning/<name>``: the unlabelled
study with the highest score, scoring on demand the ones not scored yet). Scores are cached in the
datastore's image info under the score's name, keyed by what they were computed with (checkpoint
path and mtime, prompts, text encoder), so a training round's new checkpoint invalidates them.
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from tqdm import tqdm

from medprompt.errors import InputError, PromptError
from medprompt.evaluation import evaluate
from medprompt.infers.http import http_errors
from medprompt.io.volume import load_volume

if TYPE_CHECKING:
    from monailabel.interfaces.config import TaskConfig

    from medprompt.configs.medprompt import Checkpoints
    from medprompt.io.volume import Volume

logger = logging.getLogger(__name__)

# Why a 2D study gets no score; ScoreMethod reports how many it skipped and strategies rank them last.
SKIPPED_2D = "a 2D study (X-ray, ultrasound or one slice): the MedPrompt network scores 3D volumes"
UNLEARNT_SCORE = 1.0  # both scores' maximum: a study of a modality the model never learnt
PROBABILITY_EPS = 1e-6  # keeps log2 finite for saturated sigmoids; changes H by < 3e-5 bits


def is_2d_study(datastore: Datastore, image: str) -> bool:
    """Whether the datastore image ``image`` is a 2D study (a picture, 2D DICOM or 2D NIfTI file)."""
    from medprompt.io.image2d import is_image2d

    uri = datastore.get_image_uri(image)
    return bool(uri) and is_image2d(uri)


def mean_binary_entropy(prob: np.ndarray, region: np.ndarray) -> float:
    """Mean over classes and ``region`` voxels of H(p) = -p log2 p - (1-p) log2 (1-p).

    ``prob`` is (classes, X, Y, Z), ``region`` a boolean (X, Y, Z) mask; an empty region scores 0
    (nothing to be uncertain about). Per-class binary entropy, not the entropy of a softmax, because
    the network's masks are independent sigmoids.
    """
    p = np.clip(prob[:, region].astype(np.float64), PROBABILITY_EPS, 1 - PROBABILITY_EPS)
    if p.size == 0:
        return 0.0
    return float(np.mean(-(p * np.log2(p) + (1 - p) * np.log2(1 - p))))


def label_disagreement(a: np.ndarray, b: np.ndarray, names: Mapping[str, int]) -> float:
    """1 - mean Dice between two label maps on one grid, over ``names`` (class -> value in both).

    Classes empty in both maps are ignored; if all are, the maps agree (0).
    """
    eye = np.eye(4)
    mdice = evaluate(a, eye, dict(names), b, eye, dict(names)).mdice
    return 0.0 if math.isnan(mdice) else 1.0 - mdice


@dataclass(frozen=True)
class ServedModel:
    """What the scores are computed with: the app's served checkpoint, default prompts and text encoder."""

    checkpoints: Checkpoints
    prompts: tuple[str, ...]
    text_encoder: str | None

    def key(self) -> dict[str, Any]:
        """Identity of a score's inputs, stored beside it: any change means the cached score is stale.

        The image itself is not in it: a datastore image id names a fixed file.
        """
        path = self.checkpoints.served()
        return {
            "checkpoint": str(path),
            "mtime_ns": path.stat().st_mtime_ns,
            "prompts": list(self.prompts),
            "text_encoder": self.text_encoder,
        }


class ImageScore(ABC):
    """A per-image score of the served model, cached in the datastore's image info under ``name``."""

    name: str
    description: str

    def __init__(self, model: ServedModel) -> None:
        self.model = model

    @abstractmethod
    def compute(self, volume: Volume, checkpoint: Path) -> float:
        """The score of one volume with the model file ``checkpoint``; higher = more worth correcting."""

    def score(self, volume: Volume, checkpoint: Path) -> float:
        """``compute``, or UNLEARNT_SCORE for a study of a modality the model file says it never learnt (a missing
        file is left to ``compute``, which says so)."""
        from medprompt.drafts import predictor
        from medprompt.model.sam_predictor import SamNetPredictor
        from medprompt.sam.preprocess import modality_of

        net = predictor(checkpoint, self.model.text_encoder) if Path(checkpoint).is_file() else None
        if isinstance(net, SamNetPredictor):
            modality = modality_of(volume.data, volume.modality)
            if net.unlearnt(modality):
                logger.info(f"{self.name}: {volume.source} is {modality}, which the model never learnt: "
                            f"scored {UNLEARNT_SCORE}")
                return UNLEARNT_SCORE
        return self.compute(volume, checkpoint)

    def cached(self, info: Mapping[str, Any], key: Mapping[str, Any]) -> float | None:
        """The score stored in ``info`` if it was computed with ``key``, else None."""
        entry = info.get(self.name)
        if isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("score"), (int, float)):
            return float(entry["score"])
        return None

    def update(self, datastore: Datastore, images: Sequence[str], progress: bool = False) -> dict[str, float]:
        """Scores of ``images``: cached ones read, the others computed one at a time and stored.

        An image that cannot be read is logged and left out, so one broken file does not stop the
        rest; a missing checkpoint raises WeightsError before anything is computed. A 2D study (X-ray,
        ultrasound, one slice) is left out with its reason logged: both scores are about the 3D network.
        """
        # Read once, before computing: a score made while a round replaces the checkpoint is stored
        # under the old key, so it is recomputed next time rather than trusted.
        key = self.model.key()
        checkpoint = Path(key["checkpoint"])
        scores: dict[str, float] = {}
        for image in tqdm(images, desc=self.name, unit="image", disable=not progress):
            score = self.cached(datastore.get_image_info(image), key)
            if score is None and is_2d_study(datastore, image):
                logger.info(f"{self.name}: {image} not scored: {SKIPPED_2D}")
                continue
            if score is None:
                begin = time.time()
                try:
                    score = self.score(load_volume(datastore.get_image_uri(image)), checkpoint)
                except InputError as e:
                    logger.warning(f"{self.name}: cannot score image '{image}': {e}")
                    continue
                datastore.update_image_info(image, {self.name: {"score": score, "key": key, "ts": int(time.time())}})
                logger.info(f"{self.name}: {image} = {score:.4f} ({time.time() - begin:.1f} s)")
            scores[image] = score
        return scores


class Uncertainty(ImageScore):
    name = "uncertainty"
    description = "Unlabelled study where the MedPrompt model is least sure: mean mask entropy within the body"

    def compute(self, volume: Volume, checkpoint: Path) -> float:
        from medprompt.catalog import default_catalog
        from medprompt.drafts import predictor
        from medprompt.model.grid import to_net_grid
        from medprompt.prior.landmarks import body_mask

        net = predictor(checkpoint, self.model.text_encoder)
        entries = [entry for _, entry in default_catalog().resolve_all(self.model.prompts)]
        from medprompt.model.sam_predictor import SamNetPredictor

        if isinstance(net, SamNetPredictor):  # a model on LiteMedSAM features: its cells on the sampled slices
            prob, body = net.cell_uncertainty_inputs(volume, entries)
            return mean_binary_entropy(prob, body)
        grid = to_net_grid(volume, net.device)
        prob = net.probabilities(grid, net.class_vectors(entries)).cpu().numpy()
        # The prior's body (filled: bowel gas and lungs count): air around the patient is trivially certain.
        return mean_binary_entropy(prob, body_mask(grid.raw, grid.modality))


class Disagreement(ImageScore):
    name = "disagreement"
    description = "Unlabelled study where the MedPrompt model and the anatomy prior disagree most: 1 - mean Dice"

    def compute(self, volume: Volume, checkpoint: Path) -> float:
        from medprompt.catalog import default_catalog
        from medprompt.drafts import draft

        # Only classes the prior can segment (not e.g. tumours) have a prior draft to disagree with.
        pairs = default_catalog().resolve_all(self.model.prompts)
        prompts = [text for text, entry in pairs if entry.prior_supported]
        if not prompts:
            raise PromptError(f"disagreement needs a prompt the anatomy prior can segment; "
                              f"{', '.join(self.model.prompts)} cannot be")
        # The drafts an annotator would see from each model, on the image's own grid.
        # The localisers' own masks: LiteMedSAM would draw both inside the same boxes, hiding where
        # they disagree, and costs seconds per study. The model as served, not adapted to the study: adapting
        # teaches it the prior + LiteMedSAM teacher there, which would hide the disagreement this looks for.
        prior = draft(volume, prompts, model="prior", refine="none")
        learned = draft(volume, prompts, model="medprompt", checkpoint=checkpoint, text_encoder=self.model.text_encoder,
                        refine="none", adapt=False)
        return label_disagreement(learned.labels, prior.labels, learned.names)


SCORES: tuple[type[ImageScore], ...] = (Uncertainty, Disagreement)


class ScoreMethod(ScoringMethod):
    """``POST /scoring/<name>``: score every unlabelled image not scored with the served model yet."""

    def __init__(self, score: ImageScore) -> None:
        super().__init__(f"Compute '{score.name}' for unlabelled images: {score.description}")
        self.score = score

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        begin = time.time()
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        scores = self.score.update(datastore, images, progress=True)
        skipped = sum(1 for image in images if image not in scores and is_2d_study(datastore, image))
        summary = {"total": len(images), "scored": len(scores), "skipped_2d": skipped,
                   "failed": len(images) - len(scores) - skipped, "latency": round(time.time() - begin, 3)}
        if skipped:
            summary["skipped_reason"] = SKIPPED_2D
        logger.info(f"{self.score.name}: {summary}")
        return summary


class ScoreStrategy(Strategy):
    """``POST /activelearning/<name>``: the unlabelled study with the highest score.

    Ties go to the first image id; images that cannot be scored (unreadable, or 2D studies) come last
    but are not hidden.
    No unlabelled image: None, which MONAI Label answers with ``{}`` (nothing to label).
    """

    def __init__(self, score: ImageScore) -> None:
        super().__init__(score.description)
        self.score = score

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        images = sorted(datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels")))
        if not images:
            return None
        with http_errors():  # a missing checkpoint is a 503 naming it, not a bare 500
            scores = self.score.update(datastore, images)
        best = max(images, key=lambda image: scores.get(image, -math.inf))
        logger.info(f"{self.score.name}: selected {best} ({scores.get(best)}) among {len(images)} unlabelled")
        return {"id": best, "score": scores.get(best)}


def image_scores(task_configs: Mapping[str, TaskConfig]) -> dict[str, ImageScore]:
    """The scores for the app's served MedPrompt model; none when the app does not serve one
    (``--conf models prior``): both scores are about the learned model."""
    from medprompt.configs.medprompt import MedPromptConfig

    config = next((c for c in task_configs.values() if isinstance(c, MedPromptConfig)), None)
    if config is None:
        return {}
    model = ServedModel(config.checkpoints, tuple(config.prompts), config.text_encoder)
    return {cls.name: cls(model) for cls in SCORES}
