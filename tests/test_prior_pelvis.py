"""The pelvis on CT: the hip bones say where a study ends and where the bladder lies.

Without lungs in a study the prior takes its top for the diaphragm; on a pelvic CT that put a
1.4 l "liver" among bowel and muscle. The hip bones (``landmarks.hip_bones``) say where the study
ends, and anchor the bladder's height; these tests check that they are found on a real pelvis and
that what else is bone-dense beside the spine (enhanced kidneys, arms) is not taken for them.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medprompt.catalog import default_catalog
from medprompt.io.volume import Volume, load_volume
from medprompt.prior.engine import AnatomyPrior
from medprompt.prior.landmarks import find_landmarks

UPPER_ABDOMEN = ["liver", "spleen", "stomach", "kidney_right", "kidney_left", "pancreas", "gallbladder", "aorta"]
PELVIS_SLICES = 40  # ct_abdomen_a's bottom 12 cm (3 mm slices): femoral heads to below the iliac crests


def _crop(volume: Volume, top: int) -> Volume:
    return Volume(np.ascontiguousarray(np.asarray(volume.data)[:, :, :top]), volume.affine, f"{volume.source}[:{top}]")


def test_a_pelvic_ct_drafts_no_upper_abdominal_organ_but_still_the_bladder(real_data: Path) -> None:
    case = real_data / "ct_abdomen_a"
    pelvis = _crop(load_volume(case / "image.nii.gz"), PELVIS_SLICES)
    catalog = default_catalog()
    result = AnatomyPrior(catalog).segment_work(pelvis, [catalog[n] for n in UPPER_ABDOMEN + ["urinary_bladder"]])
    assert result.landmarks.below_abdomen
    drawn = {n: int(result.masks[n].sum()) for n in UPPER_ABDOMEN if result.masks[n].any()}
    assert not drawn, f"drafted on a pelvic CT: {drawn} voxels"
    # The pelvis's own organ is still drafted where the reference has it.
    ref = np.asarray(nib.load(case / "label.nii.gz").dataobj)[:, :, :PELVIS_SLICES]
    value = json.loads((case / "labels.json").read_text())["labels"]["urinary_bladder"]
    labels = AnatomyPrior(catalog).predict(pelvis, [catalog["urinary_bladder"]])
    truth, found = ref == value, labels == 1
    dice = 2 * (truth & found).sum() / (truth.sum() + found.sum())
    assert dice >= 0.6, dice


def test_the_bladder_of_a_whole_abdominal_ct_is_placed_by_the_hip_bones(real_data: Path) -> None:
    """On the whole study the bladder was placed 80-330 mm below the liver's tip and its lower half lost
    (Dice 0.58, against 0.82 on the pelvis alone); the hip bones' top, found below the lungs, places it,
    and the spinal column is no longer taken at the pubic symphysis below the sacrum."""
    case = real_data / "ct_abdomen_a"
    volume = load_volume(case / "image.nii.gz")
    catalog = default_catalog()
    result = AnatomyPrior(catalog).segment_work(volume, [catalog["urinary_bladder"]])
    lm = result.landmarks
    assert lm.lungs.any() and lm.hip_top_z is not None
    # Below the sacrum the column is carried down from above, in the back half of the body.
    depth = np.flatnonzero(lm.body[:, :, 0].any(axis=0))
    assert lm.spine_xy[1][0] < depth[0] + 0.5 * (depth[-1] - depth[0])
    ref = np.asarray(nib.load(case / "label.nii.gz").dataobj)
    value = json.loads((case / "labels.json").read_text())["labels"]["urinary_bladder"]
    found = AnatomyPrior(catalog).predict(volume, [catalog["urinary_bladder"]]) == 1
    truth = ref == value
    dice = 2 * (truth & found).sum() / (truth.sum() + found.sum())
    assert dice >= 0.75, dice
    # Hip bones that run on to the study's top end out of view: no anchor there.
    assert _study_landmarks(_crop(volume, PELVIS_SLICES)).hip_top_z is None


def test_a_lower_abdominal_ct_finds_its_kidneys_and_no_liver_in_its_bowel(real_data: Path) -> None:
    """ct_abdomen_a's bottom 240 mm: no lungs, the top 96 mm above the hip bones' top, holding the kidneys
    and the liver's lowest 42 ml. The top was taken for the diaphragm: a 0.8 l "liver" grew from it down
    into the pelvis, the kidneys were placed against its false tip (Dice 0) and the bladder lost to them.
    An organ of the upper abdomen ends above the hip bones, and without the liver's tip the kidneys' height
    is read from the hip bones (``z_hip``)."""
    case = real_data / "ct_abdomen_a"
    volume = _crop(load_volume(case / "image.nii.gz"), 80)
    catalog = default_catalog()
    names = UPPER_ABDOMEN + ["urinary_bladder"]
    result = AnatomyPrior(catalog).segment_work(volume, [catalog[n] for n in names])
    lm = result.landmarks
    assert lm.hip_top_z is not None and not lm.below_abdomen
    voxel_ml = float(np.prod(lm.spacing)) / 1000
    for organ in ("liver", "spleen", "stomach", "kidney_left", "kidney_right"):
        low = np.flatnonzero(result.masks[organ].any(axis=(0, 1)))
        assert not len(low) or low[0] >= lm.hip_top_z, f"{organ} drawn below the hip bones' top"
    drawn = sum(result.masks[n].sum() for n in ("liver", "spleen", "stomach")) * voxel_ml
    assert drawn < 150, f"{drawn:.0f} ml of liver, spleen and stomach drawn (the reference has 42 ml of liver)"
    ref = np.asarray(nib.load(case / "label.nii.gz").dataobj)[:, :, :80]
    values = json.loads((case / "labels.json").read_text())["labels"]
    order = [catalog[n] for n in names]
    labels = AnatomyPrior(catalog).predict(volume, order)
    for organ in ("kidney_left", "kidney_right", "urinary_bladder"):
        truth, found = ref == values[organ], labels == names.index(organ) + 1
        dice = 2 * (truth & found).sum() / (truth.sum() + found.sum())
        assert dice >= 0.6, (organ, dice)


def test_height_is_read_from_the_nearer_landmark_in_the_study() -> None:
    """The bladder from the hip bones, a kidney from the liver's tip, and a kidney from the hip bones
    when the liver's tip is not in the study."""
    from medprompt.prior.landmarks import Landmarks
    from medprompt.prior.rules import spatial_weight

    shape = (20, 20, 100)
    lm = Landmarks(modality="CT", body=np.ones(shape, bool), spine_xy=(np.full(100, 10.0), np.full(100, 10.0)),
                   scale=1.0, lungs=np.zeros(shape, bool), spacing=(2.5, 2.5, 2.5), liver_tip_z=60.0, hip_top_z=20)
    kidney = {"z": [-40, 100], "z_hip": [0, 190]}
    bladder = {"z": [-330, -80], "z_hip": [-170, -20]}

    def peak(location) -> int:
        return int(np.argmax(spatial_weight(lm, shape, location)[0, 0]))

    assert peak(kidney) == 60 + 12  # 30 mm above the liver's tip
    assert peak(bladder) == 0  # 95 mm below the hip bones' top lies below the study: its bottom slice
    lm.liver_tip_z = None
    assert peak(kidney) == 20 + 38  # 95 mm above the hip bones' top


