"""Zero-shot and finetune rounds of MedPromptNet on LiteMedSAM features.

Zero-shot: the teacher is the anatomy prior + LiteMedSAM on unlabelled studies, trusted where the
two agree (medprompt.trainers.cells); every study is drawn equally often whatever its slice count (a
patient, or a modality, with few slices is not outvoted by one long CT: what must generalise is
across patients), and rare classes are up-weighted (trainers.cells.class_balance); then, for
``rounds`` > 1, the student's own confident cells join (self-training): where teacher and student
agree the target stays, where the teacher had no say and the student is sure, the student's class is
learnt at half weight. No label file is read.

Finetune: corrected studies are full-weight targets, rare classes up-weighted as in the zero-shot
round (a CT slice holds an order of magnitude more liver than pancreas). A correction speaks only for
the classes it names: the network's other classes count as its background there, or as the named
class they are part of (kidney_left in a "kidney" label), so correcting five organs does not unlearn
the other three (sam_net_train.cell_loss). Where there is a model to
beat, a quarter of the corrected slices (every fourth, at least one; whole images on a 2D datastore)
is held out and scores the candidate against it, so even one corrected study validates a round on
slices it did not train on; the first round of a new network has nothing to compare with, so it
trains on every correction (with one corrected patient, a quarter of its slices is a quarter of all
it can learn from). Unlabelled studies join where the model in service and the teacher agree
(pseudo-labels by agreement), then, in a second pass, with the first pass's confident cells
(self-training); unlabelled 2D images, which have no teacher (the anatomy prior is 3D), join in that
second pass through the first pass's own drafts of them (map -> boxes -> LiteMedSAM, see
drafted_cells) where draft and map agree. The served model is replaced only by a candidate that is
no worse there; every accepted model is kept as a version. 2D datastores (PNG/JPEG/DICOM images,
``labels/final`` PNGs) train the same way, one slice per image, and each corrected image brings a few
image-space variants of itself (trainers.augment2d: another size, lie and contrast, encoded once), which
train but never validate. Under torchrun each process teaches and holds its share of the unlabelled studies
(distributed.shard) and keeps every correction; rank 0 validates.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from medprompt.catalog import PromptCatalog, default_catalog
from medprompt.distributed import init_distributed, shard, which_process
from medprompt.errors import InputError
from medprompt.trainers.cells import CellStudy, from_labels, teachable, teacher_studies
from medprompt.trainers.defaults import FINETUNE, ZERO_SHOT
from medprompt.trainers.disk_embeddings import spill_folder, spilled
from medprompt.trainers.resume import TrainingRun
from medprompt.trainers.sam_net_train import SamNetTrainConfig, train_cells

HOLD_OUT_EVERY = 4  # one in four sampled slices of each corrected study validates the round
SURE = 0.9  # self-training: a student's cell this probable becomes a pseudo-label
SELF_WEIGHT = 0.5  # ... at this weight where no teacher had a say


def _segmenter_for(sam_checkpoint: str | Path | None, device: str) -> Callable:
    from medprompt.sam import segmenter_factory

    return segmenter_factory(sam_checkpoint, "cpu" if device == "cpu" else "auto")


def zero_shot_sam(studies: Sequence[Path], out: Path, classes: Sequence[str], *,
                  steps: int = ZERO_SHOT["sam"].steps, rounds: int = 1, batch_size: int = ZERO_SHOT["sam"].batch_size,
                  lr: float = ZERO_SHOT["sam"].lr, init: Path | None = None, text_encoder: str | None = None,
                  model_config: str = "small",
                  device: str = "auto", seed: int = 0, resume: bool = True, time_limit_s: float | None = None,
                  sam_checkpoint: str | Path | None = None, catalog: PromptCatalog | None = None,
                  progress: bool = True, on_step: Callable[[int, dict], None] | None = None) -> TrainingRun:
    """Train from unlabelled studies only; returns where the last round run stands (its model file is ``out``
    once every round is complete). ``time_limit_s`` bounds all rounds together: a round stopped by it ends
    the call, and the next call resumes it (a later round never starts from an unfinished one)."""
    from medprompt.model.sam_checkpoint import load_net
    from medprompt.trainers.zero_shot import class_vectors, list_studies

    catalog = catalog or default_catalog()
    unknown = [c for c in classes if c not in catalog]
    if unknown:
        raise InputError(f"unknown training classes: {', '.join(unknown)}")
    drawn = teachable(classes, catalog)
    undrawn = [c for c in classes if c not in drawn]
    if undrawn:  # nothing would teach them: a zero-shot round learns only what its teacher draws
        raise InputError(f"the anatomy prior, the zero-shot round's teacher, cannot draw {', '.join(undrawn)}; "
                         f"leave them out, or teach them from corrections with train-finetune")
    out = Path(out)
    cache = out.parent / "teacher_cache"
    seg = _segmenter_for(sam_checkpoint, device)
    reach = load_net(Path(init))[0].cfg.reach if init is not None else _reach(model_config)
    # Across processes (torchrun) each teaches and holds its share of the studies (distributed.shard).
    ctx = init_distributed(device)
    mine, held_by = shard(list_studies(studies), ctx)
    with spill_folder(cache) as spill:  # the studies' embeddings on disk (trainers.disk_embeddings)
        cells = teacher_studies(mine, classes, catalog, seg, reach, cache, progress, spill_to=spill,
                                desc=f"teacher (prior + LiteMedSAM){which_process(ctx)}")
        vectors, key = class_vectors(classes, catalog, text_encoder, cache)
        meta = {"teacher": "prior+LiteMedSAM", "rounds": rounds}
        start = init
        began = time.perf_counter()
        for r in range(rounds):
            target = out if r == rounds - 1 else out.with_name(f"{out.stem}.round{r + 1}{out.suffix}")
            left = None if time_limit_s is None else max(0.0, time_limit_s - (time.perf_counter() - began))
            cfg = SamNetTrainConfig(out=target, classes=list(classes), steps=steps, batch_size=batch_size, lr=lr,
                                    model_config=model_config,
                                    device=device, seed=seed + r, resume=resume, time_limit_s=left,
                                    balance=True, meta={**meta, "round": r + 1})
            run = train_cells(cfg, cells, vectors, key, init=start, study_p=np.ones(len(cells)), progress=progress,
                              on_step=on_step, desc=f"zero-shot round {r + 1}/{rounds}", held_by=[held_by] * len(cells))
            run = replace(run, round=r + 1, rounds=rounds)
            if not run.complete:
                break
            if r < rounds - 1:
                cells = self_trained(cells, target, vectors, device)
                start = target  # the next round continues from this one
    return run


def _reach(model_config: str) -> int:
    from medprompt.model.sam_net import SamNetConfig

    return SamNetConfig.preset(model_config, 1).reach


@torch.no_grad()
def student_cells(model: Path, study: CellStudy, vectors: np.ndarray, device: str = "auto") -> torch.Tensor:
    """The model's softmax (K, 1 + C, 64, 64) on a training study's slices."""
    from medprompt.model.checkpoint import resolve_device
    from medprompt.model.sam_checkpoint import load_net
    from medprompt.model.sam_predictor import cell_softmax

    dev = resolve_device(device)
    net, _ = load_net(model, dev)
    return cell_softmax(net, study.embeddings, study.neighbours, study.coords, torch.from_numpy(vectors).float(), dev)


def most_probable(p: torch.Tensor) -> torch.Tensor:
    """Softmax (K, 1 + C, h, w) -> one-hot of each cell's most probable channel (a hard pseudo-label)."""
    return torch.nn.functional.one_hot(p.argmax(1), p.shape[1]).permute(0, 3, 1, 2).float()


