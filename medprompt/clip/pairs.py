"""Image-text pairs for ``train-clip`` from saved corrections in a MONAI Label datastore.

Every class of every final label (``labels/final``) gives a crop of its image (the class's
bounding box plus a margin) paired with each phrase naming the class in the prompt catalog (name,
aliases, descriptions); classes the catalog does not know are described by their own name.
2D images (pictures, 2D DICOM, 2D NIfTI: medprompt.io.image2d) are cropped as they are; a 3D volume
gives a few axial slices through each class. Crops are PNGs beside the CSV, which lists ``image,text,class``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterator

import numpy as np

from medprompt.catalog import PromptCatalog, PromptEntry, default_catalog
from medprompt.clip.model import image_to_unit_rgb
from medprompt.errors import InputError

CROPS = "crops"


def _stem(path: Path) -> str:
    from medprompt.io.image2d import image_stem, is_image2d
    from medprompt.io.volume import volume_stem

    return image_stem(path) if is_image2d(path) else volume_stem(path)


def crop_box(mask: np.ndarray, margin: float, min_margin: int = 4) -> tuple[slice, slice]:
    """Rows and columns of ``mask``'s bounding box grown by ``margin`` of its size (at least ``min_margin`` px)."""
    rows, cols = np.nonzero(mask)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    dr = max(min_margin, int(round(margin * (r1 - r0))))
    dc = max(min_margin, int(round(margin * (c1 - c0))))
    return (slice(max(0, r0 - dr), min(mask.shape[0], r1 + dr)),
            slice(max(0, c0 - dc), min(mask.shape[1], c1 + dc)))


def class_entry(name: str, catalog: PromptCatalog) -> PromptEntry:
    """The catalog's entry for a label name (by name or alias), or one whose only text is the name."""
    entry = catalog.entries.get(name) or catalog.lookup(name)
    if entry is not None:
        return entry
    return PromptEntry(name=name, aliases=(), descriptions=(), keywords=(), prior={"supported": False},
                       source="labels")


def _labelled(studies: Path) -> Iterator[tuple[Path, Path]]:
    """(image, final label) of every study with a saved final label."""
    from medprompt.io.image2d import find_images2d
    from medprompt.io.volume import find_volumes

    final = studies / "labels" / "final"
    if not final.is_dir():
        return
    images = find_images2d(studies) + [p for p in find_volumes(studies) if p != studies]
    labels: dict[str, Path] = {}
    for label in sorted(final.iterdir()):
        if label.is_file() and label.suffix.lower() != ".json" and not label.name.startswith("."):
            labels.setdefault(_stem(label), label)
    for image in sorted(set(images)):
        if _stem(image) in labels:
            yield image, labels[_stem(image)]


def _slices(image: Path, label: Path, per_volume: int) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
    """2D (image, label, name suffix) views of a study: a 2D image itself, or axial slices of a volume."""
    from medprompt.io.image2d import is_image2d, load_image2d, load_label2d

    if is_image2d(image):
        loaded = load_image2d(image)
        lab, _ = load_label2d(label, loaded)  # on the image's rows and columns, or InputError
        yield loaded.pixels, lab.astype(np.int64), ""
        return
    from medprompt.evaluation import align_to_reference
    from medprompt.io.volume import load_labelmap, load_volume

    volume = load_volume(image)
    labels, affine, _ = load_labelmap(label)
    labels, _ = align_to_reference(labels, affine, volume.data.shape, volume.affine)
    axis = int(np.argmax(np.abs(np.asarray(volume.affine)[2, :3]) / np.asarray(volume.spacing)))
    data = np.moveaxis(np.asarray(volume.data, np.float32), axis, 0)
    labels = np.moveaxis(labels, axis, 0)
    lo, hi = np.percentile(data, (0.5, 99.5))
    present = np.nonzero(labels.reshape(labels.shape[0], -1).any(axis=1))[0]
    if present.size == 0:
        return
    picks = sorted({int(present[int(q * (present.size - 1))]) for q in np.linspace(0.25, 0.75, per_volume)})
    for k in picks:
        unit = np.clip((data[k] - lo) / max(hi - lo, 1e-6), 0, 1).T[::-1]  # rows anterior-up, as viewers show
        yield (unit * 255).astype(np.uint8), labels[k].T[::-1].astype(np.int64), f"_z{k}"


def build_pairs(studies: Path, out_dir: Path, catalog: PromptCatalog | None = None, margin: float = 0.15,
                min_pixels: int = 16, slices_per_volume: int = 3,
                label_names: dict[str, int] | None = None) -> Path:
    """Write crops and ``pairs.csv`` for every labelled class in a datastore folder; returns the CSV path."""
    from medprompt.io.image2d import label2d_sidecar
    from medprompt.io.volume import atomic_write, read_label_names, sidecar_path
    from medprompt.text.encoders import class_texts
    from medprompt.trainers.finetune import label_names_for

    studies, out_dir = Path(studies), Path(out_dir)
    if not studies.is_dir():
        raise InputError(f"{studies}: no such datastore folder")
    catalog = catalog or default_catalog()
    crops = out_dir / CROPS
    crops.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str]] = []
    studies_seen = 0
    for image, label in _labelled(studies):
        side = next((p for p in (label2d_sidecar(label), sidecar_path(label)) if p.is_file()), None)
        names = (read_label_names(side) if side is not None else None) or \
            label_names_for(label, studies, _stem(image)) or label_names
        if not names:
            raise InputError(f"{label}: no label names (no sidecar JSON, no datastore record); give label_names")
        studies_seen += 1
        for img, lab, suffix in _slices(image, label, slices_per_volume):
            rgb = (image_to_unit_rgb(img) * 255).round().astype(np.uint8)
            for name, value in names.items():
                mask = lab == value
                if int(mask.sum()) < min_pixels:
                    continue
                rs, cs = crop_box(mask, margin)
                target = crops / f"{_stem(image)}{suffix}__{name}.png"
                _write_png(target, rgb[rs, cs], atomic_write)
                entry = class_entry(name, catalog)
                for text in dict.fromkeys(class_texts(entry)):
                    rows.append((f"{CROPS}/{target.name}", text, entry.name))
    if not studies_seen:
        raise InputError(f"{studies}: no saved labels in labels/final to make pairs from")
    if not rows:
        raise InputError(f"{studies}: the saved labels hold no class of {min_pixels}+ pixels")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "text", "class"])
    writer.writerows(rows)
    csv_path = out_dir / "pairs.csv"
    atomic_write(csv_path, lambda tmp: tmp.write_text(buffer.getvalue(), encoding="utf-8"))
    return csv_path


def _write_png(path: Path, rgb: np.ndarray, atomic_write) -> None:
    from PIL import Image

    atomic_write(path, lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG"))