def test_an_organ_of_the_upper_abdomen_is_cut_at_the_hip_bones_or_dropped_when_mostly_below() -> None:
    from medprompt.prior.landmarks import Landmarks
    from medprompt.prior.rules import above_the_hips

    shape = (10, 10, 50)
    lm = Landmarks(modality="CT", body=np.ones(shape, bool), spine_xy=(np.zeros(50), np.zeros(50)),
                   scale=1.0, lungs=np.zeros(shape, bool), spacing=(2.5, 2.5, 2.5), hip_top_z=20)
    upper = {"above_pelvis": True}
    mask = np.zeros(shape, bool)
    mask[2:8, 2:8, 15:50] = True  # 5 of 35 slices below the hip bones' top
    cut = above_the_hips(mask, lm, upper)
    assert not cut[:, :, :20].any() and cut[:, :, 20:].sum() == mask[:, :, 20:].sum()
    assert above_the_hips(mask, lm, {}) is mask  # a pelvic structure keeps what lies in the pelvis
    mask[:, :, :] = False
    mask[2:8, 2:8, 0:30] = True  # two thirds below: grown from the pelvis's grey
    assert not above_the_hips(mask, lm, upper).any()
    lm.hip_top_z = None  # hip bones not in view: nothing to cut at
    assert above_the_hips(mask, lm, upper) is mask


