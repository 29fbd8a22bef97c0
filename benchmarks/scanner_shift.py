"""Benchmark: drafts of a real CT made to look as if another scanner or protocol had taken it.

The held-out cases a release is judged on come from other patients, scanners and protocols; two
development CTs cannot show how each localiser copes with that. This takes ct_abdomen_a (its own
reference stays valid) and changes one acquisition property at a time, as physics would:

- ``noise20`` / ``noise40``: white noise of 20 / 40 HU added (a low-dose or thin-slice scan; routine 3 mm
  abdominal CT measures about 10-18 HU in soft tissue, so 40 is an extreme case);
- ``thick6mm``: slices twice as thick, neighbours averaged (a 5-6 mm reconstruction);
- ``contrast``: soft tissue 0-100 HU raised by 50 HU (a crude enhanced phase: organs and vessels brighter).

Each variant is drafted by the anatomy prior + LiteMedSAM and by a MedPrompt model + LiteMedSAM, as it is and
adapted to the study (trainers.study_adaptation, as drafts are); mDice over the Synapse 8 organs.

    .venv/bin/python benchmarks/scanner_shift.py                                   # the shipped model
    .venv/bin/python benchmarks/scanner_shift.py --checkpoint ONLY_B.pt            # a model that never saw ct_a

The shipped model learnt ct_abdomen_a itself, so its "as it is" column is optimistic on these variants;
a leave-one-out model (taught on ct_abdomen_b_dicom only) is the held-out reading.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
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
from medprompt.prior.engine import AnatomyPrior  # noqa: E402
from medprompt.sam import segmenter_factory  # noqa: E402
from medprompt.sam.refine import refine  # noqa: E402
from provenance import footer  # noqa: E402

CASE = REPO.parent / "shared" / "data" / "real" / "ct_abdomen_a"
VARIANTS = ("original", "noise20", "noise40", "thick6mm", "contrast")


def variant(name: str, data: np.ndarray, affine: np.ndarray, label: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, affine, reference) of ``name``; the reference follows the image's grid."""
    rng = np.random.default_rng(0)
    if name.startswith("noise"):
        return data + rng.normal(0, float(name[5:]), data.shape).astype(np.float32), affine, label
    if name == "thick6mm":
        z = data.shape[2] // 2 * 2
        thick = data[:, :, :z].reshape(*data.shape[:2], z // 2, 2).mean(3)
        out = affine.copy()
        out[:, 2] *= 2
        out[:3, 3] += affine[:3, 2] * 0.5  # the centre of each averaged pair
        return thick, out, label[:, :, 0:z:2]
    if name == "contrast":
        soft = (data > 0) & (data < 100)
        return np.where(soft, data + 50, data).astype(np.float32), affine, label
    return data, affine, label


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="the MedPrompt model (default: the shipped one)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = p.parse_args()
    if not CASE.exists():
        sys.exit(f"error: {CASE} not found (../shared/data/real beside the repository)")
    print(footer())
    src, ref = nib.load(CASE / "image.nii.gz"), nib.load(CASE / "label.nii.gz")
    names = read_label_names(CASE / "labels.json")
    data, label = np.asarray(src.dataobj, np.float32), np.asarray(ref.dataobj)
    catalog = default_catalog()
    entries = [catalog[n] for n in SYNAPSE8]
    values = {e.name: i + 1 for i, e in enumerate(entries)}
    make = segmenter_factory()
    rows = ["| variant | prior + LiteMedSAM | model as it is | model adapted | adapted - prior |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="scanner-shift-") as tmp:
        for name in args.variants:
            image, affine, reference = variant(name, data, src.affine, label)
            path = Path(tmp) / f"{name}.nii.gz"
            nib.save(nib.Nifti1Image(image.astype(np.float32), affine), path)
            volume = load_volume(path)
            scores = {}
            for mode in ("prior", "model", "adapted"):
                t = time.perf_counter()
                if mode == "prior":
                    localiser = AnatomyPrior(catalog)
                else:
                    localiser = predictor(args.checkpoint)
                    if mode == "adapted":
                        localiser = study_localiser(localiser, volume, make)
                out = refine(volume, localiser.localize(volume, entries), entries, make)
                ev = evaluate(out.labels, volume.affine, values, reference, affine, names)
                scores[mode] = ev.mdice
                per = ", ".join(f"{s.name} {s.dice:.2f}" for s in ev.scores)
                print(f"{name:9s} {mode:8s} mDice {ev.mdice:.3f} ({time.perf_counter() - t:.0f} s): {per}", flush=True)
            rows.append(f"| {name} | {scores['prior']:.3f} | {scores['model']:.3f} | {scores['adapted']:.3f} | "
                        f"{scores['adapted'] - scores['prior']:+.3f} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