def class_parts(classes: Sequence[str], catalog: PromptCatalog) -> dict[str, list[str]]:
    """Each class's parts among ``classes`` (the catalog's prior.parts): what a study stating the whole
    also says of its parts (trainers.sam_net_train.cell_loss)."""
    return {c: [p for p in catalog[c].prior.get("parts", ()) if p in classes] for c in classes if c in catalog}


def self_trained(cells: list[CellStudy], model: Path, vectors: np.ndarray, device: str) -> list[CellStudy]:
    """Teacher targets plus the student's confident cells (see the module docstring)."""
    out = []
    for st in cells:
        if st.labelled:
            out.append(st)
            continue
        p = student_cells(model, st, vectors, device)
        sure = p.amax(1) >= SURE
        weight = st.weight.float()
        # Agreement counts only where the teacher had a say: an image with no teacher (blank_cells) holds
        # a placeholder background target at weight 0, and "agreeing" with it made every confident
        # background cell a full-weight target while the student's confident organ cells got half.
        agree = (p.argmax(1) == st.target.float().argmax(1)) & (weight > 0)
        new_w = torch.where(agree & sure, torch.maximum(weight, torch.ones_like(weight)), weight)
        take = sure & (weight == 0)
        new_w = torch.where(take, torch.full_like(weight, SELF_WEIGHT), new_w)
        target = torch.where(take[:, None], most_probable(p), st.target.float())
        out.append(replace(st, target=target.half(), weight=new_w.half(), labelled=False))
    return out


