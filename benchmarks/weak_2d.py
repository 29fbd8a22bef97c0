"""Weak supervision vs zero-shot on ../shared/data/real2d: Dice per task, and seconds of training.

For each task the zero-shot path (attribute saliency -> LiteMedSAM, as ``medprompt infer``) drafts
every image of the set; those drafts (never the manual masks) train the weak model
(``medprompt.weak.train``, the code behind ``medprompt train-weak``). Scored against the manual masks:

- zero-shot: the drafts themselves;
- held out (2-fold): trained on the drafts of one half, scored on the other half (images it never
  saw): the honest figure on sets this small;
- own training half: the same two models scored on the images whose drafts they learnt from
  (transductive, as MedCLIP-SAMv2's weak step is used on its unlabelled pool itself).

Each weak figure twice: the network alone (``--refine none``) and the network's probability as the
saliency prompting LiteMedSAM (``--refine sam``, the default of ``--model weak:``).

    .venv/bin/python benchmarks/weak_2d.py [--tasks lungs,breast,brain] [--steps 150] [--size 128]
        [--work DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from zero_shot_2d import REAL2D, TASKS, dice, reference  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="lungs,breast,brain")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--work", type=Path, default=None, help="keep drafts and models here (default: temporary)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not REAL2D.is_dir():
        print(f"real 2D data not found at {REAL2D}; nothing to measure", file=sys.stderr)
        return 1
    from medprompt.catalog import default_catalog
    from medprompt.io.image2d import find_images2d, load_image2d
    from medprompt.weak.data import cached_draft
    from medprompt.weak.draft import draft_weak
    from medprompt.weak.train import WeakConfig, train_weak

    catalog = default_catalog()
    report: dict = {"steps": args.steps, "size": args.size, "tasks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for key in args.tasks.split(","):
            folder_name, [(prompt, ref_names, cls)] = TASKS[key]
            folder = REAL2D / folder_name
            images = find_images2d(folder / "images")
            refs = {p: reference(folder, p, ref_names) for p in images}
            cache = work / key / "drafts"
            zero = {p: dice(cached_draft(p, load_image2d(p), [cls], cache, catalog) == 1, refs[p]) for p in images}
            row: dict = {"images": len(images), "zero_shot": float(np.mean(list(zero.values()))), "seconds": []}
            print(f"{key}: zero-shot Dice {row['zero_shot']:.3f} on {len(images)} images", flush=True)
            halves = images[0::2], images[1::2]
            folds = [(halves[0], halves[1]), (halves[1], halves[0])]
            scores: dict[str, list[float]] = {}
            for i, (train, test) in enumerate(folds):
                model = work / key / f"fold{i}.pt"
                # the drafts come from the shared cache: the same zero-shot masks, computed once
                result = train_weak(WeakConfig(images=train, prompts=[cls], out=model, steps=args.steps,
                                               size=args.size, drafts=cache, resume=False), progress=False)
                row["seconds"].append(round(result.seconds, 1))
                for mode, scored in (("same", train), ("heldout", test)):
                    for p in scored:
                        image = load_image2d(p)
                        for refine in ("none", "sam"):
                            labels = draft_weak(image, model, [cls], refine=refine).labels
                            scores.setdefault(f"{mode}_{refine}", []).append(dice(labels == 1, refs[p]))
                row.setdefault("left_out", []).extend(result.left_out)
                print(f"  fold {i}: trained on {len(train) - len(result.left_out)} of {len(train)} drafts "
                      f"(unsure, left out: {', '.join(result.left_out) or 'none'}) in {result.seconds:.0f} s "
                      f"(pass 2 left out {result.excluded:.1%} of pixels)", flush=True)
            row.update({k: float(np.mean(v)) for k, v in scores.items()})
            row["per_image"] = {k: [round(x, 3) for x in v] for k, v in scores.items()}
            row["zero_shot_per_image"] = {p.name: round(zero[p], 3) for p in images}
            report["tasks"][key] = row
            print(json.dumps({k: v for k, v in row.items() if k not in ("per_image", "zero_shot_per_image")}),
                  flush=True)
    print(f"\n| task | images | zero-shot | weak, held-out half: net / net -> SAM | weak, its own training "
          f"half: net / net -> SAM | training s per model ({args.steps} steps, {args.size} px) |")
    print("|---|---|---|---|---|---|")
    for key, r in report["tasks"].items():
        print(f"| {key} ({TASKS[key][0]}) | {r['images']} | {r['zero_shot']:.3f} | {r['heldout_none']:.3f} / "
              f"{r['heldout_sam']:.3f} | {r['same_none']:.3f} / {r['same_sam']:.3f} | {np.mean(r['seconds']):.0f} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
