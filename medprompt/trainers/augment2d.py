"""Image-space variants of corrected 2D images, for a finetune round on LiteMedSAM features.

The network reads LiteMedSAM's cached embeddings, not pixels, so the augmentation a pixel network
draws per batch (another patient's size, a slightly different lie, another contrast) must happen
before the encoder: each corrected 2D image gets a few fixed random variants (rotation, scale,
shift, gamma, contrast; no left-right flip, sides are classes), encoded once and trained as more
slices of the same image. With one corrected patient a network otherwise learns that patient's
size, position and contrast; the embedding noise of sam_net_train is no substitute, it moves the
features, not the anatomy. The variants are seeded by the image's content, so a later round asks
the content-keyed embedding cache for the same pixels and does not encode them again.
Ranges are the usual ones of pixel-level segmentation training (nnU-Net's scale 0.7-1.4 narrowed to
what one body is from another, rotation +-15 degrees for patients who lie supine, gamma 0.7-1.5).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F

COPIES = 8  # variants per corrected image ...
MAX_VARIANTS = 256  # ... and at most this many per round (about 0.6 s each to encode on a 2-core CPU)
ROTATION_DEG = 15.0
SCALE = (0.8, 1.25)  # log-uniform
SHIFT = 0.05  # of the image side
GAMMA = (0.7, 1.5)  # log-uniform
CONTRAST = 0.2  # gain 0.8-1.2 about the image's mean


def copies_per_image(n_images: int) -> int:
    """Variants per corrected image when ``n_images`` are corrected: COPIES, fewer for a large set (whose
    own variety matters more than its variants), so a round never encodes more than MAX_VARIANTS."""
    return min(COPIES, MAX_VARIANTS // max(1, n_images))


def variants(pixels: np.ndarray, labels: np.ndarray, copies: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``copies`` random variants of a uint8 image (rows, cols) and its label map (same shape): the same
    random geometry for both (bilinear for pixels, nearest for labels, zero outside the image)."""
    if pixels.shape != labels.shape:
        raise ValueError(f"image {pixels.shape} and label {labels.shape} differ")
    seed = int.from_bytes(hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    img = torch.from_numpy(pixels.astype(np.float32))[None, None]
    lab = torch.from_numpy(labels.astype(np.float32))[None, None]
    rows, cols = pixels.shape
    out = []
    for _ in range(copies):
        ang = math.radians(rng.uniform(-ROTATION_DEG, ROTATION_DEG))
        scale = math.exp(rng.uniform(math.log(SCALE[0]), math.log(SCALE[1])))
        tx, ty = rng.uniform(-SHIFT, SHIFT, 2) * 2  # affine_grid's frame spans -1..1
        # Output pixel -> input pixel in normalised coordinates; the aspect ratio is kept by rotating in pixels.
        a = rows / cols
        theta = torch.tensor([[math.cos(ang) / scale, -math.sin(ang) / scale * a, tx],
                              [math.sin(ang) / scale / a, math.cos(ang) / scale, ty]], dtype=torch.float32)[None]
        grid = F.affine_grid(theta, [1, 1, rows, cols], align_corners=False)
        moved = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0, 0]
        moved_lab = F.grid_sample(lab, grid, mode="nearest", padding_mode="zeros", align_corners=False)[0, 0]
        x = moved.numpy() / 255.0
        gamma = math.exp(rng.uniform(math.log(GAMMA[0]), math.log(GAMMA[1])))
        x = np.clip(x, 0, 1) ** gamma
        gain = 1 + rng.uniform(-CONTRAST, CONTRAST)
        inside = x > 0
        mean = float(x[inside].mean()) if inside.any() else 0.0
        x = np.where(inside, mean + gain * (x - mean), 0.0)
        out.append((np.clip(np.round(x * 255), 0, 255).astype(np.uint8), moved_lab.numpy().round().astype(labels.dtype)))
    return out
