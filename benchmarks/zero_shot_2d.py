"""Zero-shot 2D segmentation on ../shared/data/real2d: Dice per image and per task, and seconds per image.

Every image goes through the command line's own path (``medprompt infer IMAGE OUT.png --prompts
...``, run in-process so LiteMedSAM loads once) and the written PNG is scored against the set's
manual mask. For comparison, the same LiteMedSAM is given boxes taken from the manual mask (one per
connected part): the upper bound of any localiser feeding it.

    .venv/bin/python benchmarks/zero_shot_2d.py [--tasks lungs,breast,brain,ct] [--raters r1|all]
        [--overlays benchmarks/results/zero_shot_2d] [--json out.json]

Seconds per image (with an empty LiteMedSAM embedding cache unless --warm-cache: a new image pays for
its encoder run) are the CLI call's wall time and its CPU time (all threads; read, saliency,
LiteMedSAM encoder on the CPU, write), medians, the first call (model load) left out. On a shared
machine the wall time includes waiting for the CPU; CPU time does not. No tuning happens here: it
only measures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL2D = Path(os.environ.get("MEDPROMPT_REAL2D", ROOT.parent / "shared" / "data" / "real2d"))

# task key -> (folder, [(prompt, reference class names in labels.json (union), class drafted)])
TASKS = {
    "lungs": ("shenzhen_cxr2d", [("lungs", ["lungs"], "lungs")]),
    "breast": ("busi_us2d", [("breast tumor", ["breast_tumor_benign", "breast_tumor_malignant"], "breast_tumor")]),
    "brain": ("lgg_mr2d", [("brain tumor", ["brain_tumor"], "brain_tumor")]),
    "ct": ("curvas_ct2d", [("liver", ["liver"], "liver"), ("kidneys", ["kidney"], "kidneys"),
                           ("pancreas", ["pancreas"], "pancreas")]),
}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum() + b.sum())
    return float("nan") if total == 0 else 2.0 * int((a & b).sum()) / total


def reference(folder: Path, image: Path, names: list[str]) -> np.ndarray:
    labels_doc = json.loads((folder / "labels.json").read_text())
    values = [labels_doc["labels"][n] for n in names]
    label = np.asarray(Image.open(folder / "labels" / f"{image.stem}.png"))
    return np.isin(label, values)


def reference_boxes(mask: np.ndarray) -> np.ndarray:
    """One box per connected part of the manual mask (parts under 2 % of it left out)."""
    labels, n = ndimage.label(mask)
    boxes = []
    for i, region in enumerate(ndimage.find_objects(labels), start=1):
        if (labels[region] == i).sum() >= 0.02 * mask.sum():
            boxes.append([region[1].start, region[0].start, region[1].stop - 1, region[0].stop - 1])
    return np.asarray(boxes, np.float32)


def upper_bound(image_path: Path, entry_name: str, mask: np.ndarray, make) -> float:
    from medprompt.catalog import default_catalog
    from medprompt.sam.preprocess import sam_pixels
    from medprompt.io.image2d import load_image2d
    from medprompt.saliency.attribute import modality_for, working_image

    if not mask.any():
        return float("nan")
    image = load_image2d(image_path)
    entry = default_catalog()[entry_name]
    modality = modality_for(image, entry)
    seg = make(sam_pixels(working_image(image, entry, modality), modality)[None], image.pixel_mm)
    logits = seg.predict(0, boxes=reference_boxes(mask)).numpy()
    return dice(logits.max(axis=0) > 0, mask)


def shrink_overlays(source: Path, target: Path, side: int = 384) -> None:
    """The CLI's overlay PNGs as small JPEGs (a results folder in git stays small)."""
    target.mkdir(parents=True, exist_ok=True)
    for png in sorted(source.glob("*.png")):
        picture = Image.open(png).convert("RGB")
        picture.thumbnail((side, side))
        picture.save(target / f"{png.stem}.jpg", quality=85)
        png.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="lungs,breast,brain,ct")
    parser.add_argument("--raters", default="r1", help="CT slices: r1 (default), or all")
    parser.add_argument("--saliency", default=None, help="saliency method (default: attribute)")
    parser.add_argument("--overlays", type=Path, default=None,
                        help="write overlays of the first --overlay-count images per task here (small JPEGs)")
    parser.add_argument("--overlay-count", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--warm-cache", action="store_true",
                        help="use the usual LiteMedSAM embedding cache (default: an empty one, so every image "
                             "pays for its encoder run, as a new image does)")
    args = parser.parse_args()
    if not REAL2D.is_dir():
        print(f"real 2D data not found at {REAL2D}; nothing to measure", file=sys.stderr)
        return 1
    from medprompt.cli import main as cli
    from medprompt.io.image2d import find_images2d
    from medprompt.sam import segmenter_factory

    cold = None
    if not args.warm_cache:
        cold = tempfile.TemporaryDirectory()
        os.environ["MEDPROMPT_CACHE"] = cold.name  # before the process-wide cache is first made
    make = segmenter_factory(None, "cpu")
    report: dict = {"tasks": {}}
    first = True
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.tasks.split(","):
            folder_name, classes = TASKS[key]
            folder = REAL2D / folder_name
            images = find_images2d(folder / "images")
            if key == "ct" and args.raters != "all":
                images = [p for p in images if p.name.startswith(args.raters + "-")]
            rows = []
            for index, image in enumerate(images):
                for prompt, ref_names, drafted in classes:
                    out = Path(tmp) / f"{image.stem}_{drafted}.png"
                    argv = ["infer", str(image), str(out), "--prompts", prompt]
                    if args.saliency:
                        argv += ["--saliency", args.saliency]
                    if args.overlays is not None and index < args.overlay_count:
                        argv += ["--overlay", str(Path(tmp) / "overlays")]
                    start, cpu = time.perf_counter(), time.process_time()
                    code = cli(argv)
                    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
                    if code != 0:
                        raise SystemExit(f"medprompt infer failed on {image}")
                    mask = reference(folder, image, ref_names)
                    pred = np.asarray(Image.open(out)) > 0
                    rows.append({"image": image.name, "class": drafted, "dice": dice(pred, mask),
                                 "ref_boxes_dice": upper_bound(image, drafted, mask, make),
                                 "seconds": None if first else seconds, "cpu_seconds": None if first else cpu,
                                 "ref_pixels": int(mask.sum())})
                    first = False
                    if args.overlays is not None and index < args.overlay_count:
                        shrink_overlays(Path(tmp) / "overlays", args.overlays / folder_name)
                    r = rows[-1]
                    print(f"{key:7s} {image.name:32s} {drafted:13s} Dice {r['dice']:.3f}  ref boxes {r['ref_boxes_dice']:.3f}"
                          f"  {seconds:5.2f} s (CPU {cpu:5.2f} s)", flush=True)
            report["tasks"][key] = rows
    print("\n| task | images | class | zero-shot Dice (mean) | LiteMedSAM with reference boxes | s / image (wall) "
          "| CPU s / image |")
    print("|---|---|---|---|---|---|---|")
    for key, rows in report["tasks"].items():
        for drafted in dict.fromkeys(r["class"] for r in rows):
            sel = [r for r in rows if r["class"] == drafted]
            d = np.nanmean([r["dice"] for r in sel])
            ub = np.nanmean([r["ref_boxes_dice"] for r in sel])
            secs = [r["seconds"] for r in sel if r["seconds"] is not None]
            cpus = [r["cpu_seconds"] for r in sel if r["cpu_seconds"] is not None]
            print(f"| {key} ({TASKS[key][0]}) | {len(sel)} | {drafted} | {d:.3f} | {ub:.3f} | "
                  f"{np.median(secs) if secs else float('nan'):.2f} | {np.median(cpus) if cpus else float('nan'):.2f} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if cold is not None:
        cold.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
