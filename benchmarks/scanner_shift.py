"""Benchmark: drafts of a real CT or MR made to look as if another scanner or protocol had taken it.

The held-out cases a release is judged on come from other patients, scanners and protocols; two
development CTs and one MR cannot show how each localiser copes with that. This takes ct_abdomen_a (or,
with ``--case mr_abdomen``, the MR; each reference stays valid) and changes one acquisition property at a
time, as physics would:

- ``noise20`` / ``noise40``: white noise of 20 / 40 HU added (a low-dose or thin-slice scan; routine 3 mm
  abdominal CT measures about 10-18 HU in soft tissue, so 40 is an extreme case);
- ``thick6mm``: slices twice as thick, neighbours averaged (a 5-6 mm reconstruction);
- ``contrast``: soft tissue 0-100 HU raised by 50 HU (a crude enhanced phase: organs and vessels brighter);
- ``portal`` / ``arterial``: the unenhanced study given a contrast phase organ by organ from its reference
  (``PHASES``, typical enhancement in HU: portal venous at about 70 s, late arterial at about 35 s with the
  renal cortex brighter than the medulla and the spleen's arciform pattern); fat within a label, bile,
  urine and bone unchanged;
- ``portal6mm`` / ``arterial6mm``: a phase in 6 mm slices (the phase made first, then ``thick6mm``): the
  common clinical enhanced CT;
- MR: ``bias_lr30`` / ``bias_ap30``: a receive coil's smooth sensitivity, +-30 % from one side to the other
  (left-right / front-back); ``bias_radial``: 30 % brighter at the centre than at the edges (a body coil at
  3 T); ``noise5``: white noise of 5 % of the 95th percentile.

Each variant is drafted by the anatomy prior + LiteMedSAM and by a MedPrompt model + LiteMedSAM, as it is and
adapted to the study (trainers.study_adaptation, as drafts are); mDice over the Synapse 8 organs. The table
goes to benchmarks/results/scanner_shift_CASE_MODEL.md.

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
from scipy import ndimage as ndi

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

REAL = REPO.parent / "shared" / "data" / "real"
VARIANTS = {"ct_abdomen_a": ("original", "noise20", "noise40", "thick6mm", "contrast", "portal", "arterial",
                             "portal6mm", "arterial6mm"),
            "mr_abdomen": ("original", "bias_lr30", "bias_ap30", "bias_radial", "noise5")}


_MUSCLES = ("gluteus", "autochthon", "iliopsoas")
# HU added to each reference structure (its voxels above -30 HU: a label's fat does not enhance); muscles
# (names starting with _MUSCLES) and bowel as given under "muscle" and "bowel".
PHASES: dict[str, dict[str, float]] = {
    "portal": {"liver": 55, "spleen": 65, "pancreas": 50, "kidney_left": 120, "kidney_right": 120,
               "adrenal_gland_left": 40, "adrenal_gland_right": 40, "aorta": 130, "inferior_vena_cava": 110,
               "portal_vein_and_splenic_vein": 140, "iliac_artery_left": 130, "iliac_artery_right": 130,
               "iliac_vena_left": 100, "iliac_vena_right": 100, "stomach": 15, "muscle": 10, "bowel": 15},
    "arterial": {"liver": 15, "spleen": 60, "pancreas": 80, "kidney_left": 40, "kidney_right": 40,
                 "adrenal_gland_left": 40, "adrenal_gland_right": 40, "aorta": 260, "inferior_vena_cava": 40,
                 "portal_vein_and_splenic_vein": 70, "iliac_artery_left": 260, "iliac_artery_right": 260,
                 "iliac_vena_left": 10, "iliac_vena_right": 10, "stomach": 10, "muscle": 5, "bowel": 10},
}


def phase(name: str, data: np.ndarray, label: np.ndarray, names: dict[str, int]) -> np.ndarray:
    """The unenhanced ``data`` in contrast phase ``name`` (PHASES), from its reference ``label``."""
    out = data.astype(np.float32).copy()
    tissue = data > -30
    groups = {"muscle": [n for n in names if n.startswith(_MUSCLES)],
              "bowel": [n for n in ("small_bowel", "duodenum", "colon") if n in names]}
    for key, hu in PHASES[name].items():
        for structure in groups.get(key, [key]):
            if structure in names:
                out[(label == names[structure]) & tissue] += hu
    if name == "arterial":
        for kidney in ("kidney_left", "kidney_right"):  # corticomedullary: the outer 6 mm (cortex) far brighter
            m = label == names[kidney]
            out[m & ~ndi.binary_erosion(m, iterations=2) & tissue] += 130
        texture = ndi.gaussian_filter(np.random.default_rng(0).normal(0, 1, data.shape), 2.0)
        spleen = label == names["spleen"]  # arciform enhancement: +-30 HU, a few centimetres across
        out[spleen] += (30 / texture.std() * texture[spleen]).astype(np.float32)
    return out


def variant(name: str, data: np.ndarray, affine: np.ndarray, label: np.ndarray,
            names: dict[str, int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, affine, reference) of ``name``; the reference follows the image's grid. ``names`` (class ->
    value of ``label``) is needed for the contrast phases."""
    if name.endswith("6mm") and name != "thick6mm":  # a phase in 6 mm slices, the common clinical reconstruction
        return variant("thick6mm", variant(name[:-3], data, affine, label, names)[0], affine, label)
    if name in PHASES:
        if names is None:
            raise ValueError(f"variant {name} needs the reference's class names")
        return phase(name, data, label, names), affine, label
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
    gx = np.linspace(-1, 1, data.shape[0])[:, None, None]
    gy = np.linspace(-1, 1, data.shape[1])[None, :, None]
    if name == "bias_lr30":
        return data * (1 + 0.3 * gx).astype(np.float32), affine, label
    if name == "bias_ap30":
        return data * (1 + 0.3 * gy).astype(np.float32), affine, label
    if name == "bias_radial":
        return data * (1.3 - 0.5 * (gx ** 2 + gy ** 2)).astype(np.float32), affine, label
    if name == "noise5":
        return data + rng.normal(0, 0.05 * np.percentile(data, 95), data.shape).astype(np.float32), affine, label
    return data, affine, label


