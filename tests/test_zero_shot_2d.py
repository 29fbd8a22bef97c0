"""Zero-shot 2D segmentation of real images, through the command line, with LiteMedSAM (real inference).

Three images per task of ../shared/data/real2d (the first three in name order, not chosen by
result), each drafted by ``medprompt infer IMAGE OUT.png --prompts ...`` and scored against its
manual mask. The floors are well under the means measured on the whole development sets
(BENCHMARKS.md, benchmarks/zero_shot_2d.py), so they catch a broken reader, prior or prompt path,
not noise. Skipped when the data or LiteMedSAM's weights are absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medprompt.cli import main

REAL2D = Path(os.environ.get("MEDPROMPT_REAL2D", Path(__file__).resolve().parents[2] / "shared" / "data" / "real2d"))

# folder, prompt as a user types it, reference classes (union), mean Dice floor over the three images
CASES = {
    "lungs": ("shenzhen_cxr2d", "lungs", ["lungs"], 0.85),
    "breast": ("busi_us2d", "breast lesion", ["breast_tumor_benign", "breast_tumor_malignant"], 0.25),
    "brain": ("lgg_mr2d", "FLAIR hyperintensity", ["brain_tumor"], 0.6),
}


@pytest.fixture(scope="module")
def sam_available() -> None:
    from medprompt.errors import WeightsError
    from medprompt.sam.weights import bundled_checkpoint

    try:
        bundled_checkpoint()
    except WeightsError as error:
        pytest.skip(str(error))


@pytest.mark.parametrize("task", sorted(CASES))
def test_zero_shot_dice_on_real_images_through_the_cli(task: str, tmp_path: Path, sam_available: None) -> None:
    folder, prompt, classes, floor = CASES[task]
    root = REAL2D / folder
    if not root.is_dir():
        pytest.skip(f"real 2D data not found at {root}")
    values = [json.loads((root / "labels.json").read_text())["labels"][c] for c in classes]
    images = sorted((root / "images").iterdir())[:3]
    scores = []
    for image in images:
        out = tmp_path / f"{image.stem}.png"
        assert main(["infer", str(image), str(out), "--prompts", prompt]) == 0
        pred = np.asarray(Image.open(out)) > 0
        ref = np.isin(np.asarray(Image.open(root / "labels" / f"{image.stem}.png")), values)
        assert pred.shape == ref.shape
        scores.append(2.0 * (pred & ref).sum() / max(pred.sum() + ref.sum(), 1))
        stage = json.loads((tmp_path / f"{image.stem}.json").read_text())["stages"].popitem()[1]
        assert stage in ("attribute saliency + LiteMedSAM", "attribute saliency: nothing found")
        assert pred.any() == (stage == "attribute saliency + LiteMedSAM")
    assert np.mean(scores) >= floor, f"{task}: Dice {np.round(scores, 3).tolist()}"
