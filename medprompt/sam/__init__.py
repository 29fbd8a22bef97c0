"""LiteMedSAM, the segmenter behind every localiser: weights, preprocessing, embedding cache, 3D assembly.

``segmenter_factory`` is what drafts use: it loads the weights once and hands out a
:class:`SliceSegmenter` per set of slices, all sharing one embedding cache.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from medprompt.sam.cache import EmbeddingCache
from medprompt.sam.segmenter import SliceSegmenter, precision_summary
from medprompt.sam.weights import load_sam

log = logging.getLogger(__name__)

def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)

@lru_cache(maxsize=1)
def shared_cache() -> EmbeddingCache:
    """One embedding cache per process, shared by every model, prompt and click."""
    return EmbeddingCache()

def segmenter_factory(checkpoint: str | Path | None = None, device: str | torch.device | None = "auto",
                      cache: EmbeddingCache | None = None) -> Callable[[np.ndarray, Sequence[float]], SliceSegmenter]:
    """Load LiteMedSAM now (WeightsError if it cannot be) and return ``make(slices, pixel_mm)``."""
    sam = load_sam(checkpoint, resolve_device(device))
    _say_precision(str(sam.device))
    cache = cache if cache is not None else shared_cache()

    def make(slices: np.ndarray, pixel_mm: Sequence[float]) -> SliceSegmenter:
        seg = SliceSegmenter(sam, cache)
        seg.set_volume(slices, pixel_mm)
        return seg

    return make


@lru_cache(maxsize=None)
def _say_precision(device: str) -> None:
    """Log LiteMedSAM's precision once per device and process (the server's log; the CLI stays quiet)."""
    log.info(precision_summary(torch.device(device)))
