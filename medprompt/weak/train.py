"""Train the weak-supervision network on zero-shot masks, with checkpoint ensembling and an uncertainty pass.

Why two passes: the zero-shot masks are noisy, and MedCLIP-SAMv2 makes its weakly supervised step
uncertainty-aware. Pass 1 trains on every pixel of the masks and keeps K snapshots at the ends of K
short cosine cycles (a snapshot ensemble: converged, yet different). Their averaged softmax on the
training images marks the pixels where the ensemble is unsure (normalised entropy above
``uncertain``): where masks of similar images disagree, or a mask boundary is not where the image's
edge is. Pass 2 continues with those pixels out of the loss and keeps K new snapshots, which are the
served model. Checkpoint ensembling rather than MC dropout because it costs nothing at training
time and its members are better models than dropout samples of one.

Before both: zero-shot drafts whose confidence (how clearly the drafted mask beat every other candidate
place, :class:`medprompt.drafts2d.Draft2D`) is under ``min_confidence`` are left out of training: a
draft that was a coin flip between two cysts, or between a lesion and a shadow, teaches the wrong place
as often as the right one. Given masks are all kept.

Resumable: the whole state (network, optimiser, step, snapshots so far, pass-2 pixel weights) is
written atomically every ``save_every`` steps; a rerun with the same settings continues from it.
The model file is written (atomically) when training ends.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from medprompt.errors import InputError
from medprompt.io.volume import atomic_write
from medprompt.saliency.lesion import UNSURE
from medprompt.trainers.defaults import WEAK
from medprompt.trainers.resume import resumable_state, run_identity
from medprompt.weak.data import TrainingSet, build_training_set, list_images, resolve_classes
from medprompt.weak.model import FORMAT, build_net, ensemble_probabilities, normalised_entropy


@dataclass
class WeakConfig:
    """One weak-supervision training run; everything that changes its result is in its resume identity (_run)."""

    images: Path | Sequence[Path]  # a folder of 2D images, or the files themselves
    prompts: Sequence[str]
    out: Path
    masks: Path | None = None  # masks to learn from instead of zero-shot drafts
    steps: int = WEAK.steps  # both passes together (pass 2 takes a third)
    batch_size: int = WEAK.batch_size
    lr: float = WEAK.lr
    size: int = 256
    snapshots: int = 3
    second_pass: bool = True
    uncertain: float = 0.8  # normalised entropy above which a pixel leaves the loss in pass 2 (p in ~0.24-0.76)
    min_confidence: float = UNSURE  # zero-shot drafts less sure than this (a near tie between places) are left out
    saliency: str | None = None
    sam_checkpoint: Path | None = None
    drafts: Path | None = None  # where zero-shot drafts are cached (default: <out>.drafts beside the model)
    device: str = "auto"
    seed: int = 0
    save_every: int = 25
    resume: bool = True
    time_limit_s: float | None = None


@dataclass
class WeakResult:
    out: Path
    step: int
    steps: int
    seconds: float  # training time of this call (drafting excluded)
    draft_seconds: float
    excluded: float | None  # fraction of training pixels left out of pass 2
    complete: bool
    history: list[float] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # images whose unsure drafts were not learnt from
    start: int = 0  # the step this call began at (a resumed run's; ``steps``: it was already complete)


def pass_plan(cfg: WeakConfig) -> tuple[int, int]:
    """Steps of pass 1 and pass 2."""
    second = cfg.steps // 3 if cfg.second_pass else 0
    return cfg.steps - second, second


def lr_factor(t: int, length: int, cycles: int) -> float:
    """Within a pass of ``length`` steps: a short warm-up, a flat first half, then ``cycles`` cosine cycles."""
    half = length // 2
    if t < half:
        return min(1.0, (t + 1) / max(1, length // 20))
    cycle = max(1, (length - half) // cycles)
    u = min(((t - half) % cycle) / cycle, 1.0)
    return 0.02 + 0.48 * (1 + math.cos(math.pi * u))  # from 0.98 down to about 0.02


def snapshot_steps(length: int, cycles: int) -> list[int]:
    """Steps (1-based, within a pass) after which a snapshot is kept: the ends of the cycles."""
    half = length // 2
    cycle = max(1, (length - half) // cycles)
    return sorted({min(length, half + cycle * (k + 1)) for k in range(cycles - 1)} | {length})


def train_weak(cfg: WeakConfig, progress: bool = True,
               on_step: Callable[[int, dict], None] | None = None) -> WeakResult:
    """Run (or resume) a weak-supervision training; see the module docstring."""
    from medprompt.model.checkpoint import resolve_device

    if cfg.steps < 2 or cfg.batch_size < 1 or cfg.snapshots < 1 or cfg.size < 32 or cfg.size % 8:
        raise InputError("--steps must be at least 2, --batch-size and --snapshots positive, "
                         "--size a multiple of 8 from 32")
    out = Path(cfg.out)
    if out.is_dir():
        raise InputError(f"{out}: is a folder; --out names the model file to write")
    images = list_images(cfg.images)
    classes = resolve_classes(cfg.prompts)
    t_draft = time.perf_counter()
    data = build_training_set(images, classes, cfg.size, cfg.drafts or out.parent / f"{out.name}.drafts", masks=cfg.masks,
                              saliency=cfg.saliency, sam_checkpoint=cfg.sam_checkpoint, progress=progress)
    draft_seconds = time.perf_counter() - t_draft
    data, left_out = confident(data, cfg.min_confidence)
    if progress and left_out:
        print(f"left out {len(left_out)} unsure draft(s): {', '.join(left_out)}")
    device = resolve_device(cfg.device)
    run = _run(cfg, data)
    state_path = out.with_name(out.name + ".state")

    torch.manual_seed(cfg.seed)
    net = build_net(len(classes)).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    step, snaps, weights, history = 0, [], None, []
    state = resumable_state(state_path, None, run, cfg.resume, announce=progress)
    if state is not None:
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["optimizer"])
        step, snaps, weights = int(state["step"]), state["snapshots"], state["weights"]
        history = list(state.get("history", []))
    start = step
    pass1, pass2 = pass_plan(cfg)
    x_all = torch.from_numpy(data.x)
    y_all = torch.from_numpy(data.y.astype(np.int64))
    excluded = None if weights is None else float(1 - weights.mean())

    def save_state() -> None:
        blob = {"run": run, "net": net.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "snapshots": snaps, "weights": weights, "history": history}
        atomic_write(state_path, lambda tmp: torch.save(blob, tmp))

    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, desc="weak training", unit="step", disable=not progress)
    complete = step >= cfg.steps
    net.train()
    while step < cfg.steps:
        in_pass2 = step >= pass1
        if in_pass2 and weights is None:  # pass 1 is over: find the pixels its ensemble is unsure of
            weights = _certain_pixels(snaps, len(classes), x_all, device, cfg.uncertain)
            excluded = float(1 - weights.mean())
            snaps = []
            if progress:
                bar.write(f"pass 1 done: {excluded:.1%} of training pixels are uncertain and left out of pass 2")
        t, length = (step - pass1, pass2) if in_pass2 else (step, pass1)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(t, length, cfg.snapshots)
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + step)
        idx = torch.randint(len(x_all), (min(cfg.batch_size, max(len(x_all), 1)),), generator=gen)
        w = torch.ones(len(idx), cfg.size, cfg.size) if weights is None else \
            torch.from_numpy(weights[idx.numpy()].astype(np.float32))
        x, y, w = augment(x_all[idx], y_all[idx], w, gen)
        logits = net(x.to(device))
        loss = weighted_loss(logits, y.to(device), w.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        history.append(round(loss.item(), 4))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", phase=2 if in_pass2 else 1)
        if on_step is not None:
            on_step(step, {"loss": loss.item(), "pass": 2 if in_pass2 else 1})
        if t + 1 in snapshot_steps(length, cfg.snapshots):
            snaps.append({k: v.detach().cpu().clone() for k, v in net.state_dict().items()})
        out_of_time = cfg.time_limit_s is not None and time.perf_counter() - t0 > cfg.time_limit_s
        if step % cfg.save_every == 0 or step == cfg.steps or out_of_time:
            save_state()
        if out_of_time and step < cfg.steps:
            bar.close()
            return WeakResult(out, step, cfg.steps, time.perf_counter() - t0, draft_seconds, excluded, False, history,
                              left_out, start)
    bar.close()
    seconds = time.perf_counter() - t0
    if not complete or not out.is_file():
        meta = {"trained_on": data.names, "left_out_drafts": left_out, "source": data.source, "steps": cfg.steps,
                "passes": list(pass_plan(cfg)),
                "excluded_pixels": excluded, "uncertain": cfg.uncertain, "seconds": round(seconds, 1),
                "last_loss": history[-1] if history else None}
        blob = {"format": FORMAT, "snapshots": snaps, "classes": classes, "size": cfg.size, "meta": meta}
        atomic_write(out, lambda tmp: torch.save(blob, tmp))
    return WeakResult(out, step, cfg.steps, seconds, draft_seconds, excluded, True, history, left_out, start)


def confident(data: TrainingSet, threshold: float) -> tuple[TrainingSet, list[str]]:
    """``data`` without the drafts whose confidence is under ``threshold``, and their names. A draft that
    was a near tie between two places is as likely the wrong place; learning it teaches the wrong
    region (MedCLIP-SAMv2's weak step is uncertainty-aware for this reason). All kept when every draft
    is unsure: a weak model of something beats none, and pass 2 still drops its unsure pixels."""
    keep = [i for i, c in enumerate(data.confidence or [1.0] * len(data.names)) if c >= threshold]
    if not keep or len(keep) == len(data.names):
        return data, []
    left_out = [n for i, n in enumerate(data.names) if i not in keep]
    return TrainingSet(x=data.x[keep], y=data.y[keep], classes=data.classes, names=[data.names[i] for i in keep],
                       source=data.source, confidence=[data.confidence[i] for i in keep]), left_out


def _run(cfg: WeakConfig, data) -> dict:
    """What a resumed run must share with the one that left the state (trainers.resume): the images and
    their masks, and every setting that changes the result."""
    h = hashlib.sha1(np.ascontiguousarray(data.y).tobytes())
    h.update(np.ascontiguousarray(data.x[:, :, ::8, ::8]).tobytes())
    return run_identity(images=h.hexdigest(), classes=data.classes, steps=cfg.steps, batch_size=cfg.batch_size,
                        lr=cfg.lr, size=cfg.size, snapshots=cfg.snapshots, second_pass=cfg.second_pass,
                        uncertain=cfg.uncertain, seed=cfg.seed, min_confidence=cfg.min_confidence, format=FORMAT)


@torch.no_grad()
def _certain_pixels(snaps: list[dict], n_classes: int, x: torch.Tensor, device: torch.device,
                    threshold: float) -> np.ndarray:
    """(N, S, S) uint8: 1 where the pass-1 ensemble's normalised entropy is at most ``threshold``."""
    nets = []
    for state in snaps:
        net = build_net(n_classes).to(device)
        net.load_state_dict(state)
        net.eval()
        nets.append(net)
    out = []
    for i in range(0, len(x), 4):
        probs = ensemble_probabilities(nets, x[i:i + 4].to(device))
        out.append((normalised_entropy(probs) <= threshold).to(torch.uint8).cpu().numpy())
    return np.concatenate(out)


def augment(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, gen: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random scale (0.85-1.15), rotation (+-10 degrees), shift (+-6 %), left-right flip, gamma and contrast.

    No up-down flip or large rotation: where a class lies in the frame (lungs in the upper chest) is
    part of what the network may learn.
    """
    n = x.shape[0]
    r = torch.rand(n, 6, generator=gen)
    scale = 0.85 + 0.3 * r[:, 0]
    angle = (r[:, 1] - 0.5) * (2 * math.pi * 10 / 360)
    flip = torch.where(r[:, 2] < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.cos(angle) / scale * flip
    theta[:, 0, 1] = -torch.sin(angle) / scale
    theta[:, 1, 0] = torch.sin(angle) / scale * flip
    theta[:, 1, 1] = torch.cos(angle) / scale
    theta[:, :, 2] = (r[:, 3:5] - 0.5) * 0.12
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0].long()
    w = F.grid_sample(w[:, None], grid, mode="nearest", padding_mode="border", align_corners=False)[:, 0]
    gamma = torch.exp((r[:, 5] - 0.5) * 0.6).view(n, 1, 1, 1)
    contrast = (0.85 + 0.3 * torch.rand(n, 1, 1, 1, generator=gen))
    return (x.clamp(0, 1) ** gamma * contrast).clamp(0, 1), y, w


def weighted_loss(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus soft Dice of the foreground classes, both over the pixels with weight 1 only."""
    ce = (F.cross_entropy(logits, y, reduction="none") * w).sum() / w.sum().clamp_min(1.0)
    probs = torch.softmax(logits, 1)[:, 1:]
    onehot = F.one_hot(y, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    wm = w[:, None]
    inter = (probs * onehot * wm).sum((0, 2, 3))
    denom = ((probs + onehot) * wm).sum((0, 2, 3))
    dice = 1 - (2 * inter + 1.0) / (denom + 1.0)
    return ce + dice.mean()