def _study_landmarks(volume: Volume):
    catalog = default_catalog()
    return AnatomyPrior(catalog).segment_work(volume, [catalog["liver"]]).landmarks


@pytest.mark.parametrize("case, image", [("ct_abdomen_a", "image.nii.gz"), ("ct_abdomen_b_dicom", "dicom")])
def test_studies_that_reach_the_upper_abdomen_are_not_read_as_pelvis(real_data: Path, case: str, image: str) -> None:
    volume = load_volume(real_data / case / image)
    studies = [volume]
    if case == "ct_abdomen_a":  # without its lungs too: the top slice then is the upper abdomen's
        studies.append(_crop(volume, 100))
    for study in studies:
        catalog = default_catalog()
        result = AnatomyPrior(catalog).segment_work(study, [catalog["liver"]])
        assert not result.landmarks.below_abdomen, study.source
        assert result.masks["liver"].any(), study.source


SPACING = (2.5, 2.5, 2.5)


def _slab(parts: list[str], slices: int = 40) -> np.ndarray:
    """A synthetic unenhanced CT slab, no lungs: a body, a spine and the bone-dense ``parts`` beside it."""
    nx, ny = 170, 120
    x = (np.arange(nx)[:, None] - nx / 2) * SPACING[0]  # mm, patient right positive
    y = (np.arange(ny)[None, :] - ny / 2) * SPACING[1]  # mm, anterior positive
    plane = np.full((nx, ny), -1000.0, np.float32)
    plane[(x / 200) ** 2 + (y / 120) ** 2 <= 1] = 40.0
    plane[x**2 + (y + 70) ** 2 <= 20**2] = 300.0  # a vertebral body
    for side in (1, -1):
        if "wings" in parts:  # iliac wings: 10 mm plates 115 mm long, from the sacrum to the front
            t = np.linspace(0, 1, 200)
            px, py = side * (60 + 70 * t), -60 + 90 * t
            near = np.min((x[..., None] - px) ** 2 + (y[..., None] - py) ** 2, axis=-1) <= 5**2
            plane[near] = 300.0
        if "kidneys" in parts:  # enhanced kidneys (nephrographic phase, 180 HU), 7 x 5.5 cm across, in fat
            plane[((x - side * 75) / 43) ** 2 + ((y + 20) / 36) ** 2 <= 1] = -100.0
            plane[((x - side * 75) / 35) ** 2 + ((y + 20) / 28) ** 2 <= 1] = 180.0
        if "arms" in parts:  # humeri beside the trunk, within the body outline
            plane[(x - side * 170) ** 2 + y**2 <= 14**2] = 400.0
    return np.repeat(plane[:, :, None], slices, axis=2)


@pytest.mark.parametrize("parts, pelvis", [
    (["wings"], True),
    (["kidneys"], False),
    (["arms"], False),
    (["kidneys", "arms"], False),
])
def test_hip_bones_tell_a_pelvic_study_and_kidneys_or_arms_do_not(parts: list[str], pelvis: bool) -> None:
    assert find_landmarks(_slab(parts), SPACING, "CT").below_abdomen is pelvis


def test_a_study_with_lungs_is_never_read_as_pelvis() -> None:
    data = _slab(["wings"])
    data[60:110, 30:70, -8:] = -850.0  # lung bases in the top 2 cm (aerated lung density, posterior)
    lm = find_landmarks(data, SPACING, "CT")
    assert lm.lungs.any()
    assert not lm.below_abdomen


def test_the_cli_says_which_classes_a_draft_left_empty(real_data: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    from medprompt.cli import main

    pelvis = _crop(load_volume(real_data / "ct_abdomen_a" / "image.nii.gz"), PELVIS_SLICES)
    image = tmp_path / "pelvis.nii.gz"
    nib.save(nib.Nifti1Image(pelvis.data.astype(np.int16), pelvis.affine), image)
    assert main(["infer", str(image), str(tmp_path / "draft.nii.gz"), "--prompts", "liver", "bladder",
                 "--refine", "none"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.endswith('{"liver": 1, "urinary_bladder": 2}  (nothing drawn: liver)'), line

