"""The training set of weak supervision: a folder's 2D images and their zero-shot (or given) masks.

Without ``--masks``, every image is drafted once by :func:`medprompt.drafts2d.draft2d` and the draft
cached as ``<stem>-<key>.png`` (+ sidecar) in a folder beside the model file; the key hashes the
image's bytes, the classes, their 2D attributes and the saliency method, so a changed image or prompt
file is drafted again and a rerun (or a resumed training) drafts nothing. Each draft's confidence
(``Draft2D.confidence``: how clearly its mask beat every other candidate place; 1 where the path does not
tell) is kept in the sidecar, so training can leave the coin flips out (:mod:`medprompt.weak.train`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from medprompt.catalog import PromptCatalog, default_catalog
from medprompt.errors import InputError
from medprompt.io.image2d import LABEL_SUFFIXES, find_images2d, image_stem, load_image2d, load_label2d
from medprompt.weak.model import net_input

CACHE_VERSION = 2  # bump when draft2d's output for the same inputs changes meaning


@dataclass
class TrainingSet:
    """Images on the network grid (N, 3, S, S), their class-index targets (N, S, S) and where they came from."""

    x: np.ndarray
    y: np.ndarray
    classes: list[str]
    names: list[str]
    source: str  # "masks DIR" or "zero-shot drafts (saliency method)"
    confidence: list[float] = field(default_factory=list)  # per image, 0..1 (1: given masks, or not told)


def list_images(images: Path | Sequence[Path]) -> list[Path]:
    """A folder's 2D images, or the given files; one InputError when there is nothing to train on."""
    if isinstance(images, (str, Path)):
        folder = Path(images)
        if not folder.exists():
            raise InputError(f"{folder}: no such folder (--images)")
        if not folder.is_dir():
            raise InputError(f"{folder}: not a folder; --images takes a folder of 2D images")
        found = find_images2d(folder)
        if not found:
            raise InputError(f"{folder}: no 2D images (.png, .jpg, .tif, .bmp, 2D DICOM or 2D NIfTI) to train on")
        return found
    found = [Path(p) for p in images]
    if not found:
        raise InputError("no 2D images to train on")
    return found


def resolve_classes(prompts: Sequence[str], catalog: PromptCatalog | None = None) -> list[str]:
    """Prompt texts -> class names (catalog order of the prompts, duplicates once)."""
    catalog = catalog or default_catalog()
    return list(dict.fromkeys(entry.name for _, entry in catalog.resolve_all(list(prompts))))


def build_training_set(images: Sequence[Path], classes: list[str], size: int, cache_dir: Path,
                       masks: Path | None = None, saliency: str | None = None,
                       sam_checkpoint: str | Path | None = None, progress: bool = True) -> TrainingSet:
    """Load every image onto the network grid with its mask (given in ``masks`` or drafted and cached)."""
    if masks is not None and not Path(masks).is_dir():
        raise InputError(f"{masks}: no such folder (--masks)")
    catalog = default_catalog()
    if masks is not None:  # every mask is found before any work starts
        for path in images:
            mask_path(Path(masks), path)
    xs, ys, confidence = [], [], []
    bar = tqdm(images, desc="masks" if masks is not None else "zero-shot drafts", unit="image",
               disable=not progress)
    for path in bar:
        image = load_image2d(path)
        if masks is not None:
            labels, sure = _given_mask(Path(masks), path, image.shape, classes), 1.0
        else:
            labels, sure = draft_with_confidence(path, image, classes, cache_dir, catalog, saliency, sam_checkpoint)
        confidence.append(sure)
        x, grid = net_input(image, size)
        xs.append(x)
        ys.append(grid.to_net(labels[None].astype(np.float32), nearest=True)[0].round().astype(np.uint8))
    source = f"masks {masks}" if masks is not None else f"zero-shot drafts ({saliency or 'attribute'} saliency)"
    return TrainingSet(x=np.stack(xs), y=np.stack(ys), classes=classes, names=[p.name for p in images], source=source,
                       confidence=confidence)


def _given_mask(folder: Path, image_path: Path, shape: tuple[int, int], classes: list[str]) -> np.ndarray:
    """The mask of ``image_path`` in ``folder`` (same stem), remapped so class i of ``classes`` is i + 1.

    Values come from the mask's sidecar names where it has one, else value i + 1 is the i-th class.
    """
    found = mask_path(folder, image_path)
    labels, names = load_label2d(found)
    if labels.shape != tuple(shape):
        raise InputError(f"{found}: is {labels.shape[0]}x{labels.shape[1]}, its image {image_path.name} "
                         f"is {shape[0]}x{shape[1]}")
    out = np.zeros(shape, np.uint8)
    for i, name in enumerate(classes, start=1):
        if names is None:
            value = i
        elif name in names:
            value = names[name]
        else:
            raise InputError(f"{found}: its sidecar names {', '.join(names)}, not '{name}'")
        out[labels == value] = i
    return out


def mask_path(folder: Path, image_path: Path) -> Path:
    """``folder/<stem>.png`` (or .nii/.nii.gz) for ``image_path``; InputError naming the image otherwise."""
    stem = image_stem(image_path)
    found = next((p for p in (folder / f"{stem}{s}" for s in LABEL_SUFFIXES) if p.is_file()), None)
    if found is None:
        raise InputError(f"{folder}: no mask for {image_path.name} (expected {stem}.png, .nii or .nii.gz)")
    return found


def cached_draft(path: Path, image, classes: list[str], cache_dir: Path, catalog: PromptCatalog,
                 saliency: str | None = None, sam_checkpoint: str | Path | None = None) -> np.ndarray:
    """The zero-shot label map of ``image`` (class i of ``classes`` is i + 1), drafted once and cached."""
    return draft_with_confidence(path, image, classes, cache_dir, catalog, saliency, sam_checkpoint)[0]


def draft_with_confidence(path: Path, image, classes: list[str], cache_dir: Path, catalog: PromptCatalog,
                          saliency: str | None = None, sam_checkpoint: str | Path | None = None
                          ) -> tuple[np.ndarray, float]:
    """:func:`cached_draft` and the draft's confidence (the least over its classes; 1 where not told)."""
    from medprompt.drafts2d import draft2d
    from medprompt.io.image2d import label2d_sidecar, save_label2d

    h = hashlib.sha1(path.read_bytes())
    attrs = [catalog[c].image2d for c in classes]
    h.update(json.dumps([classes, attrs, (saliency or "attribute").lower(), CACHE_VERSION], sort_keys=True,
                        default=str).encode())
    target = cache_dir / f"{image_stem(path)}-{h.hexdigest()[:12]}.png"
    if target.is_file():
        labels, _ = load_label2d(target)
        try:
            told = json.loads(label2d_sidecar(target).read_text()).get("confidence") or {}
        except (OSError, ValueError):
            told = {}
        return labels.astype(np.uint8), min([float(v) for v in told.values()], default=1.0)
    result = draft2d(image, classes, saliency=saliency, sam_checkpoint=sam_checkpoint)
    labels = np.zeros(image.shape, np.uint8)
    for i, name in enumerate(classes, start=1):
        labels[result.labels == result.names[name]] = i
    save_label2d(target, labels, image, {c: i for i, c in enumerate(classes, start=1)},
                 extra={"stages": result.stages, "source": str(path), "confidence": result.confidence})
    return labels, min(result.confidence.values(), default=1.0)
