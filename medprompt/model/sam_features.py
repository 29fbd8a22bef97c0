"""The learned localiser's view of a study: LiteMedSAM's cached embeddings of its sampled axial slices.

MedPromptNet reads no pixels of its own. Every draft already has LiteMedSAM embed the axial
slices of a study on the sampling grid that :mod:`medprompt.sam.refine` draws on (one slice about
every 5 mm, the same uint8 pixels, the same cache), so the network's image features cost nothing
extra and carry what LiteMedSAM learned from over a million medical image-mask pairs.

Targets and outputs live on the embedding's own 64 x 64 cell grid (each cell is 4 x 4 pixels of
LiteMedSAM's 256 x 256 input): ``to_cells`` turns a label slice into per-class area fractions of
each cell, and ``cells_to_slices`` brings per-cell probabilities back onto slice pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medprompt.prior import geometry
from medprompt.sam.preprocess import SAM_SIZE, SliceGeometry, axial_view, from_axial_view, modality_of, sam_pixels

if TYPE_CHECKING:
    from medprompt.io.volume import Volume

CELLS = 64  # LiteMedSAM's embedding is 256 x 64 x 64 for its 256 x 256 input
CELL = SAM_SIZE // CELLS


@dataclass
class SliceStack:
    """Embeddings of a study's sampled axial slices (radiological view, see medprompt.sam.preprocess)."""

    embeddings: torch.Tensor  # (K, 256, 64, 64) float16 on the CPU
    slices: list[int]  # view slice index of each embedding
    geometry: SliceGeometry  # slice pixels <-> LiteMedSAM's 256 frame
    view_shape: tuple[int, int, int]  # (slices, rows, cols) of the axial view
    step: int  # view slices between two sampled ones
    modality: str
    frame: geometry.WorkFrame | None = None  # canonical grid of the study (None for a 2D image)
    tissue: torch.Tensor | None = None  # (K, 64, 64) bool: cells mostly inside the body (not air or padding)

    def neighbours(self, reach: int = 1) -> torch.Tensor:
        """(K, 2 * reach + 1) indices into ``embeddings``: each slice's sampled neighbours ``step`` apart,
        below and above; a slice without one (the ends, a gap of empty slices) stands in for it."""
        pos = {k: i for i, k in enumerate(self.slices)}
        out = []
        for i, k in enumerate(self.slices):
            row = []
            for d in range(-reach, reach + 1):
                j = pos.get(k + d * self.step)
                row.append(i if j is None else j)
            out.append(row)
        return torch.tensor(out, dtype=torch.long)

    def coords(self) -> torch.Tensor:
        """(3, 64, 64): row and column of each cell within the slice (-1..1) and whether it is on the
        slice at all (the 256 frame is zero-padded below and right): where the network looks, in the
        patient's frame (left and right are different classes)."""
        return cell_coords(self.geometry)


def cell_coords(g: SliceGeometry) -> torch.Tensor:
    """See :meth:`SliceStack.coords`."""
    centres = (torch.arange(CELLS, dtype=torch.float32) + 0.5) * CELL
    rows = centres / g.resized[0] * 2 - 1
    cols = centres / g.resized[1] * 2 - 1
    r, c = torch.meshgrid(rows, cols, indexing="ij")
    inside = ((r <= 1) & (c <= 1)).float()
    return torch.stack([r.clamp(max=1.5) * inside, c.clamp(max=1.5) * inside, inside])


def sampled_view_slices(view: np.ndarray, step: int) -> list[int]:
    """The slices :func:`medprompt.sam.refine.precompute` embeds: every ``step``-th one that is not empty."""
    return [k for k in range(view.shape[0]) if k % step == 0 and view[k].any()]


def between_sampled(slices: Sequence[int], step: int, nz: int) -> list[tuple[int, int, int, float]]:
    """How every view slice near the sampled ones takes its value from them: (z, j, j2, w), the value at
    view slice z being (1 - w) * sampled[j] + w * sampled[j2]: linear between two sampled slices, the
    nearest sampled one for up to ``step`` - 1 slices beyond either end, nothing further out."""
    ks = list(slices)
    out = [(z, 0, 0, 0.0) for z in range(max(0, ks[0] - step + 1), ks[0])]
    for j, (a, b) in enumerate(zip(ks, ks[1:])):
        out += [(z, j, j + 1, (z - a) / (b - a)) for z in range(a, b)]
    last = len(ks) - 1
    return out + [(z, last, last, 0.0) for z in range(ks[-1], min(nz, ks[-1] + step))]


