"""Finetuning MedPromptNet on 2D datastores: self-training on images without a teacher, and a learnt
probability map turned into prompts (an absent class draws nothing).

No LiteMedSAM: the student's softmax is given, and drafts keep the saliency regions (``refine="none"``);
real quality on real CT slices is measured in benchmarks/label_efficiency_real.py (BENCHMARKS.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medprompt.model import sam_features as sf
from medprompt.sam.preprocess import SliceGeometry
from medprompt.trainers.cells import CellStudy


def _study(target: torch.Tensor, weight: torch.Tensor, name: str) -> CellStudy:
    k = target.shape[0]
    return CellStudy(name, torch.zeros(k, 256, 64, 64).half(), torch.zeros(k, 3, dtype=torch.long),
                     sf.cell_coords(SliceGeometry.for_slice((64, 64))), target.half(), weight.half(),
                     torch.tensor([True]), False, list(range(k)))


def test_self_training_weighs_the_students_confident_classes_alike_where_no_teacher_spoke(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A blank image (no teacher: a placeholder background target at weight 0): the student's confident
    background and confident organ cells become targets at the same weight, unsure cells stay out.
    On a study with a teacher, agreement lifts the teacher's weight to 1."""
    from medprompt.trainers import sam_rounds

    student = torch.zeros(1, 2, 64, 64)
    student[:, 0], student[:, 1] = 0.5, 0.5  # unsure everywhere ...
    student[:, 0, :8], student[:, 1, :8] = 0.97, 0.03  # ... but sure of background in the top rows
    student[:, 0, 30:34, 30:34], student[:, 1, 30:34, 30:34] = 0.02, 0.98  # and of the organ here
    monkeypatch.setattr(sam_rounds, "student_cells", lambda *a, **k: student)
    placeholder = torch.zeros(1, 2, 64, 64)
    placeholder[:, 0] = 1
    blank = _study(placeholder, torch.zeros(1, 64, 64), "blank")
    taught = _study(placeholder, torch.full((1, 64, 64), 0.3), "taught")  # a teacher said background at 0.3
    out_blank, out_taught = sam_rounds.self_trained([blank, taught], Path("unused.pt"), np.zeros((1, 8)), "cpu")

    w = out_blank.weight.float()[0]
    assert torch.all(w[:8] == sam_rounds.SELF_WEIGHT)  # confident background: pseudo-label, not full weight
    assert torch.all(w[30:34, 30:34] == sam_rounds.SELF_WEIGHT)  # confident organ: the same weight
    assert torch.all(w[10:30] == 0)  # unsure: still nothing
    assert torch.all(out_blank.target.float()[0, 1, 30:34, 30:34] == 1)
    wt = out_taught.weight.float()[0]
    assert torch.all(wt[:8] == 1)  # teacher and a sure student agree
    assert torch.allclose(wt[30:34, 30:34], torch.tensor(0.3), atol=1e-3)  # they disagree: the teacher's stays
    assert torch.allclose(wt[10:30], torch.tensor(0.3), atol=1e-3)  # unsure student: the teacher's stays


def _image(path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.full((64, 96), 80, np.uint8)).save(path)


@pytest.mark.parametrize("probability", [True, False])
def test_a_probability_map_draws_a_class_only_where_it_is_more_likely_than_not(tmp_path: Path,
                                                                               probability: bool) -> None:
    """A softmax map (``probability = True``) whose class stays below 0.5 everywhere draws nothing (the
    network says absent); once it passes 0.5 the extent is k-means' as for any map (wider than the
    > 0.5 core). A map of another kind is split by k-means whatever its values."""
    from medprompt.drafts2d import draft2d
    from medprompt.io.image2d import load_image2d
    from medprompt.saliency import register

    yy, xx = np.mgrid[:64, :96]
    r2 = (yy - 30) ** 2 + (xx - 40) ** 2
    halo, ring = r2 <= 15 ** 2, r2 <= 10 ** 2
    faint = np.where(halo, 0.3, 0.0).astype(np.float32)
    strong = np.select([r2 <= 6 ** 2, ring, halo], [0.8, 0.45, 0.1], 0.0).astype(np.float32)
    current = {}

    def learnt(image, entry):
        return current["map"]

    if probability:
        learnt.probability = True
    register("test_learnt", learnt, replace=True)
    _image(tmp_path / "a.png")
    image = load_image2d(tmp_path / "a.png")

    current["map"] = faint
    out_faint = draft2d(image, ["liver"], saliency="test_learnt", refine="none")
    current["map"] = strong
    out_strong = draft2d(image, ["liver"], saliency="test_learnt", refine="none")
    assert np.array_equal(out_strong.labels == 1, ring)  # k-means' extent: core and the 0.45 ring
    if probability:
        assert not out_faint.labels.any() and "nothing found" in out_faint.stages["liver"]
    else:
        assert np.array_equal(out_faint.labels == 1, halo)  # k-means always finds a foreground


