"""Benchmark: text prompts for LiteMedSAM (issue 9): box-only vs text + box vs text-only, per class.

Teachers are the zero-shot round's (prior + LiteMedSAM, confident pixels; no label file is read).
Leave-one-study-out by default: for each scored study a text-token model is trained on the teacher
masks of the other real studies, then the scored study is drafted
  - box   : today's path (anatomy prior -> boxes -> LiteMedSAM, medprompt.sam.refine);
  - text+box: the same boxes, each with its class's text tokens (medprompt.model.text_segmenter);
  - text@extent: text tokens alone on the sampled slices within the prior's slice extent per class;
  - text@all : text tokens alone on every sampled slice (no localiser at all);
and scored against the reference labels (Synapse-8 classes it has). Reference labels are read only here.

    .venv/bin/python -u benchmarks/text_prompt_sam.py                         # k=2 tokens, frozen decoder
    .venv/bin/python -u benchmarks/text_prompt_sam.py --variants k2 k2dec --steps 150
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medprompt.catalog import SYNAPSE8, default_catalog  # noqa: E402
from medprompt.evaluation import evaluate  # noqa: E402
from medprompt.io.volume import load_volume, read_label_names  # noqa: E402
from medprompt.model.text_segmenter import refine_with_text, text_only_labels  # noqa: E402
from medprompt.model.text_tokens import TextTokenConfig, load_text_tokens  # noqa: E402
from medprompt.sam import segmenter_factory  # noqa: E402
from medprompt.sam.weights import load_sam  # noqa: E402
from medprompt.text.cache import cache_root  # noqa: E402
from medprompt.trainers.text_tokens_train import TextTrainConfig, teacher_slices, train_text_tokens  # noqa: E402
from medprompt.trainers.zero_shot import class_vectors  # noqa: E402

REAL = REPO.parent / "shared" / "data" / "real"
CASES = {"ct_abdomen_a": "image.nii.gz", "ct_abdomen_b_dicom": "dicom", "mr_abdomen": "image.nii.gz"}
VARIANTS = {
    "k1": TextTokenConfig(tokens=1),
    "k2": TextTokenConfig(tokens=2),
    "k2mlp": TextTokenConfig(tokens=2, hidden=256),
    "k2dec": TextTokenConfig(tokens=2, decoder=True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), help="studies to score")
    p.add_argument("--variants", nargs="+", default=["k2"], choices=list(VARIANTS))
    p.add_argument("--modes", nargs="+", default=["box", "text+box", "text@extent", "text@all"])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--transductive", action="store_true", help="train on every study, the scored one too")
    p.add_argument("--work", type=Path, default=cache_root().parent / "text_prompt_sam",
                   help="teacher cache and model files")
    p.add_argument("--retrain", action="store_true", help="train again even where a model file exists")
    p.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if not REAL.exists():
        sys.exit(f"error: {REAL} not found")
    catalog = default_catalog()
    classes = list(SYNAPSE8)
    entries = [catalog[c] for c in classes]
    names = {c: i + 1 for i, c in enumerate(classes)}
    args.work.mkdir(parents=True, exist_ok=True)
    make = segmenter_factory(device="cpu")
    sam_net = load_sam(None, "cpu").net
    t = time.perf_counter()
    teachers = {c: teacher_slices(REAL / c / f, classes, catalog, make, args.work) for c, f in CASES.items()}
    print(f"teachers ready ({time.perf_counter() - t:.0f} s): "
          + ", ".join(f"{c} {len(s.embeddings)} slices" for c, s in teachers.items()), flush=True)
    vectors, key = class_vectors(classes, catalog, None, args.work)
    results: dict = {}
    box_cache: dict = {}
    from medprompt.prior.engine import AnatomyPrior

    for case in args.cases:
        folder = REAL / case
        ref_img = nib.load(folder / "label.nii.gz")
        ref, ref_names = np.asarray(ref_img.dataobj), read_label_names(folder / "labels.json")
        volume = load_volume(folder / CASES[case])
        loc = AnatomyPrior(catalog).localize(volume, entries)

        def score(labels: np.ndarray) -> dict:
            ev = evaluate(labels, volume.affine, names, ref, ref_img.affine, ref_names)
            return {"mdice": ev.mdice, **{s.name: s.dice for s in ev.scores}}

        print(f"\n## {case} {volume.data.shape}", flush=True)
        if "box" in args.modes:
            tt = time.perf_counter()
            box_cache[case] = score(make_box(volume, loc, entries, make))
            _show("box (today)", box_cache[case], time.perf_counter() - tt)
            results.setdefault(case, {})["box"] = box_cache[case]
        for variant in args.variants:
            train_on = [c for c in CASES if args.transductive or c != case]
            tag = f"{variant}_s{args.steps}_" + ("all" if args.transductive else f"no_{case}")
            out = args.work / f"{tag}.pt"
            if args.retrain or not out.exists():
                cfg = TextTrainConfig(out=out, classes=classes, model=VARIANTS[variant], steps=args.steps,
                                      meta={"variant": variant})
                tt = time.perf_counter()
                train_text_tokens(cfg, [teachers[c] for c in train_on], vectors, key, sam_net,
                                  on_step=_progress(args.steps))
                print(f"trained {tag} on {', '.join(train_on)} in {time.perf_counter() - tt:.0f} s", flush=True)
            model, meta = load_text_tokens(out)
            for mode in args.modes:
                if mode == "box":
                    continue
                tt = time.perf_counter()
                if mode == "text+box":
                    labels = refine_with_text(volume, loc, entries, make, model, meta).labels
                elif mode == "text@extent":
                    labels = text_only_labels(volume, entries, make, model, meta, extent=loc)
                else:
                    labels = text_only_labels(volume, entries, make, model, meta)
                s = score(labels)
                _show(f"{variant} {mode}", s, time.perf_counter() - tt)
                results.setdefault(case, {})[f"{variant} {mode}"] = s
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def make_box(volume, loc, entries, make) -> np.ndarray:
    from medprompt.sam.refine import refine

    return refine(volume, loc, entries, make).labels


def _show(tag: str, s: dict, seconds: float) -> None:
    per = ", ".join(f"{k} {v:.3f}" for k, v in s.items() if k != "mdice")
    print(f"{tag:22s} mDice {s['mdice']:.3f} ({seconds:.1f} s): {per}", flush=True)


def _progress(total: int):
    def on_step(step: int, stats: dict) -> None:
        if step % 25 == 0 or step == total:
            print(f"  step {step}/{total} loss {stats['loss']:.3f} ({stats['seconds']:.0f} s)", flush=True)

    return on_step


if __name__ == "__main__":
    main()
