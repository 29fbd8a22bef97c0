"""MONAI Label's local datastore with the checks and the crash safety its REST endpoint leaves out.

``PUT /datastore/label`` passes the client's image id and label tag straight to
``LocalDatastore.save_label``, which joins the tag onto the labels folder: a tag like ``../../x``
would write outside the datastore, and an unknown image id was a 500. It also copies the label
over the previous one in place and rewrites ``datastore_v2.json`` in place, so a server killed
mid-save (power cut, OOM killer) could leave a half-written correction, or an index that stops the
next start with a JSON error. Here both are written to a temporary file and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore

from medprompt.errors import InputError, NotFoundError, RequestError, shown
from medprompt.io.image2d import PICTURE_SUFFIXES, is_image2d, load_image2d, load_label2d
from medprompt.io.volume import atomic_write, load_labelmap, load_volume, stored_shape

logger = logging.getLogger(__name__)

_TMP = ".medprompt-tmp"  # suffix of files being written; no datastore extension matches it
INDEX_NAME = "datastore_v2.json"  # LocalDatastore's default index file
STALE_TMP_S = 60.0  # a temporary file untouched this long belongs to a save that was killed
# File patterns listed as studies (and labels) beyond MONAI Label's defaults: the 2D pictures and DICOM
# files medprompt.io.image2d reads. A .dcm file is listed only when it is a 2D image, not a series' slice.
STUDY_PATTERNS_2D = tuple(f"*{s}" for s in (*PICTURE_SUFFIXES, ".dcm")) + tuple(f"*{s.upper()}" for s in
                                                                               (*PICTURE_SUFFIXES, ".dcm"))


LABEL2D_SUFFIXES = (".png", ".nii.gz", ".nii", ".nrrd")  # lossless one-channel label files of a 2D study


class GuardedDatastore(LocalDatastore):
    @classmethod
    def open(cls, studies: str, extensions: list[str], auto_reload: bool, read_only: bool) -> "GuardedDatastore":
        """A studies folder listing ``extensions`` plus the 2D image types (STUDY_PATTERNS_2D)."""
        patterns = list(dict.fromkeys([*extensions, *STUDY_PATTERNS_2D]))
        return cls(studies, extensions=patterns, auto_reload=auto_reload, read_only=read_only)

    @classmethod
    def wrap(cls, store: LocalDatastore) -> "GuardedDatastore":
        """The same datastore object (its watcher and caches), with this class's checks."""
        store.__class__ = cls
        return store  # type: ignore[return-value]

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """As LocalDatastore.add_image, for a plain image id and a file that reads as a 3D volume, atomically.

        An unreadable upload is refused here (422) rather than stored, where every later draft,
        score and training round would trip over it.
        """
        image_id = image_id or self._to_id(os.path.basename(image_filename))[0]
        if not isinstance(image_id, str) or not _is_safe_id(image_id):
            raise RequestError(f"image id {shown(image_id)} is not a file name (no '/', '\\', control "
                               "characters or leading '.')")
        _check_info(image_info)
        # InputError (422) naming the problem; an X-ray, ultrasound or single slice is a 2D study.
        load_image2d(image_filename) if is_image2d(image_filename) else load_volume(image_filename)
        _, image_ext = self._to_id(os.path.basename(image_filename))
        name = self._filename(image_id, image_ext)
        dest = os.path.join(self._datastore.image_path(), name)
        logger.info(f"Adding image {image_id} -> {dest}")
        with FileLock(self._lock_file):
            atomic_write(dest, lambda tmp: _copy(image_filename, tmp), suffix=_TMP, durable=True)
            info = dict(image_info or {}, ts=int(time.time()), name=name)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=image_ext))
            self._update_datastore_file(lock=False)
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """As LocalDatastore.save_label, after checking the tag, the image id and the file, and atomically."""
        if not isinstance(label_tag, str) or not _is_plain_name(label_tag):
            raise RequestError(f"label tag {shown(label_tag)} is not a plain name (letters, digits, '_', '-', '.')")
        obj = self._datastore.objects.get(image_id) if isinstance(image_id, str) and "\0" not in image_id else None
        if not obj:
            raise NotFoundError(f"unknown image id {shown(image_id)}: not in the datastore")
        _check_info(label_info)
        image_uri = self.get_image_uri(image_id)
        if is_image2d(image_uri):
            check_label2d(label_filename, image_uri)
        else:
            check_label3d(label_filename, image_uri)
        _, label_ext = self._to_id(os.path.basename(label_filename))
        label_path = self._datastore.label_path(label_tag)
        name = self._filename(image_id, label_ext)
        dest = os.path.join(label_path, name)
        logger.info(f"Saving label for image {image_id}; tag {label_tag} -> {dest}")
        with FileLock(self._lock_file):
            os.makedirs(label_path, exist_ok=True)
            atomic_write(dest, lambda tmp: _copy(label_filename, tmp), suffix=_TMP, durable=True)
            previous = obj.labels.get(label_tag)
            info = dict(label_info or {}, ts=int(time.time()), name=name)
            obj.labels[label_tag] = DataModel(info=info, ext=label_ext)
            self._update_datastore_file(lock=False)
            if previous is not None and previous.ext and previous.ext != label_ext:
                # A correction saved as .nrrd replacing a .png one (3D Slicer after the Python client, say):
                # the old file would otherwise be taken for this image's label by whatever globs the folder.
                Path(label_path, self._filename(image_id, previous.ext)).unlink(missing_ok=True)
        return image_id

    def get_dataset_archive(self, limit_cases: int | None) -> str:
        """As LocalDatastore's; with nothing labelled yet a 404 saying so (it failed an assertion: a 500)."""
        if not self.get_labeled_images():
            raise NotFoundError("no study has a final label yet: there is no dataset to download")
        return super().get_dataset_archive(limit_cases)

    def _list_files(self, path: str, patterns: Any) -> dict[str, str]:
        """As LocalDatastore's, less .dcm files that are slices of a series (only 2D DICOM files are studies)."""
        files = super()._list_files(path, patterns)
        return {name: file for name, file in files.items()
                if not name.lower().endswith(".dcm") or is_image2d(os.path.join(path, file))}

    def _update_datastore_file(self, lock: bool = True) -> None:
        """Write the index to a temporary file and rename it over the old one (never half-written)."""
        def write() -> None:
            self._ignore_event_config = True
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            atomic_write(self._datastore_config_path, lambda tmp: tmp.write_text(text, encoding="utf-8"),
                         suffix=_TMP, durable=True)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()