class _Drawer:
    """Stands in for LiteMedSAM: every box gets the same mask (logits +1 on ``mask``, -1 elsewhere)."""

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask

    def predict(self, k: int, boxes: np.ndarray, points=None, point_labels=None) -> torch.Tensor:
        one = torch.from_numpy(np.where(self.mask, 1.0, -1.0).astype(np.float32))
        return one[None].repeat(len(boxes), 1, 1)


@pytest.mark.parametrize("probability", [True, False])
def test_a_probability_maps_mask_is_kept_only_if_more_probable_than_not_inside(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, probability: bool) -> None:
    """A softmax map sure of a small core (0.9) draws its box; SAM's mask is kept when the class is more
    probable than not on average inside it (the core and a rim), dropped when it is mostly the faint
    surroundings (a plausible organ around a few sure cells). Another kind of map keeps SAM's mask."""
    import medprompt.sam as sam
    from medprompt.drafts2d import draft2d
    from medprompt.io.image2d import load_image2d
    from medprompt.saliency import register

    yy, xx = np.mgrid[:64, :96]
    r2 = (yy - 30) ** 2 + (xx - 40) ** 2
    prob = np.select([r2 <= 6 ** 2, r2 <= 20 ** 2], [0.9, 0.2], 0.0).astype(np.float32)

    def learnt(image, entry):
        return prob

    if probability:
        learnt.probability = True
    register("test_learnt", learnt, replace=True)
    _image(tmp_path / "a.png")
    image = load_image2d(tmp_path / "a.png")
    for radius, kept in ((8, True), (18, False)):  # mean inside: 0.60 (core + rim) / 0.28 (mostly faint)
        drawn = r2 <= radius ** 2
        monkeypatch.setattr(sam, "segmenter_factory", lambda *a, drawn=drawn, **k: lambda px, mm: _Drawer(drawn))
        out = draft2d(image, ["liver"], saliency="test_learnt")
        if kept or not probability:
            assert np.array_equal(out.labels == 1, drawn), radius
        else:
            assert not out.labels.any() and "less probable than not" in out.stages["liver"]
            assert out.prompts["liver"].empty
            # a round's teacher keeps every mask (its cells are weighed against the map instead)
            teacher = draft2d(image, ["liver"], saliency="test_learnt", probable_masks_only=False)
            assert np.array_equal(teacher.labels == 1, drawn)


class _Stand:
    """Stands in for LiteMedSAM's segmenter where only the slice geometry matters (no embedding, no mask)."""

    def __init__(self, slices: np.ndarray, pixel_mm) -> None:
        self.geometry = SliceGeometry.for_slice(slices.shape[1:], tuple(pixel_mm)[:2])

    def prepare(self, ks, progress: bool = False) -> None:
        pass

    def embedding(self, k: int) -> torch.Tensor:
        return torch.zeros(256, 64, 64).half()


