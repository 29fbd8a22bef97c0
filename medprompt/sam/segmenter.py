"""A SamPredictor for a stack of slices: set the volume once, prompt any slice many times.

Reads like segment-anything's ``SamPredictor`` (``set_image`` once, ``predict(box=..., points=...)``
many times) with the embedding cache behind it: ``set_volume`` only records the slices; an
embedding is computed the first time a slice is prompted (or in one batch by ``prepare``) and then
comes from memory or disk for every later prompt, model and request.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from medprompt.sam.cache import EmbeddingCache, slice_key
from medprompt.sam.preprocess import SAM_SIZE, SliceGeometry, model_input
from medprompt.sam.weights import LoadedSam

ENV_PRECISION = "MEDPROMPT_SAM_PRECISION"


def encoder_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast for the image encoder where it pays (CUDA; CPUs with AMX/AVX512-BF16), else fp32.

    ``MEDPROMPT_SAM_PRECISION=fp32`` forces full precision. The decoder always runs in fp32: it is
    cheap and its logits decide the mask boundary.
    """
    choice = os.environ.get(ENV_PRECISION, "auto").strip().lower()
    if choice == "fp32":
        return None
    if choice == "bf16" or device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if _cpu_has_bf16() else None


@lru_cache(maxsize=1)
def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


# One encoder run at a time per device: on a CPU each run already uses every core, and concurrent
# requests running it side by side only thrash (20 concurrent cold drafts: see BENCHMARKS.md).
_ENCODER_SLOTS: dict[str, threading.Semaphore] = {}
_SLOTS_LOCK = threading.Lock()


@contextmanager
def _encoder_slot(device: torch.device) -> Iterator[None]:
    with _SLOTS_LOCK:
        slot = _ENCODER_SLOTS.setdefault(str(device), threading.Semaphore(1))
    with slot:
        yield


