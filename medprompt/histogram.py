"""Thresholds read from a histogram, shared by the 2D saliency and the 3D prior."""

from __future__ import annotations

import numpy as np


def otsu(values: np.ndarray, bins: int = 128) -> float:
    """The threshold splitting ``values`` into two classes of least within-class variance (Otsu)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m = np.cumsum(hist * centres)
    mean0 = m / np.maximum(w0, 1)
    mean1 = (m[-1] - m) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])
