"""What every MedPrompt infer task shares: typed prompts in, a label map (NIfTI or NRRD) out.

The tasks implement MONAI Label's ``InferTask`` interface directly rather than ``BasicInferTask``: the
draft comes from :func:`medprompt.drafts.draft` (the same function the CLI uses), not a
transform/network pipeline, and ``BasicInferTask.__call__`` would overwrite the result's
``label_names`` with the task's static labels, while here they follow the request's prompts.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from abc import abstractmethod
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from medprompt.drafts import refine_choice
from medprompt.errors import InputError, MedPromptError, PromptError, shown
from medprompt.io.image2d import is_image2d
from medprompt.io.volume import load_volume, save_labelmap

if TYPE_CHECKING:
    from medprompt.drafts import Segmentation
    from medprompt.io.volume import Volume


def temporary_result(suffix: str, prefix: str, write: Callable[[str], Any]) -> str:
    """A temporary result file filled by ``write(path)``, which the server removes once sent; removed here
    when writing it fails, since the server removes only the files it sends."""
    fd, path = tempfile.mkstemp(suffix=suffix, prefix=prefix)
    os.close(fd)
    try:
        write(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        raise
    return path


def write_result(labels: np.ndarray, affine: np.ndarray, names: dict[str, int], suffix: str,
                 prefix: str = "medprompt_") -> str:
    """A label map as a temporary result file. No sidecar: the names travel in the response."""
    return temporary_result(suffix, prefix, lambda path: os.remove(save_labelmap(path, labels, affine, names)))


def parse_prompts(value: Any) -> list[str]:
    """A request's ``prompts``: a list of strings, or one comma-separated string (what Slicer's option box sends).

    Blank pieces of a string ("liver, ") are dropped; if nothing is left the draft reports an empty prompt list. A
    piece belongs to the one before it when it only says what not to draw ("liver, not the tumour" is one prompt,
    ``medprompt.negation``, not the liver and a refused "not the tumour"), or only describes the class that one
    names ("left adrenal, the inverted-Y structure lateral to the crus": ``PromptCatalog.describes``).
    """
    if isinstance(value, str):
        from medprompt.catalog import default_catalog, words
        from medprompt.negation import without_negated

        out: list[str] = []
        for piece in (p.strip() for p in value.split(",")):
            if out and piece and (not words(without_negated(piece)[0]) or default_catalog().describes(out[-1], piece)):
                out[-1] = f"{out[-1]}, {piece}"
            elif piece:
                out.append(piece)
        return out
    if isinstance(value, (list, tuple)):
        return list(value)
    raise PromptError(
        f"'prompts' must be a list of strings or a comma-separated string, not {type(value).__name__}"
    )


def sam_problems(refine: str, sam_checkpoint: str | None) -> list[str]:
    """Load LiteMedSAM now when drafts will use it; one line if its weights cannot be used."""
    if refine != "sam":
        return []
    from medprompt.sam import segmenter_factory

    try:
        segmenter_factory(sam_checkpoint)
    except MedPromptError as e:
        return [str(e)]
    return []


RESULT_SUFFIXES = (".nii.gz", ".nii", ".nrrd")


def result_suffix(request: dict[str, Any]) -> str:
    """The file type the client asked for (3D Slicer asks for ``.nrrd``); NIfTI by default.

    Label values fit the uint8 that Slicer asks for (``result_dtype``) up to 255 classes, and are
    written as uint16 beyond, so that option needs no handling.
    """
    suffix = request.get("result_extension") or ".nii.gz"
    if suffix not in RESULT_SUFFIXES:
        raise InputError(f"result_extension {shown(suffix)} is not supported; use one of {', '.join(RESULT_SUFFIXES)}")
    return suffix


def request_image(request: dict[str, Any]) -> str:
    """The path of the request's image (MONAI Label puts the datastore image's path there); InputError otherwise."""
    image = request.get("image")
    if not isinstance(image, str) or not image:
        raise InputError("no image in the request: pass a datastore image id or upload a file")
    if not image.isprintable():  # a line break in it would break every message naming the file
        raise InputError(f"'image' {shown(image)} is not a file path (it holds control characters)")
    return image


def info_values(labels: Any, names: dict[str, int], info: dict[str, int]) -> tuple[Any, dict[str, int]]:
    """The draft with each class that ``/info`` lists at its ``/info`` value, the others after the largest.

    OHIF's MONAI Label panel names a result's values by the model's ``/info`` labels, not by the
    response's ``label_names`` (it sends ``restore_label_idx: false``, "keep the model's indices"):
    a draft of ``liver,spleen`` as values 1 and 2 would show as the first two /info classes.
    """
    free = max(info.values(), default=0) + 1
    mapped: dict[str, int] = {}
    for name in sorted(names, key=names.get):
        if name in info:
            mapped[name] = int(info[name])
        else:
            mapped[name], free = free, free + 1
    lut = np.zeros(max(names.values(), default=0) + 1, np.int64)
    for name, value in names.items():
        lut[value] = mapped[name]
    dtype = np.uint8 if max(mapped.values(), default=0) < 256 else np.uint16
    return lut[np.asarray(labels)].astype(dtype), mapped


def _false(value: Any) -> bool:
    return value is False or (isinstance(value, str) and value.strip().lower() == "false")


class DraftInfer(InferTask):
    """An infer task whose result is a draft for the request's prompts; subclasses say how to draft."""

    def __init__(self, labels: dict[str, int], default_prompts: Sequence[str], description: str,
                 refine: str = "sam", sam_checkpoint: str | None = None) -> None:
        self.refine = refine  # default of the request's "refine": "sam" (LiteMedSAM draws) or "none"
        self.sam_checkpoint = sam_checkpoint
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=labels,
            dimension=3,
            description=description,
            # Shown (and editable) in the client's options, e.g. 3D Slicer's MONAI Label module.
            config={"prompts": ",".join(default_prompts), "refine": refine},
        )

    # The saliency method (medprompt.saliency) that localises classes on a 2D study; None: the attribute prior,
    # or the weak model once a medprompt_weak2d round has written it (``weak_model``).
    saliency_2d: str | None = None
    weak_model: str | None = None

    @abstractmethod
    def segment(self, volume: Volume, prompts: list[str], refine: str) -> tuple[Segmentation, dict[str, Any]]:
        """The draft (drawn by LiteMedSAM when ``refine`` is "sam"), plus what the response should report."""

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Draft the request's image; the result file is removed by the server after it is sent."""
        begin = time.time()
        prompts = parse_prompts(request.get("prompts", self._config["prompts"]))
        image = request_image(request)
        refine = refine_choice(request.get("refine", self._config["refine"]), "'refine'")
        if is_image2d(image):  # an X-ray, ultrasound or single slice: saliency -> boxes -> LiteMedSAM
            from medprompt.infers.draft2d import infer_2d

            return infer_2d(request, image, prompts, refine, self.saliency_2d, self.sam_checkpoint, self.weak_model)
        suffix = result_suffix(request)
        volume = load_volume(image)
        seg, extra = self.segment(volume, prompts, refine)

        labels, names = seg.labels, seg.names
        if _false(request.get("restore_label_idx")):
            labels, names = info_values(labels, names, self.labels)
        label_path = write_result(labels, volume.affine, names, suffix)
        return label_path, {
            "label_names": names,
            "prompts_resolved": seg.resolved,
            "stages": seg.stages,
            **extra,
            "latencies": {"total": round(time.time() - begin, 2)},
        }