def labelled_cells(image: Path, label: Path, names: dict[str, int], classes: Sequence[str], segmenter_for: Callable,
                   reach: int, copies: int = 0) -> CellStudy:
    """A corrected study (3D volume or 2D image) and its saved label as full-weight training cells; a 2D
    image with ``copies`` image-space variants of it as further slices after the first (trainers.augment2d)."""
    from medprompt.io.image2d import is_image2d

    if is_image2d(image):
        from medprompt.io.image2d import load_image2d, load_label2d
        from medprompt.model.sam_features import image_pixels, image_stack

        img = load_image2d(image)
        labels, _ = load_label2d(label, img)  # a PNG, or 3D Slicer's NIfTI/NRRD on the image's grid; sizes checked
        from medprompt.trainers.augment2d import variants

        pixels, pixel_mm, modality = image_pixels(img)
        shown = [(pixels, labels), *variants(pixels, labels, copies)]  # the image itself first
        return one_image([from_labels(image.name, image_stack(px, pixel_mm, modality, segmenter_for), lab[None],
                                      names, classes, reach) for px, lab in shown])
    from medprompt.evaluation import align_to_reference
    from medprompt.io.volume import load_labelmap, load_volume
    from medprompt.model.sam_features import label_view, study_stack

    volume = load_volume(image)
    labels, label_affine, _ = load_labelmap(label)
    labels, _ = align_to_reference(labels, label_affine, volume.data.shape, volume.affine)
    stack = study_stack(volume, segmenter_for)
    study = from_labels(image.name, stack, label_view(labels, stack.frame), names, classes, reach)
    return replace(study, digest=volume.digest)  # recorded: a corrected study is not adapted to (study_adaptation)


def one_image(views: list[CellStudy]) -> CellStudy:
    """One 2D image's study and its variants' (trainers.augment2d) as one study whose slices they are, the
    image itself first, each slice its own through-plane neighbour as a 2D image's one slice is."""
    if len(views) == 1:
        return views[0]
    first, k = views[0], len(views)
    return CellStudy(first.name, torch.cat([v.embeddings for v in views]),
                     torch.arange(k)[:, None].repeat(1, first.neighbours.shape[1]), first.coords,
                     torch.cat([v.target for v in views]), torch.cat([v.weight for v in views]), first.known,
                     first.labelled, [0] * k, first.modality)


def blank_cells(image: Path, classes: Sequence[str], segmenter_for: Callable, reach: int) -> CellStudy:
    """An unlabelled 2D image with no teacher: nothing is known until a first pass drafts it (drafted_cells)."""
    from medprompt.io.image2d import load_image2d
    from medprompt.model.sam_features import image_pixels, image_stack

    stack = image_stack(*image_pixels(load_image2d(image)), segmenter_for)
    k = len(stack.slices)
    target = torch.zeros(k, 1 + len(classes), *stack.embeddings.shape[-2:])
    target[:, 0] = 1
    return CellStudy(image.name, stack.embeddings, stack.neighbours(reach), stack.coords(), target.half(),
                     torch.zeros(k, *stack.embeddings.shape[-2:]).half(), torch.ones(len(classes), dtype=torch.bool),
                     False, list(stack.slices), stack.modality)


