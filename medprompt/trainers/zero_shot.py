"""Zero-shot training: MedPromptNet learns from unlabelled volumes, a teacher, and class text alone.

Reads images only (never a label file: tests/test_zero_shot.py proves it). Each volume's teacher
targets are computed once and cached beside the checkpoint; training samples 2.5D tiles with
augmentation, and optimises the confidence-weighted mask loss, the region-text contrastive
loss and a consistency loss between two intensity-augmented views. The model file is written
atomically every ``save_every`` steps and at the end; the optimiser state beside it makes an
interrupted run resumable.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from medprompt.catalog import SYNAPSE8, PromptCatalog, default_catalog
from medprompt.distributed import all_mean, barrier, end_of_step, init_distributed, wrap_model
from medprompt.errors import InputError
from medprompt.io.volume import atomic_write
from medprompt.model.checkpoint import load_model, save_model
from medprompt.model.grid import NetGrid, body_centre, to_net_grid
from medprompt.model.losses import consistency_loss, mask_loss, patch_targets, region_text_loss
from medprompt.model.network import MedPromptNet, NetConfig
from medprompt.teachers import PriorTeacher, Teacher
from medprompt.trainers.defaults import ZERO_SHOT
from medprompt.trainers.resume import NOT_THE_RUN, TrainingRun, digest, file_stamp, resume_into, run_identity

DEFAULT_CLASSES: tuple[str, ...] = (*SYNAPSE8, "inferior_vena_cava", "urinary_bladder")
CACHE_VERSION = 2  # bump when the teacher's output format or the network grid changes


@dataclass
class ZeroShotConfig:
    """Everything a run depends on; saved in the checkpoint so a run can be reproduced."""

    studies: Sequence[Path]
    out: Path
    steps: int = ZERO_SHOT["vit"].steps
    batch_size: int = ZERO_SHOT["vit"].batch_size
    lr: float = ZERO_SHOT["vit"].lr
    weight_decay: float = 0.05
    model_config: str = "small"
    text_encoder: str | None = None
    classes: Sequence[str] = DEFAULT_CLASSES
    device: str = "auto"
    seed: int = 0
    save_every: int = 200
    w_region: float = 0.5
    w_consistency: float = 1.0
    resume: bool = True
    init_vision: str | None = None  # open_clip model spec whose vision tower initialises the encoder
    time_limit_s: float | None = None  # stop (saved, resumable) after this long, e.g. for scheduled rounds
    init: Path | None = None  # start from this model file (its architecture wins over model_config)


@dataclass
class TrainingVolume:
    """Slice-major arrays (axial slice first) so drawing a training slice is one contiguous read.

    Targets and weights are bits packed along the class axis (8 classes per byte): every study
    stays in memory for sampling, and one byte per class and voxel made a round on 25 volumes of
    128^3 hold 2.3 GB of them.
    """

    name: str
    image: np.ndarray  # float16 (Z, X, Y), normalised
    target: np.ndarray  # uint8 (Z, ceil(C/8), X, Y): packed bits, 1 = the class is there
    weight: np.ndarray  # uint8 (Z, ceil(C/8), X, Y): packed bits, 1 = the target is to be trusted
    classes: int  # C
    slice_p: np.ndarray  # sampling probability per axial slice (more where organs are)
    centre: tuple[int, int]  # in-plane body centre: tiles are centred there (see grid.body_centre)

    @classmethod
    def from_grid(cls, name: str, image: np.ndarray, target: np.ndarray, weight: np.ndarray) -> "TrainingVolume":
        """From working-grid arrays: image (X, Y, Z), target and weight (C, X, Y, Z) in {0, 1}."""
        fg = target.sum(axis=(0, 1, 2)).astype(np.float64)
        p = fg + 0.1 * fg.max() + 1.0

        def pack(a: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(np.moveaxis(np.packbits(a.astype(bool), axis=0), 3, 0))

        return cls(name, np.ascontiguousarray(np.moveaxis(image.astype(np.float16), 2, 0)), pack(target),
                   pack(weight), int(target.shape[0]), p / p.sum(), body_centre(image.astype(np.float32)))

    def slice_targets(self, k: int, sx: slice, sy: slice) -> tuple[np.ndarray, np.ndarray]:
        """Target and weight (C, x, y) in {0, 1} of slice ``k`` within the in-plane box (sx, sy)."""
        return (np.unpackbits(self.target[k, :, sx, sy], axis=0, count=self.classes),
                np.unpackbits(self.weight[k, :, sx, sy], axis=0, count=self.classes))


def list_studies(studies: Sequence[Path]) -> list[Path]:
    """Image volumes to learn from: files/DICOM folders given directly, or those inside a folder (not its
    2D images: a one-slice NIfTI is a 2D study, which the 2D readers and find_corrections take)."""
    from medprompt.io.image2d import is_image2d
    from medprompt.io.volume import find_volumes

    found: list[Path] = []
    flat = 0
    for s in studies:
        s = Path(s)
        if not s.exists():
            raise InputError(f"{s}: no such studies folder or file")
        if s.is_file():
            found.append(s)
        else:
            inside = find_volumes(s)
            two_d = {p for p in inside if is_image2d(p)}
            found.extend(p for p in inside if p not in two_d)
            flat += len(two_d)
    if not found:
        raise InputError(f"no image volumes found in: {', '.join(map(str, studies))}"
                         + (f" ({flat} 2D NIfTI images, which rounds on 2D datastores learn from their corrections)"
                            if flat else ""))
    return found


def content_hash(path: Path) -> str:
    """Hash of a volume's bytes (every file of a DICOM folder): caches survive copies and moves."""
    h = hashlib.sha1()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _cache_key(path: Path, teacher: str, classes: Sequence[str], catalog: PromptCatalog) -> str:
    prompts = [json.dumps(catalog[c].prior, sort_keys=True, default=str) for c in classes]
    raw = json.dumps([content_hash(path), teacher, list(classes), prompts, CACHE_VERSION])
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def prepare_volumes(paths: Sequence[Path], teacher: Teacher, classes: Sequence[str], catalog: PromptCatalog,
                    cache_dir: Path, progress: bool = True) -> list[TrainingVolume]:
    """Load each image, run the teacher once (cached on disk), keep compact arrays in memory."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    entries = [catalog[c] for c in classes]
    out = []
    for path in tqdm(paths, desc="teacher targets", unit="volume", disable=not progress):
        cached = cache_dir / f"{_cache_key(path, teacher.name, classes, catalog)}.npz"
        if cached.exists():
            z = np.load(cached)
            image, target, weight = z["image"], z["target"], z["weight"]
        else:
            from medprompt.io.volume import load_volume

            grid: NetGrid = to_net_grid(load_volume(path))
            t = teacher.targets(grid, entries)
            image = grid.image.astype(np.float16)
            target = (t.target > 0.5).astype(np.uint8)
            weight = (t.weight > 0.5).astype(np.uint8)
            # One temp name per process (torchrun's fill the cache at once); removed if the disk fills.
            atomic_write(cached, lambda tmp: np.savez_compressed(tmp, image=image, target=target, weight=weight))
        out.append(TrainingVolume.from_grid(path.name, image, target, weight))
    return out


class TileSampler:
    """Random 2.5D training tiles with the same geometric augmentation for image and targets."""

    def __init__(self, volumes: list[TrainingVolume], tile: int, in_slices: int, rng: np.random.Generator,
                 jitter: int = 8, volume_p: np.ndarray | None = None):
        self.volumes = volumes
        self.jitter = jitter
        self.volume_p = volume_p
        self.tile = tile
        self.in_slices = in_slices
        self.rng = rng

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """n tiles: images (n, S, t, t), targets and weights (n, C, t, t), float32."""
        t, half = self.tile, self.in_slices // 2
        c = self.volumes[0].classes
        imgs = np.full((n, self.in_slices, t, t), -1.0, np.float32)  # -1 = air after normalisation
        tgts = np.zeros((n, c, t, t), np.float32)
        wts = np.ones((n, c, t, t), np.float32)  # outside the image is air: certainly no organ
        for i in range(n):
            v = self.volumes[int(self.rng.choice(len(self.volumes), p=self.volume_p))]
            nz, nx, ny = v.image.shape
            k = int(self.rng.choice(nz, p=v.slice_p))
            # Tile centred on the body (+- jitter pixels); it may extend past the image edges.
            x0 = v.centre[0] - t // 2 + int(self.rng.integers(-self.jitter, self.jitter + 1))
            y0 = v.centre[1] - t // 2 + int(self.rng.integers(-self.jitter, self.jitter + 1))
            sx, sy = slice(max(x0, 0), min(x0 + t, nx)), slice(max(y0, 0), min(y0 + t, ny))
            dx, dy = slice(sx.start - x0, sx.stop - x0), slice(sy.start - y0, sy.stop - y0)
            ks = np.clip(np.arange(k - half, k + half + 1), 0, nz - 1)
            imgs[i, :, dx, dy] = v.image[ks, sx, sy]
            tgts[i, :, dx, dy], wts[i, :, dx, dy] = v.slice_targets(k, sx, sy)
        return imgs, tgts, wts


def augment_geometry(img: torch.Tensor, tgt: torch.Tensor, wt: torch.Tensor, gen: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random in-plane rotation (+-10 deg) and scale (0.85-1.15). No left-right flips: sides are classes."""
    b = img.shape[0]
    ang = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(10)
    scale = 0.85 + torch.rand(b, generator=gen) * 0.3
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(b)], 1), torch.stack([sin, cos, torch.zeros(b)], 1)], 1)
    theta = theta.to(img.device)
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    img = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
    tw = F.grid_sample(torch.cat([tgt, wt], 1), grid, mode="nearest", padding_mode="border", align_corners=False)
    return img, tw[:, : tgt.shape[1]], tw[:, tgt.shape[1] :]


