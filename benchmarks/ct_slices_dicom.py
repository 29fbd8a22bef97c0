"""Benchmark: a 2D CT set stored as DICOM, one slice per patient, through the CLI.

A 2D CT set in DICOM comes as one file per slice, all in one folder, each file its own series (one
slice per patient). This makes such a set from ct_abdomen_b_dicom's 20 real DICOM files in
../shared/data/real (each given a series, study and patient of its own; pixels and geometry as
scanned), drafts it with ``medprompt infer --model medprompt`` (and with no model: the 2D attribute prior) and
scores it with ``medprompt evaluate`` against the reference resampled onto each file's pixels (nearest). The same 20 slices as
one-slice HU NIfTI files (benchmarks/ct_slices_nifti.py's writer) are drafted and scored beside them:
the two stores hold the same pixels, so the two rows should agree.

    .venv/bin/python benchmarks/ct_slices_dicom.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ct_slices_nifti import NAMES, ORGANS, REAL, default_path, report, score, start, write_slices  # noqa: E402
from medprompt.cli import main as cli  # noqa: E402
from medprompt.io.image2d import load_image2d  # noqa: E402

CASE = REAL / "ct_abdomen_b_dicom"


def write_dicom_set(images: Path, refs: Path) -> int:
    """Each DICOM file of the series as its own one-slice series, and its reference as a PNG of its pixels."""
    import pydicom
    from pydicom.uid import generate_uid

    ref_img = nib.load(CASE / "label.nii.gz")
    ref = np.asarray(ref_img.dataobj)
    names = json.loads((CASE / "labels.json").read_text())["labels"]
    organs = np.zeros(ref.shape, np.uint8)
    for value, organ in enumerate(ORGANS, 1):
        organs[ref == names[organ]] = value
    to_ref = np.linalg.inv(ref_img.affine)
    images.mkdir(parents=True, exist_ok=True)
    refs.mkdir(parents=True, exist_ok=True)
    for n, src in enumerate(sorted(p for p in (CASE / "dicom").iterdir() if p.is_file())):
        ds = pydicom.dcmread(str(src))
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.PatientID = generate_uid(), generate_uid(), f"slice{n:02d}"
        out = images / f"slice{n:02d}.dcm"
        ds.save_as(str(out))
        image = load_image2d(out)
        rows, cols = image.shape
        j, i = np.mgrid[0:rows, 0:cols]
        ras = image.affine @ np.stack([i.ravel(), j.ravel(), np.zeros(i.size), np.ones(i.size)])
        vox = np.rint(to_ref @ ras)[:3].astype(int)
        inside = np.all((vox >= 0) & (vox < np.array(ref.shape)[:, None]), axis=0)
        label = np.zeros(i.size, np.uint8)
        label[inside] = organs[vox[0, inside], vox[1, inside], vox[2, inside]]
        Image.fromarray(label.reshape(rows, cols)).save(refs / f"slice{n:02d}.png")
    return n + 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=None, help="keep the slices and results here")
    args = p.parse_args()
    work = start(args.workdir, "ct_dicom_")
    sets = {"DICOM, one series per slice": (work / "dicom", work / "ref_dicom"),
            "one-slice HU NIfTI": (work / "nifti", work / "ref_nifti")}
    counts = {"DICOM, one series per slice": write_dicom_set(*sets["DICOM, one series per slice"]),
              "one-slice HU NIfTI": write_slices("ct_abdomen_b_dicom", *sets["one-slice HU NIfTI"])}
    for label, (images, refs) in sets.items():
        (refs / "labels.json").write_text(json.dumps(NAMES))
        pred = work / f"pred_{images.name}"
        t = time.perf_counter()
        if cli(["infer", str(images), str(pred), "--model", "medprompt", "--prompts", *ORGANS]) != 0:
            sys.exit(f"error: infer failed on {images}")
        seconds = time.perf_counter() - t
        report(f"{label}: {counts[label]} slices of ct_abdomen_b_dicom drafted in {seconds:.1f} s",
               score(pred, refs, work / f"{pred.name}.json"))
        default_path(images, refs, work / f"attribute_{images.name}", f"{label}, {counts[label]} slices")


if __name__ == "__main__":
    main()