def drafted_cells(st: CellStudy, image: Path, model: Path, classes: Sequence[str], catalog: PromptCatalog,
                  vectors: np.ndarray, sam_checkpoint: str | Path | None, device: str) -> CellStudy:
    """An unlabelled 2D image taught by ``model``'s own draft of it, as ``medprompt infer`` makes it (the
    network's map -> boxes -> LiteMedSAM), trusted where the draft and the network's map agree as the
    3D teacher is trusted where LiteMedSAM and the prior agree (cells.teacher_weights: the same class,
    or within one cell of the map's region of it), at SELF_WEIGHT. LiteMedSAM draws the boundary the
    64 x 64 map cannot, so on images nobody corrected the student learns the organ's rim next to what
    it found, not only the cells it was already sure of."""
    from medprompt.drafts2d import draft2d
    from medprompt.io.image2d import load_image2d
    from medprompt.model.sam_features import image_pixels, to_cells
    from medprompt.model.sam_predictor import saliency_method
    from medprompt.sam.preprocess import SliceGeometry
    from medprompt.trainers.cells import teacher_weights

    img = load_image2d(image)
    out = draft2d(img, list(classes), saliency=saliency_method(model, sam_checkpoint), sam_checkpoint=sam_checkpoint,
                  catalog=catalog, probable_masks_only=False)  # every mask: teacher_weights says where to trust it
    pixels, pixel_mm, _ = image_pixels(img)
    geometry = SliceGeometry.for_slice(pixels.shape, pixel_mm)  # where blank_cells' embedding sits in SAM's frame
    target = to_cells(out.labels[None], geometry, [out.names[out.resolved[c]] for c in classes])
    p = student_cells(model, st, vectors, device)
    weight = teacher_weights(target, most_probable(p)) * SELF_WEIGHT
    return CellStudy(st.name, st.embeddings, st.neighbours, st.coords, target.half(), weight.half(), st.known,
                     False, st.slices, st.modality)