def test_a_thin_organ_is_judged_against_what_a_perfect_cell_map_of_it_would_hold(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The network's map is one value per cell of LiteMedSAM's frame, so even a perfect map of a thin organ
    stays well below 1 inside it (its rim cells are part organ), and a large organ's does not. A mask is kept
    when the map holds more than half of what that perfect map would: a thin mask whose map averages 0.45
    inside it was dropped as "less probable than not", and is kept now."""
    from PIL import Image

    import medprompt.sam as sam
    from medprompt.drafts2d import draft2d
    from medprompt.io.image2d import load_image2d
    from medprompt.model.sam_predictor import perfect_map, saliency_method
    from medprompt.saliency import register

    Image.fromarray(np.full((512, 512), 80, np.uint8)).save(tmp_path / "a.png")
    image = load_image2d(tmp_path / "a.png")  # one cell of the 64 x 64 grid is 8 x 8 pixels here
    yy, xx = np.mgrid[:512, :512]
    thin = (abs(yy - 250) <= 8) & (abs(xx - 250) <= 60)  # 17 pixels: about two cells thick
    large = (yy - 250) ** 2 + (xx - 250) ** 2 <= 120 ** 2
    held = {name: float(perfect_map(image, m)[m].mean()) for name, m in (("thin", thin), ("large", large))}
    assert held["large"] > 0.95 and held["thin"] < 0.8, held
    assert saliency_method().perfect is perfect_map  # the network's 2D map says what its perfect map is

    prob = np.where(thin, 0.45, 0.0).astype(np.float32)  # under 0.5 inside, yet over half of the perfect map's

    def learnt(image, entry):
        return prob

    learnt.probability = True
    register("test_thin", learnt, replace=True)
    monkeypatch.setattr(sam, "segmenter_factory", lambda *a, **k: lambda px, mm: _Drawer(thin))
    prob[250, 250] = 0.9  # present: somewhere more likely than not
    assert prob[thin].mean() < 0.5
    dropped = draft2d(image, ["liver"], saliency="test_thin")
    assert not dropped.labels.any() and "less probable than not" in dropped.stages["liver"]
    learnt.perfect = perfect_map
    kept = draft2d(image, ["liver"], saliency="test_thin")
    assert np.array_equal(kept.labels == 1, thin)
    learnt.perfect = lambda image, mask: mask.astype(np.float32)  # a map at the pixels' own resolution
    assert not draft2d(image, ["liver"], saliency="test_thin").labels.any()


def test_an_unlabelled_image_learns_its_draft_where_draft_and_map_agree(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second pass's target on an unlabelled 2D image is the first pass's draft (LiteMedSAM's mask
    from the map's boxes), not only the cells the map was sure of: trusted on the map's region and the
    rim next to it, not where the draft drew the class away from it, at SELF_WEIGHT."""
    from PIL import Image

    import medprompt.drafts2d as drafts2d
    from medprompt.catalog import default_catalog
    from medprompt.trainers import sam_rounds

    Image.fromarray(np.full((64, 64), 80, np.uint8)).save(tmp_path / "u.png")  # one pixel per 64 x 64 cell
    drawn = np.zeros((64, 64), np.uint8)
    drawn[16:48, 24:56] = 1  # the draft's organ
    drawn[0:2, 60:64] = 1  # and a speck far from anything the map said
    asked = {}
    monkeypatch.setattr(drafts2d, "draft2d", lambda image, prompts, **k: asked.update(k) or drafts2d.Draft2D(
        labels=drawn, names={"liver": 1}, resolved={"liver": "liver"}))
    student = torch.zeros(1, 2, 64, 64)
    student[:, 0], student[:, 1] = 0.9, 0.1
    student[:, 0, 24:40, 32:48], student[:, 1, 24:40, 32:48] = 0.3, 0.7  # the map: the organ's core only
    monkeypatch.setattr(sam_rounds, "student_cells", lambda *a, **k: student)
    blank = sam_rounds.blank_cells(tmp_path / "u.png", ["liver"], _Stand, reach=1)
    out = sam_rounds.drafted_cells(blank, tmp_path / "u.png", Path("unused.pt"), ["liver"], default_catalog(),
                                   np.zeros((1, 8)), None, "cpu")
    t, w = out.target.float()[0, 1], out.weight.float()[0]
    assert asked["probable_masks_only"] is False  # the teacher is every mask LiteMedSAM drew
    assert torch.all(t[16:48, 24:56] == 1) and float(t.sum()) == 32 * 32 + 8  # the draft, not the map
    assert torch.all(w[24:40, 32:48] == sam_rounds.SELF_WEIGHT)  # draft and map agree
    assert torch.all(w[23, 32:48] == sam_rounds.SELF_WEIGHT)  # the draft's rim next to the map's region
    assert torch.all(w[16, 24:56] == 0)  # further out the map said background: not trusted
    assert torch.all(w[0:2, 60:64] == 0)  # the speck: not trusted
    assert torch.all(w[55:60, 5:10] == sam_rounds.SELF_WEIGHT)  # background on both
