"""Typed prompts -> a 2D label map: saliency -> box prompts -> LiteMedSAM (MedCLIP-SAM's zero-shot path).

For each prompt: a saliency method (``medprompt.saliency``; default the attribute prior) maps
where the class is, :func:`medprompt.saliency.prompts.saliency_to_prompts` turns the map into boxes
as MedCLIP-SAMv2 does, and LiteMedSAM draws the masks on the whole image, shown to it as it was
trained (longest side 256, aspect kept, 0.5-99.5 percentile clipping, or a CT window where the
pixels are Hounsfield units). Where classes overlap, the pixel goes to the class with the higher
SAM logit. ``refine="none"`` keeps the saliency regions themselves.

A focal lesion on ultrasound (a one-part class on a US image) is not one box: LiteMedSAM draws several
proposals (the map's components and dark blobs) on the same embedding and the most lesion-like mask by
ultrasound physics wins (:mod:`medprompt.saliency.lesion`); ``Draft2D.confidence`` says by how much.

A method whose map is a probability (a trained classifier's softmax, marked ``probability = True``:
the MedPrompt network's) says first *whether* the class is on the slice: only where it is somewhere
more probable than everything else together (> 0.5, as the 3D path reads the same network,
model.sam_predictor) does its map become boxes, by the same k-means as any map. K-means alone always
finds a "foreground", so a class absent from the slice (the pancreas on a slice below it, the kidneys
above them) got a box and a mask; and the > 0.5 core alone is narrower than the organ (a network
trained on a few images is sure of an organ's middle, not its rim), so its box cut SAM's mask short.
The mask LiteMedSAM draws from those boxes is then read against the same map as a whole: it is kept
only if the map holds more than half of what a perfect map of that mask would hold inside it (mean p
over the mask > 0.5 x the mean of the mask itself seen at the map's resolution), the 0.5 rule applied
to the object rather than to its surest pixel. A map sure of a few cells on a slice without the organ
still gets a box, and LiteMedSAM a plausible organ around them: that mask is mostly improbable. The
network's map is one value per cell of LiteMedSAM's 64 x 64 grid, trained on each cell's share of the
class, so even a perfect map is below 1 along an organ's rim: on the CURVAS references it averages 0.91
inside a liver, 0.81 inside a kidney and 0.72 inside a pancreas (medians). Judged against 0.5 alone, a
thin organ needed a map far surer of it than a large one did (CURVAS k = 1: 27 masks of a present
pancreas were dropped; 4 of 17 aortas on ct_abdomen_a's HU slices). The price is a few more organs
drawn on slices without them (BENCHMARKS.md, "A 2D mask judged against what a perfect cell map of it
would hold"). The method says what its perfect map of a mask is (``perfect``); without one the mask
itself is taken as that (plain "more probable than not"). Choosing among several boxes from one map
(k-means, > 0.5, wider margins) the mask that agrees best with the map, and feeding a box from SAM's own
mask back, were measured too and gained nothing (BENCHMARKS.md, "CURVAS k = 1: the mask read against the
map"). A round's teacher draft of an unlabelled image keeps every mask
(``probable_masks_only=False``): its cells are weighed by agreement with the map already, and a dropped
mask taught the organ's rim as background.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from medprompt.catalog import PromptCatalog, PromptEntry, default_catalog
from medprompt.drafts import refine_choice
from medprompt.errors import PromptError
from medprompt.io.image2d import Image2D
from medprompt.saliency import SaliencyFn, checked_map
from medprompt.saliency import get as get_saliency
from medprompt.saliency.attribute import attribute_saliency, modality_for, working_image
from medprompt.saliency.lesion import select_lesion
from medprompt.saliency.prompts import SamPrompts, saliency_to_prompts
from medprompt.sam.preprocess import sam_pixels


PROBABLE = 0.5  # a probability map says a class is on the slice where it is more likely than not


@dataclass
class Draft2D:
    """A 2D draft: labels (rows, cols), class -> value, prompt -> class, stages, and what made each mask."""

    labels: np.ndarray
    names: dict[str, int]
    resolved: dict[str, str]
    stages: dict[str, str] = field(default_factory=dict)
    saliency: dict[str, np.ndarray] = field(default_factory=dict)
    prompts: dict[str, SamPrompts] = field(default_factory=dict)
    confidence: dict[str, float] = field(default_factory=dict)  # where the path can tell: 0 (a coin flip) .. 1
    seconds: float = 0.0


def draft2d(image: Image2D, prompts: Sequence[str], saliency: str | SaliencyFn | None = None, refine: str = "sam",
            sam_checkpoint: str | Path | None = None, catalog: PromptCatalog | None = None,
            points: bool = False, probable_masks_only: bool = True) -> Draft2D:
    """Segment ``prompts`` on ``image``; see the module docstring. ``saliency``: a registered method's name
    or the method itself (a round drafting with its candidate model). ``probable_masks_only``: a
    probability map's mask is kept only if the class is more probable than not inside it (a draft for a
    person); a round's teacher passes False, as its cells are weighed by agreement with the map already
    and a dropped mask would teach the organ's rim as background. PromptError for a class with no 2D
    attributes (unless another saliency method is chosen) or an image of another modality."""
    start = time.perf_counter()
    refine = refine_choice(refine)
    catalog = catalog or default_catalog()
    if prompts is None:
        raise PromptError(f"{image.source} is a 2D image: name what to segment with --prompts "
                          "(e.g. lungs, breast_tumor, brain_tumor, liver)")
    pairs = catalog.resolve_all(prompts)
    entries = [entry for _, entry in pairs]
    method = saliency if callable(saliency) else get_saliency(saliency)
    method_name = (getattr(saliency, "__name__", "learnt") if callable(saliency)
                   else (saliency or "attribute").strip().lower())
    modalities = {e.name: _modality(image, e, strict=method_name == "attribute") for e in entries}
    make_segmenter = None
    if refine == "sam":
        from medprompt.sam import segmenter_factory

        make_segmenter = segmenter_factory(sam_checkpoint)  # a missing weight fails before the work
    names = {e.name: i + 1 for i, e in enumerate(entries)}
    out = Draft2D(labels=np.zeros(image.shape, np.uint8 if len(entries) < 256 else np.uint16), names=names,
                  resolved={text: e.name for text, e in pairs})
    best = np.full(image.shape, -np.inf, np.float32)
    segmenters: dict[tuple[str, str], object] = {}  # one embedding per channel LiteMedSAM sees
    probability = getattr(method, "probability", False)  # a softmax: read at PROBABLE (module docstring)
    perfect = getattr(method, "perfect", None)  # its perfect map of a mask, where its grid is coarser
    for entry in entries:
        sal = checked_map(method(image, entry), image.shape, method_name)
        parts = int(entry.image2d.get("parts", 1)) if entry.image2d else 1
        absent = probability and float(sal.max()) <= PROBABLE
        sam_prompts = (SamPrompts.none() if absent
                       else saliency_to_prompts(sal, parts=parts, per_part=True, points=points))
        out.saliency[entry.name], out.prompts[entry.name] = sal, sam_prompts
        modality = modalities[entry.name]
        focal_lesion = modality == "US" and parts == 1 and bool(entry.image2d)
        if sam_prompts.empty and not (focal_lesion and make_segmenter is not None):
            out.stages[entry.name] = f"{method_name} saliency: nothing found"
            continue
        if make_segmenter is None:
            mask = np.logical_or.reduce(sam_prompts.regions)
            logits = np.where(mask, 1.0, -1.0).astype(np.float32)
            out.stages[entry.name] = f"{method_name} saliency"
        else:
            grey = working_image(image, entry, modality)
            key = (modality, str(entry.image2d.get("sequence", "")) if entry.image2d else "")
            seg = segmenters.get(key)
            if seg is None:
                seg = segmenters[key] = make_segmenter(sam_pixels(grey, modality)[None], image.pixel_mm)
            if focal_lesion:
                # A focal lesion on ultrasound: LiteMedSAM's masks of several proposals, ranked by
                # ultrasound physics (medprompt.saliency.lesion). Another method's map (a learnt one)
                # adds its places to the attribute prior's and decides where physics is unsure.
                learnt = method_name != "attribute"
                choice = select_lesion(seg, grey, attribute_saliency(image, entry) if learnt else sal,
                                       entry.image2d, agreement=sal if learnt else None)
                chosen = choice.chosen
                out.confidence[entry.name] = round(choice.confidence, 4)  # 0 when nothing was found
                if chosen is None:
                    out.stages[entry.name] = f"{method_name} saliency: nothing found"
                    continue
                out.prompts[entry.name] = SamPrompts(boxes=chosen.box[None].astype(np.float32),
                                                     regions=[chosen.logits > 0])
                logits = chosen.logits
                out.stages[entry.name] = f"{method_name} saliency + LiteMedSAM proposals"
            else:
                point_labels = (np.ones(sam_prompts.points.shape[:2], np.int64)
                                if sam_prompts.points is not None else None)
                per_box = seg.predict(0, boxes=sam_prompts.boxes, points=sam_prompts.points,
                                      point_labels=point_labels).numpy()
                logits = per_box.max(axis=0)
                out.stages[entry.name] = f"{method_name} saliency + LiteMedSAM"
        drawn = logits > 0
        if probable_masks_only and probability and not focal_lesion:
            inside = _share_held(drawn, sal, perfect(image, drawn) if perfect is not None else None)
            if inside <= PROBABLE:
                out.stages[entry.name] = (f"{method_name} saliency: its mask is less probable than not "
                                          f"({inside:.2f} of a perfect map's mean inside it)")
                out.prompts[entry.name] = SamPrompts.none()  # drew nothing
                continue
        take = drawn & (logits > best)
        out.labels[take] = names[entry.name]
        best = np.where(take, logits, best)
    out.seconds = time.perf_counter() - start
    return out


def _share_held(mask: np.ndarray, probability: np.ndarray, perfect: np.ndarray | None) -> float:
    """The map's mean probability inside ``mask`` over a perfect map's (``perfect``: the mask at the map's
    resolution; None: the mask itself, 1 inside), 0 for an empty mask. Above 0.5 the map holds more than
    half of the class a perfect map of this mask would: with no ``perfect``, the mask's expected pixels of
    the class outnumber its expected others."""
    if not mask.any():
        return 0.0
    best = float(perfect[mask].mean()) if perfect is not None else 1.0
    return float(probability[mask].mean()) / max(best, 1e-6)


def _modality(image: Image2D, entry: PromptEntry, strict: bool) -> str:
    """The modality LiteMedSAM's preprocessing (and the attribute prior) follow. ``strict``: the attribute
    prior's checks (the class must have 2D attributes for this modality); other saliency methods read any
    class on any image, so the image's own modality, else the class's, else none."""
    if strict:
        return modality_for(image, entry)
    try:
        return modality_for(image, entry)
    except PromptError:
        return image.family or "OTHER"


def draft2d_file(source: str | Path, target: str | Path, prompts: Sequence[str] | None, saliency: str | None = None,
                 refine: str = "sam", sam_checkpoint: str | Path | None = None,
                 overlay_dir: str | Path | None = None, catalog: PromptCatalog | None = None) -> Draft2D:
    """The CLI's 2D path: read ``source``, draft, write the label map (+ sidecar) and, optionally, overlays."""
    from medprompt.io.image2d import image_stem, load_image2d, save_label2d

    image = load_image2d(source)
    result = draft2d(image, prompts, saliency=saliency, refine=refine, sam_checkpoint=sam_checkpoint, catalog=catalog)
    boxes = {name: p.boxes.round(1).tolist() for name, p in result.prompts.items()}
    save_label2d(target, result.labels, image, result.names,
                 extra={"stages": result.stages, "prompts_resolved": result.resolved, "boxes": boxes,
                        "confidence": result.confidence,
                        "saliency": (saliency or "attribute").strip().lower(), "seconds": round(result.seconds, 3)})
    if overlay_dir is not None:
        write_overlays(Path(overlay_dir), image_stem(target), image, result)
    return result


