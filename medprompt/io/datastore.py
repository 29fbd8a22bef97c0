"""MONAI Label's local datastore with the checks its REST endpoint leaves out.

``PUT /datastore/label`` passes the client's image id and label tag straight to
``LocalDatastore.save_label``, which joins the tag onto the labels folder: a tag like ``../../x``
would write outside the datastore, and an unknown image id was a 500.
"""

from __future__ import annotations

import re
from typing import Any

from monailabel.datastore.local import LocalDatastore

from medprompt.errors import NotFoundError, RequestError

_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class GuardedDatastore(LocalDatastore):
    @classmethod
    def wrap(cls, store: LocalDatastore) -> "GuardedDatastore":
        """The same datastore object (its watcher and caches), with this class's checks."""
        store.__class__ = cls
        return store  # type: ignore[return-value]

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        if not isinstance(label_tag, str) or not _TAG.match(label_tag) or ".." in label_tag:
            raise RequestError(f"label tag {label_tag!r} is not a plain name (letters, digits, '_', '-', '.')")
        if not isinstance(image_id, str) or "\0" in image_id or not self._datastore.objects.get(image_id):
            raise NotFoundError(f"unknown image id {image_id!r}: not in the datastore")
        return super().save_label(image_id, label_filename, label_tag, label_info)
