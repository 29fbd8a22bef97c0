"""The training loop of MedPromptNet on LiteMedSAM features (zero-shot and finetune rounds share it).

Batches are random cells of sampled slices of CellStudy's (medprompt.trainers.cells), with their
neighbours' embeddings; the loss is the confidence-weighted soft cross-entropy of background +
classes per cell; a class a study does not state counts as its background (or as the stated class it is
a part of), a marginal rather than a mask, so partial labels do not unlearn other organs (optionally each
cell's weight scaled by its classes' balance weights, so a rare class is not drowned). Augmentation
jitters the position channels and the embedding.
The model file is written atomically every ``save_every`` steps and at the end; the optimiser state
beside it makes an interrupted run resumable. Cheap: the image encoder never runs here, only a
per-cell MLP on cached embeddings.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from medprompt.model.sam_checkpoint import load_net, save_net
from medprompt.model.sam_net import SamNetConfig, SamPromptNet, channel_owner, merged_log_softmax, part_matrix
from medprompt.trainers.cells import CellStudy, class_area, class_balance
from medprompt.trainers.defaults import ZERO_SHOT
from medprompt.trainers.resume import NOT_THE_RUN, TrainingRun, digest, file_stamp, resume_into, run_identity

if TYPE_CHECKING:
    from medprompt.distributed import DistContext
    from medprompt.trainers.disk_embeddings import DiskEmbeddings


@dataclass
class SamNetTrainConfig:
    """Everything a run depends on; saved in the checkpoint so a run can be reproduced."""

    out: Path
    classes: Sequence[str]
    steps: int = ZERO_SHOT["sam"].steps
    batch_size: int = ZERO_SHOT["sam"].batch_size
    lr: float = ZERO_SHOT["sam"].lr
    weight_decay: float = 0.05
    model_config: str = "small"
    device: str = "auto"
    seed: int = 0
    save_every: int = 200
    resume: bool = True
    time_limit_s: float | None = None
    cells: int = 256  # cells drawn per slice and step (of 4096)
    jitter: float = 0.1  # position jitter (the slice spans -1..1)
    noise: float = 0.1  # embedding jitter, in units of the embedding's own spread
    balance: bool = False  # up-weight classes with little trusted area (trainers.cells.class_balance)
    parts: dict = field(default_factory=dict)  # class -> its part classes (catalog prior.parts), see cell_loss
    meta: dict = field(default_factory=dict)


def batch_of(studies: Sequence[CellStudy], picks: Sequence[tuple[int, int]], cells: int | None = None,
             rng: np.random.Generator | None = None, jitter: float = 0.0, noise: float = 0.0,
             class_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(study, slice) picks -> per-cell inputs (B, N, F), targets (B, 1 + C, N), weights (B, N), known (B, C).

    ``cells``: a random subset of N cells per slice (all 4096 when None); ``jitter`` moves each slice's
    position channels by up to that much (the same anatomy a little elsewhere); ``noise`` jitters the
    embeddings in units of their own spread; ``class_weight`` (1 + C,) scales each cell's weight by its
    target's mix of classes."""
    xs, tgts, wts, known = [], [], [], []
    for s, k in picks:
        st = studies[s]
        n_cells = st.embeddings.shape[-2] * st.embeddings.shape[-1]
        idx = (torch.from_numpy(rng.choice(n_cells, size=cells, replace=False)) if cells is not None and rng is not None
               else torch.arange(n_cells))
        coords = st.coords.reshape(3, -1)[:, idx].clone()
        if rng is not None and jitter:
            coords[:2] += torch.from_numpy(rng.uniform(-jitter, jitter, (2, 1))).float() * coords[2:3]
        x = torch.cat([cell_embeddings(st.embeddings, st.neighbours[k], idx).float(), coords], 0).T  # as cell_inputs
        xs.append(x)
        tgts.append(st.target[k].float().flatten(1)[:, idx])
        wts.append(st.weight[k].float().flatten()[idx])
        known.append(st.known)
    x, target, weight = torch.stack(xs), torch.stack(tgts), torch.stack(wts)
    if noise:
        n_emb = x.shape[-1] - 3
        x[..., :n_emb] += noise * x[..., :n_emb].std() * torch.randn_like(x[..., :n_emb])
    if class_weight is not None:
        weight = weight * torch.einsum("bkn,k->bn", target, class_weight.to(target))
    return x, target, weight, torch.stack(known)


