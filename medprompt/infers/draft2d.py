"""2D studies in the MONAI Label app: an X-ray, ultrasound or single slice drafted by medprompt.drafts2d.

The draft models (``medprompt_prior``, ``medprompt``) route a 2D study here by itself rather than
serving a separate 2D model: 3D Slicer's and OHIF's MONAI Label modules pick a segmentation model
from ``/info`` and send whatever study is open, so one model per prompt set keeps their model list
as it is and the same choice works on CT volumes and on X-rays.

The result comes back in the format the client asks for (``result_extension``): a uint8 PNG of
class indices by default (rows x columns, as the image is displayed), or NRRD / NIfTI, which both
clients ask for (Slicer ``.nrrd`` uint8, OHIF ``.nrrd``). Those are written on the grid ITK gives
the image file, because that is how Slicer loads the study and imports the label map: a picture
has origin 0, its pixel spacing and identity directions in LPS; a DICOM with patient position its
own geometry; a 2D NIfTI its stored grid and affine. The class names travel in ``label_names`` so
the client names and colours segments by class.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import numpy as np

from medprompt.errors import InputError, RequestError, shown
from medprompt.infers.draft import temporary_result
from medprompt.io.image2d import Image2D, load_image2d, to_stored
from medprompt.io.volume import save_labelmap

RESULT_SUFFIXES_2D = (".png", ".nrrd", ".nii.gz", ".nii")
DEFAULT_SUFFIX_2D = ".png"


def result_suffix_2d(request: dict[str, Any]) -> str:
    """The file type a client asked for a 2D study's draft in (``result_extension``); PNG by default."""
    suffix = request.get("result_extension") or DEFAULT_SUFFIX_2D
    if suffix not in RESULT_SUFFIXES_2D:
        raise InputError(f"result_extension {shown(suffix)} is not supported for a 2D study; use one of "
                         f"{', '.join(RESULT_SUFFIXES_2D)}")
    return suffix


def saliency_choice(request: dict[str, Any], default: str | None) -> str | None:
    """The request's ``saliency`` method (e.g. ``attribute``), else the model's; unknown names fail in draft2d."""
    value = request.get("saliency", default)
    if value is not None and not isinstance(value, str):
        raise RequestError(f"'saliency' must name a saliency method, not {type(value).__name__}")
    return value or default


def write_result_2d(labels: np.ndarray, image: Image2D, names: dict[str, int], suffix: str) -> str:
    """A temporary result file (the server removes it once sent); no sidecar: names go in the response."""
    if suffix == ".png" and labels.size and int(labels.max()) > 255:
        raise InputError(f"{len(names)} classes do not fit a PNG label map (255 at most): ask for "
                         "result_extension .nii.gz")

    def write(path: str) -> None:
        if suffix == ".png":
            from PIL import Image

            from medprompt.io.volume import atomic_write

            data = np.ascontiguousarray(labels.astype(np.uint8))
            atomic_write(path, lambda tmp: Image.fromarray(data, mode="L").save(tmp, format="PNG"))
        else:
            data, affine = to_stored(labels, image)
            data = data.reshape(*data.shape[:2], 1)  # a 3D file of one slice, as Slicer reads the image
            os.remove(save_labelmap(path, data.astype(labels.dtype), affine, names))

    return temporary_result(suffix, "medprompt_2d_", write)


def infer_2d(request: dict[str, Any], image_path: str, prompts: Sequence[str], refine: str,
             saliency: str | None, sam_checkpoint: str | None,
             weak_model: str | os.PathLike | None = None) -> tuple[str, dict[str, Any]]:
    """Draft a 2D study for ``prompts``: (result file, response JSON), as an InferTask returns them.

    ``weak_model``: the model the ``medprompt_weak2d`` round writes; once it exists it localises the
    classes it was trained on (its maps prompting LiteMedSAM) unless the request names a saliency method.
    """
    from medprompt.drafts2d import draft2d

    begin = time.time()
    suffix = result_suffix_2d(request)
    method = saliency_choice(request, saliency)
    if method is None and weak_model is not None:
        from medprompt.weak.draft import serving_method

        method = serving_method(weak_model, prompts)
    image = load_image2d(image_path)
    result = draft2d(image, prompts, saliency=method, refine=refine, sam_checkpoint=sam_checkpoint)
    path = write_result_2d(result.labels, image, result.names, suffix)
    return path, {
        "label_names": result.names,
        "prompts_resolved": result.resolved,
        "stages": result.stages,
        "dimension": 2,
        "image_size": {"rows": image.shape[0], "columns": image.shape[1]},
        "pixel_mm": list(image.pixel_mm) if image.spacing_known else None,
        "saliency": (method or "attribute").strip().lower(),
        "boxes": {name: p.boxes.round(1).tolist() for name, p in result.prompts.items()},
        "latencies": {"total": round(time.time() - begin, 2)},
    }
