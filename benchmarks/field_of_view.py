"""Benchmark: drafts of a CT cut to other fields of view, from the pelvis alone up to the whole study.

A study need not show the upper abdomen. ct_abdomen_a reaches from the femoral heads to the lung bases;
its bottom 120, 165, 186 mm... are what a pelvic or lower-abdominal CT would show, and the full study without
its top 36 mm is an abdominal CT that starts below the diaphragm (no lungs). Each crop, as stored and under
the acquisition changes of benchmarks/scanner_shift.py, is drafted by the anatomy prior + LiteMedSAM (the
default) for the Synapse 8 organs and the bladder. Printed per crop: whether the prior read it as ending
below the upper abdomen (within 85 mm above the hip bones' top, landmarks.hip_bones), the millilitres drawn of the organs of the upper abdomen against
the reference's millilitres within the crop, the kidneys' Dice (both as one; nan where the crop holds none) and the
bladder's Dice. Table:
benchmarks/results/field_of_view.md.

    .venv/bin/python benchmarks/field_of_view.py                 # about 4 min on a 2-core CPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from medprompt.catalog import SYNAPSE8, default_catalog  # noqa: E402
from medprompt.io.volume import Volume  # noqa: E402
from medprompt.prior.engine import AnatomyPrior  # noqa: E402
from medprompt.sam import segmenter_factory  # noqa: E402
from medprompt.sam.refine import refine  # noqa: E402
from provenance import footer  # noqa: E402
from scanner_shift import VARIANTS, load_case, variant  # noqa: E402

TOPS_MM = (120, 165, 186, 210, 240, 270, 300, None)  # from the bottom slice; None: the whole study


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS["ct_abdomen_a"]),
                   choices=VARIANTS["ct_abdomen_a"])
    args = p.parse_args()
    data, src_affine, label, names = load_case("ct_abdomen_a")
    print(footer())
    catalog = default_catalog()
    classes = list(SYNAPSE8) + ["urinary_bladder"]
    entries = [catalog[n] for n in classes]
    make = segmenter_factory()
    rows = ["| variant | crop (from the bottom) | read as below the upper abdomen | upper-abdomen organs drawn, ml | "
            "in the reference, ml | kidneys Dice | bladder Dice |", "|---|---|---|---|---|---|---|"]
    for name in args.variants:
        image, affine, reference = variant(name, data, src_affine, label, names)
        step = float(np.linalg.norm(affine[:3, 2]))
        for top_mm in TOPS_MM:
            top = image.shape[2] if top_mm is None else int(round(top_mm / step))
            volume = Volume(np.ascontiguousarray(image[:, :, :top]), affine, f"{name}[:{top}]", "CT")
            crop_ref = reference[:, :, :top]
            loc = AnatomyPrior(catalog).localize(volume, entries)
            below = bool(AnatomyPrior(catalog).segment_work(volume, entries[:1]).landmarks.below_abdomen)
            out = refine(volume, loc, entries, make).labels
            voxel_ml = float(np.prod(np.linalg.norm(affine[:3, :3], axis=0))) / 1000
            drawn = sum(int((out == i + 1).sum()) for i, n in enumerate(classes) if n != "urinary_bladder") * voxel_ml
            truth = sum(int((crop_ref == names[n]).sum()) for n in SYNAPSE8 if n in names) * voxel_ml
            t, f = crop_ref == names["urinary_bladder"], out == classes.index("urinary_bladder") + 1
            dice = 2 * (t & f).sum() / max(1, t.sum() + f.sum()) if t.any() else float("nan")
            kt = np.isin(crop_ref, [names[n] for n in ("kidney_left", "kidney_right")])
            kf = np.isin(out, [classes.index(n) + 1 for n in ("kidney_left", "kidney_right")])
            kidneys = 2 * (kt & kf).sum() / max(1, kt.sum() + kf.sum()) if kt.any() else float("nan")
            crop = "whole" if top_mm is None else f"{round(top * step)} mm"
            print(f"{name:9s} {crop:>6s}  below the upper abdomen {below!s:5s}  upper abdomen drawn {drawn:6.0f} ml "
                  f"(reference {truth:6.0f} ml)  kidneys Dice {kidneys:.3f}  bladder Dice {dice:.3f}", flush=True)
            rows.append(f"| {name} | {crop} | {'yes' if below else 'no'} | {drawn:.0f} | {truth:.0f} | {kidneys:.3f} | {dice:.3f} |")
    table = "\n".join(rows)
    print(table)
    out_path = REPO / "benchmarks" / "results" / "field_of_view.md"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(table + "\n\n" + footer() + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
