"""Benchmark: anatomy-prior draft of a 512x512x200 CT (Synapse 8 prompts): wall time and peak memory.

The volume is the real ``ct_abdomen_a`` resampled to 512x512x200 (so the anatomy is real, the
size is that of a clinical scan). Peak memory is the process's maximum resident set size, read
after the run, minus nothing: it includes Python, torch and the input volume itself.

    .venv/bin/python benchmarks/prior_speed.py [--repeats 3] [--shape 512 512 200]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medprompt.drafts import draft  # noqa: E402
from medprompt.io.volume import Volume  # noqa: E402

CASE = REPO.parent / "shared" / "data" / "real" / "ct_abdomen_a" / "image.nii.gz"


def clinical_size_ct(shape: tuple[int, int, int], path: Path = CASE) -> Volume:
    """The real CT resampled (linear) to a clinical matrix size, with its affine scaled to match."""
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    zoom = [t / s for t, s in zip(shape, data.shape)]
    big = ndi.zoom(data, zoom, order=1).astype(np.float32)
    affine = img.affine.copy()
    affine[:3, :3] = affine[:3, :3] @ np.diag([1 / z for z in zoom])
    return Volume(data=big, affine=affine, source=f"ct_abdomen_a resampled to {shape}", modality="CT")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 200])
    args = p.parse_args()
    if not CASE.exists():
        sys.exit(f"error: {CASE} not found (../shared/data/real beside the checkout)")
    vol = clinical_size_ct(tuple(args.shape))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"volume {vol.data.shape} spacing {np.round(vol.spacing, 3)} mm, input array {vol.data.nbytes / 2**20:.0f} MiB")
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        seg = draft(vol, refine="none")  # the prior alone; benchmarks/sam_speed.py times LiteMedSAM
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    counts = {n: int(np.sum(seg.labels == v)) for n, v in seg.names.items()}
    print(f"draft (8 classes): best {min(times):.2f} s, median {np.median(times):.2f} s over {args.repeats}")
    print(f"peak RSS {peak:.0f} MiB (before drafting, with the volume loaded: {rss_before:.0f} MiB)")
    print("voxels per class:", counts)


if __name__ == "__main__":
    main()
