"""A SamPredictor for a stack of slices: set the volume once, prompt any slice many times.

Reads like segment-anything's ``SamPredictor`` (``set_image`` once, ``predict(box=..., points=...)``
many times) with the embedding cache behind it: ``set_volume`` only records the slices; an
embedding is computed the first time a slice is prompted (or in one batch by ``prepare``) and then
comes from memory or disk for every later prompt, model and request.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from medprompt.sam.cache import EmbeddingCache, slice_key
from medprompt.sam.decoder import SliceContext, decode, decode_groups, slice_context, token_pe
from medprompt.sam.preprocess import SliceGeometry, model_input
from medprompt.sam.weights import LoadedSam

ENV_PRECISION = "MEDPROMPT_SAM_PRECISION"
CONTEXT_SLICES = 4  # slices whose decoder context is kept (about 10 MB each in fp32, half in bf16)


def encoder_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast for the image encoder where it pays (CUDA; CPUs with AMX/AVX512-BF16), else fp32.

    ``MEDPROMPT_SAM_PRECISION=fp32`` forces full precision (encoder and decoder).
    """
    choice = os.environ.get(ENV_PRECISION, "auto").strip().lower()
    if choice == "fp32":
        return None
    if choice == "bf16" or device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if _cpu_has_bf16() else None


def decoder_dtype(device: torch.device) -> torch.dtype:
    """The mask decoder's two-way transformer in bf16 on CPUs with bf16 instructions (AMX or
    AVX512-BF16, as for the encoder), else fp32.

    There a 3D draft's 150-200 prompts are most of a re-prompt, and bf16 halves the transformer's
    time per prompt (measured with AMX); Dice on the real CT and MR cases unchanged to 0.001
    (BENCHMARKS.md, issue 8). The upscaling and the logits stay fp32. On a GPU the decoder is cheap:
    fp32. ``MEDPROMPT_SAM_PRECISION`` (fp32 / bf16) sets it as it sets the encoder's.
    """
    choice = os.environ.get(ENV_PRECISION, "auto").strip().lower()
    if choice == "fp32" or device.type != "cpu" and choice != "bf16":
        return torch.float32
    return torch.bfloat16 if choice == "bf16" or _cpu_has_bf16() else torch.float32


def precision_summary(device: torch.device) -> str:
    """What LiteMedSAM runs in on ``device``, said once in the log when the weights load: a CPU without
    bf16 instructions drafts about twice as slowly (7x when bf16 is forced there and emulated), and the
    log line then gives the reason before anyone has to ask."""
    enc = "bf16" if encoder_dtype(device) is not None else "fp32"
    dec = "bf16" if decoder_dtype(device) == torch.bfloat16 else "fp32"
    text = f"LiteMedSAM on {device}: encoder {enc}, decoder's transformer {dec}"
    if device.type != "cpu" or _cpu_has_bf16():
        return text
    if dec == "bf16":  # without bf16 instructions only MEDPROMPT_SAM_PRECISION=bf16 chooses it (decoder_dtype)
        return (f"{text}; {ENV_PRECISION}=bf16 on a CPU without AMX or AVX512-BF16 emulates bf16 (a re-prompt "
                "took 7x as long as in fp32, BENCHMARKS.md): unset it")
    return f"{text} (no AMX or AVX512-BF16 on this CPU: drafts take about twice as long as on one with them)"


@lru_cache(maxsize=1)
def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


# glibc serves allocations above its mmap threshold with a fresh mmap each time and returns them on
# free, and trims the heap's free top above its trim threshold: every few-MB tensor the decoder
# makes (about 20 per prompt) was page-faulted in anew. With these limits the heap keeps them:
# 52 -> 26 ms per prompt on one core (BENCHMARKS.md, issue 8). Explicit MALLOC_* variables win.
MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its adaptive threshold
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


@lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); False where not glibc or the
    environment already sets them."""
    if any(os.environ.get(v) for v in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


# One LiteMedSAM encoder run at a time per device: on a CPU it already uses every core, and
# concurrent requests running it side by side only thrash (20 concurrent drafts: see BENCHMARKS.md).
# The decoder's calls are small (a few ms per operation) and leave cores idle between operations,
# so two may run at once: a 3D draft decodes two slices at a time (refine.py), 3.4 -> 3.0 s for
# the 149 calls of a 512x512x200 CT on the 2-core CPU (BENCHMARKS.md, issue 8).
DECODERS_PER_DEVICE = 2
_SLOTS: dict[tuple[str, str], threading.Semaphore] = {}
_SLOTS_LOCK = threading.Lock()


@contextmanager
def _device_slot(device: torch.device, stage: str = "encoder") -> Iterator[None]:
    with _SLOTS_LOCK:
        slot = _SLOTS.setdefault((str(device), stage),
                                 threading.Semaphore(DECODERS_PER_DEVICE if stage == "decoder" else 1))
    with slot:
        yield


class SliceSegmenter:
    """LiteMedSAM over the slices of one volume; embeddings cached per slice content."""

    def __init__(self, sam: LoadedSam, cache: EmbeddingCache | None = None, batch: int | None = None) -> None:
        self.sam = sam
        if sam.device.type == "cpu":
            keep_freed_memory()
        self.cache = cache if cache is not None else EmbeddingCache()
        # One slice at a time on the CPU: measured fastest per slice (0.57 s bf16) vs 1.0 s in batches of 8.
        self.batch = batch or (1 if sam.device.type == "cpu" else 16)
        self.dtype = encoder_dtype(sam.device)
        self.decoder_dtype = decoder_dtype(sam.device)
        self.slices: np.ndarray | None = None
        self.geometry: SliceGeometry | None = None
        self._keys: dict[int, str] = {}
        self._embeddings: dict[int, torch.Tensor] = {}
        self._contexts: OrderedDict[int, SliceContext] = OrderedDict()
        self._contexts_lock = threading.Lock()
        self._pe: torch.Tensor | None = None
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
        self._contexts.clear()

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
            with self.cache.computing([self._key(k) for k in chunk]), _device_slot(self.sam.device):
                fresh = []
                for k in chunk:
                    cached = self.cache.get(self._key(k))
                    if cached is not None:
                        self._embeddings[k] = torch.from_numpy(cached)
                    else:
                        fresh.append(k)
                if fresh:
                    x = model_input(self.slices[fresh], self.geometry).to(self.sam.device,
                                                                          memory_format=torch.channels_last)
                    with torch.autocast(self.sam.device.type, dtype=self.dtype or torch.float32,
                                        enabled=self.dtype is not None):
                        emb = self.sam.net.image_encoder(x)
                    emb = emb.to(torch.float16).cpu().contiguous()
                    for k, e in zip(fresh, emb):
                        self._embeddings[k] = e
                        self.cache.put(self._key(k), e.numpy())
                    self.encoded += len(fresh)
            bar.update(len(chunk))
        bar.close()

    def embedding(self, k: int) -> torch.Tensor:
        """Slice ``k``'s image embedding (256, 64, 64), float16 on the CPU: the learned localiser's features."""
        self.prepare([k])
        return self._embeddings[k]

    def _context(self, k: int) -> SliceContext:
        """Slice ``k``'s prompt-independent decoder work, kept for the last few slices: every class drawn
        on a slice (and every candidate box of a click) shares it."""
        with self._contexts_lock:  # two decoder threads may ask at once (refine.py)
            if k in self._contexts:
                self._contexts.move_to_end(k)
                return self._contexts[k]
            if self._pe is None:
                self._pe = token_pe(self.sam.net).to(self.decoder_dtype)  # once, in the precision contexts use
        image = self._embeddings[k].to(self.sam.device, torch.float32)[None]
        ctx = slice_context(self.sam.net, image, self._pe, self.decoder_dtype)
        with self._contexts_lock:
            self._contexts[k] = ctx
            while len(self._contexts) > CONTEXT_SLICES:
                self._contexts.popitem(last=False)
        return ctx

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
        sparse, _ = net.prompt_encoder(points=pts, boxes=box_t, masks=None)
        region = region or (0, g.shape[0], 0, g.shape[1])
        with _device_slot(dev, "decoder"):
            logits, quality = decode(net, self._context(k), sparse, g, region)
        self.last_quality = quality.float().cpu()  # SAM's own IoU estimate per prompt, for choosing among candidates
        return logits.float().cpu()

    @torch.no_grad()
    def predict_regions(self, k: int, asks: Sequence[tuple[np.ndarray, tuple[int, int, int, int]]],
                        classes: Sequence[str | None] | None = None) -> list[torch.Tensor]:
        """Several classes on slice ``k`` at once: ``asks`` lists (boxes (n, 4), region) as
        :meth:`predict` takes them, and each gets its logits (n, region rows, region cols). The same
        values as one :meth:`predict` per class (to float rounding), with the classes' prompts
        sharing decoder calls (``decode_groups``): a 3D draft draws about five prompts per sampled slice.
        ``classes`` names each ask's class; boxes alone do not need it (a segmenter that also prompts
        with the class's text does: medprompt.model.text_segmenter)."""
        self.prepare([k])
        g, dev, net = self.geometry, self.sam.device, self.sam.net
        boxes = np.concatenate([np.asarray(b, np.float32).reshape(-1, 4) for b, _ in asks])
        sparse, _ = net.prompt_encoder(points=None, boxes=torch.from_numpy(g.box_to_model(boxes)).to(dev), masks=None)
        with _device_slot(dev, "decoder"):
            out = decode_groups(net, self._context(k), sparse, g, [(region, len(b)) for b, region in asks])
        self.last_quality = torch.cat([q for _, q in out]).float().cpu()
        return [logits.float().cpu() for logits, _ in out]
