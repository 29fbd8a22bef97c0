"""A MONAI Label datastore whose studies live on a DICOMweb server (a PACS such as Orthanc).

MONAI Label's own ``DICOMWebDatastore`` asks the PACS for uncompressed pixels (Orthanc 1.10 cannot
transcode JPEG 2000: HTTP 500), lists only CT, and writes corrections as DICOM SEG with dcmqi, a
binary it downloads. This one:

- lists every image series (not SEG, RTSTRUCT, SR, ...) by QIDO-RS; image ids are SeriesInstanceUIDs,
  as OHIF sends them;
- fetches a series as stored (WADO-RS ``transfer-syntax=*``), decodes it with our reader
  (``medprompt.io.load_volume``: JPEG 2000, JPEG lossless, RLE, ...) and caches both the DICOM files
  and the decoded NIfTI on disk, so every model, scoring method and trainer reads a plain volume;
- stores a final label (``PUT /datastore/label``) back in the PACS as a DICOM SEG written in-process
  (``medprompt.io.dicom_seg``), one segment per class named as the client named it;
- counts a series as labelled when the PACS holds a SEG referencing it (the newest one wins), and
  mirrors that SEG into the cache's ``labels/final`` on the series grid, so the finetune round and
  active learning read corrections exactly as they read a folder's.

The cache is a LocalDatastore folder (``studies/``) with ``dicom/`` and ``seg/`` beside it, in
``<cache>/<hash of the URL>`` (see :func:`default_cache`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel

from medprompt.errors import InputError, NotFoundError, RequestError, shown
from medprompt.io.datastore import GuardedDatastore
from medprompt.io.dicom_seg import read_seg, write_seg
from medprompt.io.volume import load_labelmap, load_volume, save_labelmap, save_volume
from medprompt.pacs.client import CACHE_ENV, DicomWebClient, value

logger = logging.getLogger(__name__)

FINAL = "final"
# Series of these modalities are not images to draft on: segmentations, structure sets, reports, ...
NOT_IMAGES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG", "RWV", "DOC"})
LIST_TTL_S = 10.0  # how long a series listing is reused; our own saves refresh it at once
DRAFT_SEG_KEEP_S = 3600.0  # drafts sent as DICOM SEG are deleted this long after they were written


def default_cache(url: str) -> Path:
    """Where the cache of ``url`` lives: ``$MEDPROMPT_DICOMWEB_CACHE``, MONAI Label's cache setting, else
    ``$MEDPROMPT_CACHE/dicomweb`` (``~/.cache/medprompt/dicomweb``); one folder per URL inside."""
    from monailabel.config import settings

    base = (os.environ.get(CACHE_ENV) or settings.MONAI_LABEL_DICOMWEB_CACHE_PATH
            or settings.MONAI_LABEL_DATASTORE_CACHE_PATH or "").strip()
    if not base:
        env = os.environ.get("MEDPROMPT_CACHE")
        base = str((Path(env).expanduser() if env else Path.home() / ".cache" / "medprompt") / "dicomweb")
    return Path(base) / hashlib.sha256(url.encode()).hexdigest()[:16]


def default_auth() -> tuple[str, str] | None:
    """Basic-auth credentials from MONAI Label's settings, as its own DICOMweb client takes them."""
    from monailabel.config import settings

    user = settings.MONAI_LABEL_DATASTORE_USERNAME or settings.MONAI_LABEL_DICOMWEB_USERNAME
    password = settings.MONAI_LABEL_DATASTORE_PASSWORD or settings.MONAI_LABEL_DICOMWEB_PASSWORD
    return (user, password) if user and password else None