def split_validation(study: CellStudy) -> tuple[list[int], list[int]]:
    """(train, held-out) slice indices of a corrected study: every fourth sampled slice validates."""
    k = len(study.embeddings)
    if k < 2:
        return [0], []
    held = [j for j in range(k) if j % HOLD_OUT_EVERY == HOLD_OUT_EVERY // 2] or [k // 2]
    return [j for j in range(k) if j not in held], held


@torch.no_grad()
def cell_dice(model: Path, studies: Sequence[CellStudy], vectors: np.ndarray, device: str = "auto",
              part_of: torch.Tensor | None = None) -> float:
    """Mean soft Dice over the known classes present on ``studies``' cells (validation of a round), each
    class's probability with its unstated parts' added as the loss counts them (sam_net.channel_owner)."""
    from medprompt.model.sam_net import channel_owner, merge_probabilities

    scores = []
    for st in studies:
        owner = channel_owner(st.known[None], part_of)
        p = merge_probabilities(student_cells(model, st, vectors, device), owner.expand(len(st.embeddings), -1))
        t = st.target.float()
        for c in np.flatnonzero(st.known.numpy()):
            pc, tc = p[:, c + 1], t[:, c + 1]
            denom = float(pc.sum() + tc.sum())
            if float(tc.sum()) > 0.5:
                scores.append(2 * float((pc * tc).sum()) / max(denom, 1e-6))
    return float(np.mean(scores)) if scores else 0.0


def agreeing(st: CellStudy, model: Path, vectors: np.ndarray, device: str) -> CellStudy:
    """An unlabelled study's teacher cells kept only where the model in service agrees."""
    p = student_cells(model, st, vectors, device)
    agree = p.argmax(1) == st.target.float().argmax(1)
    weight = torch.where(agree, st.weight.float(), torch.zeros_like(st.weight.float()))
    return replace(st, weight=weight.half(), labelled=False)


def study_draws(n_corrected: int, n_unlabelled: int, labelled_share: float) -> np.ndarray:
    """How often a finetune batch draws each study, corrected ones first: the unlabelled take 1 -
    ``labelled_share`` of it, but never more per study than a correction (with more corrected studies than
    unlabelled ones every study is drawn alike; CURVAS with 4 of 5 patients corrected, BENCHMARKS.md)."""
    share = max(labelled_share, n_corrected / (n_corrected + n_unlabelled)) if n_unlabelled else 1.0
    return np.array([share / n_corrected] * n_corrected + [(1 - share) / max(1, n_unlabelled)] * n_unlabelled)


def finetune_sam(studies: Path, served: Path, init: Path | None, baseline: Path | None, *,
                 steps: int = FINETUNE["sam"].steps, lr: float = FINETUNE["sam"].lr,
                 batch_size: int = FINETUNE["sam"].batch_size, device: str = "auto", text_encoder: str | None = None,
                 model_config: str = "small", label_names: dict[str, int] | None = None,
                 labelled_share: float = 0.5, seed: int = 0, catalog: PromptCatalog | None = None,
                 sam_checkpoint: str | Path | None = None, semi: bool = True, augment: bool = True,
                 progress: bool = True, on_step: Callable[[int, dict], None] | None = None):
    """One finetune round on a datastore folder (3D volumes or 2D images); see the module docstring.
    ``augment``: corrected 2D images train with image-space variants of them (trainers.augment2d)."""
    from tqdm import tqdm

    from medprompt.io.image2d import is_image2d
    from medprompt.model.sam_checkpoint import load_net
    from medprompt.trainers.augment2d import copies_per_image
    from medprompt.trainers.finetune import FinetuneResult, catalog_with
    from medprompt.trainers.zero_shot import DEFAULT_CLASSES, class_vectors

    catalog = catalog or default_catalog()
    studies, served = Path(studies), Path(served)
    labelled, unlabelled = find_corrections(studies, label_names)
    if not labelled:
        raise InputError(f"{studies}: no saved labels in labels/final to finetune on")
    # A new network learns the corrected classes only: classes no study states would never be pushed down.
    base_classes = list(load_net(init)[1].get("classes", DEFAULT_CLASSES)) if init else []
    label_classes = sorted({n for s in labelled for n in s.names})
    classes = base_classes + [c for c in label_classes if c not in base_classes]
    catalog = catalog_with(classes, catalog)
    parts = class_parts(classes, catalog)
    work = served.parent / "finetune_work"
    (work / "teacher_cache").mkdir(parents=True, exist_ok=True)
    candidate = work / "candidate.pt"
    for stale in (candidate, candidate.with_suffix(".pt.state")):
        stale.unlink(missing_ok=True)  # a round always starts from the model in service
    with spill_folder(work) as spill:  # the round's embeddings live on disk (trainers.disk_embeddings)
        seg = _segmenter_for(sam_checkpoint, device)
        reach = _reach(model_config) if init is None else load_net(init)[0].cfg.reach
        is_2d = [is_image2d(s.image) for s in labelled]
        copies = copies_per_image(sum(is_2d)) if augment and any(is_2d) else 0
        bar = tqdm(list(zip(labelled, is_2d)), desc="corrections" + (" and variants" if copies else ""), unit="study",
                   disable=not progress)
        corrected = [spilled(labelled_cells(s.image, s.label, s.names, classes, seg, reach, copies if two_d else 0),
                             spill) for s, two_d in bar]
        # a 2D image without its variants:
        originals = [c.subset([0]) if two_d else c for c, two_d in zip(corrected, is_2d)]
        vectors, key = class_vectors(classes, catalog, text_encoder, work / "teacher_cache")
        base = Path(baseline) if baseline else (served if served.is_file() else init)
        if base is not None and not Path(base).is_file():
            base = None
        train, val = [], []
        if base is None:  # nothing to compare a candidate with: validation decides nothing, so train on it all
            train = corrected
        elif all(is_2d) and len(corrected) >= 2:  # 2D: hold out whole images (their variants too)
            held = set(range(HOLD_OUT_EVERY // 2, len(corrected), HOLD_OUT_EVERY)) or {len(corrected) - 1}
            val = [originals[i] for i in sorted(held)]
            train = [c for i, c in enumerate(corrected) if i not in held]
            where = [v.name for v in val]
        else:
            for c, two_d in zip(corrected, is_2d):
                if two_d:  # one image among 3D studies: trained on whole
                    train.append(c)
                    continue
                keep, held = split_validation(c)
                train.append(c.subset(keep))
                if held:
                    val.append(c.subset(held))
            where = [f"{v.name} ({len(v.embeddings)} held-out slices)" for v in val]
        if not val:  # everything trained (one corrected image, or no model to beat): it can only catch a worse round
            val, where = originals, [f"{o.name} (also trained on)" for o in originals]
        # Across processes (torchrun) each teaches and holds its share of the unlabelled studies
        # (distributed.shard); every process keeps all the corrections.
        ctx = init_distributed(device)
        volumes = _teachable(unlabelled)
        # The teacher draws the classes the anatomy prior supports (cells.teachable); with none, it has nothing to say.
        drawn = teachable(classes, catalog)
        taught = volumes if drawn else []
        teach, teach_held = shard(taught, ctx)
        unl = teacher_studies(teach, classes, catalog, seg, reach, work / "teacher_cache", progress, spill_to=spill,
                              desc=f"teacher (prior + LiteMedSAM){which_process(ctx)}") if teach else []
        if unl and init is not None and Path(init).is_file():
            unl = [agreeing(u, Path(init), vectors, device) for u in unl]
        blank_all = [p for p in unlabelled if p not in volumes] if semi else []
        blank_paths, blank_held = shard(blank_all, ctx)
        blank = [spilled(blank_cells(p, classes, seg, reach), spill) for p in blank_paths]
        meta = {"teacher": "prior+LiteMedSAM", "labelled": [s.image.name for s in labelled], "semi_supervised": semi}
        for r in range(2 if semi and (unl or blank) else 1):
            if r == 1:  # self-training: the first pass's confident cells on the unlabelled studies join
                unl = self_trained(unl, candidate, vectors, device) + [
                    drafted_cells(b, path, candidate, classes, catalog, vectors, sam_checkpoint, device)
                    for b, path in zip(blank, blank_paths)]
            cells = train + unl
            n_unl = len(taught) + (len(blank_all) if r == 1 else 0)  # over all processes
            held_by = [ctx.world] * len(train) + [teach_held] * len(teach) + [blank_held] * (len(blank) if r == 1 else 0)
            p = study_draws(len(train), n_unl, labelled_share)
            p = np.concatenate([p[: len(train)], np.full(len(unl), p[-1] if n_unl else 0.0)])
            cfg = SamNetTrainConfig(out=candidate, classes=classes, steps=steps, batch_size=batch_size, lr=lr,
                                    model_config=model_config, device=device, seed=seed + r,
                                    save_every=max(steps, 1), resume=False, balance=True, parts=parts, meta=meta)
            train_cells(cfg, cells, vectors, key, init=init if r == 0 else candidate, study_p=p, progress=progress,
                        on_step=on_step, desc="finetuning" if r == 0 else "finetuning (self-training)",
                        held_by=held_by)
        if not ctx.is_main:
            return FinetuneResult(accepted=False, served=served, candidate_score=float("nan"), previous_score=None,
                                  validation=[], classes=classes)
        from medprompt.model.sam_net import part_matrix

        part_of = part_matrix(classes, parts)
        new = cell_dice(candidate, val, vectors, device, part_of)
        old = None
        if base is not None:
            old = cell_dice(Path(base), val, vectors, device, part_of)  # the same prompts as the candidate
        # Said in the round's report: on the unlabelled volumes these classes were left to the corrections.
        undrawn = [c for c in classes if c not in drawn] if volumes else []
        result = FinetuneResult(accepted=old is None or new >= old, served=served, candidate_score=new,
                                previous_score=old, validation=where, classes=classes,
                                details={"teacher_cannot_draw": undrawn} if undrawn else {})
        if result.accepted:
            versions = served.parent / "versions"
            versions.mkdir(exist_ok=True)
            result.version = versions / f"{time.strftime('%Y%m%d-%H%M%S')}-dice{new:.3f}.pt"
            shutil.copy2(candidate, result.version)
            os.replace(candidate, served)
        else:
            candidate.unlink(missing_ok=True)
        return result


def _teachable(paths: Sequence[Path]) -> list[Path]:
    """Unlabelled studies the teacher can read: 3D volumes (the anatomy prior is 3D; 2D images train
    from their corrections only)."""
    from medprompt.io.image2d import is_image2d

    return [p for p in paths if not is_image2d(p)]


def find_corrections(studies: Path, label_names: dict[str, int] | None = None):
    """Labelled and unlabelled studies of a datastore folder: 3D volumes and 2D images alike."""
    import glob

    from medprompt.io.image2d import find_images2d, image_stem, label2d_names
    from medprompt.trainers.finetune import LabelledStudy, find_labelled, label_names_for

    images2d = find_images2d(studies)
    labelled: list = []
    unlabelled: list[Path] = []
    try:
        labelled, unlabelled = find_labelled(studies, label_names)
    except InputError:
        if not images2d:
            raise
    final = studies / "labels" / "final"
    for image in images2d:
        stem = image_stem(image)
        found = [p for p in final.glob(f"{glob.escape(stem)}.*") if p.suffix != ".json" and image_stem(p) == stem] \
            if final.is_dir() else []
        if not found:
            unlabelled.append(image)
            continue
        names = label2d_names(found[0]) or label_names_for(found[0], studies, stem) or label_names
        if not names:
            raise InputError(f"{found[0]}: no label names (no sidecar JSON, no datastore record); give them "
                             f"with --label-names")
        labelled.append(LabelledStudy(image, found[0], names))
    return labelled, unlabelled
