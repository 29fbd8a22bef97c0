"""Semi-supervised finetuning on annotators' corrections plus the still-unlabelled studies.

Labelled volumes (a MONAI Label datastore's ``labels/final``) give full-weight targets for the
classes their label map names; unlabelled volumes keep contributing through the teacher's
confident regions and the consistency loss (the zero-shot objective), so one corrected volume is
enough to start. Classes the annotators added that prompts/ does not know become prompts whose
text is their name. A round trains a candidate from the model in service and replaces it only if
it is no worse on held-out labelled volumes; every accepted model is also kept as a version.
"""

from __future__ import annotations

import glob

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from medprompt.catalog import PromptCatalog, catalog_with, default_catalog
from medprompt.distributed import init_distributed
from medprompt.errors import InputError
from medprompt.model.checkpoint import load_model
from medprompt.model.grid import NET_SPACING_MM, to_net_grid
from medprompt.prior import geometry
from medprompt.teachers import PriorTeacher
from medprompt.trainers.defaults import FINETUNE
from medprompt.trainers.zero_shot import (
    DEFAULT_CLASSES, TrainingVolume, ZeroShotConfig, class_vectors, list_studies, prepare_volumes, run_training,
)

DATASTORE_JSON = "datastore_v2.json"  # where MONAI Label's LocalDatastore keeps label info


@dataclass
class LabelledStudy:
    image: Path
    label: Path
    names: dict[str, int]


@dataclass
class FinetuneResult:
    """What a round did: whether the candidate replaced the served model, and the scores behind it."""

    accepted: bool
    served: Path
    candidate_score: float
    previous_score: float | None
    validation: list[str]
    classes: list[str]
    version: Path | None = None
    details: dict = field(default_factory=dict)


def label_names_for(label: Path, studies: Path, image_id: str) -> dict[str, int] | None:
    """Class names of a saved label: its JSON sidecar, else MONAI Label's datastore record."""
    from medprompt.io.volume import read_label_names, sidecar_path

    side = sidecar_path(label)
    if side.is_file():
        return read_label_names(side)
    ds = studies / DATASTORE_JSON
    if ds.is_file():
        try:
            info = json.loads(ds.read_text())["objects"][image_id]["labels"]["final"]["info"]
            names = info.get("label_names")
            if isinstance(names, dict) and names:
                return {str(k): int(v) for k, v in names.items()}
            # 3D Slicer's MONAI Label module sends [{"name": ..., "idx": ...}, ...] as label_info.
            items = info.get("label_info")
            if isinstance(items, list) and items:
                return {str(i["name"]): int(i["idx"]) for i in items if "name" in i and "idx" in i}
        except (KeyError, ValueError, TypeError):
            return None
    return None


def find_labelled(studies: Path, default_names: dict[str, int] | None = None) -> tuple[list[LabelledStudy], list[Path]]:
    """Split a datastore folder into labelled studies (image + final label + names) and unlabelled images."""
    from medprompt.io.volume import volume_stem

    images = list_studies([studies])
    final = studies / "labels" / "final"
    labelled, unlabelled = [], []
    for image in images:
        stem = volume_stem(image)
        # Exactly this stem: ids such as DICOM UIDs may be another id plus ".N", which a glob would also match.
        candidates = [p for p in final.glob(f"{glob.escape(stem)}.*")
                      if p.suffix != ".json" and volume_stem(p) == stem] if final.is_dir() else []
        if not candidates:
            unlabelled.append(image)
            continue
        names = label_names_for(candidates[0], studies, stem) or default_names
        if not names:
            raise InputError(f"{candidates[0]}: no label names (no sidecar JSON, no {DATASTORE_JSON} record); "
                             f"give them with --label-names")
        labelled.append(LabelledStudy(image, candidates[0], names))
    return labelled, unlabelled


def labelled_volume(study: LabelledStudy, classes: Sequence[str]) -> TrainingVolume:
    """A corrected volume as training targets: every pixel certain for the classes its label names."""
    from medprompt.evaluation import align_to_reference
    from medprompt.io.volume import load_labelmap, load_volume

    volume = load_volume(study.image)
    labels, label_affine, _ = load_labelmap(study.label)
    # A label may be stored in another axis order than its image (e.g. LAS vs a DICOM's LPS).
    labels, _ = align_to_reference(labels, label_affine, volume.data.shape, volume.affine)
    grid = to_net_grid(volume)
    target = np.zeros((len(classes), *grid.image.shape), np.uint8)
    weight = np.zeros_like(target)
    for c, name in enumerate(classes):
        if name not in study.names:
            continue  # not annotated in this volume: no statement either way
        mask, _ = geometry.to_work((labels == study.names[name]).astype(np.float32), volume.affine,
                                   NET_SPACING_MM, exact_inplane=True)
        target[c] = mask > 0.5
        weight[c] = 1
    return TrainingVolume.from_grid(study.image.name, grid.image, target, weight)


def mean_dice(checkpoint: Path, studies: Sequence[LabelledStudy], catalog: PromptCatalog) -> float:
    """Mean Dice over the annotated classes of held-out labelled volumes (full-volume inference)."""
    from medprompt.io.volume import load_labelmap, load_volume
    from medprompt.model.predictor import load_checkpoint

    from medprompt.evaluation import align_to_reference

    predictor = load_checkpoint(checkpoint, device="auto")
    scores = []
    for study in studies:
        volume = load_volume(study.image)
        ref, ref_affine, _ = load_labelmap(study.label)
        ref, _ = align_to_reference(ref, ref_affine, volume.data.shape, volume.affine)
        names = list(study.names)
        pred = predictor.predict(volume, [catalog[n] for n in names])
        for i, name in enumerate(names):
            p, r = pred == i + 1, ref == study.names[name]
            if p.any() or r.any():
                scores.append(2 * np.sum(p & r) / (p.sum() + r.sum()))
    return float(np.mean(scores)) if scores else 0.0


