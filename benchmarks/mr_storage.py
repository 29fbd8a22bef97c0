"""Benchmark: the real abdominal MR stored as uint16 and as float64 at 1e6 scale drafts the same, with every model.

MR intensities have no unit; scanners and converters store them as uint16, float32 or float64 at any
scale. ``mr_abdomen`` (../shared/data/real) is written both ways (uint16: the image shifted to 0 and
x4, rounded; float64: the same values x250, up to about 1e6) and drafted with prior/medprompt x
refine none/sam; the script prints the share of equal voxels and the worst class's Dice between the two.

    .venv/bin/python benchmarks/mr_storage.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CASE = REPO.parent / "shared" / "data" / "real" / "mr_abdomen" / "image.nii.gz"


def main() -> None:
    if not CASE.exists():
        sys.exit(f"error: {CASE} not found (../shared/data/real beside the checkout)")
    os.environ["MEDPROMPT_CACHE"] = tempfile.mkdtemp(prefix="medprompt_mr_storage_")
    from medprompt.drafts import draft
    from medprompt.io.volume import load_volume

    source = nib.load(CASE)
    raw = np.asarray(source.dataobj).astype(np.float64)
    as_uint16 = np.clip(np.round((raw - raw.min()) * 4), 0, 65535).astype(np.uint16)
    folder = Path(tempfile.mkdtemp(prefix="medprompt_mr_storage_"))
    nib.save(nib.Nifti1Image(as_uint16, source.affine), folder / "uint16.nii.gz")
    nib.save(nib.Nifti1Image(as_uint16.astype(np.float64) * 250.0, source.affine), folder / "float64.nii.gz")
    volumes = [load_volume(folder / name) for name in ("uint16.nii.gz", "float64.nii.gz")]
    print(f"{CASE.parent.name}: uint16 up to {as_uint16.max()}, float64 up to {as_uint16.max() * 250.0:.3g}")
    for model in ("prior", "medprompt"):
        for refine in ("none", "sam"):
            start = time.perf_counter()
            a, b = (draft(v, model=model, refine=refine) for v in volumes)
            dice = {name: 2 * np.sum((a.labels == v) & (b.labels == v)) / max(1, np.sum(a.labels == v) + np.sum(b.labels == v))
                    for name, v in a.names.items() if (a.labels == v).any() or (b.labels == v).any()}
            worst = min(dice, key=dice.get)
            print(f"{model}+{refine}: voxels equal {np.mean(a.labels == b.labels):.5f}; worst class Dice "
                  f"{dice[worst]:.4f} ({worst}); {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
