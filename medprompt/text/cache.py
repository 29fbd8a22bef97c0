"""On-disk cache of text embeddings, one small ``.npy`` file per (encoder, text).

Encoding a sentence needs torch and the encoder's weights (seconds to load); reading a cached
vector needs neither, so repeated prompts and the catalog's descriptions cost milliseconds.
The cache is an optimisation only: a folder that cannot be read or written never breaks encoding.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

ENV_CACHE = "MEDPROMPT_CACHE"
log = logging.getLogger(__name__)


def cache_root() -> Path:
    """``$MEDPROMPT_CACHE/text``, else ``~/.cache/medprompt/text`` (read on every call so tests can redirect it)."""
    base = os.environ.get(ENV_CACHE, "").strip()
    return Path(base).expanduser() / "text" if base else Path.home() / ".cache" / "medprompt" / "text"


class EmbeddingCache:
    """Vectors of one encoder, keyed by the encoder's key plus a fingerprint of its weight files.

    The fingerprint (file sizes and times) keeps a re-downloaded or retrained checkpoint at the same
    path from being served stale vectors.
    """

    def __init__(self, key: str, fingerprint: str, dim: int) -> None:
        self.key = key
        self.dim = dim
        self._space = hashlib.sha256(f"{key}\0{fingerprint}\0{dim}".encode()).hexdigest()[:24]
        self._warned = False

    def _path(self, text: str) -> Path:
        name = hashlib.sha256(text.encode("utf-8")).hexdigest()[:40]
        return cache_root() / self._space / name[:2] / f"{name}.npy"

    def get(self, text: str) -> np.ndarray | None:
        """The cached vector, or None when absent or unreadable (a damaged file is a miss, not an error)."""
        path = self._path(text)
        try:
            vector = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if vector.shape != (self.dim,) or vector.dtype != np.float32 or not np.all(np.isfinite(vector)):
            return None
        return vector

    def put(self, text: str, vector: np.ndarray) -> None:
        """Write atomically (temp file + rename) so a reader never sees half a vector; failures only log."""
        path = self._path(text)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npy")
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.asarray(vector, dtype=np.float32), allow_pickle=False)
            os.replace(tmp, path)
            tmp = None
        except OSError as error:
            if not self._warned:  # once per encoder: a read-only cache is a slowdown, not a failure
                log.warning("text embedding cache not writable (%s); continuing without it", error)
                self._warned = True
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