def train_finetune(studies: Path, served: Path, init: Path | None = None, *, baseline: Path | None = None,
                   steps: int | None = None, batch_size: int | None = None,
                   lr: float | None = None, device: str = "auto", text_encoder: str | None = None,
                   model_config: str = "small", label_names: dict[str, int] | None = None,
                   labelled_share: float = 0.5, seed: int = 0, catalog: PromptCatalog | None = None,
                   progress: bool = True, on_step: Callable[[int, dict], None] | None = None,
                   arch: str | None = None) -> FinetuneResult:
    """One finetuning round on a datastore folder; ``served`` is replaced only by a no-worse model.

    ``init`` (default: ``served`` when it exists) is where training starts; ``baseline`` (default:
    ``served`` when it exists, else ``init``) is the model a candidate must not be worse than. With two or more
    labelled volumes one in four (at least one) is held out for validation; with a single one it
    is used both to train and to validate, which can only catch a round that made it worse.
    ``arch``: default that of ``init`` (or ``served``); a model on LiteMedSAM features (``sam``) goes to
    :func:`medprompt.trainers.sam_rounds.finetune_sam`, which also reads 2D datastores.
    """
    from medprompt.drafts import checkpoint_arch

    studies, served = Path(studies), Path(served)
    start = Path(init) if init else (served if served.is_file() else None)
    if (arch or (checkpoint_arch(start) if start is not None else "sam")) == "sam":
        from medprompt.trainers.sam_rounds import finetune_sam

        tuned = FINETUNE["sam"]
        return finetune_sam(studies, served, start, baseline, steps=steps or tuned.steps, lr=lr or tuned.lr,
                            batch_size=batch_size or tuned.batch_size, device=device, text_encoder=text_encoder,
                            model_config=model_config, label_names=label_names, labelled_share=labelled_share,
                            seed=seed, catalog=catalog, progress=progress, on_step=on_step)
    tuned = FINETUNE["vit"]
    steps, batch_size, lr = steps or tuned.steps, batch_size or tuned.batch_size, lr or tuned.lr
    catalog = catalog or default_catalog()
    labelled, unlabelled = find_labelled(studies, label_names)
    if not labelled:
        raise InputError(f"{studies}: no saved labels in labels/final to finetune on")
    init = Path(init) if init else (served if served.is_file() else None)
    base_classes = list(load_model(init)[1].get("classes", DEFAULT_CLASSES)) if init else list(DEFAULT_CLASSES)
    label_classes = sorted({n for s in labelled for n in s.names})
    classes = base_classes + [c for c in label_classes if c not in base_classes]
    catalog = catalog_with(classes, catalog)

    val = labelled[3::4] or labelled[-1:] if len(labelled) >= 2 else labelled
    train = [s for s in labelled if s not in val] or labelled
    work = served.parent / "finetune_work"
    work.mkdir(parents=True, exist_ok=True)
    candidate = work / "candidate.pt"
    for stale in (candidate, candidate.with_suffix(".pt.state")):
        stale.unlink(missing_ok=True)  # a round always starts from the model in service

    lab_vols = [labelled_volume(s, classes) for s in train]
    unl_vols = prepare_volumes(unlabelled, PriorTeacher(catalog), classes, catalog, work / "teacher_cache", progress)
    volumes = lab_vols + unl_vols
    share = labelled_share if unl_vols else 1.0
    p = np.array([share / len(lab_vols)] * len(lab_vols) + [(1 - share) / max(1, len(unl_vols))] * len(unl_vols))
    vectors, encoder_key = class_vectors(classes, catalog, text_encoder, work / "teacher_cache")
    cfg = ZeroShotConfig(studies=[studies], out=candidate, steps=steps, batch_size=batch_size, lr=lr,
                         model_config=model_config, text_encoder=text_encoder, classes=classes, device=device,
                         seed=seed, save_every=max(steps, 1), resume=False, init=init)
    run_training(cfg, volumes, vectors, encoder_key,
                 {"teacher": "prior", "labelled": [s.image.name for s in train]}, progress, on_step, p / p.sum(),
                 desc="finetuning")
    ctx = init_distributed(device)  # the group run_training joined: under torchrun, rank 0 alone validates
    if not ctx.is_main:
        return FinetuneResult(accepted=False, served=served, candidate_score=math.nan, previous_score=None,
                              validation=[], classes=classes, details={"rank": ctx.rank})

    new = mean_dice(candidate, val, catalog)
    baseline = Path(baseline) if baseline else (served if served.is_file() else init)
    old = mean_dice(baseline, val, catalog) if baseline is not None and baseline.is_file() else None
    result = FinetuneResult(accepted=old is None or new >= old, served=served, candidate_score=new,
                            previous_score=old, validation=[s.image.name for s in val], classes=classes)
    if result.accepted:
        versions = served.parent / "versions"
        versions.mkdir(exist_ok=True)
        result.version = versions / f"{time.strftime('%Y%m%d-%H%M%S')}-dice{new:.3f}.pt"
        shutil.copy2(candidate, result.version)
        os.replace(candidate, served)  # same folder tree: atomic, readers see the old or the new file
    else:
        candidate.unlink(missing_ok=True)
    return result
