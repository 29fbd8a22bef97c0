"""Benchmark: label efficiency of MedPromptNet on LiteMedSAM features, on REAL data.

(a) CURVAS CT slices (../shared/data/real2d/curvas_ct2d, 5 patients): corrections of k patients (all their
    slices) in a 2D datastore, the other images unlabelled there; one ``train-finetune`` round from the
    shipped model, as a datastore's first round starts (``--new-network``: from a new one), each corrected
    image with its image-space variants (trainers.augment2d; ``--no-augment``: without) (semi-supervised:
    a second pass learns the first pass's drafts of the unlabelled images, or supervised-only), then the other
    patients' slices drafted as ``medprompt infer IMAGE --model medprompt`` does (the network's map ->
    boxes -> LiteMedSAM) and scored per organ. k = 0 is the zero-shot 2D path (attribute saliency).
    Every rotation of the patients is run (``--rotations`` fewer for a quick look).
(b) 3D: one real CT's reference as corrections (ct_abdomen_b_dicom -> score ct_abdomen_a, and
    ct_abdomen_a -> score ct_abdomen_b_dicom and mr_abdomen), starting from a zero-shot model, scored
    with LiteMedSAM drawing the network's regions, against the zero-shot model on the same case. Both
    models draft as `medprompt infer` does: adapted to a study their rounds did not learn
    (trainers.study_adaptation; ``--no-adapt``: as they are). ``--corrected`` runs one source only, so
    each fold of a held-out check can start from a model that never saw its scored CT.

    .venv/bin/python benchmarks/label_efficiency_real.py --part curvas --ks 0 1 2 4
    .venv/bin/python benchmarks/label_efficiency_real.py --part 3d --zero-shot models/medprompt_sam.pt [--with-unlabelled]
    .venv/bin/python benchmarks/label_efficiency_real.py --part 3d --zero-shot ONLY_B.pt --corrected ct_abdomen_b_dicom --tag held_out_a

Writes a Markdown table (and for CURVAS a PNG plot) into benchmarks/results/ (``--no-augment``: beside
the default run's, with ``_no_augment`` in the name; a CURVAS run of fewer k, rotations or modes than the
whole protocol: with ``_partial``, which git ignores). Each CURVAS rotation prints its own line too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medprompt.catalog import default_catalog  # noqa: E402
from medprompt.model.checkpoint import DEFAULT_CHECKPOINT  # noqa: E402
from provenance import footer  # noqa: E402

REAL2D = REPO.parent / "shared" / "data" / "real2d" / "curvas_ct2d"
REAL = REPO.parent / "shared" / "data" / "real"
ORGANS = ("pancreas", "kidney", "liver")
RESULTS = REPO / "benchmarks" / "results"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / s if s else 1.0


def curvas(ks: list[int], rotations: int, steps: int, init: Path | None, first: int = 0,
           augment: bool = True, modes: tuple[str, ...] = ("semi", "supervised")) -> list[dict]:
    from medprompt.drafts2d import draft2d
    from medprompt.evaluation import ClassScore, DatasetEvaluation, Evaluation
    from medprompt.io.image2d import load_image2d, load_label2d
    from medprompt.model.sam_predictor import saliency_method
    from medprompt.saliency import register
    from medprompt.trainers.sam_rounds import finetune_sam

    if not REAL2D.exists():
        sys.exit(f"error: {REAL2D} not found")
    from medprompt.trainers.finetune import catalog_with

    names = json.loads((REAL2D / "labels.json").read_text())["labels"]
    catalog = catalog_with(list(ORGANS), default_catalog())  # "kidney" (both sides) is a class of these labels
    images = sorted((REAL2D / "images").glob("*.png"))
    patient = {p: p.stem.split("-")[1].split("_")[0] for p in images}
    patients = sorted(set(patient.values()))
    rows = []
    for k in ks:
        for mode in (["zero-shot"] if k == 0 else modes):
            per = {o: [] for o in ORGANS}
            cases = {}  # the same images scored as `medprompt evaluate` scores them (only where the organ is)
            t0 = time.perf_counter()
            for j in range(first, first + min(rotations, len(patients)) if k else 1):
                labelled = {patients[(j + i) % len(patients)] for i in range(k)}
                test = [p for p in images if patient[p] not in labelled]
                if k:
                    work = Path(tempfile.mkdtemp(prefix="curvas_"))
                    final = work / "labels" / "final"
                    final.mkdir(parents=True)
                    for p in images:
                        shutil.copy2(p, work / p.name)
                        if patient[p] in labelled:
                            shutil.copy2(REAL2D / "labels" / p.name, final / p.name)
                            (final / f"{p.stem}.json").write_text(json.dumps({"labels": names}))
                    served = work / "model" / "medprompt.pt"
                    served.parent.mkdir()
                    finetune_sam(work, served, init, None, steps=steps, semi=mode == "semi", augment=augment,
                                 device="cpu", progress=False)
                    register("medprompt", saliency_method(served), replace=True)
                rot = {o: [] for o in ORGANS}
                for p in test:
                    ref, _ = load_label2d(REAL2D / "labels" / p.name)
                    # k = 0 drafts as `medprompt infer IMAGE` does with no model: the default catalog, where
                    # "kidney" is an alias of "kidneys" (two parts); a finetuned model's catalog adds its classes.
                    out = draft2d(load_image2d(p), list(ORGANS), saliency="medprompt" if k else None,
                                  catalog=catalog if k else default_catalog())
                    scores = []
                    for o in ORGANS:
                        drawn, truth = out.labels == out.names[out.resolved[o]], ref == names[o]
                        rot[o].append(dice(drawn, truth))
                        per[o].append(rot[o][-1])
                        d = rot[o][-1] if drawn.any() or truth.any() else float("nan")
                        scores.append(ClassScore(o, d, d / (2 - d), int(truth.sum()), int(drawn.sum())))
                    cases[f"{j}/{p.name}"] = Evaluation(scores)
                if k:
                    print(json.dumps({"k": k, "mode": mode, "rotation": j, "labelled": sorted(labelled),
                                      **{o: round(float(np.mean(v)), 3) for o, v in rot.items()},
                                      "mean": round(float(np.mean([np.mean(v) for v in rot.values()])), 3)}), flush=True)
                    shutil.rmtree(work, ignore_errors=True)
            summary = DatasetEvaluation(cases, list(ORGANS), {}, {}).summary()
            row = {"k": k, "mode": mode, **{o: float(np.mean(v)) for o, v in per.items()},
                   "images": len(per[ORGANS[0]]), "seconds": time.perf_counter() - t0,
                   **{f"{c.name}_held": c.dice_mean for c in summary},
                   **{f"{c.name}_present": c.n for c in summary},
                   **{f"{c.name}_false": len(c.false_positive_cases) for c in summary}}
            row["mean"] = float(np.mean([row[o] for o in ORGANS]))
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def three_d(zero_shot: Path, steps: int, with_unlabelled: bool = False, adapt: bool = True,
            corrected: str | None = None) -> list[dict]:
    """``with_unlabelled``: the scored studies sit in the datastore unlabelled too, as in a real one
    (the round's semi-supervised term reads them; transductive)."""
    import nibabel as nib

    from medprompt.catalog import SYNAPSE8
    from medprompt.drafts import study_localiser
    from medprompt.evaluation import evaluate
    from medprompt.io.volume import load_volume, read_label_names
    from medprompt.model.sam_predictor import load_sam_predictor
    from medprompt.sam import segmenter_factory
    from medprompt.sam.refine import refine
    from medprompt.trainers.sam_rounds import finetune_sam

    cases = {"ct_abdomen_a": "image.nii.gz", "ct_abdomen_b_dicom": "dicom", "mr_abdomen": "image.nii.gz"}
    plans = {"ct_abdomen_b_dicom": ["ct_abdomen_a"], "ct_abdomen_a": ["ct_abdomen_b_dicom", "mr_abdomen"]}
    if corrected is not None:
        plans = {corrected: plans[corrected]}
    catalog = default_catalog()
    make = segmenter_factory()

    def score(model: Path, case: str) -> tuple[float, dict]:
        folder = REAL / case
        ref_img = nib.load(folder / "label.nii.gz")
        ref_names = read_label_names(folder / "labels.json")
        present = [n for n in SYNAPSE8 if n in ref_names]
        entries = [catalog[n] for n in present]
        volume = load_volume(folder / cases[case])
        pred = load_sam_predictor(model)
        loc = (study_localiser(pred, volume, make) if adapt else pred).localize(volume, entries, segmenter_for=make)
        out = refine(volume, loc, entries, make)
        ev = evaluate(out.labels, volume.affine, {e.name: i + 1 for i, e in enumerate(entries)},
                      np.asarray(ref_img.dataobj), ref_img.affine, ref_names)
        return ev.mdice, {s.name: round(s.dice, 3) for s in ev.scores}

    rows = []
    for source, targets in plans.items():
        work = Path(tempfile.mkdtemp(prefix="real3d_"))
        final = work / "labels" / "final"
        final.mkdir(parents=True)
        src = REAL / source
        image = src / cases[source]
        if image.is_dir():
            shutil.copytree(image, work / source)
        else:
            shutil.copy2(image, work / f"{source}.nii.gz")
        ref_names = read_label_names(src / "labels.json")
        shutil.copy2(src / "label.nii.gz", final / f"{source}.nii.gz")
        keep = {n: v for n, v in ref_names.items() if n in catalog}
        (final / f"{source}.json").write_text(json.dumps({"labels": keep}))
        for other in targets if with_unlabelled else []:
            img = REAL / other / cases[other]
            if img.is_dir():
                shutil.copytree(img, work / other)
            else:
                shutil.copy2(img, work / f"{other}.nii.gz")
        served = work / "model" / "medprompt.pt"
        served.parent.mkdir()
        shutil.copy2(zero_shot, served)
        t0 = time.perf_counter()
        result = finetune_sam(work, served, served, served, steps=steps, device="cpu", progress=False)
        for target in targets:
            before, per_before = score(zero_shot, target)
            after, per_after = score(served, target)
            both = [n for n in per_before if n in read_label_names(src / "labels.json")]  # organs both references hold
            row = {"corrected": source, "scored": target, "zero_shot": before, "finetuned": after,
                   "both": both, "zero_shot_both": float(np.mean([per_before[n] for n in both])),
                   "finetuned_both": float(np.mean([per_after[n] for n in both])),
                   "accepted": result.accepted, "validation": [result.previous_score, result.candidate_score],
                   "per_class_before": per_before, "per_class_after": per_after,
                   "seconds": time.perf_counter() - t0}
            print(json.dumps(row), flush=True)
            rows.append(row)
        shutil.rmtree(work, ignore_errors=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ORGANS) + 1, figsize=(14, 3.2), sharey=True)
    for ax, organ in zip(axes, [*ORGANS, "mean"]):
        for mode, style, colour in (("semi", "o-", "C0"), ("supervised", "s--", "C1")):
            pts = sorted((r["k"], r[organ]) for r in rows if r["mode"] in (mode, "zero-shot"))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=colour, label=mode)
            if organ != "mean":  # only the images holding the organ
                held = sorted((r["k"], r[f"{organ}_held"]) for r in rows if r["mode"] in (mode, "zero-shot"))
                ax.plot([p[0] for p in held], [p[1] for p in held], style, color=colour, alpha=0.35,
                        label=f"{mode}, images holding the organ")
        ax.set_title(organ)
        ax.set_xlabel("corrected patients")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Dice on the other patients")
    axes[-1].legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["curvas", "3d"], default="curvas")
    p.add_argument("--ks", nargs="+", type=int, default=[0, 1, 2, 4])
    p.add_argument("--rotations", type=int, default=5, help="CURVAS: patient rotations per k (default: all 5)")
    p.add_argument("--first-rotation", type=int, default=0,
                   help="CURVAS: start at this rotation (more rotations of a k in a second run)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--init", type=Path, default=DEFAULT_CHECKPOINT,
                   help="CURVAS: start from this model (default: the shipped one, as a datastore's first round does)")
    p.add_argument("--new-network", action="store_true", help="CURVAS: start from a new network instead")
    p.add_argument("--modes", nargs="+", choices=["semi", "supervised"], default=["semi", "supervised"],
                   help="CURVAS: which rounds to run for k >= 1 (default: both)")
    p.add_argument("--no-augment", action="store_true",
                   help="CURVAS: corrected images without their image-space variants (trainers.augment2d)")
    p.add_argument("--zero-shot", type=Path, default=DEFAULT_CHECKPOINT,
                   help="3D: the zero-shot model on LiteMedSAM features a round starts from")
    p.add_argument("--with-unlabelled", action="store_true",
                   help="3D: the scored studies are in the datastore unlabelled too (as in a real datastore)")
    p.add_argument("--no-adapt", action="store_true",
                   help="3D: draft with the models as they are, not adapted to each study they never learnt")
    p.add_argument("--corrected", choices=["ct_abdomen_b_dicom", "ct_abdomen_a"],
                   help="3D: only this study's correction (default: both)")
    p.add_argument("--tag", default="", help="3D: results file label_efficiency_3d_TAG.md instead of the default's")
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.part == "curvas":
        rows = curvas(args.ks, args.rotations, args.steps, None if args.new_network else args.init,
                      args.first_rotation, not args.no_augment, tuple(args.modes))
        lines = ["| corrected patients | training | pancreas | kidney | liver | mean | images scored |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['k']} | {r['mode']} | {r['pancreas']:.3f} | {r['kidney']:.3f} | {r['liver']:.3f} | "
                  f"{r['mean']:.3f} | {r['images']} |" for r in rows]
        # The table above scores an image where organ and draft are both empty as 1 (a right absence);
        # this one scores only the images that hold the organ, as `medprompt evaluate` does, and counts
        # the images drawn with an organ they do not hold.
        lines += ["", "Only the images whose reference holds the organ (Dice mean; drawn where absent / absent images):", "",
                  "| corrected patients | training | pancreas | kidney | liver | mean |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['k']} | {r['mode']} | "
                  + " | ".join(f"{r[o + '_held']:.3f} ({r[o + '_false']} / {r['images'] - r[o + '_present']})"
                               for o in ORGANS)
                  + f" | {np.nanmean([r[o + '_held'] for o in ORGANS]):.3f} |" for r in rows]
        stem = "label_efficiency_curvas" + ("_no_augment" if args.no_augment else "")
        # Only the whole protocol replaces the committed results; a quick look (fewer k, rotations or modes)
        # goes beside them, ignored by git, instead of overwriting them.
        whole = sorted(args.ks) == [0, 1, 2, 4] and set(args.modes) == {"semi", "supervised"}
        if not whole or args.rotations < 5 or args.first_rotation:
            stem += "_partial"
        (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n\n" + footer() + "\n")
        plot(rows, RESULTS / f"{stem}.png")
    else:
        rows = three_d(args.zero_shot, args.steps, args.with_unlabelled, not args.no_adapt, args.corrected)
        lines = ["| corrected | scored | zero-shot + SAM | finetuned + SAM | on the organs both references hold |",
                 "|---|---|---|---|---|"]
        lines += [f"| {r['corrected']} | {r['scored']} | {r['zero_shot']:.3f} | {r['finetuned']:.3f} | "
                  f"{r['zero_shot_both']:.3f} -> {r['finetuned_both']:.3f} ({', '.join(r['both'])}) |" for r in rows]
        name = "label_efficiency_3d" + (f"_{args.tag}" if args.tag else "")
        (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n\n" + footer() + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
