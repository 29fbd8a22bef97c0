"""LiteMedSAM image embeddings, computed once per slice and shared by every prompt and model.

An embedding (256 x 64 x 64) is keyed by what produced it: the weights' SHA-256 and the exact
uint8 pixels and geometry the encoder saw, so a re-windowed slice, another study or another
checkpoint never reads a stale entry, and the same study opened twice (or drafted by another
model, or clicked on) reads it back in milliseconds instead of about half a second per slice.
Entries are float16 ``.npy`` files in ``$MEDPROMPT_CACHE/sam`` (default ``~/.cache/medprompt/sam``),
bounded on disk (``MEDPROMPT_SAM_CACHE_GB``, default 4 GB: about 2,000 slices); the least
recently used are dropped first. A small in-memory layer serves a study's repeated prompts. The
cache is an optimisation only: a folder that cannot be written never breaks a draft. Concurrent
requests for the same study (a draft started while *Next Sample*'s prefetch runs, several clients
opening one study) share the work: ``computing`` makes the second wait for the first's slices.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from medprompt.io.volume import atomic_write
from medprompt.text.cache import ENV_CACHE

ENV_LIMIT_GB = "MEDPROMPT_SAM_CACHE_GB"
DEFAULT_LIMIT_GB = 4.0
MEMORY_LIMIT_BYTES = 512 << 20
log = logging.getLogger(__name__)


def default_root() -> Path:
    base = os.environ.get(ENV_CACHE, "").strip()
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "medprompt") / "sam"


def default_limit_bytes() -> int:
    raw = os.environ.get(ENV_LIMIT_GB, "").strip()
    try:
        gb = float(raw) if raw else DEFAULT_LIMIT_GB
    except ValueError:
        log.warning("%s=%r is not a number; using %s GB", ENV_LIMIT_GB, raw, DEFAULT_LIMIT_GB)
        gb = DEFAULT_LIMIT_GB
    return max(0, int(gb * (1 << 30)))


def slice_key(weights_sha256: str, pixels: np.ndarray, resized: tuple[int, int]) -> str:
    """Content key of one encoder input: weights, the uint8 slice as stored, and its resize target."""
    h = hashlib.sha256()
    h.update(weights_sha256.encode())
    h.update(repr((pixels.shape, str(pixels.dtype), tuple(resized))).encode())
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()[:40]


class EmbeddingCache:
    """float16 embeddings on disk (bounded, least recently used dropped first) and in memory."""

    def __init__(self, root: Path | None = None, limit_bytes: int | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.limit_bytes = default_limit_bytes() if limit_bytes is None else int(limit_bytes)
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self._memory_bytes = 0
        self._disk_bytes: int | None = None  # counted on the first write
        self._lock = threading.Lock()
        self._inflight: dict[str, list] = {}  # key -> [lock, holders and waiters]
        self._warned = False
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            found = self._memory.get(key)
            if found is not None:
                self._memory.move_to_end(key)
                self.hits += 1
                return found
        path = self._path(key)
        try:
            found = np.load(path, allow_pickle=False)
            os.utime(path)  # recently used: dropped last
        except (OSError, ValueError):
            found = None
        with self._lock:
            if found is None:
                self.misses += 1
                return None
            self.hits += 1
            self._remember(key, found)
        return found

    def put(self, key: str, embedding: np.ndarray) -> None:
        data = np.ascontiguousarray(embedding, dtype=np.float16)
        with self._lock:
            self._remember(key, data)
        if self.limit_bytes <= 0:
            return
        path = self._path(key)

        def save(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, data)

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, save, suffix=".tmp")  # a full disk's half-written file is removed, not left unpruned
        except OSError as e:
            if not self._warned:
                log.warning("LiteMedSAM embedding cache %s is not writable (%s); embeddings are not kept", self.root, e)
                self._warned = True
            return
        with self._lock:
            if self._disk_bytes is None:
                self._disk_bytes = sum(p.stat().st_size for p in self.root.glob("*/*.npy"))
            else:
                self._disk_bytes += path.stat().st_size
            if self._disk_bytes > self.limit_bytes:
                self._prune()

    @contextmanager
    def computing(self, keys: Sequence[str]) -> Iterator[None]:
        """Hold ``keys`` while their embeddings are computed; another thread computing any of them waits
        here, then finds them with ``get``. Locks are taken in sorted order, so two holders never deadlock."""
        with self._lock:
            entries = [self._inflight.setdefault(k, [threading.Lock(), 0]) for k in sorted(set(keys))]
            for entry in entries:
                entry[1] += 1
        taken = []
        try:
            for entry in entries:
                entry[0].acquire()
                taken.append(entry)
            yield
        finally:
            for entry in reversed(taken):
                entry[0].release()
            with self._lock:
                for key in sorted(set(keys)):
                    entry = self._inflight[key]
                    entry[1] -= 1
                    if entry[1] == 0:
                        del self._inflight[key]

    def _remember(self, key: str, data: np.ndarray) -> None:
        if key in self._memory:
            self._memory.move_to_end(key)
            return
        self._memory[key] = data
        self._memory_bytes += data.nbytes
        while self._memory_bytes > MEMORY_LIMIT_BYTES and len(self._memory) > 1:
            _, old = self._memory.popitem(last=False)
            self._memory_bytes -= old.nbytes

    def _prune(self) -> None:
        """Drop the least recently used files until the folder is at 90 % of its bound."""
        files = []
        for p in self.root.glob("*/*.npy"):
            try:
                st = p.stat()
            except OSError:
                continue
            files.append((st.st_mtime_ns, st.st_size, p))
        files.sort()
        total = sum(size for _, size, _ in files)
        target = int(self.limit_bytes * 0.9)
        for _, size, p in files:
            if total <= target:
                break
            try:
                p.unlink()
                total -= size
            except OSError:
                pass
        self._disk_bytes = total
