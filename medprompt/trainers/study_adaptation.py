"""A model adapted to the study it is about to draft: its own round's recipe, run on that study.

A zero-shot round is transductive: its student learns each training study's own look from the
teacher's trusted cells (prior + LiteMedSAM where they agree, trainers.cells) and then draws those
studies better than the teacher does (ct_abdomen_a 0.783 against 0.761). A study it never saw gets
none of that: a model taught on one CT drew the other at or below the teacher (leave-one-out 0.736 and
0.707 against prior + LiteMedSAM's 0.761 and 0.709). Running the same round on the study being drafted,
from the model's own weights for ``ADAPT_STEPS`` steps, brings the gain back (0.779 and 0.730; 0.770
after 100 steps, 0.784 after 400: BENCHMARKS.md "A study the model never saw"). It reads no label.

A model annotators taught (a finetune round's) learnt the studies of its datastore, but not one added
since. It is adapted as its round treats an unlabelled study: the teacher's cells count only where the
model agrees with them (sam_rounds.agreeing), at the finetune round's learning rate, so the teacher
cannot undo what the corrections taught. Without it, a model finetuned on one corrected CT drew a CT
it never saw below the zero-shot model adapted to it (0.763 against 0.779, 0.709 against 0.731); with it
0.772 and 0.726 (BENCHMARKS.md "A corrected model on a study added after its round").

The adapted network is kept in memory only (the last few studies, for re-prompts); the model file is
never touched. Not for a study the model's round learnt (the model file records their digests), nor for
a study of a modality the model never learnt (the anatomy prior localises those, model.sam_predictor),
nor for 2D images (the teacher's prior is 3D).
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from medprompt.catalog import default_catalog
from medprompt.memo import Memo
from medprompt.model.sam_checkpoint import load_net
from medprompt.model.sam_features import study_stack
from medprompt.model.sam_predictor import SamNetPredictor
from medprompt.trainers.cells import taught_cells, taught_study, teachable
from medprompt.trainers.defaults import FINETUNE, ZERO_SHOT
from medprompt.trainers.sam_rounds import agreeing
from medprompt.trainers.sam_net_train import SamNetTrainConfig, train_cells

if TYPE_CHECKING:
    from medprompt.io.volume import Volume

ADAPT_STEPS = 200  # the round's batch and learning rate; a third of a zero-shot round's steps, on one study
_ADAPTED: Memo[SamNetPredictor] = Memo(entries=4)
_ONE_AT_A_TIME = threading.Lock()  # adaptations are CPU-bound: two at once take as long as both in turn


def adaptable(pred: SamNetPredictor) -> bool:
    """Whether ``pred`` was made by one of our rounds (zero-shot or finetune) and loaded from a file."""
    meta = pred.meta
    return meta.get("teacher") == "prior+LiteMedSAM" and "path" in meta


def adapted(pred: SamNetPredictor, volume: "Volume", segmenter_for: Callable, steps: int | None = None,
            progress: bool = False) -> SamNetPredictor:
    """``pred`` with its network adapted to ``volume`` (the same predictor where adaptation does not apply);
    ``steps``: default ``ADAPT_STEPS``."""
    steps = ADAPT_STEPS if steps is None else steps
    if steps <= 0 or not adaptable(pred) or volume.digest in pred.meta.get("learnt_studies", ()):
        return pred  # a study its round learnt is drawn as that round left it
    catalog = pred.catalog or default_catalog()
    classes = list(pred.meta["classes"])
    # The teacher draws what the anatomy prior can; a finetuned model's other classes (a tumour, a user's
    # class) go untaught: the study does not state them (sam_net.channel_owner), and agreement keeps the
    # model's own cells of them out of the loss.
    if not teachable(classes, catalog):
        return pred
    path = Path(pred.meta["path"])
    key = (str(path), path.stat().st_mtime_ns, volume.digest, steps, str(pred.sam_checkpoint), pred.text_encoder)

    def make() -> SamNetPredictor:
        stack = study_stack(volume, segmenter_for)
        if pred.unlearnt(stack.modality):
            return pred
        target, prior, known = taught_cells(volume, stack, classes, catalog, segmenter_for)
        study = taught_study(volume.source, volume, stack, target, prior, pred.net.cfg.reach, known)
        vectors = np.stack([np.asarray(pred.meta["class_vectors"][c], np.float32) for c in classes])
        recipe = ZERO_SHOT["sam"]
        if pred.meta.get("labelled"):  # corrections taught it: the teacher counts where the model agrees
            study = agreeing(study, path, vectors, str(pred.device))
            recipe = FINETUNE["sam"]
        with tempfile.TemporaryDirectory(prefix="medprompt-adapt-") as tmp:
            out = Path(tmp) / "adapted.pt"
            cfg = SamNetTrainConfig(out=out, classes=classes, steps=steps, batch_size=recipe.batch_size,
                                    lr=recipe.lr, device=str(pred.device), resume=False,
                                    save_every=steps, balance=True, meta={"adapted_from": str(path)})
            train_cells(cfg, [study], vectors, pred.meta["text_encoder"], init=path, study_p=np.ones(1),
                        progress=progress, desc="adapting to this study")
            net, _ = load_net(out, pred.device)
        meta = {**pred.meta, "adapted_to": volume.source}  # the served model's record: what it learnt, who taught it
        return SamNetPredictor(net, meta, pred.device, pred.text_encoder, pred.sam_checkpoint, pred.fuse_prior,
                               pred.catalog, source="adapted medprompt")

    kept = _ADAPTED.get(key)
    if kept is not None:
        return kept
    with _ONE_AT_A_TIME:  # a draft asked while Next Sample's prefetch adapts the study waits for it, not redoes it
        return _ADAPTED.get_or_make(key, make)