class SliceSegmenter:
    """LiteMedSAM over the slices of one volume; embeddings cached per slice content."""

    def __init__(self, sam: LoadedSam, cache: EmbeddingCache | None = None, batch: int | None = None) -> None:
        self.sam = sam
        self.cache = cache if cache is not None else EmbeddingCache()
        # One slice at a time on the CPU: measured fastest per slice (0.57 s bf16) vs 1.0 s in batches of 8.
        self.batch = batch or (1 if sam.device.type == "cpu" else 16)
        self.dtype = encoder_dtype(sam.device)
        self.slices: np.ndarray | None = None
        self.geometry: SliceGeometry | None = None
        self._keys: dict[int, str] = {}
        self._embeddings: dict[int, torch.Tensor] = {}
        self.encoded = 0  # slices this segmenter ran the encoder on (the rest came from the cache)
        self.last_quality: torch.Tensor | None = None

    def set_volume(self, slices: np.ndarray, pixel_mm: Sequence[float] = (1.0, 1.0)) -> None:
        """uint8 slices (Z, rows, cols) from :func:`medprompt.sam.preprocess.to_uint8`, any order of planes."""
        if slices.ndim != 3 or slices.dtype != np.uint8:
            raise ValueError(f"expected uint8 slices (Z, rows, cols), got {slices.dtype} {slices.shape}")
        self.slices = slices
        self.geometry = SliceGeometry.for_slice(slices.shape[1:], tuple(pixel_mm)[:2])
        self._keys.clear()
        self._embeddings.clear()

    def _key(self, k: int) -> str:
        if k not in self._keys:
            # The encoder's precision is part of what made the embedding.
            self._keys[k] = slice_key(f"{self.sam.sha256}:{self.dtype or 'fp32'}", self.slices[k], self.geometry.resized)
        return self._keys[k]

    @torch.no_grad()
    def prepare(self, ks: Iterable[int], progress: bool = False) -> None:
        """Make sure slices ``ks`` have embeddings: from the cache, else from the encoder in batches."""
        todo = []
        for k in sorted(set(int(k) for k in ks)):
            if k in self._embeddings:
                continue
            cached = self.cache.get(self._key(k))
            if cached is not None:
                self._embeddings[k] = torch.from_numpy(cached)
            else:
                todo.append(k)
        bar = tqdm(total=len(todo), desc="LiteMedSAM encoder", unit="slice", disable=not progress or not todo, leave=False)
        for i in range(0, len(todo), self.batch):
            chunk = todo[i : i + self.batch]
            # Slices another request is encoding right now are waited for, then read, not encoded twice.
            with self.cache.computing([self._key(k) for k in chunk]), _encoder_slot(self.sam.device):
                fresh = []
                for k in chunk:
                    cached = self.cache.get(self._key(k))
                    if cached is not None:
                        self._embeddings[k] = torch.from_numpy(cached)
                    else:
                        fresh.append(k)
                if fresh:
                    x = model_input(self.slices[fresh], self.geometry).to(self.sam.device)
                    with torch.autocast(self.sam.device.type, dtype=self.dtype or torch.float32,
                                        enabled=self.dtype is not None):
                        emb = self.sam.net.image_encoder(x)
                    emb = emb.to(torch.float16).cpu()
                    for k, e in zip(fresh, emb):
                        self._embeddings[k] = e
                        self.cache.put(self._key(k), e.numpy())
                    self.encoded += len(fresh)
            bar.update(len(chunk))
        bar.close()

    @torch.no_grad()
    def predict(self, k: int, boxes: np.ndarray | None = None, points: np.ndarray | None = None,
                point_labels: np.ndarray | None = None,
                region: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """Logits (N, rows, cols) on slice ``k``'s own pixels, as a CPU tensor; the mask is logits > 0.

        ``boxes`` (N, 4): x0, y0, x1, y1 in slice pixels (column, row), one mask each. ``points``
        (N, P, 2) x, y with ``point_labels`` (N, P): 1 foreground, 0 background; with boxes they
        refine each box's mask, alone they give N masks. ``region`` (row0, row1, col0, col1) asks
        for the logits of that part of the slice only: the same values as cropping the full
        result, computed for a fraction of the cost (see :func:`decode`).
        """
        self.prepare([k])
        g = self.geometry
        dev = self.sam.device
        n = len(boxes) if boxes is not None else len(points)
        box_t = torch.from_numpy(g.box_to_model(boxes)).to(dev) if boxes is not None else None
        pts = None
        if points is not None:
            coords = g.points_to_model(np.asarray(points).reshape(-1, 2)).reshape(n, -1, 2)
            pts = (torch.from_numpy(coords).to(dev),
                   torch.as_tensor(np.asarray(point_labels), dtype=torch.int64, device=dev).reshape(n, -1))
        net = self.sam.net
        sparse, dense = net.prompt_encoder(points=pts, boxes=box_t, masks=None)
        image = self._embeddings[k].to(dev, torch.float32)[None]
        region = region or (0, g.shape[0], 0, g.shape[1])
        logits, quality = decode(net, image, sparse, dense, g, region)
        self.last_quality = quality.float().cpu()  # SAM's own IoU estimate per prompt, for choosing among candidates
        return logits.float().cpu()


def _two_way(transformer: torch.nn.Module, keys: torch.Tensor, key_pe: torch.Tensor,
             tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's TwoWayTransformer.forward on token-major (N, HW, C) image tokens (same layers, same order)."""
    queries = tokens
    for layer in transformer.layers:
        queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=key_pe)
    attn_out = transformer.final_attn_token_to_image(q=queries + tokens, k=keys + key_pe, v=keys)
    return transformer.norm_final_attn(queries + attn_out), keys


def _taps(n_in: int, n_out: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps of output rows lo..hi-1 when resizing n_in -> n_out as torch does
    (``align_corners=False``: source position clamped at 0, upper neighbour at the last row)."""
    src = np.maximum((np.arange(lo, hi) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def decode(net: torch.nn.Module, image: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor,
           g: SliceGeometry, region: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's mask decoder for N prompts: logits on ``region`` of the slice only, and SAM's IoU estimate.

    The two-way transformer needs the whole embedding, but everything after it is local: the
    upscaling is two stride-2, kernel-2 transposed convolutions with a per-pixel LayerNorm, the
    mask is a per-pixel product with the mask token's hypernetwork output, and the resize back to
    the slice is bilinear. So only the 64x64 embedding cells under the region are upscaled, which
    for an organ's box is a small part of the 256x256 output (the upscaling was most of the
    decoder's time). Equal to cropping ``logits_to_slice`` of the full output (tests/test_sam.py).
    Only the first mask token is used (SAM's single-mask output, as MedSAM is trained).
    """
    dec = net.mask_decoder
    n = sparse.shape[0]
    tokens = torch.cat([torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)[None].expand(n, -1, -1),
                        sparse], dim=1)
    c, h, w = image.shape[1:]
    # Token-major and contiguous from the start: SAM's transformer permutes (B, C, H, W) to a strided
    # (B, HW, C) view, and the many element-wise adds on those views were a third of the decoder's time.
    src = (image + dense).flatten(2).transpose(1, 2).contiguous().expand(n, -1, -1)
    pos = net.prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2).contiguous()
    hs, src = _two_way(dec.transformer, src, pos, tokens)
    hyper = dec.output_hypernetworks_mlps[0](hs[:, 1, :])  # (N, C/8)
    quality = dec.iou_prediction_head(hs[:, 0, :])[:, 0]
    src = src.transpose(1, 2).reshape(n, c, h, w)
    r0, r1, c0, c1 = region
    ri0, ri1, rw = _taps(g.resized[0], g.shape[0], r0, r1)
    ci0, ci1, cw = _taps(g.resized[1], g.shape[1], c0, c1)
    scale = SAM_SIZE // h  # 4: one embedding cell -> 4x4 logits
    e_r0, e_r1 = int(ri0.min()) // scale, int(ri1.max()) // scale + 1
    e_c0, e_c1 = int(ci0.min()) // scale, int(ci1.max()) // scale + 1
    up = dec.output_upscaling(src[:, :, e_r0:e_r1, e_c0:e_c1])  # (N, C/8, 4h', 4w')
    logits = torch.einsum("nc,nchw->nhw", hyper, up)
    base_r, base_c = e_r0 * scale, e_c0 * scale
    dev = logits.device
    rw_t = torch.from_numpy(rw).to(dev)[None, :, None]
    logits = (logits[:, torch.from_numpy(ri0 - base_r).to(dev)] * (1 - rw_t)
              + logits[:, torch.from_numpy(ri1 - base_r).to(dev)] * rw_t)
    cw_t = torch.from_numpy(cw).to(dev)[None, None, :]
    return (logits[:, :, torch.from_numpy(ci0 - base_c).to(dev)] * (1 - cw_t)
            + logits[:, :, torch.from_numpy(ci1 - base_c).to(dev)] * cw_t), quality