# Distinct colours for classes 1, 2, ... in overlays (repeats after eight).
COLOURS = np.array([[255, 64, 64], [64, 200, 255], [255, 210, 0], [80, 230, 80], [230, 90, 255], [255, 140, 0],
                    [0, 255, 200], [255, 255, 255]], np.uint8)


def write_overlays(folder: Path, stem: str, image: Image2D, result: Draft2D, max_side: int = 512) -> list[Path]:
    """``<stem>_saliency.png`` (each class's map as a heat tint, its boxes drawn) and ``<stem>_mask.png``
    (mask outlines and boxes) over the image, at most ``max_side`` pixels: for a person to look at."""
    from PIL import Image, ImageDraw
    from scipy import ndimage

    from medprompt.io.volume import atomic_write

    grey = image.grey()
    lo, hi = np.percentile(grey, (0.5, 99.5))
    base = np.clip((grey - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    rgb = np.repeat(base[:, :, None], 3, axis=2).astype(np.float32)
    heat = rgb.copy()
    outline = rgb.copy()
    for name, value in result.names.items():
        colour = COLOURS[(value - 1) % len(COLOURS)].astype(np.float32)
        sal = result.saliency.get(name)
        if sal is not None:
            heat = heat * (1 - 0.6 * sal[:, :, None]) + colour * 0.6 * sal[:, :, None]
        mask = result.labels == value
        edge = mask & ~ndimage.binary_erosion(mask, iterations=max(1, max(image.shape) // 256))
        outline[edge] = colour
    scale = min(1.0, max_side / max(image.shape))
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, pixels in (("saliency", heat), ("mask", outline)):
        picture = Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).resize(size, Image.BILINEAR)
        draw = ImageDraw.Draw(picture)
        for name, value in result.names.items():
            prompts = result.prompts.get(name)
            for box in (prompts.boxes if prompts is not None else []):
                draw.rectangle([float(v) * scale for v in box], outline=tuple(int(c) for c in COLOURS[(value - 1) % 8]))
        path = folder / f"{stem}_{suffix}.png"
        atomic_write(path, lambda tmp, picture=picture: picture.save(tmp, format="PNG"))
        written.append(path)
    return written
