"""Benchmark: real CT slices stored as one-slice NIfTI files in Hounsfield units, through the CLI.

A 2D CT set often comes as one NIfTI per slice, in HU, with no modality anywhere (a NIfTI has no
modality field). This makes such a set from the real CTs in ../shared/data/real (every third slice of
ct_abdomen_a that holds one of the five organs both references have; every slice of the 20-slice
ct_abdomen_b_dicom), then drafts ct_abdomen_a's slices with ``medprompt infer --model medprompt`` and
scores them with ``medprompt evaluate``: no model (the 2D attribute prior, on the liver and pancreas), the
shipped zero-shot model, and with ``--finetune`` also a
model finetuned by ``medprompt train-finetune`` on ct_abdomen_b_dicom's slices as corrections (a 2D
datastore). Prints evaluate's per-class table and the times. ``--format nrrd`` stores every slice and
reference as 3D Slicer saves a 2D study instead (an NRRD of X x Y x 1 in LPS): the drafts are then NIfTIs
on the slices' grid, scored against the NRRD references, each read by its own geometry.

    .venv/bin/python benchmarks/ct_slices_nifti.py [--finetune] [--format nifti|nrrd] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medprompt.cli import main as cli  # noqa: E402
from medprompt.io.volume import load_volume  # noqa: E402
from provenance import footer  # noqa: E402

REAL = REPO.parent / "shared" / "data" / "real"
ORGANS = ("aorta", "liver", "pancreas", "spleen", "stomach")  # the Synapse organs both references hold
ATTRIBUTE_ORGANS = ("liver", "pancreas")  # of ORGANS, those with 2D attributes (prompts/*.yaml image2d)
NAMES = {"labels": {organ: value for value, organ in enumerate(ORGANS, 1)}}  # labels.json of the slices' maps
CASES = {"ct_abdomen_a": ("image.nii.gz", 3), "ct_abdomen_b_dicom": ("dicom", 1)}  # (image, every n-th slice)


def write_slices(case: str, images: Path, labels: Path, fmt: str = "nifti") -> int:
    """One int16 HU NIfTI (or 3D Slicer's NRRD) per axial slice holding an organ, with its label map in
    ``labels``."""
    image, every = CASES[case]
    folder = REAL / case
    volume = load_volume(folder / image)
    ref_img = nib.load(folder / "label.nii.gz")
    names = json.loads((folder / "labels.json").read_text())["labels"]
    turn = nib.orientations.ornt_transform(nib.orientations.io_orientation(ref_img.affine),
                                           nib.orientations.io_orientation(volume.affine))
    ref = nib.orientations.apply_orientation(np.asarray(ref_img.dataobj), turn)  # onto the image's axes
    labels_3d = np.zeros(ref.shape, np.uint8)
    for value, organ in enumerate(ORGANS, 1):
        labels_3d[ref == names[organ]] = value
    data = np.rint(np.asarray(volume.data)).astype(np.int16)
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    written = 0
    for k in range(0, data.shape[2], every):
        if not labels_3d[:, :, k].any():
            continue
        affine = volume.affine.copy()
        affine[:3, 3] = volume.affine[:3, :3] @ [0, 0, k] + volume.affine[:3, 3]
        if fmt == "nrrd":
            lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3]
            header = {"space": "left-posterior-superior", "space directions": lps[:, :3].T, "space origin": lps[:, 3]}
            nrrd.write(str(images / f"{case}_{k:03d}.nrrd"), data[:, :, k:k + 1], header)
            nrrd.write(str(labels / f"{case}_{k:03d}.nrrd"), labels_3d[:, :, k:k + 1], header)
        else:
            nib.save(nib.Nifti1Image(data[:, :, k], affine), images / f"{case}_{k:03d}.nii.gz")
            nib.save(nib.Nifti1Image(labels_3d[:, :, k], affine), labels / f"{case}_{k:03d}.nii.gz")
        written += 1
    return written


def start(workdir: Path | None, prefix: str) -> Path:
    """Check the real data is there, print the provenance, and give an empty work folder."""
    if not REAL.exists():
        sys.exit(f"error: {REAL} not found")
    print(footer())
    work = workdir or Path(tempfile.mkdtemp(prefix=prefix))
    shutil.rmtree(work, ignore_errors=True)
    return work


def score(pred: Path, ref: Path, out: Path) -> dict:
    if cli(["evaluate", "--pred", str(pred), "--ref", str(ref), "--json", str(out)]) != 0:
        sys.exit("error: evaluate failed")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--finetune", action="store_true", help="also finetune on ct_abdomen_b_dicom's slices")
    p.add_argument("--workdir", type=Path, default=None, help="keep the slices and results here")
    p.add_argument("--format", choices=("nifti", "nrrd"), default="nifti",
                   help="how the slices and references are stored (nrrd: as 3D Slicer saves a 2D study)")
    args = p.parse_args()
    work = start(args.workdir, "ct_slices_")
    n_test = write_slices("ct_abdomen_a", work / "test", work / "ref", args.format)
    (work / "ref" / "labels.json").write_text(json.dumps(NAMES))
    prompts = ["--prompts", *ORGANS]
    default_path(work / "test", work / "ref", work / "pred_attribute", f"{n_test} slices of ct_abdomen_a")
    runs = {"shipped zero-shot model": None}
    if args.finetune:
        store = work / "datastore"
        n_corr = write_slices("ct_abdomen_b_dicom", store, store / "labels" / "final", args.format)
        (work / "names.json").write_text(json.dumps(NAMES))
        t = time.perf_counter()
        if cli(["train-finetune", "--studies", str(store), "--label-names", str(work / "names.json"),
                "--json", str(work / "round.json")]) != 0:
            sys.exit("error: train-finetune failed")
        round_ = json.loads((work / "round.json").read_text())
        print(f"train-finetune on {n_corr} corrected slices: {time.perf_counter() - t:.0f} s, validation "
              f"{round_['previous_score']:.3f} -> {round_['candidate_score']:.3f}, accepted {round_['accepted']}")
        runs["finetuned on ct_abdomen_b_dicom's slices"] = store / "model" / "medprompt.pt"
    for label, checkpoint in runs.items():
        pred = work / ("pred_" + ("finetuned" if checkpoint else "zero_shot"))
        t = time.perf_counter()
        argv = ["infer", str(work / "test"), str(pred), "--model", "medprompt", *prompts]
        if cli(argv + (["--checkpoint", str(checkpoint)] if checkpoint else [])) != 0:
            sys.exit("error: infer failed")
        seconds = time.perf_counter() - t
        report(f"{label}: {n_test} slices of ct_abdomen_a drafted in {seconds:.1f} s",
               score(pred, work / "ref", work / f"{pred.name}.json"))


def default_path(images: Path, refs: Path, pred: Path, what: str) -> None:
    """``medprompt infer`` with no model: the 2D attribute prior -> boxes -> LiteMedSAM, on the organs that
    have 2D attributes (liver, pancreas), as a user gets it before any model exists."""
    t = time.perf_counter()
    if cli(["infer", str(images), str(pred), "--prompts", *ATTRIBUTE_ORGANS]) != 0:
        sys.exit(f"error: infer failed on {images}")
    seconds = time.perf_counter() - t
    report(f"no model (the 2D attribute prior, the default): {what} drafted in {seconds:.1f} s",
           score(pred, refs, pred.with_name(f"{pred.name}.json")))


def report(title: str, result: dict) -> None:
    """evaluate's JSON as a markdown table of the organs it scored."""
    print(f"\n{title}; mDice {result['mdice']:.3f}")
    print("| class | n | Dice mean +- sd | drawn where absent |")
    print("|---|---|---|---|")
    for organ in (o for o in ORGANS if o in result["classes"]):
        c = result["classes"][organ]
        print(f"| {organ} | {c['n']} | {c['dice_mean']:.3f} +- {c['dice_sd']:.3f} | {len(c['false_positive_cases'])} |")


if __name__ == "__main__":
    main()
