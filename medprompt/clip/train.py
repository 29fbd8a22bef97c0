"""Finetune an open_clip model on image-text pairs with DHN-NCE (``medprompt train-clip``).

Pairs come from a CSV with columns ``image,text`` (and optionally ``class``): images relative to
the CSV's folder. Pairs that share a class (or, without that column, an image or a caption) are
never each other's negatives. The result is a model folder in BiomedCLIP's layout
(``open_clip_config.json`` + ``open_clip_pytorch_model.bin``), usable wherever a model spec is
taken (saliency, ``--text-encoder``); it is written atomically every ``save_every`` steps with the
optimiser state beside it, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import csv
import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from medprompt.clip.dhn_nce import BETA1, BETA2, TAU
from medprompt.errors import InputError, shown

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
STATE_FILE = "train_state.pt"
META_FILE = "train_clip.json"


@dataclass
class Pair:
    image: Path
    text: str
    group: str  # pairs of one group are not negatives of each other


@dataclass
class ClipTrainConfig:
    """Everything a run depends on; saved beside the model so it can be reproduced."""

    pairs: Path
    model: str
    out: Path
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-5
    weight_decay: float = 0.1
    tau: float = TAU
    beta1: float = BETA1
    beta2: float = BETA2
    device: str = "auto"
    seed: int = 0
    save_every: int = 100
    resume: bool = True
    time_limit_s: float | None = None


@dataclass
class ClipTrainResult:
    out: Path
    steps_done: int
    losses: list[float] = field(default_factory=list)  # every step this run trained


def read_pairs(path: Path) -> list[Pair]:
    """The CSV's rows as pairs; a missing column, file or caption is an InputError naming the row."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such pairs file (CSV with columns image,text)")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip().lower() for c in (reader.fieldnames or [])]
            if "image" not in columns or "text" not in columns:
                raise InputError(f"{path}: needs columns image,text (found {', '.join(columns) or 'none'})")
            rows = [{(k or "").strip().lower(): (v or "") for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"{path}: unreadable CSV ({error})") from None
    pairs = []
    for n, row in enumerate(rows, start=2):
        image, text = row["image"].strip(), " ".join(row["text"].split())
        if not image or not text:
            raise InputError(f"{path}, line {n}: empty image or text")
        file = Path(image) if Path(image).is_absolute() else path.parent / image
        if not file.is_file():
            raise InputError(f"{path}, line {n}: image {shown(image)} not found")
        pairs.append(Pair(file, text, row.get("class", "").strip()))
    if len({p.text for p in pairs}) < 2:
        raise InputError(f"{path}: contrastive training needs at least 2 different captions, found "
                         f"{len({p.text for p in pairs})}")
    return pairs


def read_image(path: Path) -> np.ndarray:
    """A 2D image file as an array (PNG, JPEG, TIFF, BMP; 16-bit grey kept); unreadable is an InputError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("P", "CMYK", "YCbCr", "LA", "PA", "HSV", "LAB"):
                img = img.convert("RGB")
            return np.asarray(img)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise InputError(f"{path}: not a readable image ({error})") from None


def exclusion_mask(batch: Sequence[Pair]):
    """``(N, N)`` bool: pairs in one group (or, ungrouped, with one image or caption) are not negatives."""
    import torch

    def same(values: list[str]) -> torch.Tensor:
        codes = {v: k for k, v in enumerate(dict.fromkeys(values))}
        c = torch.tensor([codes[v] for v in values])
        return c[:, None] == c[None, :]

    grouped = torch.tensor([bool(p.group) for p in batch])
    both = grouped[:, None] & grouped[None, :]
    mask = same([p.group for p in batch]) & both
    mask |= same([str(p.image) for p in batch]) | same([p.text for p in batch])
    mask.fill_diagonal_(False)
    return mask


def _fingerprint(pairs: Sequence[Pair]) -> str:
    h = hashlib.sha1()
    for p in pairs:
        h.update(f"{p.image}|{p.text}|{p.group}\n".encode())
    return h.hexdigest()[:16]


def train_clip(cfg: ClipTrainConfig, progress: bool = True) -> ClipTrainResult:
    """Run (or resume) a finetuning; returns where the model folder is and the losses of this run."""
    import torch
    from tqdm import tqdm

    from medprompt.clip.dhn_nce import dhn_nce_loss
    from medprompt.clip.model import load_clip, write_model_folder
    from medprompt.distributed import DistContext, end_of_step
    from medprompt.io.volume import write_json
    from medprompt.model.checkpoint import atomic_torch_save, resolve_device
    from medprompt.trainers.resume import NOT_THE_RUN, resume_into, run_identity
    from medprompt.trainers.zero_shot import warmup_cosine

    if cfg.steps < 1 or cfg.batch_size < 2:
        raise InputError("steps must be positive and the batch at least 2 pairs (negatives come from the batch)")
    pairs = read_pairs(cfg.pairs)
    device = resolve_device(cfg.device)
    clip = load_clip(cfg.model, fresh=True)  # a private copy: its weights change
    model = clip.model.to(device).train().requires_grad_(True)
    clip_pixels = clip.pixels
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.steps))
    out = Path(cfg.out)
    state_path = out / STATE_FILE
    settings = {k: v for k, v in asdict(cfg).items() if k not in (*NOT_THE_RUN, "pairs", "model")}
    identity = run_identity(**settings, model=clip.key, pairs=_fingerprint(pairs))
    start = resume_into(state_path, out, identity, cfg.resume, progress, model, opt, sched, model_key="model")
    meta = {"source_model": clip.key, "loss": "DHN-NCE", **{k: str(v) if isinstance(v, Path) else v
                                                             for k, v in asdict(cfg).items()},
            "pairs_count": len(pairs), "identity": identity}

    def save() -> None:
        write_model_folder(out, model, clip.files.model_cfg, clip.mean, clip.std, clip.files.tokenizer_folder)
        write_json(out / META_FILE, {**meta, "step": done, "last_losses": losses[-10:]})

    def state() -> dict:
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "run": identity}

    single = DistContext(0, 1, 0, device)  # one process: end_of_step's bookkeeping without the agreement
    use_amp = device.type == "cuda"
    batch_n = min(cfg.batch_size, len(pairs))
    losses: list[float] = []
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train-clip", unit="step",
               disable=not progress)
    t0 = time.perf_counter()
    done = start
    for step in bar:
        rng = np.random.default_rng([cfg.seed, step])  # the same batches after a resume
        batch = [pairs[i] for i in rng.choice(len(pairs), size=batch_n, replace=False)]
        pixels = torch.cat([clip_pixels(read_image(p.image)) for p in batch]).to(device)
        tokens = clip.tokenizer([p.text for p in batch]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            image_features = model.encode_image(pixels)
            text_features = model.encode_text(tokens)
        try:
            loss = dhn_nce_loss(image_features.float(), text_features.float(), cfg.tau, cfg.beta1, cfg.beta2,
                                exclude=exclusion_mask(batch).to(device))
        except ValueError:
            loss = None  # every pair of this batch in one class: nothing to contrast
        if loss is not None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        sched.step()
        done = step + 1
        if end_of_step(single, done, cfg.steps, cfg.save_every, cfg.time_limit_s, t0, save, state, state_path, bar):
            break
    if not (out / "open_clip_config.json").is_file():
        save()
        atomic_torch_save({**state(), "step": done, "steps": cfg.steps}, state_path)
    return ClipTrainResult(out, done, losses)


def describe(result: ClipTrainResult) -> str:
    """One line for the CLI: where the model is and how the loss moved."""
    if not result.losses:
        return f"{result.out}: nothing left to train (step {result.steps_done})"
    k = max(1, len(result.losses) // 10)
    first, last = np.mean(result.losses[:k]), np.mean(result.losses[-k:])
    return (f"wrote {result.out} (step {result.steps_done}); DHN-NCE {first:.3f} -> {last:.3f} "
            f"(mean of the first and last {k} steps)")


__all__ = ["ClipTrainConfig", "ClipTrainResult", "Pair", "read_pairs", "read_image", "train_clip", "describe",
           "IMAGE_SUFFIXES"]
