"""``POST /infer/<model>?output=dicom_seg`` on a DICOMweb datastore: the draft as a DICOM SEG, written offline.

MONAI Label's infer endpoint handles ``output=dicom_seg`` itself, after the app's ``infer``: it
accepts only its own DICOMweb datastore class, requires the client to send ``label_info``, and
converts with dcmqi's ``itkimage2segimage``. :func:`install` points those three names of the
endpoint module at ours: our datastore class, ``label_info`` optional (the draft's own class names
are used), and :meth:`DicomWebDatastore.draft_seg` (pydicom-seg, in-process) as the converter.
The app records each draft's class names (:func:`remember`) for the converter, which only gets the
result file.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from typing import Any, Callable

logger = logging.getLogger(__name__)

_MAX_REMEMBERED = 64
_names: OrderedDict[str, dict[str, int]] = OrderedDict()  # result file -> its class names
_names_lock = threading.Lock()


def remember(result: dict[str, Any]) -> None:
    """Keep a draft's class names by its result file, for the SEG the endpoint may ask for next."""
    file, params = result.get("file"), result.get("params")
    names = params.get("label_names") if isinstance(params, dict) else None
    if isinstance(file, str) and isinstance(names, dict):
        with _names_lock:
            _names[file] = {str(k): int(v) for k, v in names.items()}
            while len(_names) > _MAX_REMEMBERED:
                _names.popitem(last=False)


def _names_of(label: str, label_info: Any) -> dict[str, int]:
    with _names_lock:
        names = _names.pop(label, None)
    if names:
        return names
    if isinstance(label_info, list):
        return {str(i["name"]): int(i["idx"]) for i in label_info if isinstance(i, dict) and "name" in i and "idx" in i}
    return {}


def install(datastore: Callable[[], Any]) -> None:
    """Route the infer endpoint's ``output=dicom_seg`` to ours; ``datastore`` returns the app's datastore."""
    from monailabel.endpoints import infer as endpoint

    from medprompt.pacs.datastore import DicomWebDatastore

    if getattr(endpoint, "_medprompt_seg_output", False):
        return
    original = endpoint.run_inference

    def run_inference(background_tasks: Any, model: str, image: str = "", session_id: str = "", params: Any = "{}",
                      file: Any = None, label: Any = None, output: Any = None) -> Any:
        if output == "dicom_seg" and isinstance(params, str):
            try:
                parsed = json.loads(params) if params else {}
            except ValueError:
                parsed = None  # the endpoint reports bad JSON itself
            if isinstance(parsed, dict) and parsed.get("label_info") is None:
                params = json.dumps({**parsed, "label_info": []})  # the draft names its own classes
        return original(background_tasks, model, image, session_id, params, file, label, output)

    def nifti_to_dicom_seg(series_dir: str, label: str, label_info: Any, file_ext: str = "*",
                           use_itk: bool = True) -> str:
        """The endpoint's converter: ``series_dir`` ends in the image id (its cache path without suffix)."""
        image_id = os.path.basename(str(series_dir))
        return str(datastore().draft_seg(image_id, label, _names_of(label, label_info)))

    endpoint.run_inference = run_inference
    endpoint.nifti_to_dicom_seg = nifti_to_dicom_seg
    endpoint.DICOMWebDatastore = DicomWebDatastore
    endpoint._medprompt_seg_output = True
    logger.info("output=dicom_seg: drafts are written as DICOM SEG in-process (pydicom-seg; no dcmqi)")
