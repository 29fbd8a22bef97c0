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


@pytest.mark.parametrize("file, shipped, bad, field", [
    ("pancreas", "like: liver", "like: [1, 2]", "prior.mr.like"),  # like must name a class
    ("spleen", "vs_liver: longer", "vs_liver: darker", "prior.mr.vs_liver"),  # longer or shorter
    ("kidney_left", "weightings: [T2]", "weightings: [PD]", "prior.mr.weightings"),  # of T1 and T2
])
def test_an_mr_attribute_of_the_wrong_kind_is_refused_by_name(tmp_path: Path, file: str, shipped: str, bad: str,
                                                              field: str) -> None:
    text = (Path(__file__).parents[1] / "prompts" / f"{file}.yaml").read_text()
    assert shipped in text
    (tmp_path / f"{file}.yaml").write_text(text.replace(shipped, bad))
    with pytest.raises(PromptError, match=field):
        PromptCatalog.load([tmp_path])


def _shaded_abdomen(fat: float = 500.0, shade: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A T1-like MR slab (3 mm voxels) with mr_abdomen's grey levels: a body ellipse ringed by 15 mm of
    subcutaneous fat (500), muscle-grey tissue inside (40) and a liver-grey organ (100) against the right
    abdominal wall, times ``1 + shade * x`` (x -1..1 left to right). Returns the image, the body and the
    shading."""
    shape = (120, 90, 12)
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    r = np.sqrt(((i - 60) / 50.0) ** 2 + ((j - 45) / 36.0) ** 2)
    body2d = r <= 1.0
    image2d = np.where(body2d, 40.0, 2.0)
    image2d[(r > 1.0 - 5 / 40) & body2d] = fat  # 15 mm of fat under the skin
    image2d[(((i - 30) / 18.0) ** 2 + ((j - 42) / 16.0) ** 2 <= 1.0) & (r <= 1.0 - 5 / 40)] = 100.0  # the "liver"
    rng = np.random.default_rng(0)
    image = np.repeat(image2d[:, :, None], shape[2], 2) * (1 + 0.03 * rng.standard_normal(shape))
    x = np.linspace(-1, 1, shape[0])[:, None, None]
    shading = np.broadcast_to(1 + shade * x, shape)
    return (image * shading).astype(np.float32), np.repeat(body2d[:, :, None], shape[2], 2), shading


def test_the_coil_field_is_read_from_the_subcutaneous_fat_and_leaves_anatomy_alone() -> None:
    from medprompt.prior.coil_field import coil_field

    spacing = (3.0, 3.0, 3.0)
    flat, body, _ = _shaded_abdomen()
    assert coil_field(flat, body, spacing) is None  # a bright organ on one side is not shading: nothing to divide
    mild, body, _ = _shaded_abdomen(shade=0.05)
    assert coil_field(mild, body, spacing) is None  # +-5 %: within what the organs' windows absorb
    shaded, body, shading = _shaded_abdomen(shade=0.3)
    field = coil_field(shaded, body, spacing)
    truth = shading / np.median(shading[body])
    assert np.abs(field[body] / truth[body] - 1).max() < 0.04  # +-30 % recovered to a few per cent
    suppressed, body, _ = _shaded_abdomen(fat=40.0, shade=0.3)  # fat-suppressed: no bright ring to read
    assert coil_field(suppressed, body, spacing) is None


def test_a_coils_left_right_shading_does_not_split_the_mr_organs_windows(real_data: Path, tmp_path: Path) -> None:
    """mr_abdomen times a +-30 % left-right gradient: the prior's organs as on the original. Before the field
    was divided out, the gallbladder fell from 0.54 to 0.04 and the pancreas from 0.62 to 0.30 (with
    LiteMedSAM drawing)."""
    case = real_data / "mr_abdomen"
    src = nib.load(case / "image.nii.gz")
    data = np.asarray(src.dataobj, np.float32)
    shaded = data * (1 + 0.3 * np.linspace(-1, 1, data.shape[0]))[:, None, None].astype(np.float32)
    nib.save(nib.Nifti1Image(shaded, src.affine), tmp_path / "shaded.nii.gz")
    catalog = default_catalog()
    names = ["liver", "gallbladder", "pancreas", "spleen", "kidney_left", "kidney_right", "stomach"]
    entries = [catalog[n] for n in names]
    ref_img = nib.load(case / "label.nii.gz")
    ref_names = json.loads((case / "labels.json").read_text())["labels"]
    dice = {}
    for tag, path in (("original", case / "image.nii.gz"), ("shaded", tmp_path / "shaded.nii.gz")):
        volume = load_volume(path)
        loc = AnatomyPrior(catalog).localize(volume, entries)
        labels = geometry.paint_input_labels([(i + 1, loc.masks[n]) for i, n in enumerate(names)], loc.frame)
        ev = evaluate(labels, volume.affine, {n: i + 1 for i, n in enumerate(names)}, np.asarray(ref_img.dataobj),
                      ref_img.affine, ref_names)
        dice[tag] = {s.name: s.dice for s in ev.scores}
    for name in names:
        assert dice["shaded"][name] >= dice["original"][name] - 0.1, (name, dice)


def test_like_finds_the_named_class_first_even_when_nothing_else_needs_it(tmp_path: Path) -> None:
    """``mr: {like: a}`` reads class a's mask; a must be found even when no other rule anchors on it (the
    pancreas's ``like: liver`` worked only because the liver anchors heights). Class b's own place holds mostly
    muscle-grey tissue (40) and reaches the organ of a's grey (100): with a's window b is drawn in that organ,
    without it b took the muscle's grey."""
    from medprompt.io.volume import Volume

    image, _, _ = _shaded_abdomen()
    prior = "prior: {supported: true, method: organ, %s location: {x: %s, y: [-60, 60]}, volume_ml: [5, 5000]}\n"
    (tmp_path / "organ_a.yaml").write_text("name: organ_a\ndescriptions: [an organ]\n" + prior % ("", "[-140, -40]"))
    (tmp_path / "organ_b.yaml").write_text("name: organ_b\ndescriptions: [another organ]\n"
                                           + prior % ("mr: {like: organ_a},", "[-60, 20]"))
    catalog = PromptCatalog.load([tmp_path])
    volume = Volume(data=image, affine=np.diag([3.0, 3.0, 3.0, 1.0]), modality="MR", source="phantom")
    loc = AnatomyPrior(catalog).localize(volume, [catalog["organ_b"]])
    labels = geometry.paint_input_labels([(1, loc.masks["organ_b"])], loc.frame)
    drawn = image[labels == 1]
    assert drawn.size > 50 and np.median(drawn) > 80, (drawn.size, np.median(drawn) if drawn.size else None)