def check_label3d(label_filename: str, image_uri: str) -> None:
    """A correction of a volume: a label map on the image's voxel grid; InputError (422) otherwise."""
    labels, _, _ = load_labelmap(label_filename)  # never store a correction no round could read
    image_shape = stored_shape(image_uri)
    if image_shape is not None and tuple(labels.shape) != image_shape:
        raise InputError(f"the label's grid {'x'.join(map(str, labels.shape))} is not the image's "
                         f"{'x'.join(map(str, image_shape))}: save it on the image's own grid")


def check_label2d(label_filename: str, image_uri: str) -> None:
    """A correction of a 2D study: one channel of whole numbers >= 0 on the image's own pixel grid.

    A picture label (PNG) is compared as displayed (rows x columns). A NIfTI or NRRD one, as 3D Slicer
    saves it, is compared on the grid ITK reads the image on: the NIfTI image's stored grid, else
    columns x rows (x 1). InputError (422) naming both sizes otherwise.
    """
    name = label_filename.lower()
    if not name.endswith(LABEL2D_SUFFIXES):
        suffix = "".join(Path(label_filename).suffixes) or "a file with no suffix"
        raise InputError(f"a label of a 2D study is saved as {', '.join(LABEL2D_SUFFIXES)}, not {shown(suffix)} "
                         "(JPEG and other lossy or colour formats change class values)")
    load_label2d(label_filename, load_image2d(image_uri))  # as a round reads it; its grid checked against the image's


def recover(studies: str | os.PathLike, index_name: str = INDEX_NAME) -> None:
    """Before the datastore opens: drop temporary files a killed save left, and set aside an unreadable index.

    LocalDatastore refuses to start on an index it cannot parse; moved aside, the index is rebuilt
    from the image and label files on disk (their per-label info, such as timestamps, is lost).
    """
    root = Path(studies)
    if not root.is_dir():
        return
    now = time.time()
    for leftover in root.rglob(f"*{_TMP}"):
        # A training round's child process opens the datastore too: spare a save in progress right now.
        if now - leftover.stat().st_mtime > STALE_TMP_S:
            leftover.unlink(missing_ok=True)
    index = root / index_name
    if not index.is_file():
        return
    try:
        json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        aside = index.with_name(f"{index.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(index, aside)
        logger.warning(f"datastore index {index} was unreadable ({error}); moved to {aside.name} and rebuilt "
                       "from the files on disk")


def _check_info(info: object) -> None:
    """The request's ``params`` becomes the label's or image's info: it must be a JSON object."""
    if info is not None and not isinstance(info, dict):
        raise RequestError("'params' must be a JSON object, e.g. {\"label_info\": [{\"name\": \"liver\", \"idx\": 1}]}")


def _is_safe_id(text: str) -> bool:
    """An image id is a file name in the images folder: any characters but separators and controls."""
    return (0 < len(text) <= 200 and not text.startswith(".") and not any(c in "/\\" for c in text)
            and all(ord(c) >= 32 and ord(c) != 127 for c in text))


def _is_plain_name(tag: str) -> bool:
    return (0 < len(tag) <= 64 and tag[0].isascii() and tag[0].isalnum() and ".." not in tag
            and all(c.isascii() and (c.isalnum() or c in "_.-") for c in tag))


def _copy(source: str, target: Path) -> None:
    with open(source, "rb") as src, open(target, "wb") as out:
        shutil.copyfileobj(src, out)
