"""Zero-shot training of text prompts for LiteMedSAM (medprompt.model.text_tokens): no label file is read.

Teachers are what the zero-shot round already trusts (medprompt.trainers.cells): the anatomy prior +
LiteMedSAM draft of each unlabelled study, weighted by ``teacher_weights`` (cells where the prior's own
mask agrees with it, or where SAM drew the class within one cell of the prior's mask), here kept at
pixel level on SAM's 256 x 256 input frame of every sampled slice, with the prior's box per class and
slice (the box a draft would give SAM). Each step draws slices and, per slice, either text-only
prompts (any class: present ones must be drawn, absent ones left empty) or text + the prior's box
(jittered): weighted binary cross-entropy + Dice on SAM's low-resolution logits. LiteMedSAM's image
encoder never runs (cached embeddings) and its decoder is frozen unless the config finetunes a copy.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medprompt.catalog import PromptCatalog
from medprompt.model.text_tokens import TextTokenConfig, TextTokens, low_res_logits, prompt_tokens, save_text_tokens
from medprompt.sam.preprocess import SAM_SIZE

CACHE_VERSION = 1


@dataclass
class TextTeacher:
    """One unlabelled study's teacher on SAM's input frame (CPU tensors)."""

    name: str
    embeddings: torch.Tensor  # (K, 256, 64, 64) float16: the sampled slices' LiteMedSAM embeddings
    target: torch.Tensor  # (K, 256, 256) uint8: teacher label (i + 1 for classes[i]); padding 0
    weight: torch.Tensor  # (K, 256, 256) float16: trust per pixel (cells' teacher_weights; padding 0)
    boxes: torch.Tensor  # (K, C, 4) float32: the prior's box per class on SAM's frame (NaN: none)


def _frame(labels: np.ndarray, resized: tuple[int, int]) -> torch.Tensor:
    """Label slices (K, rows, cols) -> (K, 256, 256) uint8 on SAM's frame (nearest, padded with 0)."""
    t = torch.from_numpy(np.ascontiguousarray(labels).astype(np.float32))[:, None]
    t = F.interpolate(t, size=resized, mode="nearest")[:, 0]
    return F.pad(t, (0, SAM_SIZE - resized[1], 0, SAM_SIZE - resized[0])).to(torch.uint8)


def teacher_slices(path: Path, classes: Sequence[str], catalog: PromptCatalog, segmenter_for: Callable,
                   cache_dir: Path) -> TextTeacher:
    """The prior + LiteMedSAM teacher of one study on its sampled slices (cached by content)."""
    from medprompt.io.volume import load_volume
    from medprompt.model.checkpoint import atomic_torch_save
    from medprompt.model.sam_features import label_view, study_stack, to_cells
    from medprompt.trainers.cells import teacher_weights
    from medprompt.trainers.zero_shot import content_hash

    volume = load_volume(path)
    stack = study_stack(volume, segmenter_for)
    prompts = [json.dumps([catalog[c].prior, catalog[c].sam], sort_keys=True, default=str) for c in classes]
    key = hashlib.sha1(json.dumps([content_hash(path), list(classes), prompts, CACHE_VERSION]).encode()).hexdigest()[:16]
    cached = Path(cache_dir) / f"text_teacher_{key}.pt"
    if cached.exists():
        blob = torch.load(cached, map_location="cpu", weights_only=True)
        return TextTeacher(path.name, stack.embeddings, blob["target"], blob["weight"], blob["boxes"])
    from medprompt.prior import geometry
    from medprompt.prior.engine import AnatomyPrior
    from medprompt.sam.refine import RefineSettings, refine, slice_boxes

    entries = [catalog[c] for c in classes]
    loc = AnatomyPrior(catalog).localize(volume, entries)
    drawn = refine(volume, loc, entries, segmenter_for).labels
    prior = geometry.paint_input_labels([(i + 1, loc.masks[e.name]) for i, e in enumerate(entries)
                                         if e.name in loc.masks], loc.frame)
    tv = label_view(drawn, stack.frame)[stack.slices]
    pv = label_view(prior, stack.frame)[stack.slices]
    g = stack.geometry
    values = list(range(1, len(classes) + 1))
    cells = teacher_weights(to_cells(tv, g, values), to_cells(pv, g, values))  # (K, 64, 64)
    scale = SAM_SIZE // cells.shape[-1]
    weight = cells.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    weight[:, g.resized[0]:] = 0
    weight[:, :, g.resized[1]:] = 0
    sx, sy, _ = stack.frame.canonical_spacing
    settings = RefineSettings()
    boxes = torch.full((len(tv), len(classes), 4), float("nan"))
    edge = np.array([g.shape[1] - 1, g.shape[0] - 1] * 2, np.float32)
    for j in range(len(tv)):
        for i in range(len(classes)):
            seed = pv[j] == i + 1
            if seed.any():
                b = slice_boxes(seed, (float(sy), float(sx)), settings)
                union = np.clip(np.array([b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()], np.float32), 0, edge)
                boxes[j, i] = torch.from_numpy(g.box_to_model(union[None]))[0]
    target, weight = _frame(tv, g.resized), weight.half()
    atomic_torch_save({"target": target, "weight": weight, "boxes": boxes}, cached)
    return TextTeacher(path.name, stack.embeddings, target, weight, boxes)