class DicomWebDatastore(GuardedDatastore):
    """Studies on a DICOMweb server, decoded and cached locally; final labels stored back as DICOM SEG."""

    def __init__(self, url: str, cache: Path | None = None, auth: tuple[str, str] | None = None) -> None:
        self.url = url.rstrip("/")
        self.client = DicomWebClient(self.url, auth if auth is not None else default_auth())
        self.client.check()  # an unreachable server stops the start with one line
        self.cache = Path(cache) if cache else default_cache(self.url)
        self.dicom_dir = self.cache / "dicom"
        self.seg_dir = self.cache / "seg"
        self._lock = threading.RLock()
        self._listed_at = -np.inf
        self._images: dict[str, dict[str, Any]] = {}  # series uid -> its QIDO record
        self._seg_refs: dict[str, str | None] = {}  # SEG series uid -> the series it segments (never changes)
        self._latest_seg: dict[str, tuple[str, str]] = {}  # image series uid -> (SEG study uid, SEG series uid)
        super().__init__(str(self.cache / "studies"), extensions=("*.nii.gz",), auto_reload=False)
        logger.info(f"DICOMweb datastore {self.url}; cache {self.cache}")

    # -- what the PACS holds --------------------------------------------------------------------

    def name(self) -> str:
        return self.url

    def _refresh(self, force: bool = False) -> None:
        """Re-list the PACS' series (at most every LIST_TTL_S) and which image each SEG segments."""
        with self._lock:
            if not force and time.monotonic() - self._listed_at < LIST_TTL_S:
                return
            images: dict[str, dict[str, Any]] = {}
            segs: list[tuple[str, dict[str, Any]]] = []
            for record in self.client.search_series():
                uid, modality = value(record, "SeriesInstanceUID"), str(value(record, "Modality") or "")
                if not uid:
                    continue
                if modality == "SEG":
                    segs.append((str(uid), record))
                elif modality not in NOT_IMAGES:
                    images[str(uid)] = record
            latest: dict[str, tuple[tuple[str, str], str, str]] = {}
            for seg_uid, record in segs:
                study = str(value(record, "StudyInstanceUID"))
                target = self._segmented_series(study, seg_uid)
                if target is None or target not in images:
                    continue
                stamp = (f"{value(record, 'SeriesDate') or ''}{value(record, 'SeriesTime') or ''}", seg_uid)
                if target not in latest or stamp > latest[target][0]:
                    latest[target] = (stamp, study, seg_uid)
            self._images = images
            self._latest_seg = {image: (study, seg) for image, (_, study, seg) in latest.items()}
            self._listed_at = time.monotonic()

    def _segmented_series(self, study: str, seg_uid: str) -> str | None:
        """The SeriesInstanceUID a SEG references (its metadata, fetched once per SEG)."""
        if seg_uid not in self._seg_refs:
            target = None
            for item in self.client.series_metadata(study, seg_uid)[:1]:
                refs = item.get("00081115", {}).get("Value") or []
                target = value(refs[0], "SeriesInstanceUID") if refs else None
            if target is None:
                logger.warning(f"SEG series {seg_uid} references no series: ignored")
            self._seg_refs[seg_uid] = str(target) if target else None
        return self._seg_refs[seg_uid]

    def list_images(self) -> list[str]:
        self._refresh()
        return sorted(self._images)

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        """Series with a SEG in the PACS (tag ``final``); other tags are kept in the local cache only."""
        if label_tag not in (None, FINAL):
            return super().get_labeled_images(label_tag, labels)
        self._refresh()
        return sorted(self._latest_seg)

    def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        labelled = set(self.get_labeled_images(label_tag, labels))
        return [uid for uid in self.list_images() if uid not in labelled]

    def _study_of(self, image_id: str) -> str:
        self._refresh()
        record = self._images.get(image_id)
        if record is None:
            self._refresh(force=True)
            record = self._images.get(image_id)
        if record is None:
            raise NotFoundError(f"unknown image id {shown(image_id)}: no such image series on {self.url}")
        return str(value(record, "StudyInstanceUID"))

    # -- images ---------------------------------------------------------------------------------

    def get_image_uri(self, image_id: str) -> str:
        """The decoded series (NIfTI in the cache), fetched from the PACS on first use; "" for an unknown id."""
        if not isinstance(image_id, str) or not _is_uid(image_id):
            return ""
        path = self._image_path(image_id)
        if path.is_file():
            self._register(image_id)
            return str(path)
        try:
            study = self._study_of(image_id)
        except NotFoundError:
            return ""
        return str(self._fetch(image_id, study))

    def _image_path(self, image_id: str) -> Path:
        return Path(self._datastore.image_path()) / f"{image_id}.nii.gz"

    def series_files(self, image_id: str) -> list[Path]:
        """The cached DICOM files of a fetched series (what a SEG of it references)."""
        self.get_image_uri(image_id)
        return sorted((self.dicom_dir / image_id).glob("*.dcm"))

    def _fetch(self, image_id: str, study: str) -> Path:
        """Retrieve the series as stored, decode it with our reader, cache DICOM files and NIfTI."""
        path = self._image_path(image_id)
        self.dicom_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.dicom_dir / f".{image_id}.lock")):  # one fetch per series, across processes
            if path.is_file():
                self._register(image_id)
                return path
            begin = time.time()
            folder = self.dicom_dir / image_id
            partial = self.dicom_dir / f".{image_id}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
            try:
                files = self.client.retrieve_series(study, image_id, partial)
                try:
                    volume = load_volume(partial)
                except InputError as error:
                    raise InputError(f"series {image_id} from {self.url} cannot be decoded: {error}") from None
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(partial, folder)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
            save_volume(path, volume)
            record = self._images.get(image_id, {})
            self._register(image_id, {"SeriesInstanceUID": image_id, "StudyInstanceUID": study,
                                      "Modality": str(value(record, "Modality") or volume.modality or ""),
                                      "PatientID": str(value(record, "PatientID") or ""),
                                      "instances": len(files)})
            logger.info(f"fetched series {image_id} from {self.url}: {len(files)} instances, "
                        f"{'x'.join(map(str, volume.data.shape))} voxels, {time.time() - begin:.1f} s")
        return path

    def _register(self, image_id: str, info: dict[str, Any] | None = None) -> None:
        """Make a cached image known to the local index (another process may have fetched it)."""
        with self._lock:
            if image_id in self._datastore.objects and info is None:
                return
            with FileLock(self._lock_file):
                obj = self._datastore.objects.get(image_id)
                if obj is None:
                    obj = ImageLabelModel(image=DataModel(info={}, ext=".nii.gz"))
                    self._datastore.objects[image_id] = obj
                obj.image.info.update(dict(info or {}, ts=int(time.time()), name=f"{image_id}.nii.gz"))
                self._update_datastore_file(lock=False)

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        info = super().get_image_info(image_id)
        if not info and isinstance(image_id, str):
            self._refresh()
            record = self._images.get(image_id)
            if record is not None:
                info = {key: str(value(record, key) or "") for key in
                        ("StudyInstanceUID", "Modality", "SeriesDescription", "PatientID", "StudyDate")}
        return info

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        """As LocalDatastore's, for any series of the PACS (its record is made on first use)."""
        if image_id not in self._datastore.objects and self.get_image_uri(image_id):
            self._register(image_id)
        super().update_image_info(image_id, info)

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        raise RequestError(f"this server's studies live on {self.url}: store new studies there")

    def remove_image(self, image_id: str) -> None:
        raise RequestError(f"this server's studies live on {self.url}: remove studies there")

    # -- labels ---------------------------------------------------------------------------------

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """A final label goes to the PACS as a DICOM SEG (STOW-RS), then into the cache; other tags stay local."""
        if not isinstance(image_id, str) or not self.get_image_uri(image_id):
            raise NotFoundError(f"unknown image id {shown(image_id)}: no such image series on {self.url}")
        if label_tag != FINAL:
            return super().save_label(image_id, label_filename, label_tag, label_info)
        if label_info is not None and not isinstance(label_info, dict):
            raise RequestError("'params' must be a JSON object, e.g. "
                               "{\"label_info\": [{\"name\": \"liver\", \"idx\": 1}]}")
        volume = load_volume(self.get_image_uri(image_id))
        labels, file_names = self._read_label(label_filename, volume.data.shape)
        if labels.shape != volume.data.shape:
            raise InputError(f"the label's grid {'x'.join(map(str, labels.shape))} is not the image's "
                             f"{'x'.join(map(str, volume.data.shape))}: save it on the image's own grid")
        names = label_names(label_info or {}, file_names, labels)
        self.seg_dir.mkdir(parents=True, exist_ok=True)
        seg = write_seg(labels, volume.affine, names, self.series_files(image_id),
                        self.seg_dir / f".{image_id}.{uuid.uuid4().hex[:8]}.dcm")
        try:
            seg_uid = _stamp(seg)
            self.client.store([seg], f"storing the correction of series {image_id} as DICOM SEG")
        finally:
            seg.unlink(missing_ok=True)
        self._store_final(image_id, labels, volume.affine, names, seg_uid, dict(label_info or {}))
        with self._lock:
            self._seg_refs[seg_uid] = image_id
            self._latest_seg[image_id] = (self._study_of(image_id), seg_uid)
            self._listed_at = -np.inf
        logger.info(f"stored the correction of series {image_id} on {self.url} as SEG {seg_uid} "
                    f"({', '.join(sorted(names))})")
        return image_id

    def _read_label(self, label_filename: str, shape: tuple[int, ...]) -> tuple[np.ndarray, dict[str, int] | None]:
        """A label file's voxels and the names its sidecar carries. OHIF sends raw voxels instead (``.bin``,
        one byte each, x fastest) on the image's grid (``shape``): read here as MONAI Label's
        ``binary_to_image`` reads them, without its second read of the image and its temp NIfTI, which
        nothing removed (every OHIF save left one in the server's temp folder)."""
        if not str(label_filename).endswith(".bin"):
            labels, _, names = load_labelmap(label_filename)
            return labels, names
        size, voxels = os.path.getsize(label_filename), int(np.prod(shape))
        if size != voxels:
            raise InputError(f"the label's {size} bytes are not the image's {'x'.join(map(str, shape))} = {voxels} "
                             "voxels of one byte each: send a .bin of uint8 voxels on the image's own grid")
        return np.fromfile(label_filename, dtype=np.uint8).reshape(shape, order="F").astype(np.int32), None

    def _store_final(self, image_id: str, labels: np.ndarray, affine: np.ndarray, names: dict[str, int],
                     seg_uid: str, info: dict[str, Any]) -> None:
        """The cache's copy of a final label (with its names sidecar) and its index record."""
        final = Path(self._datastore.label_path(FINAL))
        final.mkdir(parents=True, exist_ok=True)
        save_labelmap(final / f"{image_id}.nii.gz", labels, affine, names)
        with self._lock, FileLock(self._lock_file):
            self._register(image_id)
            record = dict(info, label_names=names, seg_series=seg_uid, ts=int(time.time()), name=f"{image_id}.nii.gz")
            self._datastore.objects[image_id].labels[FINAL] = DataModel(info=record, ext=".nii.gz")
            self._update_datastore_file(lock=False)

    def sync_label(self, image_id: str) -> Path | None:
        """Bring the cache's final label of ``image_id`` in line with the PACS' newest SEG of it.

        A SEG saved elsewhere (another server, OHIF) is fetched and read onto the series grid; a
        label whose SEG is gone from the PACS is dropped. Returns the cached label, or None.
        """
        self._refresh()
        latest = self._latest_seg.get(image_id)
        obj = self._datastore.objects.get(image_id)
        cached = obj.labels.get(FINAL) if obj else None
        if latest is None:
            if cached is not None:
                super().remove_label(image_id, FINAL)
            return None
        path = Path(self._datastore.label_path(FINAL)) / f"{image_id}.nii.gz"
        if cached is not None and cached.info.get("seg_series") == latest[1] and path.is_file():
            return path
        study, seg_uid = latest
        volume = load_volume(self.get_image_uri(image_id))
        folder = self.seg_dir / f".{seg_uid}.{uuid.uuid4().hex[:8]}"
        try:
            files = self.client.retrieve_series(study, seg_uid, folder)
            labels, _, names = read_seg(files[0], grid=(volume.data.shape, volume.affine))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self._store_final(image_id, labels, volume.affine, names, seg_uid, {"source": "PACS"})
        logger.info(f"read SEG {seg_uid} of series {image_id} from {self.url} ({', '.join(sorted(names))})")
        return path

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        if label_tag == FINAL and isinstance(label_id, str) and _is_uid(label_id):
            self.sync_label(label_id)
        return super().get_label_uri(label_id, label_tag)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        if label_tag == FINAL:
            raise RequestError(f"final labels are DICOM SEGs on {self.url}: remove the SEG there")
        super().remove_label(label_id, label_tag)

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        """Every labelled series, fetched and with its SEG read into the cache: what a training round reads."""
        self._refresh(force=True)
        gone = [i for i, obj in self._datastore.objects.items() if FINAL in obj.labels and i not in self._latest_seg]
        for image_id in self.get_labeled_images() + gone:
            try:
                self.sync_label(image_id)
            except (InputError, NotFoundError) as error:  # one unreadable SEG must not stop a round
                logger.error(f"the SEG of series {image_id} is left out: {error}")
        return super().datalist(full_path)

    def get_dataset_archive(self, limit_cases: int | None) -> str:
        self.datalist()
        return super().get_dataset_archive(limit_cases)

    def status(self) -> dict[str, Any]:
        return {**super().status(), "url": self.url}

    def json(self) -> dict[str, Any]:
        """Every series of the PACS (those not fetched yet with their QIDO record), and the cache's labels."""
        cached = super().json()
        objects = dict(cached.get("objects", {}))
        for image_id in self.list_images():
            objects.setdefault(image_id, {"image": {"info": self.get_image_info(image_id)}, "labels": {}})
        return {**cached, "objects": objects}

    # -- DICOM SEG of a draft (output=dicom_seg) ---------------------------------------------------

    def draft_seg(self, image_id: str, label_filename: str, names: dict[str, int]) -> Path:
        """A draft as a DICOM SEG of its series, for the response (not stored in the PACS)."""
        labels, _, file_names = load_labelmap(label_filename)
        volume = load_volume(self.get_image_uri(image_id))
        drafts = self.seg_dir / "drafts"
        drafts.mkdir(parents=True, exist_ok=True)
        now = time.time()
        for old in drafts.glob("*.dcm"):  # the server sends the file after this returns: keep recent ones
            if now - old.stat().st_mtime > DRAFT_SEG_KEEP_S:
                old.unlink(missing_ok=True)
        out = drafts / f"{image_id}-{uuid.uuid4().hex[:8]}.dcm"
        write_seg(labels, volume.affine, names or file_names or {}, self.series_files(image_id), out)
        _stamp(out)
        return out


