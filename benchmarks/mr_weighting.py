"""Benchmark: the anatomy prior (and prior + LiteMedSAM) on mr_abdomen as scanned (T1-weighted) and on
contrasts made from it by spin-echo physics (``medprompt.mr_contrasts``: T2 with and without fat suppression,
T1 spin echo, T1 with fat suppressed), to show whether the prior's MR rules follow the series' weighting or
assume one contrast. No labelled T2 abdomen is in ../shared/data, and held-out MRs may be T2 (CHAOS T2-SPIR,
many AMOS MRs). The boundaries are the reference's own, so Dice on a made contrast is no quality figure.

    .venv/bin/python benchmarks/mr_weighting.py [--refine none sam] [--contrasts t1 t2fs t2 t1se t1fs]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medprompt.catalog import SYNAPSE8  # noqa: E402
from medprompt.drafts import draft  # noqa: E402
from medprompt.evaluation import evaluate  # noqa: E402
from medprompt.io.volume import load_volume  # noqa: E402
from medprompt.mr_contrasts import CONTRASTS, made_contrast  # noqa: E402
from medprompt.prior.engine import AnatomyPrior  # noqa: E402

CASE = REPO.parent / "shared" / "data" / "real" / "mr_abdomen"


def weighting_read(volume) -> str:
    """The weighting the prior reads from ``volume`` (``medprompt.prior.landmarks.mr_weighting``)."""
    prior = AnatomyPrior()
    result = prior.segment_work(volume, [prior.catalog["spleen"]])
    return result.landmarks.weighting or "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--refine", nargs="+", default=["none", "sam"], choices=["none", "sam"])
    p.add_argument("--contrasts", nargs="+", default=["t1", *CONTRASTS], choices=["t1", *CONTRASTS],
                   help="t1: mr_abdomen as scanned; the others are made from it")
    args = p.parse_args()
    if not CASE.exists():
        sys.exit(f"error: {CASE} not found")
    ref = nib.load(CASE / "label.nii.gz")
    label = np.asarray(ref.dataobj)
    names = json.loads((CASE / "labels.json").read_text())["labels"]
    t1 = nib.load(CASE / "image.nii.gz")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.contrasts:
            if name == "t1":
                contrast, path = "T1 (as scanned)", CASE / "image.nii.gz"
            else:
                contrast, path = CONTRASTS[name][0], Path(tmp) / f"{name}.nii.gz"
                made = made_contrast(np.asarray(t1.dataobj), label, names, name, t1.header.get_zooms()[:3])
                nib.save(nib.Nifti1Image(made, t1.affine, t1.header), path)
            volume = load_volume(path)
            data = np.asarray(volume.data)
            grey = {n: float(np.median(data[label == names[n]])) for n in ("liver", "spleen", "kidney_left")}
            print(f"\n## {contrast}: median grey liver {grey['liver']:.0f}, spleen {grey['spleen']:.0f}, "
                  f"left kidney {grey['kidney_left']:.0f}; read as {weighting_read(volume)}-weighted")
            for refine in args.refine:
                seg = draft(volume, list(SYNAPSE8), model="prior", refine=refine)
                ev = evaluate(seg.labels, volume.affine, seg.names, label, ref.affine, names)
                cells = ", ".join(f"{s.name} {s.dice:.3f}" for s in ev.scores)
                print(f"prior{' + LiteMedSAM' if refine == 'sam' else ''}: mDice {ev.mdice:.3f}: {cells}", flush=True)


if __name__ == "__main__":
    main()
