"""Benchmark: finetune the shipped model on one corrected real CT, score another patient's CT.

The corrections are ``ct_abdomen_b_dicom``'s reference mask (organs of the Synapse 8 it has);
``ct_abdomen_a`` joins as an unlabelled study and is then scored on the organs both share.

    .venv/bin/python benchmarks/finetune_real.py [--steps 300] [--device auto]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medprompt.catalog import SYNAPSE8  # noqa: E402
from medprompt.drafts import draft  # noqa: E402
from medprompt.evaluation import evaluate  # noqa: E402
from medprompt.io.volume import load_volume, read_label_names, write_json  # noqa: E402
from medprompt.model.checkpoint import VIT_CHECKPOINT  # noqa: E402
from medprompt.trainers.finetune import train_finetune  # noqa: E402

REAL = REPO.parent / "shared" / "data" / "real"


def score(checkpoint: Path, organs: list[str]) -> tuple[float, dict[str, float]]:
    case = REAL / "ct_abdomen_a"
    volume = load_volume(case / "image.nii.gz")
    seg = draft(volume, organs, model="medprompt", checkpoint=checkpoint, refine="none")  # the network itself
    ref = nib.load(case / "label.nii.gz")
    names = read_label_names(case / "labels.json")
    ev = evaluate(seg.labels, volume.affine, seg.names, np.asarray(ref.dataobj), ref.affine, names)
    return ev.mdice, {s.name: round(s.dice, 3) for s in ev.scores}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    b_names = read_label_names(REAL / "ct_abdomen_b_dicom" / "labels.json")
    a_names = read_label_names(REAL / "ct_abdomen_a" / "labels.json")
    organs = [c for c in SYNAPSE8 if c in b_names and c in a_names]
    with tempfile.TemporaryDirectory() as tmp:
        ds = Path(tmp) / "datastore"
        (ds / "labels" / "final").mkdir(parents=True)
        shutil.copytree(REAL / "ct_abdomen_b_dicom" / "dicom", ds / "ct_b")
        shutil.copy(REAL / "ct_abdomen_a" / "image.nii.gz", ds / "ct_a.nii.gz")
        shutil.copy(REAL / "ct_abdomen_b_dicom" / "label.nii.gz", ds / "labels" / "final" / "ct_b.nii.gz")
        write_json(ds / "labels" / "final" / "ct_b.json", {"labels": {c: b_names[c] for c in organs}})
        served = Path(tmp) / "model" / "medprompt.pt"
        served.parent.mkdir()
        shutil.copy(VIT_CHECKPOINT, served)
        before, per_before = score(served, organs)
        t = time.perf_counter()
        result = train_finetune(ds, served, steps=args.steps, batch_size=args.batch_size, device=args.device)
        elapsed = time.perf_counter() - t
        after, per_after = score(served, organs)
    print(f"organs: {organs}")
    print(f"ct_abdomen_a mDice before {before:.3f} {per_before}")
    print(f"ct_abdomen_a mDice after  {after:.3f} {per_after}")
    print(f"round: {args.steps} steps x {args.batch_size} in {elapsed:.0f} s; validation (ct_b, trained on) "
          f"{result.previous_score:.3f} -> {result.candidate_score:.3f}; accepted={result.accepted}")


if __name__ == "__main__":
    main()