@dataclass
class TextTrainConfig:
    """One training run; stored in the model file's metadata."""

    out: Path
    classes: Sequence[str]
    model: TextTokenConfig = field(default_factory=TextTokenConfig)
    steps: int = 150
    slices_per_step: int = 2
    prompts_per_slice: int = 4
    lr: float = 2e-3
    decoder_lr: float = 3e-5
    box_share: float = 0.5  # share of slices whose prompts are text + the prior's box
    jitter: float = 0.1  # box corners move by up to this share of the box's size
    seed: int = 0
    meta: dict = field(default_factory=dict)


def prompt_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted binary cross-entropy + soft Dice (on prompts whose target is not empty): logits and
    target (N, 256, 256), weight (256, 256) shared by the slice's prompts."""
    w = weight[None].expand_as(logits)
    bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * w).sum() / w.sum().clamp(min=1.0)
    p = torch.sigmoid(logits)
    inter = (p * target * w).sum((1, 2))
    denom = ((p + target) * w).sum((1, 2))
    has = (target * w).sum((1, 2)) > 0
    dice = (1 - 2 * inter[has] / denom[has].clamp(min=1e-6)).mean() if has.any() else logits.new_zeros(())
    return bce + dice


def _slice_prompts(st: TextTeacher, j: int, n: int, use_box: bool, rng: np.random.Generator,
                   jitter: float) -> tuple[list[int], torch.Tensor | None]:
    """Classes to prompt on slice ``j`` (half of them present where possible) and their boxes."""
    c = st.boxes.shape[1]
    if use_box:
        have = np.flatnonzero(~torch.isnan(st.boxes[j, :, 0]).numpy())
        pick = rng.choice(have, size=min(n, len(have)), replace=False).tolist()
        b = st.boxes[j, pick].clone()
        size = torch.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]] * 2, 1)
        b += torch.from_numpy(rng.uniform(-jitter, jitter, b.shape)).float() * size
        return pick, b.clamp(0, SAM_SIZE - 1)
    present = np.unique(st.target[j].numpy())
    present = [int(v) - 1 for v in present if v > 0 and st.weight[j][st.target[j] == v].float().sum() > 0]
    pick = rng.choice(present, size=min(len(present), (n + 1) // 2), replace=False).tolist() if present else []
    others = [i for i in range(c) if i not in pick]
    pick += rng.choice(others, size=n - len(pick), replace=False).tolist()
    return pick, None


def train_text_tokens(cfg: TextTrainConfig, studies: Sequence[TextTeacher], vectors: np.ndarray, encoder_key: str,
                      sam_net: torch.nn.Module, on_step: Callable[[int, dict], None] | None = None) -> Path:
    """Train the text-to-token map (and, with ``cfg.model.decoder``, a copy of the decoder); returns
    the model file. LiteMedSAM's own weights stay frozen."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    flags = [p.requires_grad for p in sam_net.parameters()]  # the loaded network is shared: given back as it was
    for p in sam_net.parameters():
        p.requires_grad_(False)
    try:
        return _train(cfg, studies, vectors, encoder_key, sam_net, rng, on_step)
    finally:
        for p, flag in zip(sam_net.parameters(), flags):
            p.requires_grad_(flag)


def _train(cfg: TextTrainConfig, studies: Sequence[TextTeacher], vectors: np.ndarray, encoder_key: str,
           sam_net: torch.nn.Module, rng: np.random.Generator,
           on_step: Callable[[int, dict], None] | None) -> Path:
    model = TextTokens(cfg.model, sam_net.mask_decoder if cfg.model.decoder else None)
    groups = [{"params": [p for n, p in model.named_parameters() if not n.startswith("decoder.")], "lr": cfg.lr}]
    if model.decoder is not None:
        for p in model.decoder.parameters():
            p.requires_grad_(True)
        groups.append({"params": list(model.decoder.parameters()), "lr": cfg.decoder_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=cfg.steps,
                                                pct_start=0.1)
    text = torch.from_numpy(vectors).float()
    usable = [[j for j in range(len(st.embeddings)) if float(st.weight[j].float().sum()) > 0] for st in studies]
    model.train()
    t0 = time.perf_counter()
    losses: list[float] = []
    for step in range(cfg.steps):
        loss = torch.zeros(())
        for _ in range(cfg.slices_per_step):
            s = int(rng.integers(len(studies)))
            st = studies[s]
            j = int(rng.choice(usable[s]))
            has_box = bool((~torch.isnan(st.boxes[j, :, 0])).any())
            use_box = has_box and rng.random() < cfg.box_share
            pick, boxes = _slice_prompts(st, j, cfg.prompts_per_slice, use_box, rng, cfg.jitter)
            sparse = prompt_tokens(sam_net, model, text[pick], boxes)
            logits = low_res_logits(sam_net, model, st.embeddings[j].float()[None], sparse)
            target = torch.stack([(st.target[j] == i + 1).float() for i in pick])
            loss = loss + prompt_loss(logits, target, st.weight[j].float()) / cfg.slices_per_step
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, {"loss": losses[-1], "seconds": time.perf_counter() - t0})
    model.eval()
    meta = {"text_encoder": encoder_key, "classes": list(cfg.classes),
            "class_vectors": {c: vectors[i].tolist() for i, c in enumerate(cfg.classes)},
            "trained_on": [st.name for st in studies], "teacher": "prior+LiteMedSAM", "steps": cfg.steps,
            "last_loss": float(np.mean(losses[-20:])) if losses else None,
            "seconds": round(time.perf_counter() - t0, 1), **cfg.meta}
    return save_text_tokens(cfg.out, model, meta)
