"""Per-study work kept in memory between requests: what drafting the same study again would redo.

A server drafts one study many times (another prompt, the other model, refinement on or off, a
second annotator). The work that depends on the image alone is kept for the last few studies, keyed
by the image's content digest (``Volume.digest``): the anatomy prior's working grid, smoothing and
landmarks, and LiteMedSAM's windowed uint8 slices. Nothing is written to disk; a new process
starts empty.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

T = TypeVar("T")
_ALL: "weakref.WeakSet[Memo]" = weakref.WeakSet()


def clear_all() -> None:
    """Forget every study's kept work (benchmarks measuring a first draft; tests)."""
    for memo in list(_ALL):
        memo.clear()


class Memo(Generic[T]):
    """A small thread-safe least-recently-used map; two requests computing one key at once both compute
    (same result), which is cheaper than holding a lock across the work."""

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self._items: OrderedDict[Hashable, T] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        _ALL.add(self)

    def get(self, key: Hashable) -> T | None:
        """The kept value of ``key`` (counted as a hit), or None."""
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]

    def get_or_make(self, key: Hashable, make: Callable[[], T]) -> T:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
        value = make()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.entries:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
