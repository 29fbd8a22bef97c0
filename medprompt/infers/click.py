"""MONAI Label infer tasks for interactive editing: clicks or a box on a slice -> LiteMedSAM's mask.

Typed ``deepgrow`` so 3D Slicer's MONAI Label module (and OHIF's) offer them with their
foreground/background point tools and ROI box. ``medprompt_click`` is a 2D model: the client
sends the slice and replaces that slice of the segment only. ``medprompt_click_3d`` carries the
mask through neighbouring slices (request ``propagate``, default ``--conf click_propagate``, 10)
and the client replaces the whole segment with it.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from medprompt.errors import InputError, RequestError
from medprompt.infers.draft import request_image, result_suffix, sam_problems, write_result
from medprompt.io.volume import load_volume


def segment_label(request: dict[str, Any]) -> str:
    """The name of the segment being edited (request ``label``, default "label"); RequestError when blank."""
    label = str(request.get("label") or "label")
    if not label.strip():
        raise RequestError("'label' must name the segment being edited, not be blank")
    return label


class ClickInfer(InferTask):
    """LiteMedSAM prompted by the annotator: the segment named ``label``, value 1 in the result."""

    def __init__(self, labels: Sequence[str], dimension: int, propagate: int, sam_checkpoint: str | None,
                 description: str) -> None:
        super().__init__(type=InferType.DEEPGROW, labels=list(labels), dimension=dimension,
                         description=description, config={"propagate": propagate} if dimension == 3 else {})
        self.propagate = propagate if dimension == 3 else 0
        self.sam_checkpoint = sam_checkpoint

    def is_valid(self) -> bool:
        return True

    def problems(self) -> list[str]:
        """LiteMedSAM's weights, loaded at start-up so a missing file is logged at once."""
        return sam_problems("sam", self.sam_checkpoint)

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        from medprompt.catalog import default_catalog
        from medprompt.sam import segmenter_factory
        from medprompt.sam.interactive import ClickRequest, click_segment
        from medprompt.sam.preprocess import modality_of

        begin = time.time()
        image = request_image(request)
        label = segment_label(request)
        suffix = result_suffix(request)
        make = segmenter_factory(self.sam_checkpoint)
        volume = load_volume(image)
        data = np.asarray(volume.data)
        if data.ndim != 3:
            raise InputError(f"{volume.source}: expected a 3D volume, got shape {data.shape}")
        clicks = ClickRequest.parse(request, data.shape, self.propagate)
        if self.dimension == 2:
            clicks.propagate = 0  # the client replaces only the clicked slice with a 2D model's result
        modality = modality_of(data, volume.modality)
        # A segment named after a class with its own window (lungs, bone) is shown in that window.
        entry = default_catalog().lookup(label)
        window = entry.sam.get("window") if entry is not None else None
        mask = click_segment(data, volume.affine, modality, clicks, make, window=window)
        label_path = write_result(mask.astype(np.uint8), volume.affine, {label: 1}, suffix, prefix="medprompt_click_")
        drawn = [int(k) for k in np.flatnonzero(mask.any(axis=(0, 1)))]
        return label_path, {
            "label_names": {label: 1},
            "slice": clicks.k,
            "slices": [drawn[0], drawn[-1]] if drawn else [],
            "stages": {label: "annotator's " + ("box" if clicks.roi else "clicks") + " + LiteMedSAM"},
            "latencies": {"total": round(time.time() - begin, 2)},
        }
