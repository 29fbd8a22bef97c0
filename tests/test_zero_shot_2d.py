"""Zero-shot 2D segmentation of real images, through the command line, with LiteMedSAM (real inference).

Three images per task of ../shared/data/real2d (the first three in name order, not chosen by
result), each drafted by ``medprompt infer IMAGE OUT.png --prompts ...`` and scored against its
manual mask. The floors are well under the means measured on the whole development sets
(BENCHMARKS.md, benchmarks/zero_shot_2d.py), so they catch a broken reader, prior or prompt path,
not noise. Skipped when the data or LiteMedSAM's weights are absent.

The breast path's proposal ranking (medprompt/saliency/lesion.py) is also checked on synthetic B-mode
images built here (a planted hypoechoic lesion, a darker no-contact band, alike twin cysts, "+" caliper
cursors around a faint mass), so its behaviour is tested without the real data.
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
        drawn = ("attribute saliency + LiteMedSAM", "attribute saliency + LiteMedSAM proposals")
        assert stage in drawn + ("attribute saliency: nothing found",)
        assert pred.any() == (stage in drawn)
    assert np.mean(scores) >= floor, f"{task}: Dice {np.round(scores, 3).tolist()}"


# -- a focal lesion on ultrasound: proposals ranked by ultrasound physics (synthetic, no real data) --------

Lesion = tuple[float, float, float, float]  # centre row, centre col, radius rows, radius cols (fractions)


def synthetic_us(rng: np.random.Generator, lesions: tuple[Lesion, ...] = ((0.4, 0.45, 0.09, 0.14),),
                 no_contact: bool = True, shape: tuple[int, int] = (240, 320)) -> tuple[np.ndarray, np.ndarray]:
    """uint8 B-mode picture and the mask of its first lesion.

    Speckled fibroglandular tissue (Rayleigh noise on an echogenicity that falls with depth), a bright
    skin line, black margins left and right of the probe's field and below it, hypoechoic oval lesions
    (row, col, radius rows, radius cols as fractions of the image) with posterior enhancement beneath,
    and with ``no_contact`` an anechoic band from the skin line down at the right of the field (a lifted
    probe: darker than any lesion, larger, reaching the field's bottom).
    """
    h, w = shape
    yy, xx = np.mgrid[:h, :w] / np.array([h, w], float)[:, None, None]
    echo = 0.75 - 0.35 * yy + 0.08 * np.sin(18 * yy + 3 * xx)  # tissue layers, attenuation with depth
    echo[yy < 0.04] = 1.3  # skin line
    first = None
    for cy, cx, ry, rx in lesions:
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        below = (yy > cy) & (yy < cy + 3 * ry) & (np.abs(xx - cx) < 0.8 * rx)
        echo[below & ~inside] *= 1.35  # posterior acoustic enhancement
        echo[inside] = 0.18
        first = inside if first is None else first
    if no_contact:
        echo[(yy >= 0.04) & (xx > 0.82) & (xx < 0.95)] = 0.03
    speckle = rng.rayleigh(1.0, size=shape) / np.sqrt(np.pi / 2)
    from scipy import ndimage

    picture = ndimage.gaussian_filter(echo * speckle, 0.8) * 160
    field = (xx > 0.05) & (xx < 0.95) & (yy < 0.92)
    picture[~field] = 0
    return np.clip(picture, 0, 255).astype(np.uint8), first & field


def test_acquired_field_leaves_out_margins_and_no_contact_band_not_a_cyst() -> None:
    """Black margins and the anechoic no-contact band (both connected to the image's edge) are outside the
    field; an enclosed anechoic lesion is inside it."""
    from medprompt.saliency.lesion import acquired_field

    picture, lesion = synthetic_us(np.random.default_rng(0))
    fov = acquired_field(picture.astype(np.float32))
    h, w = picture.shape
    assert not fov[:, : int(0.04 * w)].any() and not fov[int(0.94 * h):].any()  # margins
    assert fov[lesion].mean() > 0.98  # the lesion is tissue in the field
    band = np.zeros_like(lesion)
    band[int(0.1 * h): int(0.85 * h), int(0.84 * w): int(0.93 * w)] = True
    assert fov[band].mean() < 0.1


def test_lesion_score_prefers_a_dark_oval_to_a_band_or_the_field_edge() -> None:
    """Same darkness, three shapes: the oval in the tissue outscores a band along a tissue plane and a
    region running into the no-contact area; a mask as bright as its surroundings scores nothing."""
    from medprompt.saliency.lesion import acquired_field, lesion_score, mask_features

    picture, lesion = synthetic_us(np.random.default_rng(1))
    g = picture.astype(np.float32) / 255
    fov = acquired_field(picture.astype(np.float32))
    h, w = g.shape
    band = np.zeros_like(lesion)
    band[int(0.6 * h): int(0.63 * h), int(0.1 * w): int(0.7 * w)] = True
    edge = np.zeros_like(lesion)
    edge[int(0.3 * h): int(0.5 * h), int(0.72 * w): int(0.9 * w)] = True
    tissue = np.roll(lesion, -int(0.3 * w), axis=1)  # same oval, moved into plain tissue
    scores = {}
    for name, mask in {"lesion": lesion, "band": band, "edge": edge, "tissue": tissue}.items():
        f = mask_features(mask, g, fov)
        scores[name] = lesion_score(f, quality=0.9, stability=0.9)
    assert scores["lesion"] > 2 * max(scores["band"], scores["edge"], scores["tissue"]), scores


@pytest.mark.parametrize("seed", [0, 1])
def test_ultrasound_lesion_found_not_the_no_contact_band(seed: int, tmp_path: Path, sam_available: None) -> None:
    """Through the CLI (real LiteMedSAM): the planted lesion is drawn, not the darker no-contact band
    beside it; the draft says it came from ranked proposals and how sure it is."""
    picture, lesion = synthetic_us(np.random.default_rng(seed))
    source = tmp_path / "us.png"
    Image.fromarray(picture).save(source)
    out = tmp_path / "us_label.png"
    assert main(["infer", str(source), str(out), "--prompts", "breast lesion"]) == 0
    pred = np.asarray(Image.open(out)) > 0
    dice = 2.0 * (pred & lesion).sum() / max(1, pred.sum() + lesion.sum())
    assert dice > 0.8, dice
    sidecar = json.loads((tmp_path / "us_label.json").read_text())
    assert sidecar["stages"]["breast_tumor"] == "attribute saliency + LiteMedSAM proposals"
    assert sidecar["confidence"]["breast_tumor"] > 0.25


def test_two_equal_lesions_make_an_unsure_draft(sam_available: None) -> None:
    """Two alike cysts: either may be drawn, and the draft's confidence says it was a near tie, so weak
    supervision leaves it out; one cyst alone is a confident draft."""
    from medprompt.drafts2d import draft2d
    from medprompt.io.image2d import Image2D

    twins = ((0.4, 0.3, 0.09, 0.12), (0.4, 0.62, 0.09, 0.12))
    sure = {}
    for name, lesions in {"one": twins[:1], "two": twins}.items():
        picture, _ = synthetic_us(np.random.default_rng(3), lesions=lesions, no_contact=False)
        result = draft2d(Image2D(pixels=picture.astype(np.float32), source=name), ["breast lesion"])
        sure[name] = result.confidence["breast_tumor"]
    assert sure["two"] < 0.25 < sure["one"], sure


def test_learnt_map_breaks_near_ties_only(sam_available: None) -> None:
    """A learnt map (the weak model's, as a saliency method) decides between two alike cysts, either way
    it points; it cannot move a clear single lesion to where it points instead."""
    from medprompt.drafts2d import draft2d
    from medprompt.io.image2d import Image2D
    from medprompt.saliency import register

    twins = ((0.4, 0.3, 0.09, 0.12), (0.4, 0.62, 0.09, 0.12))
    masks = {}
    for name, lesions in {"one": twins[:1], "two": twins}.items():
        picture, _ = synthetic_us(np.random.default_rng(3), lesions=lesions, no_contact=False)
        masks[name] = [synthetic_us(np.random.default_rng(3), lesions=(lesion,), no_contact=False)[1]
                       for lesion in lesions]
        for k, pointed in enumerate(synthetic_us(np.random.default_rng(3), lesions=(twin,), no_contact=False)[1]
                                    for twin in twins):
            register("test_learnt", lambda image, entry, m=pointed: m.astype(np.float32), replace=True)
            labels = draft2d(Image2D(pixels=picture.astype(np.float32), source=name), ["breast lesion"],
                             saliency="test_learnt").labels > 0
            overlap = [2.0 * (labels & m).sum() / max(1, labels.sum() + m.sum()) for m in masks[name]]
            if name == "two":  # a near tie: the map's cyst is drawn
                assert overlap[k] > 0.8, (k, overlap)
            else:  # one clear cyst: drawn wherever the map points
                assert overlap[0] > 0.8, (k, overlap)


# -- caliper cursors: where the sonographer measured (medprompt/saliency/calipers.py) ---------------------

def draw_cursor(picture: np.ndarray, row: int, col: int, arm: int = 6, value: int = 230) -> None:
    """A scanner's "+" caliper cursor, 1 px strokes, burnt into ``picture`` in place."""
    picture[row, col - arm: col + arm + 1] = value
    picture[row - arm: row + arm + 1, col] = value


def lesion_ends(lesion: Lesion, shape: tuple[int, int]) -> list[tuple[int, int]]:
    """Row, col of the ends of a lesion's horizontal and vertical diameters (where a sonographer puts cursors)."""
    h, w = shape
    cy, cx, ry, rx = lesion
    return [(round(cy * h), round((cx - rx) * w)), (round(cy * h), round((cx + rx) * w)),
            (round((cy - ry) * h), round(cx * w)), (round((cy + ry) * h), round(cx * w))]


def test_caliper_cursors_found_where_drawn_and_nowhere_else() -> None:
    """Speckle, the skin line and tissue layers make no cursor; drawn "+" cursors are found where they are,
    a lone dash or a ruler tick (a stroke with arms on one side only) is not; boxes follow the cursors."""
    from medprompt.saliency.calipers import ASPECTS, caliper_boxes, find_calipers

    lesion = (0.45, 0.45, 0.12, 0.18)
    for seed in range(3):
        picture, _ = synthetic_us(np.random.default_rng(seed), lesions=(lesion,))
        assert len(find_calipers(picture.astype(np.float32))) == 0
    ends = lesion_ends(lesion, picture.shape)
    for r, c in ends:
        draw_cursor(picture, r, c)
    picture[200, 60:74] = 230  # a dash
    picture[150:170, 290] = 230  # a ruler: a vertical line with ticks to its left only
    picture[160, 284:290] = 230
    found = find_calipers(picture.astype(np.float32))
    assert len(found) == 4, found
    for r, c in ends:
        assert np.abs(found - [r, c]).sum(axis=1).min() <= 2, (r, c, found)
    (box,) = caliper_boxes(found, picture.shape)  # two diameters: their bounding box (and a little room)
    rows, cols = [r for r, _ in ends], [c for _, c in ends]
    assert box[0] <= min(cols) and box[2] >= max(cols) and box[1] <= min(rows) and box[3] >= max(rows)
    assert box[2] - box[0] < 1.2 * (max(cols) - min(cols))
    one_diameter = caliper_boxes(found[np.argsort(found[:, 1])][[0, -1]], picture.shape)
    assert len(one_diameter) == len(ASPECTS)  # its depth is unknown: several boxes, flatter to rounder
    heights = [b[3] - b[1] for b in one_diameter]
    assert heights == sorted(heights) and heights[0] < heights[-1]


def test_caliper_support_is_high_on_the_measured_outline_only() -> None:
    from medprompt.saliency.calipers import caliper_support

    yy, xx = np.mgrid[:100, :100]
    disc = (yy - 50) ** 2 + (xx - 50) ** 2 <= 20 ** 2
    marks = np.array([[50, 30], [50, 70], [30, 50], [70, 50]], np.float32)
    assert caliper_support(disc, marks, 3.0) > 0.6
    assert caliper_support(np.roll(disc, 30, axis=1), marks, 3.0) < 0.3  # the same disc elsewhere
    assert caliper_support(disc, marks[:0], 3.0) == 0.0


def test_cursors_outweigh_echogenicity_only_where_they_lie() -> None:
    """A mask the cursors outline scores as a mass even when isoechoic (no contrast), and beats a darker mask
    no cursor lies on; without cursors on the image the isoechoic mask scores nothing, as before."""
    from medprompt.saliency.lesion import lesion_score

    oval = {"contrast": 0.0, "margin": 1.5, "area": 0.03, "solidity": 1.0, "fill": 1.0, "elongation": 0.7,
            "outside": 0.0, "top": 0.3, "bottom": 0.3}
    dark = {**oval, "contrast": 1.5}
    assert lesion_score(oval, 0.9, 0.9) == 0.0 < lesion_score(dark, 0.9, 0.9)
    measured = lesion_score({**oval, "calipers": 1.0}, 0.9, 0.9)
    assert measured > lesion_score({**dark, "calipers": 0.0}, 0.9, 0.9) > 0.0
    assert lesion_score({**dark, "calipers": 1.0}, 0.9, 0.9) > measured  # a measured dark mass: higher still


def test_measured_lesion_drawn_not_a_darker_one(sam_available: None) -> None:
    """A faint (nearly isoechoic) mass the sonographer measured, beside a darker cyst nobody measured: with
    the cursors the measured mass is drawn; the same picture without them draws the cyst (the cursors,
    not the picture, decide)."""
    from medprompt.drafts2d import draft2d
    from medprompt.io.image2d import Image2D

    faint, dark = (0.42, 0.3, 0.12, 0.17), (0.42, 0.7, 0.09, 0.12)
    picture, _ = synthetic_us(np.random.default_rng(5), lesions=(dark,), no_contact=False)
    h, w = picture.shape
    yy, xx = np.mgrid[:h, :w] / np.array([h, w], float)[:, None, None]
    inside = ((yy - faint[0]) / faint[2]) ** 2 + ((xx - faint[1]) / faint[3]) ** 2 <= 1
    picture[inside] = (picture[inside] * 0.6).astype(np.uint8)  # a little darker than the tissue around it
    cyst = ((yy - dark[0]) / dark[2]) ** 2 + ((xx - dark[1]) / dark[3]) ** 2 <= 1

    def drawn(pixels: np.ndarray) -> np.ndarray:
        return draft2d(Image2D(pixels=pixels.astype(np.float32), source="us"), ["breast lesion"]).labels > 0

    def dice(a: np.ndarray, b: np.ndarray) -> float:
        return 2.0 * (a & b).sum() / max(1, a.sum() + b.sum())

    assert dice(drawn(picture), cyst) > 0.7  # unmeasured: the darker cyst wins on echogenicity
    measured = picture.copy()
    for r, c in lesion_ends(faint, picture.shape):
        draw_cursor(measured, r, c)
    assert dice(drawn(measured), inside) > 0.7