def load_case(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """(image as float32, its affine, reference label map, class name -> value) of one real case, or exit
    naming where the case should be."""
    case = REAL / name
    if not case.exists():
        sys.exit(f"error: {case} not found (../shared/data/real beside the repository)")
    src, ref = nib.load(case / "image.nii.gz"), nib.load(case / "label.nii.gz")
    return (np.asarray(src.dataobj, np.float32), src.affine, np.asarray(ref.dataobj),
            read_label_names(case / "labels.json"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="the MedPrompt model (default: the shipped one)")
    p.add_argument("--case", choices=list(VARIANTS), default="ct_abdomen_a")
    p.add_argument("--variants", nargs="+", help="default: every variant of the case")
    args = p.parse_args()
    unknown = set(args.variants or ()) - set(VARIANTS[args.case])
    if unknown:
        sys.exit(f"error: no variant {', '.join(sorted(unknown))} of {args.case}; choose from {', '.join(VARIANTS[args.case])}")
    data, src_affine, label, names = load_case(args.case)
    print(footer())
    catalog = default_catalog()
    entries = [catalog[n] for n in SYNAPSE8]
    values = {e.name: i + 1 for i, e in enumerate(entries)}
    make = segmenter_factory()
    rows = ["| variant | prior + LiteMedSAM | model as it is | model adapted | adapted - prior |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="scanner-shift-") as tmp:
        for name in args.variants or VARIANTS[args.case]:
            image, affine, reference = variant(name, data, src_affine, label, names)
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
    model = args.checkpoint.name if args.checkpoint else "shipped"
    out = REPO / "benchmarks" / "results" / f"scanner_shift_{args.case}_{Path(model).stem}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(rows) + "\n\n" + footer() + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
