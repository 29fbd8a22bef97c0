"""Benchmark: the anatomy prior (and prior + LiteMedSAM) on mr_abdomen as scanned (T1-weighted) and on a
T2-weighted, fat-suppressed contrast made from it, to show how much of the prior's MR rules assume T1 contrast.

No T2-weighted abdominal MR with labels is in ../shared/data, and held-out MRs may be T2 (CHAOS T2-SPIR, many
AMOS MRs). The T2 contrast is made from physics, not from a scan: each tissue of the reference gets its
spin-echo signal S = PD (1 - exp(-TR/T1)) exp(-TE/T2) at 1.5 T (relaxation times from de Bazelaire et al.,
Radiology 2004, and Stanisz et al., MRM 2005; TR 1700 ms, TE 80 ms, fat suppressed to a tenth), and the T1
image's texture within each tissue (its ratio to the tissue's median, clipped to 0.6-1.4) is kept. Vessels are
flow voids. It tests whether a rule follows the physics (the liver is darker than the spleen and kidneys on
T2, brighter on T1), not image quality: the boundaries are the reference's own, so Dice on it is no quality
figure.

    .venv/bin/python benchmarks/mr_weighting.py [--refine none sam]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from math import exp
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medprompt.catalog import SYNAPSE8  # noqa: E402
from medprompt.drafts import draft  # noqa: E402
from medprompt.evaluation import evaluate  # noqa: E402
from medprompt.io.volume import load_volume  # noqa: E402

CASE = REPO.parent / "shared" / "data" / "real" / "mr_abdomen"
TR, TE, FAT_SUPPRESSION = 1700.0, 80.0, 0.1
# proton density (relative), T1 and T2 (ms) at 1.5 T
TISSUE = {
    "liver": (0.70, 586, 46), "pancreas": (0.72, 584, 46), "spleen": (0.80, 1057, 79),
    "kidney_left": (0.85, 1190, 86), "kidney_right": (0.85, 1190, 86),  # cortex and medulla averaged
    "gallbladder": (0.95, 2800, 500), "stomach": (0.85, 1500, 150),  # bile; fluid-filled lumen and wall
    "adrenal_gland_left": (0.70, 800, 60), "adrenal_gland_right": (0.70, 800, 60),
    "small_bowel": (0.80, 1000, 90), "duodenum": (0.80, 1000, 90), "colon": (0.80, 1000, 80),
    "spinal_cord": (0.75, 745, 74), "intervertebral_discs": (0.80, 1100, 110),
    "autochthon_left": (0.70, 856, 27), "autochthon_right": (0.70, 856, 27),
    "iliopsoas_left": (0.70, 856, 27), "iliopsoas_right": (0.70, 856, 27), "lung_right": (0.10, 1200, 40),
}
FIXED = {"aorta": 0.02, "inferior_vena_cava": 0.02,  # flow voids
         "portal_vein_and_splenic_vein": 0.08, "vertebrae": 0.06}  # slow flow; fatty marrow, fat suppressed
FAT = (0.90, 343, 58)
SOFT = (0.70, 856, 35)  # unlabelled soft tissue: muscle-like
FAT_T1_ABOVE, SOFT_T1_ABOVE = 300, 40  # grey on the T1 image that marks unlabelled fat and soft tissue


def signal(pd: float, t1: float, t2: float) -> float:
    """Spin-echo signal at ``TR``, ``TE``."""
    return pd * (1 - exp(-TR / t1)) * exp(-TE / t2)


def t2_contrast(image: np.ndarray, label: np.ndarray, names: dict[str, int], seed: int = 0) -> np.ndarray:
    """The T2-weighted, fat-suppressed image of the tissues in ``label`` with ``image``'s texture."""
    a = image.astype(float)
    out = np.zeros_like(a)

    def put(mask: np.ndarray, s: float) -> None:
        if mask.any():
            med = float(np.median(a[mask])) or 1.0
            out[mask] = s * np.clip(a[mask] / med, 0.6, 1.4)

    for name, value in names.items():
        if name in TISSUE:
            put(label == value, signal(*TISSUE[name]))
        elif name in FIXED:
            put(label == value, FIXED[name])
    free = label == 0
    put(free & (a > FAT_T1_ABOVE), signal(*FAT) * FAT_SUPPRESSION)
    put(free & (a > SOFT_T1_ABOVE) & (a <= FAT_T1_ABOVE), signal(*SOFT))
    noise = np.abs(np.random.default_rng(seed).normal(0, 8, out.shape))
    return (out / out.max() * 800 + noise).astype(np.int16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--refine", nargs="+", default=["none", "sam"], choices=["none", "sam"])
    args = p.parse_args()
    if not CASE.exists():
        sys.exit(f"error: {CASE} not found")
    ref = nib.load(CASE / "label.nii.gz")
    label = np.asarray(ref.dataobj)
    names = json.loads((CASE / "labels.json").read_text())["labels"]
    t1 = nib.load(CASE / "image.nii.gz")
    with tempfile.TemporaryDirectory() as tmp:
        t2_path = Path(tmp) / "t2.nii.gz"
        nib.save(nib.Nifti1Image(t2_contrast(np.asarray(t1.dataobj), label, names), t1.affine, t1.header), t2_path)
        for contrast, path in (("T1 (as scanned)", CASE / "image.nii.gz"), ("T2, fat suppressed (made)", t2_path)):
            volume = load_volume(path)
            data = np.asarray(volume.data)
            grey = {n: float(np.median(data[label == names[n]])) for n in ("liver", "spleen", "kidney_left")}
            print(f"\n## {contrast}: median grey liver {grey['liver']:.0f}, spleen {grey['spleen']:.0f}, "
                  f"left kidney {grey['kidney_left']:.0f}")
            for refine in args.refine:
                seg = draft(volume, list(SYNAPSE8), model="prior", refine=refine)
                ev = evaluate(seg.labels, volume.affine, seg.names, label, ref.affine, names)
                cells = ", ".join(f"{s.name} {s.dice:.3f}" for s in ev.scores)
                print(f"prior{' + LiteMedSAM' if refine == 'sam' else ''}: mDice {ev.mdice:.3f}: {cells}", flush=True)


if __name__ == "__main__":
    main()
