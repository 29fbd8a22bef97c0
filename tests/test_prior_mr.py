"""The prior on MR: a class whose relaxation times equal another's takes that class's intensity window.

On unenhanced MR the pancreas has the liver's T1 and T2 (about 585 and 46 ms at 1.5 T), so it is the
liver's grey on whatever sequence; it used to be found at the mode of its expected place, which on
this T1 MR was retroperitoneal fat (pancreas Dice 0.04). Measured against TotalSegmentator's mask
in ../shared/data/real (skipped without it).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medprompt.catalog import PromptCatalog, default_catalog
from medprompt.errors import PromptError
from medprompt.evaluation import evaluate
from medprompt.io.volume import load_volume
from medprompt.prior.engine import AnatomyPrior
from medprompt.prior import geometry


def test_mr_pancreas_takes_the_livers_window_not_the_fat_around_it(real_data: Path) -> None:
    case = real_data / "mr_abdomen"
    volume = load_volume(case / "image.nii.gz")
    catalog = default_catalog()
    entries = [catalog["liver"], catalog["pancreas"]]
    loc = AnatomyPrior(catalog).localize(volume, entries)
    labels = geometry.paint_input_labels([(2, loc.masks["pancreas"]), (1, loc.masks["liver"])], loc.frame)
    ref_img = nib.load(case / "label.nii.gz")
    ref_names = json.loads((case / "labels.json").read_text())["labels"]
    ev = evaluate(labels, volume.affine, {"liver": 1, "pancreas": 2}, np.asarray(ref_img.dataobj),
                  ref_img.affine, ref_names)
    dice = {s.name: s.dice for s in ev.scores}
    assert dice["pancreas"] >= 0.5, dice  # 0.62 (0.04 with the window taken where it is expected)
    data = np.asarray(volume.data, np.float32)
    pancreas, liver = labels == 2, labels == 1
    # The liver's grey, not the fat's: its median within the liver's 10-90 % range.
    lo, hi = np.percentile(data[liver], [10, 90])
    assert lo <= np.median(data[pancreas]) <= hi


def test_like_must_name_a_class(tmp_path: Path) -> None:
    text = (Path(__file__).parents[1] / "prompts" / "pancreas.yaml").read_text()
    assert "like: liver" in text
    (tmp_path / "pancreas.yaml").write_text(text.replace("like: liver", "like: [1, 2]"))
    with pytest.raises(PromptError, match="prior.mr.like"):
        PromptCatalog.load([tmp_path])
