"""Benchmark: localiser alone vs localiser + LiteMedSAM on the real cases in ../shared/data/real.

Localises once per case, then draws with LiteMedSAM under each setting asked for (embeddings are
cached, so a sweep costs the encoder once). Prints per-class Dice and mDice over the Synapse 8
classes present in each reference.

    .venv/bin/python benchmarks/sam_refine.py                         # the defaults
    .venv/bin/python benchmarks/sam_refine.py --margin 0 3 6 --keep 5 10 20 --step 3
    .venv/bin/python benchmarks/sam_refine.py --model medprompt              # adapted to each study, as drafts are
    .venv/bin/python benchmarks/sam_refine.py --model medprompt --no-adapt   # the model as it is
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medprompt.catalog import SYNAPSE8, default_catalog  # noqa: E402
from medprompt.drafts import predictor, study_localiser  # noqa: E402
from medprompt.evaluation import evaluate  # noqa: E402
from medprompt.io.volume import load_volume, read_label_names  # noqa: E402
from medprompt.prior import geometry  # noqa: E402
from medprompt.sam import segmenter_factory  # noqa: E402
from medprompt.sam.refine import RefineSettings, refine  # noqa: E402
from provenance import footer  # noqa: E402

REAL = REPO.parent / "shared" / "data" / "real"
CASES = {"ct_abdomen_a": "image.nii.gz", "ct_abdomen_b_dicom": "dicom", "mr_abdomen": "image.nii.gz"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="prior", help="localiser: prior or medprompt")
    p.add_argument("--checkpoint", type=Path, default=None, help="--model medprompt: the model file (default: the shipped one)")
    p.add_argument("--no-adapt", action="store_true",
                   help="--model medprompt: draw with the model as it is, not adapted to each study first")
    p.add_argument("--cases", nargs="+", default=list(CASES))
    p.add_argument("--margin", nargs="+", type=float, default=[RefineSettings.margin_mm])
    p.add_argument("--keep", nargs="+", type=float, default=[RefineSettings.keep_within_mm])
    p.add_argument("--step", nargs="+", type=float, default=[RefineSettings.step_mm])
    p.add_argument("--frac", nargs="+", type=float, default=[RefineSettings.margin_frac])
    p.add_argument("--weight", nargs="+", type=float, default=[None],
                   help="localiser weight (default: by modality, see RefineSettings)")
    p.add_argument("--ends", nargs="+", type=int, default=[int(RefineSettings.draw_ends)],
                   help="1: SAM also draws each class's first and last slice; 0: they copy the nearest drawn one")
    p.add_argument("--ratio", nargs="+", type=float, default=[RefineSettings.min_area_ratio])
    args = p.parse_args()
    if not REAL.exists():
        sys.exit(f"error: {REAL} not found")
    print(footer())
    catalog = default_catalog()
    entries = [catalog[n] for n in SYNAPSE8]
    make = segmenter_factory()
    summary: dict[tuple, list[float]] = {}
    for case in args.cases:
        folder = REAL / case
        ref_img = nib.load(folder / "label.nii.gz")
        ref = np.asarray(ref_img.dataobj)
        ref_names = read_label_names(folder / "labels.json")
        volume = load_volume(folder / CASES[case])
        if args.model == "prior":
            from medprompt.prior.engine import AnatomyPrior

            localiser = AnatomyPrior(catalog)
        else:
            localiser = predictor(args.checkpoint)
        t = time.perf_counter()
        if not args.no_adapt:
            localiser = study_localiser(localiser, volume, make)
        loc = localiser.localize(volume, entries)
        t_loc = time.perf_counter() - t
        names = {e.name: i + 1 for i, e in enumerate(entries)}
        alone = geometry.paint_input_labels([(names[n], m) for n, m in loc.masks.items()], loc.frame)
        ev0 = evaluate(alone, volume.affine, names, ref, ref_img.affine, ref_names)
        print(f"\n## {case} {volume.data.shape} ({args.model} {t_loc:.1f} s)")
        print(f"{args.model:28s} mDice {ev0.mdice:.3f}: " + ", ".join(f"{s.name} {s.dice:.3f}" for s in ev0.scores))
        summary.setdefault(("alone",), []).append(ev0.mdice)
        grid = itertools.product(args.margin, args.frac, args.keep, args.step, args.ratio, args.weight, args.ends)
        for margin, frac, keep, step, ratio, weight, ends in grid:
            settings = RefineSettings(margin_mm=margin, margin_frac=frac, keep_within_mm=keep, step_mm=step,
                                      min_area_ratio=ratio, localiser_weight=weight, draw_ends=bool(ends))
            t = time.perf_counter()
            out = refine(volume, loc, entries, make, settings)
            dt = time.perf_counter() - t
            ev = evaluate(out.labels, volume.affine, names, ref, ref_img.affine, ref_names)
            tag = (f"+SAM m{margin:g}+{frac:g} k{keep:g} s{step:g} r{ratio:g} "
                   f"w{settings.weight_for(loc.modality):g} e{ends}")
            print(f"{tag:28s} mDice {ev.mdice:.3f} ({dt:.1f} s, {out.encoded_slices} encoded, "
                  f"{out.cached_slices} cached): " + ", ".join(f"{s.name} {s.dice:.3f}" for s in ev.scores))
            summary.setdefault((margin, frac, keep, step, ratio, weight, ends), []).append(ev.mdice)
    print("\n## mean mDice over cases")
    for key, vals in summary.items():
        print(f"{str(key):28s} {np.mean(vals):.3f}  ({', '.join(f'{v:.3f}' for v in vals)})")


if __name__ == "__main__":
    main()