def cell_embeddings(embeddings: "torch.Tensor | DiskEmbeddings", rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(S * 256, N): slices ``rows``' embeddings at cells ``idx``, slice by slice as cell_inputs lays them out.
    A tensor in memory is read at those cells only: copying whole slices (6 MB for three) to keep 256 of
    their 4096 cells was most of a training step on the CPU; a study on disk is read in whole rows."""
    if isinstance(embeddings, torch.Tensor):
        flat = embeddings.flatten(2)  # (K, 256, h * w), a view
        at = idx[None].expand(flat.shape[1], -1)
        return torch.cat([flat[r].gather(1, at) for r in rows.tolist()])
    emb = embeddings[rows]
    return emb.reshape(-1, emb.shape[-2] * emb.shape[-1])[:, idx]


def cell_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, known: torch.Tensor,
              part_of: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted soft cross-entropy over background + the classes each sample states: logits and target
    (B, 1 + C, ...), weight (B, ...), known (B, C); a class a sample does not state counts as its
    background, or as the stated class it is a part of (``part_of``, see sam_net.channel_owner)."""
    owner = channel_owner(known, part_of)
    stated = owner == torch.arange(owner.shape[1], device=owner.device)
    stated = stated.reshape(*stated.shape, *([1] * (logits.dim() - 2)))
    t = target * stated
    t = t / t.sum(1, keepdim=True).clamp(min=1e-6)
    ce = -(t * merged_log_softmax(logits, owner)).sum(1)
    return (ce * weight).sum() / weight.sum().clamp(min=1.0)


def process_draws(study_p: np.ndarray, held_by: np.ndarray, ctx: "DistContext") -> tuple[np.ndarray, float]:
    """This process's draw probability of each of its studies and its loss scale, from each study's weight in
    the round (``study_p``, as one process would draw them) and on how many processes it is (``held_by``).

    A study on every process is drawn by each 1 / world as often; the scale (world x this process's share of
    all draws) makes the mean of the processes' scaled losses, which DDP's averaged gradient follows, the
    one-process loss in expectation, however unevenly the studies fell. One process: (study_p / sum, 1)."""
    from medprompt.distributed import all_sum

    p = np.asarray(study_p, np.float64) / np.asarray(held_by, np.float64)
    scale = ctx.world * p.sum() / float(all_sum(torch.tensor([p.sum()], dtype=torch.float64), ctx))
    return p / p.sum(), float(scale)


def warm_net(init: Path | None, text_dim: int, model_config: str, device: torch.device
             ) -> tuple[SamPromptNet, dict | None]:
    """A network to train and its model file's record: from ``init`` (its architecture wins), or new from the
    preset with no record (None)."""
    if init is not None and Path(init).is_file():
        net, meta = load_net(Path(init), device)
        return net.train(), meta
    return SamPromptNet(SamNetConfig.preset(model_config, text_dim)).to(device), None


def learnt_modalities(modalities: Sequence[str | None], init_meta: dict | None) -> list[str] | None:
    """The modalities a model trained on studies of ``modalities`` from a model with record ``init_meta`` (None:
    trained from scratch) has learnt; None (any) when one is unknown, as for a model file from before models
    recorded them. SamNetPredictor hands a study of another modality to the anatomy prior."""
    if any(m is None for m in modalities) or (init_meta is not None and "modalities" not in init_meta):
        return None
    return sorted({*modalities, *(init_meta or {}).get("modalities", [])})


def train_cells(cfg: SamNetTrainConfig, studies: list[CellStudy], vectors: np.ndarray, encoder_key: str,
                init: Path | None = None, study_p: np.ndarray | None = None, progress: bool = True,
                on_step: Callable[[int, dict], None] | None = None, desc: str = "training",
                held_by: Sequence[int] | None = None) -> TrainingRun:
    """Run (or resume, trainers.resume) training on ``studies``; returns where the model file (``cfg.out``) stands.

    ``study_p``: how often a batch draws each study (relative; default its slice count). Across processes
    each holds its share of a round's studies (distributed.shard) and ``held_by`` says on how many
    processes each of these is (1 for a shard's, all for the corrections every process keeps): draws and
    loss follow :func:`process_draws`, and the class balance counts every study once."""
    from medprompt.distributed import all_sum, barrier, end_of_step, gathered, init_distributed, unwrap, wrap_model
    from medprompt.trainers.zero_shot import warmup_cosine

    ctx = init_distributed(cfg.device)
    device = ctx.device
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    state_path = out.with_suffix(out.suffix + ".state")
    net, init_meta = warm_net(init, vectors.shape[1], cfg.model_config, device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.steps))
    trained_on = gathered([s.name for s in studies], ctx)
    run = run_identity(**{k: v for k, v in asdict(cfg).items() if k not in NOT_THE_RUN}, net=net.cfg.to_dict(),
                       text=encoder_key, vectors=digest([vectors]), init=file_stamp(init),
                       # each study by name, targets and draw weight, in an order that does not depend on how
                       # many processes hold them: a stopped run resumes with any number of processes
                       studies=sorted(gathered([(s.name, digest([s.target, s.weight, s.known]),
                                                 None if study_p is None else round(float(study_p[i]), 9))
                                                for i, s in enumerate(studies)], ctx)))
    # said even when quiet: in a server round the line goes to the round's log
    start = resume_into(state_path, out, run, cfg.resume, ctx.is_main, net, opt, sched)
    model = wrap_model(net, ctx)
    rng = np.random.default_rng([cfg.seed, start, ctx.rank])
    text = torch.from_numpy(vectors).float().to(device)
    p = np.asarray(study_p, np.float64) if study_p is not None else np.array([len(s.embeddings) for s in studies], np.float64)
    held = np.asarray(held_by if held_by is not None else np.ones(len(studies)), np.float64)
    p, loss_scale = process_draws(p, held, ctx)
    balance = class_balance(all_sum(class_area(studies, 1.0 / held), ctx)) if cfg.balance else None
    part_of = part_matrix(list(cfg.classes), cfg.parts).to(device)
    meta = {"text_encoder": encoder_key, "classes": list(cfg.classes),
            "class_vectors": {c: vectors[i].tolist() for i, c in enumerate(cfg.classes)},
            "trained_on": trained_on, "steps": cfg.steps, **cfg.meta}
    modalities = learnt_modalities(gathered([s.modality for s in studies], ctx), init_meta)
    if modalities is not None:
        meta["modalities"] = modalities
    learnt = sorted({*(d for d in gathered([s.digest for s in studies], ctx) if d),
                     *(init_meta or {}).get("learnt_studies", [])})
    if learnt:
        meta["learnt_studies"] = learnt  # their Volume.digest: not adapted to again (trainers.study_adaptation)
    if balance is not None:
        meta["class_balance"] = dict(zip(["background", *cfg.classes], balance.tolist()))
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=desc, unit="step",
               disable=not progress or not ctx.is_main)
    t0 = time.perf_counter()
    stats: dict = {}
    done = start
    model.train()
    for step in bar:
        picks = []
        for s in rng.choice(len(studies), size=cfg.batch_size, p=p):
            picks.append((int(s), int(rng.integers(len(studies[int(s)].embeddings)))))
        x, t, w, k = (a.to(device) for a in batch_of(studies, picks, cfg.cells, rng, cfg.jitter, cfg.noise, balance))
        loss = cell_loss(model(x, text), t, w, k, part_of)
        if ctx.world > 1:
            loss = loss * loss_scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        stats = {"loss": float(loss.item())}
        bar.set_postfix({"loss": f"{stats['loss']:.3f}"})
        if on_step is not None and ctx.is_main:
            on_step(step + 1, stats)
        done = step + 1
        if end_of_step(ctx, done, cfg.steps, cfg.save_every, cfg.time_limit_s, t0,
                       lambda: save_net(out, unwrap(model), {**meta, "step": done, "last_losses": stats}),
                       lambda: {"net": unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                                "scheduler": sched.state_dict(), "run": run}, state_path, bar):
            break
    barrier(ctx)  # other ranks return once rank 0's files exist
    return TrainingRun(out, start, done, cfg.steps)