def study_stack(volume: "Volume", segmenter_for: Callable, progress: bool = False) -> SliceStack:
    """Embeddings of ``volume``'s sampled slices in the default window (from the cache where a draft or
    the prefetch already made them)."""
    from medprompt.sam.refine import RefineSettings, sampling_step, uint8_view

    canon, ornt, (sx, sy, sz) = geometry.to_canonical(np.asarray(volume.data), volume.affine)
    modality = modality_of(canon, volume.modality)
    view = uint8_view(volume, canon, ornt, modality, None)
    step = sampling_step(float(sz), RefineSettings())
    ks = sampled_view_slices(view, step)
    if not ks:  # an all-zero study: still one slice, so shapes hold (the network will find nothing)
        ks = [view.shape[0] // 2]
    seg = segmenter_for(view, (sy, sx))
    seg.prepare(ks, progress=progress)
    emb = torch.stack([seg.embedding(k) for k in ks])
    frame = geometry.WorkFrame(ornt, tuple(canon.shape), tuple(canon.shape), (sx, sy, sz), (sx, sy, sz))
    tissue = to_cells((view[ks] > 0).astype(np.int32), seg.geometry, [1])[:, 1] > 0.5
    return SliceStack(emb, ks, seg.geometry, tuple(view.shape), step, modality, frame, tissue)


def image_stack(pixels: np.ndarray, pixel_mm: Sequence[float], modality: str, segmenter_for: Callable) -> SliceStack:
    """A 2D image (uint8 as LiteMedSAM sees it) as a one-slice stack."""
    seg = segmenter_for(pixels[None], pixel_mm)
    seg.prepare([0])
    return SliceStack(seg.embedding(0)[None], [0], seg.geometry, (1, *pixels.shape), 1, modality, None)


def image_pixels(img) -> tuple[np.ndarray, tuple[float, float], str]:
    """A 2D image (medprompt.io.image2d.Image2D) as LiteMedSAM sees it: uint8 pixels, pixel size, modality."""
    modality = img.modality or "OTHER"
    return sam_pixels(img.grey().astype(np.float32), modality), tuple(img.pixel_mm), modality


def to_cells(labels: np.ndarray, g: SliceGeometry, values: Sequence[int]) -> torch.Tensor:
    """Label slices (K, rows, cols) -> (K, 1 + len(values), 64, 64) area fractions per cell: channel 0
    is everything else (background), channel i the share of ``values[i-1]``; padding is background.

    The slice is resized to LiteMedSAM's frame by area, padded and averaged over 4 x 4 pixel cells:
    every step is a box average along rows and along columns, so the whole is ``A @ mask @ B.T`` with
    (64, rows) and (64, cols) matrices (:func:`_cell_weights`), and the 256 x 256 frame is never built
    (a 512 x 512 CT's 40 teacher slices: one class mask at a time, not 11 float maps of that frame)."""
    lab = torch.from_numpy(np.ascontiguousarray(labels)).long()
    rows_w = _cell_weights(lab.shape[-2], g.resized[0])  # (64, rows)
    cols_w = _cell_weights(lab.shape[-1], g.resized[1])  # (64, cols)
    k = lab.shape[0]
    out = torch.zeros(k, 1 + len(values), CELLS, CELLS)
    claimed = torch.zeros(lab.shape)
    for i, v in enumerate(values):
        m = (lab == int(v)).float()
        claimed += m
        out[:, i + 1] = rows_w @ m @ cols_w.T
    background = 1 - claimed.clamp_(max=1)
    inside = rows_w.sum(1)[:, None] * cols_w.sum(1)[None, :]  # share of each cell on the slice, not padding
    out[:, 0] = rows_w @ background @ cols_w.T + (1 - inside)
    return out


@lru_cache(maxsize=64)
def _cell_weights(n: int, resized: int) -> torch.Tensor:
    """(64, n): how much each of ``n`` pixels along one axis counts in each cell once resized (by area)
    to ``resized`` pixels, zero-padded to LiteMedSAM's 256 and averaged over 4-pixel cells."""
    eye = torch.eye(n)[:, None]  # (n, 1, n): each pixel alone
    x = F.adaptive_avg_pool1d(eye, resized) if resized != n else eye
    x = F.pad(x, (0, SAM_SIZE - resized))
    return F.avg_pool1d(x, CELL)[:, 0].T.contiguous()


def cells_to_slices(cells: torch.Tensor, g: SliceGeometry, shape: tuple[int, int] | None = None) -> torch.Tensor:
    """(K, C, 64, 64) per-cell values -> (K, C, rows, cols) on slice pixels (or on ``shape``, the slice
    resized), bilinear as LiteMedSAM's own logits are brought back."""
    x = F.interpolate(cells.float(), size=(SAM_SIZE, SAM_SIZE), mode="bilinear", align_corners=False)
    x = x[..., : g.resized[0], : g.resized[1]]
    return F.interpolate(x, size=shape or g.shape, mode="bilinear", align_corners=False)


def label_view(labels_input: np.ndarray, frame: geometry.WorkFrame) -> np.ndarray:
    """A label map on the study's input grid -> the axial view the stack's slices index."""
    import nibabel as nib

    return axial_view(nib.orientations.apply_orientation(np.asarray(labels_input), frame.ornt))


def localisation_frame(stack: SliceStack, rows: int, cols: int) -> geometry.WorkFrame:
    """A working frame whose grid is the axial view at (rows, cols) per slice and every view slice."""
    assert stack.frame is not None
    nx, ny, nz = stack.frame.canonical_shape
    sx, sy, sz = stack.frame.canonical_spacing
    return geometry.WorkFrame(stack.frame.ornt, (nx, ny, nz), (cols, rows, nz), (sx, sy, sz),
                              (sx * nx / cols, sy * ny / rows, sz))


def view_masks_to_work(masks_view: np.ndarray) -> np.ndarray:
    """(Z, rows, cols) view masks -> (cols, rows, Z) canonical-order masks of :func:`localisation_frame`."""
    return from_axial_view(masks_view)
