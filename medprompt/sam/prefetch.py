"""Embeddings computed in the background when the client is sent to a study (3D Slicer's "Next Sample").

A cold draft of a 512x512x200 CT spends most of its ~50 s on the CPU in LiteMedSAM's encoder. The
annotator needs some seconds to open the study and type a prompt anyway, so the server starts on
the embeddings the draft will ask for first (``refine.precompute``) as soon as active learning
hands out the study (and, for the MedPrompt model, adapts it to the study next:
configs.medprompt.MedPromptConfig.prefetch). One study at a time: a new request while one runs is
skipped, never queued.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)


class Prefetcher:
    """One background study at a time. At interpreter exit (Ctrl-C on the server) the work stops after
    the slice in hand and is waited for: a thread left inside torch's encoder while Python tears down
    aborted the process (``terminate called without an active exception``, exit 134)."""

    def __init__(self, sam_checkpoint: str | None = None,
                 run: Callable[[str, str | None, threading.Event], int] | None = None,
                 logger: logging.Logger | None = None) -> None:
        self.sam_checkpoint = sam_checkpoint
        self.log = logger or log  # the server passes the app's logger: MONAI Label shows that one
        self._run_one = run or _precompute_file
        self._busy = threading.Lock()
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None
        atexit.register(self.close)

    def start(self, image_path: str) -> bool:
        """Begin on ``image_path`` in a daemon thread; False (nothing started) while another one runs or after close."""
        if self._stop.is_set() or not self._busy.acquire(blocking=False):
            return False
        self.thread = threading.Thread(target=self._run, args=(image_path,), name="sam-prefetch", daemon=True)
        self.thread.start()
        return True

    def close(self, timeout: float = 60.0) -> None:
        """Stop after the slice in hand and wait for it (a slice takes about a second on a CPU)."""
        self._stop.set()
        thread = self.thread
        if thread is not None and thread.is_alive():
            thread.join(timeout)

    def _run(self, image_path: str) -> None:
        begin = time.time()
        try:
            n = self._run_one(image_path, self.sam_checkpoint, self._stop)
            if self._stop.is_set():
                self.log.info(f"LiteMedSAM embeddings for {image_path}: stopped after {n} slices (shutting down)")
            else:
                self.log.info(f"LiteMedSAM embeddings ready for {image_path}: {n} slices; background work done in "
                              f"{time.time() - begin:.1f} s")
        except Exception as e:  # a background optimisation: never fatal, the draft computes what it needs
            self.log.warning(f"background work for {image_path} stopped: {type(e).__name__}: {e}; the first draft "
                             f"will do what is missing")
        finally:
            self._busy.release()


def _precompute_file(image_path: str, sam_checkpoint: str | None, stop: threading.Event) -> int:
    from medprompt.io.volume import load_volume
    from medprompt.sam import segmenter_factory
    from medprompt.sam.refine import precompute

    return precompute(load_volume(image_path), segmenter_factory(sam_checkpoint), stop=stop)