def label_names(info: dict[str, Any], file_names: dict[str, int] | None, labels: np.ndarray) -> dict[str, int]:
    """Class name -> value of a saved label: ``label_names`` or ``label_info`` of the request, else the
    label file's sidecar. Every value in the label must have a name: a SEG segment needs one."""
    names: dict[str, int] = {}
    given = info.get("label_names")
    if isinstance(given, dict):
        names = {str(k): int(v) for k, v in given.items() if _is_int(v)}
    items = info.get("label_info")
    if not names and isinstance(items, list):  # 3D Slicer and OHIF: [{"name": ..., "idx": ...}, ...]
        names = {str(i["name"]): int(i["idx"]) for i in items
                 if isinstance(i, dict) and "name" in i and _is_int(i.get("idx"))}
    if not names and isinstance(items, dict):
        names = {str(k): int(v) for k, v in items.items() if _is_int(v)}
    if not names and file_names:
        names = dict(file_names)
    present = {int(v) for v in np.unique(labels) if v != 0}
    unnamed = sorted(present - set(names.values()))
    if unnamed:
        raise RequestError(f"label value{'s' if len(unnamed) > 1 else ''} {', '.join(map(str, unnamed[:10]))} "
                           "ha{} no class name: pass params {{\"label_info\": [{{\"name\": \"liver\", \"idx\": 1}}]}} "
                           "(a DICOM SEG names every segment)".format("ve" if len(unnamed) > 1 else "s"))
    return {name: v for name, v in names.items() if v in present}


def _stamp(path: Path) -> str:
    """Give a SEG this moment as its series/content date and time (the newest SEG of a series wins);
    returns its SeriesInstanceUID."""
    import pydicom

    dataset = pydicom.dcmread(str(path))
    now = datetime.now()
    dataset.SeriesDate = dataset.ContentDate = now.strftime("%Y%m%d")
    dataset.SeriesTime = dataset.ContentTime = now.strftime("%H%M%S.%f")
    dataset.save_as(str(path))
    return str(dataset.SeriesInstanceUID)


def _is_uid(text: str) -> bool:
    """A DICOM UID: digits and dots, at most 64 characters (also keeps ids from naming other files)."""
    return 0 < len(text) <= 64 and all(c.isdigit() or c == "." for c in text) and not text.startswith(".")


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) or (isinstance(v, str) and v.isdigit())
