"""Benchmark: zero-shot Dice/IoU of a draft model on the real cases in ../shared/data/real.

Same code path as ``medprompt infer`` + ``medprompt evaluate``; prints one table per case.

    .venv/bin/python benchmarks/quality.py [--model prior|medprompt] [--refine sam|none] [--checkpoint FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medprompt.catalog import SYNAPSE8  # noqa: E402
from medprompt.drafts import draft  # noqa: E402
from medprompt.evaluation import evaluate  # noqa: E402
from medprompt.io.volume import load_volume, read_label_names  # noqa: E402

REAL = REPO.parent / "shared" / "data" / "real"
EXTRA = ("inferior_vena_cava", "portal_vein_and_splenic_vein", "adrenal_gland_left", "adrenal_gland_right",
         "urinary_bladder")
CASES = {"ct_abdomen_a": "image.nii.gz", "ct_abdomen_b_dicom": "dicom", "mr_abdomen": "image.nii.gz"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="prior")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--refine", default="sam", help="sam (default, as medprompt infer) or none (the model's own masks)")
    args = p.parse_args()
    if not REAL.exists():
        sys.exit(f"error: {REAL} not found")
    for case, image in CASES.items():
        folder = REAL / case
        ref_img = nib.load(folder / "label.nii.gz")
        ref_names = read_label_names(folder / "labels.json")
        volume = load_volume(folder / image)
        print(f"\n## {case} {volume.data.shape}")
        for group, prompts in (("Synapse 8", list(SYNAPSE8)), ("other classes", [c for c in EXTRA if c in ref_names])):
            t = time.perf_counter()
            seg = draft(volume, prompts, model=args.model, checkpoint=args.checkpoint, refine=args.refine)
            dt = time.perf_counter() - t
            ev = evaluate(seg.labels, volume.affine, seg.names, np.asarray(ref_img.dataobj), ref_img.affine, ref_names)
            cells = ", ".join(f"{s.name} {s.dice:.3f}" for s in ev.scores)
            print(f"{group}: mDice {ev.mdice:.3f} mIoU {ev.miou:.3f} ({len(ev.scores)} classes, {dt:.1f} s): {cells}")


if __name__ == "__main__":
    main()
