"""Benchmark: the anatomy prior (and prior + LiteMedSAM) on mr_abdomen as scanned (T1-weighted) and on MR
contrasts made by spin-echo physics (``medprompt.mr_contrasts``: T2 with and without fat suppression, T1 spin
echo, T1 with fat suppressed) from mr_abdomen and from ct_abdomen_a (another patient, abdomen and pelvis; and
its pelvis alone), to show whether the prior's MR rules follow the series' weighting or assume one contrast.
No labelled T2 abdomen is in ../shared/data, and held-out MRs may be T2 (CHAOS T2-SPIR, many AMOS MRs). The
boundaries are the reference's own, so Dice on a made contrast is no quality figure.

    .venv/bin/python benchmarks/mr_weighting.py [--refine none sam] [--cases ...] [--contrasts t1 t2fs ...]
    .venv/bin/python benchmarks/mr_weighting.py --sweep
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
from medprompt.mr_contrasts import CONTRASTS, made_contrast, made_from_ct  # noqa: E402
from medprompt.prior.engine import AnatomyPrior  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "real"


def weighting_read(volume) -> str:
    """The weighting the prior reads from ``volume`` (``medprompt.prior.landmarks.mr_weighting``)."""
    prior = AnatomyPrior()
    result = prior.segment_work(volume, [prior.catalog["spleen"]])
    return result.landmarks.weighting or "?"


def made_cases(case: str, contrasts: list[str], tmp: Path):
    """(title, image path) of each contrast of ``case``: mr_abdomen as scanned ("t1") and made from its reference;
    ct_abdomen_a (abdomen and pelvis, another patient) made from its CT and reference, and its pelvis alone
    (the slices below the hip bones' top: no organ of the eight is there)."""
    folder = DATA / case.removesuffix("_pelvis")
    ref = nib.load(folder / "label.nii.gz")
    label = np.asarray(ref.dataobj)
    names = json.loads((folder / "labels.json").read_text())["labels"]
    scan = nib.load(folder / "image.nii.gz")
    data, spacing = np.asarray(scan.dataobj), scan.header.get_zooms()[:3]
    if case.endswith("_pelvis"):
        hips = np.isin(label, [names["hip_left"], names["hip_right"]])
        top = int(np.flatnonzero(hips.any(axis=(0, 1)))[-1])
        data, label = data[:, :, :top], label[:, :, :top]
    for name in contrasts:
        if name == "t1":
            if case == "mr_abdomen":
                yield "T1 (as scanned)", folder / "image.nii.gz", label, ref.affine, names
            continue
        make = made_contrast if case == "mr_abdomen" else made_from_ct
        path = tmp / f"{case}_{name}.nii.gz"
        nib.save(nib.Nifti1Image(make(data, label, names, name, spacing), scan.affine, scan.header), path)
        yield CONTRASTS[name][0], path, label, ref.affine, names


SWEEP = [("T1", tr, te, kept) for tr in (300.0, 600.0) for te in (8.0, 15.0) for kept in (1.0, 0.1)] + [
    ("T2", tr, te, kept) for tr in (1500.0, 4000.0) for te in (60.0, 90.0, 120.0) for kept in (1.0, 0.1)]


def sweep(tmp: Path) -> None:
    """The weighting read on spin-echo contrasts over ``SWEEP`` (weighting, TR, TE, fat's signal kept), made
    from both patients: how far from the default contrasts the read holds."""
    wrong = 0
    for expected, tr, te, kept in SWEEP:
        CONTRASTS["sweep"] = (f"TR {tr:.0f} TE {te:.0f}", tr, te, kept)
        read = [weighting_read(load_volume(path)) for case in ("mr_abdomen", "ct_abdomen_a")
                for _, path, *_ in made_cases(case, ["sweep"], tmp)]
        wrong += sum(r != expected for r in read)
        print(f"{expected} TR {tr:.0f} TE {te:.0f} fat kept {kept}: read mr_abdomen {read[0]}, ct_abdomen_a {read[1]}",
              flush=True)
    del CONTRASTS["sweep"]
    print(f"misread {wrong} of {2 * len(SWEEP)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--refine", nargs="+", default=["none", "sam"], choices=["none", "sam"])
    p.add_argument("--cases", nargs="+", default=["mr_abdomen", "ct_abdomen_a", "ct_abdomen_a_pelvis"],
                   choices=["mr_abdomen", "ct_abdomen_a", "ct_abdomen_a_pelvis"])
    p.add_argument("--contrasts", nargs="+", default=["t1", *CONTRASTS], choices=["t1", *CONTRASTS],
                   help="t1: mr_abdomen as scanned; the others are made")
    p.add_argument("--sweep", action="store_true", help="only the weighting read over a grid of TR, TE and fat")
    args = p.parse_args()
    for case in args.cases:
        if not (DATA / case.removesuffix("_pelvis")).exists():
            sys.exit(f"error: {DATA / case.removesuffix('_pelvis')} not found")
    with tempfile.TemporaryDirectory() as tmp:
        if args.sweep:
            sweep(Path(tmp))
            return
        for case in args.cases:
            for contrast, path, label, affine, names in made_cases(case, args.contrasts, Path(tmp)):
                volume = load_volume(path)
                print(f"\n## {case}, {contrast}: read as {weighting_read(volume)}-weighted")
                for refine in args.refine:
                    seg = draft(volume, list(SYNAPSE8), model="prior", refine=refine)
                    ev = evaluate(seg.labels, volume.affine, seg.names, label, affine, names)
                    cells = ", ".join(f"{s.name} {s.dice:.3f}" for s in ev.scores)
                    drawn = sum(int(np.count_nonzero(seg.labels == v)) for v in seg.names.values())
                    print(f"prior{' + LiteMedSAM' if refine == 'sam' else ''}: mDice {ev.mdice:.3f}: {cells}; "
                          f"{drawn} voxels drawn", flush=True)


if __name__ == "__main__":
    main()