def augment_intensity(img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Contrast, brightness and noise jitter: the same anatomy under different scanners."""
    b = img.shape[0]
    gain = (1 + (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * 0.15).to(img.device)
    shift = ((torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * 0.1).to(img.device)
    noise = torch.randn(img.shape, generator=gen).to(img.device) * 0.03
    return img * gain + shift + noise


def class_vectors(classes: Sequence[str], catalog: PromptCatalog, text_encoder: str | None,
                  cache_dir: Path | None = None) -> tuple[np.ndarray, str]:
    """Frozen text vectors of the training classes (cached beside the teacher targets)."""
    from medprompt.text import class_embedding, class_texts

    texts = json.dumps([[c, class_texts(catalog[c])] for c in classes])
    key = hashlib.sha1(json.dumps([text_encoder or "minilm", texts]).encode()).hexdigest()[:16]
    cached = cache_dir / f"text_{key}.npz" if cache_dir else None
    if cached is not None and cached.exists():
        z = np.load(cached)
        return z["vectors"], str(z["key"])
    from medprompt.text import get_text_encoder

    encoder = get_text_encoder(text_encoder)
    vectors = np.stack([class_embedding(catalog[c], encoder) for c in classes]).astype(np.float32)
    if cached is not None:
        atomic_write(cached, lambda tmp: np.savez(tmp, vectors=vectors, key=encoder.key))
    return vectors, encoder.key


def train_zero_shot(cfg: ZeroShotConfig, catalog: PromptCatalog | None = None, teacher: Teacher | None = None,
                    progress: bool = True, on_step: Callable[[int, dict], None] | None = None) -> TrainingRun:
    """Run (or resume) a zero-shot training; returns where its model file (``cfg.out``) stands."""
    catalog = catalog or default_catalog()
    teacher = teacher or PriorTeacher(catalog)
    unknown = [c for c in cfg.classes if c not in catalog]
    if unknown:
        raise InputError(f"unknown training classes: {', '.join(unknown)}")
    out = Path(cfg.out)
    paths = list_studies(cfg.studies)
    volumes = prepare_volumes(paths, teacher, cfg.classes, catalog, out.parent / "teacher_cache", progress)
    vectors, encoder_key = class_vectors(cfg.classes, catalog, cfg.text_encoder, out.parent / "teacher_cache")
    return run_training(cfg, volumes, vectors, encoder_key, {"teacher": teacher.name}, progress, on_step)


def run_training(cfg: ZeroShotConfig, volumes: list[TrainingVolume], vectors: np.ndarray, encoder_key: str,
                 meta_extra: dict, progress: bool = True, on_step: Callable[[int, dict], None] | None = None,
                 volume_p: np.ndarray | None = None, desc: str = "zero-shot training") -> TrainingRun:
    """The training loop shared by zero-shot and finetuning: targets are already in ``volumes``; a partial
    run of the same settings and targets resumes (trainers.resume).

    ``volume_p`` weights how often each volume is drawn (finetuning draws labelled ones more).
    Started by torchrun, every process runs this loop on its own device with its own tiles (seed +
    rank) and ``cfg.batch_size`` of them per step, so a step learns from world * batch_size tiles;
    DDP averages the gradients, rank 0 alone logs and writes the files, and every process returns
    once they are written (see medprompt/distributed.py).
    """
    ctx = init_distributed(cfg.device)
    device = ctx.device
    torch.manual_seed(cfg.seed)  # the same initial weights everywhere (DDP broadcasts rank 0's anyway)
    rng = np.random.default_rng(cfg.seed + ctx.rank)
    gen = torch.Generator().manual_seed(cfg.seed + ctx.rank)
    out = Path(cfg.out)
    state_path = out.with_suffix(out.suffix + ".state")
    if cfg.init is not None and Path(cfg.init).is_file():
        net, init_meta = load_model(Path(cfg.init), device)
        net_cfg = net.cfg
        if net_cfg.text_dim != vectors.shape[1] or init_meta.get("text_encoder") != encoder_key:
            raise InputError(f"{cfg.init} was trained with text encoder '{init_meta.get('text_encoder')}', "
                             f"not '{encoder_key}': start from scratch or use the same encoder")
    else:
        net_cfg = NetConfig.preset(cfg.model_config, text_dim=vectors.shape[1])
        net = MedPromptNet(net_cfg).to(device)
    if cfg.init_vision:
        _init_vision(net, cfg.init_vision)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.steps))
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_THE_RUN}
    run = run_identity(**{**settings, "init": file_stamp(cfg.init)}, net=net_cfg.to_dict(),
                       text=encoder_key, vectors=digest([vectors]),
                       volumes=[(v.name, digest([v.target, v.weight])) for v in volumes],
                       volume_p=None if volume_p is None else np.asarray(volume_p, np.float64).round(9).tolist(),
                       meta=meta_extra)
    # said even when quiet: in a server round the line goes to the round's log
    start = resume_into(state_path, out, run, cfg.resume, ctx.is_main, net, opt, sched)
    if start:
        rng = np.random.default_rng(cfg.seed + ctx.rank + start)
    model = wrap_model(net, ctx)  # ``net`` stays the bare network: saved, and its region_logits called
    text = torch.from_numpy(vectors).to(device)
    sampler = TileSampler(volumes, net_cfg.tile, net_cfg.in_slices, rng, volume_p=volume_p)
    meta = {
        "text_encoder": encoder_key,
        "classes": list(cfg.classes),
        "class_vectors": {c: vectors[i].tolist() for i, c in enumerate(cfg.classes)},
        "trained_on": [v.name for v in volumes],
        "steps": cfg.steps,
        **meta_extra,
    }
    use_amp = device.type == "cuda"
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=desc,
               unit="step", disable=not (progress and ctx.is_main))
    t0 = time.perf_counter()
    stats: dict = {}
    done = start
    net.train()
    for step in bar:
        img, tgt, wt = (torch.from_numpy(a).to(device) for a in sampler.sample(cfg.batch_size))
        img, tgt, wt = augment_geometry(img, tgt, wt, gen)
        view_a, view_b = augment_intensity(img, gen), augment_intensity(img, gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits, patches = model(torch.cat([view_a, view_b]), text)
            region = net.region_logits(patches, text)
        logits, region = logits.float(), region.float()
        la, lb = logits.chunk(2)
        cls, pw = patch_targets(tgt, wt, net_cfg.patch)
        l_mask = mask_loss(la, tgt, wt)
        l_region = region_text_loss(region.chunk(2)[0], cls, pw)
        l_cons = consistency_loss(la, lb)
        loss = l_mask + cfg.w_region * l_region + cfg.w_consistency * l_cons
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        stats = {"loss": loss.item(), "mask": l_mask.item(), "region": l_region.item(), "consistency": l_cons.item()}
        if ctx.world > 1:
            stats = {k: all_mean(v, ctx) for k, v in stats.items()}
        bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items()})
        if on_step is not None and ctx.is_main:
            on_step(step + 1, stats)
        done = step + 1
        if end_of_step(ctx, done, cfg.steps, cfg.save_every, cfg.time_limit_s, t0,
                       lambda: save_model(out, net, {**meta, "step": done, "last_losses": stats}),
                       lambda: {"net": net.state_dict(), "optimizer": opt.state_dict(),
                                "scheduler": sched.state_dict(), "run": run}, state_path, bar):
            break
    barrier(ctx)  # every process returns once rank 0's files are there
    elapsed = time.perf_counter() - t0
    if progress and ctx.is_main and done > start:
        where = f"{device} x {ctx.world} processes" if ctx.world > 1 else f"{device}"
        print(f"trained {done - start} steps in {elapsed:.0f} s "
              f"({(done - start) * cfg.batch_size * ctx.world / max(elapsed, 1e-9):.1f} tiles/s on {where}); "
              f"model: {out}")
    return TrainingRun(out, start, done, cfg.steps)


def warmup_cosine(steps: int, warmup_frac: float = 0.05) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up, then cosine decay to 5 %."""
    warm = max(1, int(steps * warmup_frac))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, steps - warm))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def _init_vision(net: MedPromptNet, spec: str) -> None:
    """Start the encoder from an open_clip vision tower (e.g. BiomedCLIP's ViT-B/16), local weights only."""
    from medprompt.model.network import init_from_open_clip
    from medprompt.text.encoders import load_open_clip_model

    model = load_open_clip_model(spec)
    init_from_open_clip(net, model.visual)
