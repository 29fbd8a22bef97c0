"""MedPromptNet on LiteMedSAM features: cell targets, geometry back to the input grid, learning, rounds.

LiteMedSAM itself is replaced by a stand-in segmenter whose "embedding" of a slice is its pixels
on the 64 x 64 cell grid, so these tests run in seconds and check the network's own logic; real
quality on real images is measured in benchmarks/ (BENCHMARKS.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medprompt.model import sam_features as sf
from medprompt.model.sam_net import SamNetConfig, SamPromptNet, cell_inputs, part_matrix
from medprompt.sam.preprocess import SliceGeometry
from medprompt.trainers.cells import CellStudy
from medprompt.trainers.sam_net_train import SamNetTrainConfig, cell_loss, train_cells


class PixelSegmenter:
    """Stands in for SliceSegmenter: the embedding of a slice is its normalised pixels per cell (channel 0),
    their complement (channel 1) and zeros, so a network can learn "bright = organ" from it."""

    def __init__(self, slices: np.ndarray, pixel_mm) -> None:
        self.slices = slices
        self.geometry = SliceGeometry.for_slice(slices.shape[1:], tuple(pixel_mm)[:2])
        self.prepared: set[int] = set()

    def prepare(self, ks, progress: bool = False) -> None:
        self.prepared.update(int(k) for k in ks)

    def embedding(self, k: int) -> torch.Tensor:
        t = torch.from_numpy(self.slices[[k]]).float()[:, None] / 255  # no per-slice min-max: grey levels hold
        t = F.interpolate(t, size=self.geometry.resized, mode="area")
        t = F.pad(t, (0, 256 - self.geometry.resized[1], 0, 256 - self.geometry.resized[0]))
        x = F.avg_pool2d(t, 4)[0, 0]
        e = torch.zeros(256, 64, 64)
        e[0], e[1] = x, 1 - x
        return e.half()

    def predict(self, k: int, boxes: np.ndarray | None = None, **_) -> torch.Tensor:
        """LiteMedSAM's stand-in mask for a box: the bright pixels inside it (logits +1 there, -1 elsewhere)."""
        out = []
        for x0, y0, x1, y1 in np.asarray(boxes if boxes is not None else np.zeros((0, 4))):
            m = np.zeros(self.slices.shape[1:], bool)
            m[int(y0) : int(y1) + 1, int(x0) : int(x1) + 1] = True
            out.append(np.where(m & (self.slices[k] > 127), 1.0, -1.0))
        return torch.from_numpy(np.asarray(out, np.float32).reshape(-1, *self.slices.shape[1:]))


def pixel_segmenters(slices: np.ndarray, pixel_mm) -> PixelSegmenter:
    return PixelSegmenter(slices, pixel_mm)


def test_cell_fractions_follow_the_slice_geometry_and_padding() -> None:
    g = SliceGeometry.for_slice((40, 80), (1.0, 1.0))  # longest side 80 -> 256: factor 3.2, rows 128
    labels = np.zeros((1, 40, 80), np.int32)
    labels[0, :20, :40] = 7  # -> model rows 0..63, cols 0..127 -> cells 0..15 x 0..31
    cells = sf.to_cells(labels, g, [3, 7])
    assert cells.shape == (1, 3, 64, 64)
    assert torch.allclose(cells.sum(1), torch.ones(1, 64, 64), atol=1e-5)
    assert torch.all(cells[0, 2, :16, :32] > 0.99) and torch.all(cells[0, 2, 17:, :] < 0.01)
    assert torch.all(cells[0, 1] == 0)  # value 3 is absent
    assert torch.all(cells[0, 0, 32:, :] == 1)  # rows 128..255 of the 256 frame are padding
    back = sf.cells_to_slices(cells[:, 2:3], g)[0, 0]
    assert back.shape == (40, 80)
    assert (back[:18, :38] > 0.5).all() and (back[22:, :] < 0.5).all() and (back[:, 42:] < 0.5).all()



@pytest.mark.parametrize("shape, mm", [((333, 517), (0.7, 0.9)), ((300, 200), (1.0, 2.5)), ((7, 5), (1.0, 1.0)),
                                       ((256, 256), (1.0, 1.0))])
def test_cell_fractions_equal_the_resized_padded_slice_averaged_over_cells(shape, mm) -> None:
    """to_cells never builds LiteMedSAM's 256 frame; it must give what building it gives: each class's
    mask resized by area, zero-padded, averaged over 4 x 4 cells; background the rest, padding included
    (also where one label value is listed twice, and for a value no pixel has)."""
    g = SliceGeometry.for_slice(shape, mm)
    labels = np.random.default_rng(1).integers(0, 6, (3, *shape)).astype(np.int32)
    labels[:, : shape[0] // 2] = 2
    values = [1, 2, 2, 9]
    masks = torch.stack([torch.from_numpy(labels == v).float() for v in values], 1)
    masks = torch.cat([1 - masks.sum(1, keepdim=True).clamp(max=1), masks], 1)
    frame = F.pad(F.interpolate(masks, size=g.resized, mode="area"),
                  (0, sf.SAM_SIZE - g.resized[1], 0, sf.SAM_SIZE - g.resized[0]))
    frame[:, 0, g.resized[0]:] = 1
    frame[:, 0, :, g.resized[1]:] = 1
    expected = F.avg_pool2d(frame, sf.CELL)
    got = sf.to_cells(labels, g, values)
    assert got.shape == expected.shape == (3, 5, 64, 64)
    assert torch.allclose(got, expected, atol=1e-5)
    assert float(got[:, 4].abs().max()) == 0.0  # no pixel is 9

def test_view_slices_between_sampled_ones_interpolate_and_the_ends_take_the_nearest() -> None:
    got = {z: (j, j2, round(w, 3)) for z, j, j2, w in sf.between_sampled([2, 5, 9], 3, 12)}
    assert sorted(got) == list(range(12))  # 0-1 before the first, 10-11 after the last (step - 1 each)
    assert got[0] == got[1] == (0, 0, 0.0) and got[2][::2] == (0, 0.0)  # a sampled slice is itself
    assert got[4] == (0, 1, 0.667) and got[7] == (1, 2, 0.5) and got[9] == got[11] == (2, 2, 0.0)
    assert [z for z, *_ in sf.between_sampled([6], 2, 20)] == [5, 6, 7]  # one sampled slice, nothing further


def test_view_masks_go_back_to_the_input_voxels_they_came_from() -> None:
    """A label in an LPS-stored volume -> the axial view the network works on -> the localisation grid ->
    the input grid again: the same voxels (no flip, no transpose, no shift)."""
    affine = np.diag([-1.5, -1.5, 3.0, 1.0])  # LPS storage, like DICOM
    labels = np.zeros((30, 24, 12), np.uint8)
    labels[3:9, 15:22, 2:5] = 1
    labels[20:27, 2:6, 8:11] = 1
    canon, ornt, spacing = sf.geometry.to_canonical(labels, affine)
    frame = sf.geometry.WorkFrame(ornt, canon.shape, canon.shape, spacing, spacing)
    stack = sf.SliceStack(torch.zeros(1, 256, 64, 64), [0], SliceGeometry.for_slice((24, 30)), (12, 24, 30), 1, "CT",
                          frame)
    view = sf.label_view(labels, frame)
    assert view.shape == (12, 24, 30)
    work_frame = sf.localisation_frame(stack, 24, 30)
    back = sf.geometry.paint_input_labels([(1, sf.view_masks_to_work(view == 1))], work_frame)
    np.testing.assert_array_equal(back, labels)


def test_each_prompt_s_logits_do_not_depend_on_the_other_prompts_of_the_call() -> None:
    torch.manual_seed(0)
    net = SamPromptNet(SamNetConfig.preset("tiny", text_dim=12)).eval()
    x = cell_inputs(torch.randn(2, 3, 256, 64, 64), torch.randn(2, 3, 64, 64))
    a, b = torch.randn(1, 12), torch.randn(1, 12)
    with torch.no_grad():
        alone = net(x, a)
        both = net(x, torch.cat([b, a]))
    assert alone.shape == (2, 2, 64 * 64) and both.shape == (2, 3, 64 * 64)
    torch.testing.assert_close(alone[:, 1], both[:, 2])
    torch.testing.assert_close(alone[:, 0], both[:, 0])  # background


def test_slice_logits_equal_the_network_s_forward_on_cell_inputs() -> None:
    """The inference path folds the input LayerNorm into the first linear layer, one slice at a time: it must
    give forward's logits for float16 embeddings (as the cache stores them), a LayerNorm whose scale and
    shift are not 1 and 0, and cells whose inputs sit far from zero (a variance taken as E[x^2] - m^2
    would lose digits there); a wrong fold (scale or shift on the wrong side) fails by far more."""
    torch.manual_seed(0)
    net = SamPromptNet(SamNetConfig.preset("small", text_dim=12)).eval()
    with torch.no_grad():
        net.norm.weight.uniform_(0.5, 1.5)
        net.norm.bias.uniform_(-0.2, 0.2)
    emb = (torch.randn(3, 3, 256, 64, 64) * 0.3 + torch.linspace(-4, 4, 64)[None, None, None, :, None]).half()
    coords = torch.rand(3, 3, 64, 64) * 2 - 1
    text = torch.randn(4, 12)
    with torch.no_grad():
        want = net(cell_inputs(emb.float(), coords), text)
    got = net.slice_logits(emb, coords, text)
    assert got.shape == want.shape == (3, 5, 64 * 64) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (want.argmax(1) == got.argmax(1)).float().mean() > 0.999


def test_cell_loss_counts_an_unstated_class_as_background_or_as_the_stated_whole_it_is_part_of() -> None:
    # classes: kidneys, kidney_left (a part of kidneys), liver; the study states only "kidneys"
    part_of = part_matrix(["kidneys", "kidney_left", "liver"], {"kidneys": ["kidney_left"]})
    known = torch.tensor([[True, False, False]])
    sure = 12.0

    def loss(target_channel: int, confident_channel: int) -> float:
        logits = torch.zeros(1, 4, 1)
        logits[0, confident_channel] = sure
        target = torch.zeros(1, 4, 1)
        target[0, target_channel] = 1
        return float(cell_loss(logits, target, torch.ones(1, 1), known, part_of))

    assert loss(1, 2) < 1e-3  # a "kidneys" cell the network calls kidney_left: right
    assert loss(0, 3) < 1e-3  # a background cell the network calls liver: the study says nothing of the liver
    assert loss(0, 2) > 5  # a background cell called kidney_left: the study says there is no kidney there
    assert loss(1, 3) > 5  # a "kidneys" cell called liver
    assert loss(0, 1) > 5
    # a study that states every class: plain cross-entropy
    logits, target = torch.randn(2, 4, 5), torch.randint(0, 4, (2, 5))
    full = cell_loss(logits, F.one_hot(target, 4).permute(0, 2, 1).float(), torch.ones(2, 5),
                     torch.ones(2, 3, dtype=torch.bool), part_of)
    torch.testing.assert_close(full, F.cross_entropy(logits, target))
    assert float(cell_loss(logits, F.one_hot(target, 4).permute(0, 2, 1).float(), torch.zeros(2, 5),
                           torch.ones(2, 3, dtype=torch.bool))) == 0.0  # untrusted cells teach nothing


def test_a_trained_part_counts_for_the_asked_whole_and_other_unasked_classes_as_anything_else(monkeypatch) -> None:
    from medprompt.catalog import default_catalog
    from medprompt.model.sam_predictor import SamNetPredictor

    vec = {c: np.random.default_rng(i).normal(size=12).tolist() for i, c in enumerate(["kidney_left", "kidney_right", "liver"])}
    pred = SamNetPredictor(SamPromptNet(SamNetConfig.preset("tiny", text_dim=12)), {"class_vectors": vec,
                           "text_encoder": "hash"}, torch.device("cpu"), text_encoder="hash")
    seen = {}
    probs = torch.tensor([0.1, 0.05, 0.3, 0.25, 0.3])  # background, kidneys (asked), kidney_left, kidney_right, liver

    def fake_probabilities(stack, text):
        seen["prompts"] = len(text)
        return probs.reshape(1, 5, 1, 1).expand(2, 5, 3, 3).clone()

    monkeypatch.setattr(pred, "class_vectors", lambda entries: torch.zeros(len(entries), 12))
    monkeypatch.setattr(pred, "cell_probabilities", fake_probabilities)
    out = pred.asked_probabilities(None, [default_catalog()["kidneys"]])
    assert seen["prompts"] == 4 and out.shape == (2, 2, 3, 3)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.4, 0.6]))  # liver is anything else; the kidneys join


def test_teacher_trusts_sam_near_the_priors_mask_of_the_same_class_only() -> None:
    from medprompt.trainers.cells import teacher_weights

    prior = torch.zeros(1, 3, 8, 8)
    prior[:, 0] = 1
    prior[:, 0, 2:4, 2:4], prior[:, 1, 2:4, 2:4] = 0, 1  # the prior's class 1: a 2 x 2 block
    teacher = torch.zeros(1, 3, 8, 8)
    teacher[:, 0] = 1
    teacher[:, 0, 2:5, 2:5], teacher[:, 1, 2:5, 2:5] = 0, 1  # SAM drew class 1 one cell wider
    teacher[:, 0, 6, 6], teacher[:, 2, 6, 6] = 0, 1  # and class 2 where the prior has background
    teacher[:, 0, 4, 0], teacher[:, 1, 4, 0] = 0, 1  # and class 1 far (two cells) from the prior's
    w = teacher_weights(teacher, prior)[0]
    assert torch.all(w[2:5, 2:5] == 1)  # agreeing and within one cell of the prior's class 1
    assert w[6, 6] == 0 and w[4, 0] == 0  # disagreeing, not near the prior's mask of that class
    assert w[0, 7] == 1  # background on both


def test_class_balance_lifts_rare_classes_within_the_cap() -> None:
    from medprompt.trainers.cells import BALANCE_CAP, class_area, class_balance

    target = torch.zeros(1, 4, 64, 64)
    target[:, 0] = 1
    for c, (rows, cols) in {1: (40, 40), 2: (20, 20), 3: (1, 1)}.items():  # 1600, 400 and 1 cells
        r0 = 64 - rows if c == 1 else 0
        c0 = 64 - cols if c == 1 else (0 if c == 2 else 40)
        target[:, :, r0 : r0 + rows, c0 : c0 + cols] = 0
        target[:, c, r0 : r0 + rows, c0 : c0 + cols] = 1
    study = CellStudy("s", torch.zeros(1, 256, 64, 64).half(), torch.zeros(1, 3, dtype=torch.long),
                      sf.cell_coords(SliceGeometry.for_slice((64, 64))), target.half(), torch.ones(1, 64, 64).half(),
                      torch.tensor([True, True, True]))
    w = class_balance(class_area([study]))
    assert w[0] == 1 and w[2] == 1  # background and the median class stay
    assert w[1] == 1  # a larger class is not pushed down
    assert w[3] == BALANCE_CAP  # sqrt(400 / 1) = 20, capped
    study.weight[:, 0:20, 0:20] = 0  # untrusted cells do not count: class 2 now has no trusted area
    assert class_balance(class_area([study]))[2] == 1  # a class never taught is not up-weighted (nothing to lift)


def _planted_study(seed: int, n: int = 6) -> CellStudy:
    """Random embeddings where class 1 is a blob marked on channel 5 and class 2 one on channel 9."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, 256, 64, 64, generator=g) * 0.5
    target = torch.zeros(n, 3, 64, 64)
    target[:, 0] = 1
    for k in range(n):
        for c, ch in ((1, 5), (2, 9)):
            r, q = (int(v) for v in torch.randint(8, 48, (2,), generator=g))
            emb[k, ch, r : r + 12, q : q + 12] += 3.0
            target[k, :, r : r + 12, q : q + 12] = 0
            target[k, c, r : r + 12, q : q + 12] = 1
    nb = torch.tensor([[max(0, k - 1), k, min(n - 1, k + 1)] for k in range(n)])
    return CellStudy(f"planted{seed}", emb.half(), nb, sf.cell_coords(SliceGeometry.for_slice((64, 64))),
                     target.half(), torch.ones(n, 64, 64).half(), torch.tensor([True, True]), True, list(range(n)))


def test_the_network_learns_planted_classes_and_training_resumes(tmp_path: Path, one_torch_thread) -> None:
    from medprompt.trainers.sam_rounds import cell_dice

    vectors = np.random.default_rng(1).normal(size=(2, 12)).astype(np.float32)
    out = tmp_path / "net.pt"
    cfg = SamNetTrainConfig(out=out, classes=["a", "b"], steps=120, batch_size=4, lr=1e-2, model_config="tiny",
                            device="cpu", save_every=1000, time_limit_s=0.0, jitter=0.0, noise=0.0)
    train_cells(cfg, [_planted_study(0)], vectors, "test", progress=False)  # stops after one step, saved
    blob = torch.load(out, weights_only=False)
    assert blob["step"] == 1 and out.with_suffix(".pt.state").is_file()
    cfg.time_limit_s = None
    train_cells(cfg, [_planted_study(0)], vectors, "test", progress=False)  # resumes to the end
    assert torch.load(out, weights_only=False)["step"] == 120
    held_out = _planted_study(7)
    assert cell_dice(out, [held_out], vectors, "cpu") > 0.8
    shuffled = vectors[::-1].copy()  # the classes' text vectors swapped: the maps follow the text
    assert cell_dice(out, [held_out], shuffled, "cpu") < 0.2


def test_a_run_resumes_only_its_own_state_and_a_finished_one_trains_nothing(tmp_path: Path, one_torch_thread,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """`train-zero-shot --out F` twice: the second call must not claim a new model (it trains nothing and
    F is untouched); with other studies, or other steps, the partial state beside F is set aside, said so."""
    from medprompt.trainers.resume import describe

    vectors = np.random.default_rng(1).normal(size=(2, 12)).astype(np.float32)
    out = tmp_path / "net.pt"
    cfg = SamNetTrainConfig(out=out, classes=["a", "b"], steps=4, batch_size=2, model_config="tiny", device="cpu",
                            save_every=1000, time_limit_s=0.0)
    stopped = train_cells(cfg, [_planted_study(0)], vectors, "test", progress=False)
    assert (stopped.start, stopped.step, stopped.complete) == (0, 1, False)
    assert "holds step 1 of 4; run the same command again to resume" in describe(stopped)
    cfg.time_limit_s = None
    steps: list[int] = []
    done = train_cells(cfg, [_planted_study(0)], vectors, "test", progress=False, on_step=lambda k, _: steps.append(k))
    assert steps == [2, 3, 4] and (done.start, done.step, done.complete) == (1, 4, True)
    assert describe(done).startswith(f"wrote {out} (4 steps, resumed at step 1)")
    before = out.read_bytes()
    again = train_cells(cfg, [_planted_study(0)], vectors, "test", progress=True, on_step=lambda k, _: steps.append(k))
    assert (again.start, again.trained, again.complete) == (4, 0, True) and steps == [2, 3, 4]
    assert out.read_bytes() == before
    assert "already trained" in describe(again) and "nothing was trained" in describe(again)
    capsys.readouterr()

    fresh: list[int] = []
    train_cells(cfg, [_planted_study(3)], vectors, "test", progress=True, on_step=lambda k, _: fresh.append(k))
    assert fresh == [1, 2, 3, 4]  # other targets: the finished run is not taken for this one
    said = capsys.readouterr().out
    assert f"{out}.state belongs to a run with other studies; starting over at step 0" in said
    cfg.steps, fresh = 5, []
    train_cells(cfg, [_planted_study(3)], vectors, "test", progress=True, on_step=lambda k, _: fresh.append(k))
    assert fresh == [1, 2, 3, 4, 5] and "belongs to a run with other steps;" in capsys.readouterr().out


def test_zero_shot_rounds_stop_at_the_time_limit_and_resume_round_by_round(tmp_path: Path, one_torch_thread,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A time limit that ends round 1 ends the call: round 2 never starts from an unfinished round 1, and
    the next call finishes round 1, then trains round 2; a third call trains nothing."""
    from medprompt.trainers import sam_rounds, zero_shot
    from medprompt.trainers.resume import describe

    image = tmp_path / "study.nii.gz"
    image.write_bytes(b"")  # listed only: the teacher below stands in for reading it
    vectors = np.random.default_rng(1).normal(size=(2, 12)).astype(np.float32)
    monkeypatch.setattr(sam_rounds, "_segmenter_for", lambda *a, **k: pixel_segmenters)
    monkeypatch.setattr(sam_rounds, "teacher_studies", lambda paths, *a, **k: [_planted_study(0)])
    monkeypatch.setattr(zero_shot, "class_vectors", lambda *a, **k: (vectors, "test"))
    seen: list[int] = []
    run = lambda limit: sam_rounds.zero_shot_sam(  # noqa: E731
        [image], tmp_path / "zs.pt", ["liver", "spleen"], steps=3, rounds=2, batch_size=2, model_config="tiny",
        device="cpu", time_limit_s=limit, progress=False, on_step=lambda k, _: seen.append(k))
    first = run(0.0)
    assert (first.out.name, first.step, first.complete) == ("zs.round1.pt", 1, False)
    assert not (tmp_path / "zs.pt").exists() and seen == [1]
    assert describe(first) == f"{first.out} holds step 1 of 3 of round 1 of 2; run the same command again to resume"
    second = run(None)
    assert second.out == tmp_path / "zs.pt" and second.complete and seen == [1, 2, 3, 1, 2, 3]
    assert describe(second) == f"wrote {second.out} (2 rounds of 3 steps)"
    third = run(None)
    assert third.complete and third.trained == 0 and seen == [1, 2, 3, 1, 2, 3]
    assert describe(third).startswith(f"{third.out} is already trained: 2 rounds of 3 steps of this run")


def test_a_study_spilled_to_disk_reads_back_and_trains_exactly_as_in_memory(tmp_path: Path, one_torch_thread,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A round keeps its studies' embeddings on disk (trainers.disk_embeddings): indexing, held-out subsets,
    the network's softmax and training must be what the tensors in memory give; a full disk is one clear
    error and leaves no partial file."""
    from medprompt.model.sam_predictor import cell_softmax
    from medprompt.trainers.disk_embeddings import DiskEmbeddings, spilled

    study = _planted_study(0)
    disk = spilled(study, tmp_path)
    assert isinstance(disk.embeddings, DiskEmbeddings) and disk.embeddings.shape == tuple(study.embeddings.shape)
    assert len(disk.embeddings) == 6 and list(tmp_path.glob("*.f16"))
    idx = torch.tensor([[5, 0, 5], [2, 3, 1]])
    assert torch.equal(disk.embeddings[idx], study.embeddings[idx])
    assert torch.equal(disk.embeddings[4], study.embeddings[4])
    part, part_disk = study.subset([1, 4, 5]), disk.subset([1, 4, 5])
    assert torch.equal(part_disk.embeddings[part.neighbours], part.embeddings[part.neighbours])
    assert spilled(disk, tmp_path) is disk and spilled(study, None) is study
    import medprompt.trainers.disk_embeddings as de
    from medprompt.errors import MedPromptError

    if Path("/dev/full").exists():  # writes there fail as on a full disk (ENOSPC)
        full = tmp_path / "full"
        full.mkdir()

        def on_full_disk(dir, suffix):
            (full / "part.f16").touch()
            return os.open("/dev/full", os.O_WRONLY), str(full / "part.f16")

        monkeypatch.setattr(de.tempfile, "mkstemp", on_full_disk)
        with pytest.raises(MedPromptError, match="planted0.*12 MB.*full: .*free disk"):
            de.spilled(study, full)
        assert not list(full.iterdir())  # no partial file left
        monkeypatch.undo()

    vectors = np.random.default_rng(1).normal(size=(2, 12)).astype(np.float32)
    nets = []
    for name, st in (("memory", study), ("disk", disk)):
        cfg = SamNetTrainConfig(out=tmp_path / f"{name}.pt", classes=["a", "b"], steps=6, batch_size=3,
                                model_config="tiny", device="cpu", save_every=1000)
        train_cells(cfg, [st], vectors, "test", progress=False)
        nets.append(torch.load(cfg.out, weights_only=False)["state_dict"])
    assert nets[0].keys() == nets[1].keys() and all(torch.equal(nets[0][k], nets[1][k]) for k in nets[0])
    from medprompt.model.sam_checkpoint import load_net

    net, _ = load_net(tmp_path / "disk.pt")
    text = torch.from_numpy(vectors)
    assert torch.equal(cell_softmax(net, disk.embeddings, disk.neighbours, disk.coords, text, torch.device("cpu"), 4),
                       cell_softmax(net, study.embeddings, study.neighbours, study.coords, text, torch.device("cpu"), 4))


def test_teacher_studies_go_to_disk_one_by_one_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The zero-shot and finetune rounds pass a folder: each teacher study's embeddings are written there as
    soon as it is made, so a datastore's studies are never all in memory at once."""
    from medprompt.catalog import default_catalog
    from medprompt.trainers import cells
    from medprompt.trainers.disk_embeddings import DiskEmbeddings

    made = []

    def fake_teacher(path, *a, **k):
        if made:  # the study made before this one is already on disk
            assert len(list(tmp_path.glob("spill/*.f16"))) == len(made)
        made.append(_planted_study(len(made)))
        return made[-1]

    monkeypatch.setattr(cells, "teacher_study", fake_teacher)
    (tmp_path / "spill").mkdir()
    paths = [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", tmp_path / "c.nii.gz"]
    out = cells.teacher_studies(paths, ["liver"], default_catalog(), None, 1, tmp_path / "cache", progress=False,
                                spill_to=tmp_path / "spill")
    assert all(isinstance(st.embeddings, DiskEmbeddings) for st in out)
    assert all(torch.equal(st.embeddings[st.neighbours], m.embeddings[m.neighbours]) for st, m in zip(out, made))
    kept = cells.teacher_studies(paths[:1], ["liver"], default_catalog(), None, 1, tmp_path / "cache", progress=False)
    assert isinstance(kept[0].embeddings, torch.Tensor)  # no folder: in memory, as before


def test_localize_and_draft_with_a_model_on_sam_features(tmp_path: Path, one_torch_thread,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A bright box in a CT-like volume is learnt from one labelled study and found in another one of other
    size, orientation and spacing; the draft (no SAM boundary) lands on the input grid where the box is."""
    from medprompt.catalog import default_catalog
    from medprompt.drafts import draft
    from medprompt.io.volume import load_volume
    from medprompt.trainers.cells import from_labels
    from medprompt.trainers.zero_shot import class_vectors

    def study(shape, affine, box, path):
        data = np.full(shape, -1000.0, np.float32)
        data[2:-2, 2:-2, :] = 40.0  # body
        data[box] = 250.0  # "liver": bright
        label = np.zeros(shape, np.uint8)
        label[box] = 1
        nib.save(nib.Nifti1Image(data, affine), path)
        return load_volume(path), label

    vol_a, lab_a = study((48, 40, 16), np.diag([2.0, 2.0, 5.0, 1.0]), np.s_[8:24, 10:30, 3:12], tmp_path / "a.nii.gz")
    vol_b, lab_b = study((36, 44, 20), np.diag([-2.5, -2.5, 4.0, 1.0]), np.s_[20:32, 6:20, 5:15], tmp_path / "b.nii.gz")
    catalog = default_catalog()
    classes = ["liver"]
    stack = sf.study_stack(vol_a, pixel_segmenters)
    train = from_labels("a", stack, sf.label_view(lab_a, stack.frame), {"liver": 1}, classes, reach=1)
    vectors, key = class_vectors(classes, catalog, None)
    out = tmp_path / "samnet.pt"
    train_cells(SamNetTrainConfig(out=out, classes=classes, steps=150, batch_size=4, lr=1e-2, model_config="tiny",
                                  device="cpu"), [train], vectors, key, progress=False)
    import medprompt.sam

    import medprompt.model.prior_fusion as fusion

    monkeypatch.setattr(medprompt.sam, "segmenter_factory", lambda *a, **k: pixel_segmenters)
    # the anatomy prior has nothing to say about a box phantom: the network's own regions here
    monkeypatch.setattr(fusion, "prior_view_masks", lambda *a, **k: {})
    seg = draft(vol_b, ["liver"], model="medprompt", checkpoint=out, refine="none")
    assert seg.labels.shape == lab_b.shape
    hit = seg.labels == 1
    dice = 2 * (hit & (lab_b == 1)).sum() / (hit.sum() + (lab_b == 1).sum())
    assert dice > 0.7, dice
    # a prior region more than twice the network's: the draft takes the prior's (here: the whole grid)
    def everywhere(volume, entries, stack, shape, catalog=None):
        return {"liver": np.ones((stack.view_shape[0], *shape), bool)}

    monkeypatch.setattr(fusion, "prior_view_masks", everywhere)
    assert (draft(vol_b, ["liver"], model="medprompt", checkpoint=out, refine="none").labels == 1).all()
    # A class the model learnt from labels that the prompt catalog does not know is a prompt for it (the
    # prior has no region for it: the network's own).
    from medprompt.model.sam_checkpoint import load_net, save_net

    net, meta = load_net(out)
    renamed = {**meta, "classes": ["bright_box"], "class_vectors": {"bright_box": meta["class_vectors"]["liver"]}}
    own = draft(vol_b, ["bright box"], model="medprompt", checkpoint=save_net(tmp_path / "own.pt", net, renamed),
                refine="none")
    assert own.names == {"bright_box": 1} and np.array_equal(own.labels == 1, seg.labels == 1)
    # The model records the modality it learnt (a CT-like study), and a study of a modality it never learnt
    # is localised by the prior however much the network finds. Here the prior's region is the network's own
    # plus a corner block: the model that learnt CT keeps its own region (near the prior's, over half its size).
    assert meta["modalities"] == ["CT"]
    import medprompt.model.sam_predictor as sp

    seen: dict[str, np.ndarray] = {}
    regions = sp.network_regions

    def spied(prob, entries):
        seen.update(out := regions(prob, entries))
        return out

    def own_and_corner(volume, entries, stack, shape, catalog=None):
        block = seen["liver"].copy()
        block[:, :4, :4] = True
        return {"liver": block}

    monkeypatch.setattr(sp, "network_regions", spied)
    monkeypatch.setattr(fusion, "prior_view_masks", own_and_corner)

    def liver(checkpoint: Path) -> np.ndarray:
        return draft(vol_b, ["liver"], model="medprompt", checkpoint=checkpoint, refine="none").labels == 1

    assert np.array_equal(liver(out), seg.labels == 1)
    mr_only = save_net(tmp_path / "mr_only.pt", net, {**meta, "modalities": ["MR"]})
    with caplog.at_level("WARNING", logger="medprompt.model.sam_predictor"):
        drawn = liver(mr_only)
    assert (drawn >= (seg.labels == 1)).all() and drawn.sum() > (seg.labels == 1).sum()  # the corner too
    assert "the model learnt MR only, so this CT study is localised by the anatomy prior" in caplog.text
    unrecorded = save_net(tmp_path / "unrecorded.pt", net, {k: v for k, v in meta.items() if k != "modalities"})
    assert np.array_equal(liver(unrecorded), seg.labels == 1)  # a model file from before the record: any modality


def test_a_model_learns_the_modalities_of_its_studies_and_its_starting_model() -> None:
    from medprompt.trainers.sam_net_train import learnt_modalities

    assert learnt_modalities(["CT", "CT"], None) == ["CT"]
    assert learnt_modalities(["MR"], {"modalities": ["CT"]}) == ["CT", "MR"]
    assert learnt_modalities(["CT"], {}) is None  # the starting model's record is unknown: any
    assert learnt_modalities(["CT", None], None) is None  # a study of unknown modality: any


def _disc_image(path: Path, centre: tuple[int, int], radius: int, label_path: Path | None = None) -> None:
    from PIL import Image

    yy, xx = np.mgrid[:96, :128]
    disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2
    img = np.full((96, 128), 60, np.uint8)
    img[disc] = 200
    Image.fromarray(img).save(path)
    if label_path is not None:
        Image.fromarray(disc.astype(np.uint8)).save(label_path)
        label_path.with_suffix(".json").write_text('{"labels": {"liver": 1}}')


def test_a_finetune_round_on_a_2d_datastore_serves_only_a_no_worse_model(tmp_path: Path, one_torch_thread,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """PNG images with corrections in labels/final: a first round (nothing to compare with) trains on every
    corrected image and serves the model; the served network finds the class on a new image; a later round
    validates on held-out images and a worse candidate is dropped."""
    import medprompt.sam
    from medprompt.drafts2d import draft2d
    from medprompt.io.image2d import load_image2d
    from medprompt.trainers import sam_rounds

    monkeypatch.setattr(sam_rounds, "_segmenter_for", lambda *a, **k: pixel_segmenters)
    monkeypatch.setattr(medprompt.sam, "segmenter_factory", lambda *a, **k: pixel_segmenters)
    store = tmp_path / "store"
    final = store / "labels" / "final"
    final.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i in range(6):
        centre = (int(rng.integers(25, 70)), int(rng.integers(25, 100)))
        _disc_image(store / f"img{i}.png", centre, int(rng.integers(10, 20)), final / f"img{i}.png" if i < 4 else None)
    served = tmp_path / "model" / "medprompt.pt"
    result = sam_rounds.finetune_sam(store, served, None, None, steps=40, lr=1e-2, device="cpu",
                                     model_config="tiny", progress=False)
    assert result.accepted and served.is_file() and result.version is not None
    # no model to compare with: validation decides nothing, so no corrected image is held out of training
    assert sorted(result.validation) == [f"img{i}.png (also trained on)" for i in range(4)]
    assert result.candidate_score > 0.6

    new = tmp_path / "new.png"
    _disc_image(new, (60, 40), 16)
    from medprompt.model.sam_predictor import saliency_method
    from medprompt.saliency import register

    register("medprompt", saliency_method(served), replace=True)
    out = draft2d(load_image2d(new), ["liver"], saliency="medprompt", refine="none")
    yy, xx = np.mgrid[:96, :128]
    truth = (yy - 60) ** 2 + (xx - 40) ** 2 <= 16 ** 2
    hit = out.labels == 1
    assert 2 * (hit & truth).sum() / (hit.sum() + truth.sum()) > 0.7
    from medprompt.cli import main
    from medprompt.io.image2d import load_label2d

    assert main(["infer", str(new), str(tmp_path / "out.png"), "--prompts", "liver", "--model", "medprompt",
                 "--checkpoint", str(served), "--refine", "none"]) == 0  # the same through the command line
    labels, names = load_label2d(tmp_path / "out.png")
    assert names == {"liver": 1} and np.array_equal(labels == 1, hit)

    before = served.read_bytes()
    scores = iter([0.1, 0.9])  # the candidate scores worse than the model in service
    monkeypatch.setattr(sam_rounds, "cell_dice", lambda *a, **k: next(scores))
    worse = sam_rounds.finetune_sam(store, served, served, served, steps=5, device="cpu", progress=False)
    assert not worse.accepted and served.read_bytes() == before
    assert worse.validation == ["img2.png"]  # a model to beat: one of the four corrected images is held out
    assert not (served.parent / "finetune_work" / "candidate.pt").exists()

    # The command line, on a datastore with no model of its own yet: the round starts from the shipped model,
    # as the server's first round does (its classes carry over; a new network would know only the label's).
    from medprompt.catalog import SYNAPSE8
    from medprompt.model.sam_checkpoint import load_net

    monkeypatch.undo()
    monkeypatch.setattr(sam_rounds, "_segmenter_for", lambda *a, **k: pixel_segmenters)
    monkeypatch.setattr(sam_rounds, "cell_dice", lambda *a, **k: 0.5)  # a tie is served: what starts it is tested
    from medprompt.model.checkpoint import DEFAULT_CHECKPOINT

    shipped = DEFAULT_CHECKPOINT.read_bytes()
    fresh = store / "model" / "medprompt.pt"  # without --model: the datastore's own model file
    assert main(["train-finetune", "--studies", str(store), "--steps", "2", "--device", "cpu"]) == 0
    assert DEFAULT_CHECKPOINT.read_bytes() == shipped  # the shipped model is only the start
    classes = load_net(fresh)[1]["classes"]
    assert set(SYNAPSE8) <= set(classes) and "liver" in classes


def test_image_variants_move_image_and_label_together_and_repeat_for_the_same_image() -> None:
    """A corrected 2D image's variants: the label stays on the pixels it names, the organ moved and changed
    size, and the same image gives the same variants (a later round finds their embeddings cached)."""
    from medprompt.trainers.augment2d import COPIES, MAX_VARIANTS, copies_per_image, variants

    yy, xx = np.mgrid[:96, :128]
    disc = (yy - 40) ** 2 + (xx - 70) ** 2 <= 15 ** 2
    img = np.full((96, 128), 60, np.uint8)
    img[disc] = 200
    out = variants(img, disc.astype(np.uint8) * 3, 6)
    again = variants(img, disc.astype(np.uint8) * 3, 6)
    assert len(out) == 6
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(out, again))
    areas = []
    for px, lab in out:
        assert px.dtype == np.uint8 and set(np.unique(lab)) <= {0, 3}
        organ = lab == 3
        body = (px > 0) & ~organ
        bright = px > (float(px[organ].mean()) + float(px[body].mean())) / 2
        assert 2 * (bright & organ).sum() / (bright.sum() + organ.sum()) > 0.9  # image and label moved together
        assert not np.array_equal(organ, disc)
        areas.append(organ.sum() / disc.sum())
    assert max(areas) / min(areas) > 1.1  # scaled, not only shifted
    assert copies_per_image(1) == COPIES and copies_per_image(10 * MAX_VARIANTS) == 0
    assert copies_per_image(100) * 100 <= MAX_VARIANTS


def test_a_2d_round_trains_on_variants_of_corrected_images_and_validates_on_the_images_alone(
        tmp_path: Path, one_torch_thread, monkeypatch: pytest.MonkeyPatch) -> None:
    """Variants are training data only: a held-out image is scored without them, and its variants do not
    train either (they would be the held-out image under another contrast)."""
    from medprompt.trainers import sam_rounds
    from medprompt.trainers.augment2d import COPIES

    monkeypatch.setattr(sam_rounds, "_segmenter_for", lambda *a, **k: pixel_segmenters)
    store = tmp_path / "store"
    final = store / "labels" / "final"
    final.mkdir(parents=True)
    for i in range(4):
        _disc_image(store / f"img{i}.png", (30 + 8 * i, 40 + 10 * i), 12 + i, final / f"img{i}.png")
    seen: dict[str, list] = {"train": [], "val": []}
    train_cells = sam_rounds.train_cells

    def spy_train(cfg, studies, *a, **k):
        from medprompt.trainers.disk_embeddings import DiskEmbeddings

        assert all(isinstance(s.embeddings, DiskEmbeddings) for s in studies)  # held on disk, not in memory
        seen["train"].append(sorted((s.name, len(s.embeddings)) for s in studies))
        return train_cells(cfg, studies, *a, **k)

    def spy_dice(model, studies, *a, **k):
        seen["val"].append(sorted((s.name, len(s.embeddings)) for s in studies))
        return 0.5

    monkeypatch.setattr(sam_rounds, "train_cells", spy_train)
    monkeypatch.setattr(sam_rounds, "cell_dice", spy_dice)
    served = tmp_path / "model" / "medprompt.pt"
    work = served.parent / "finetune_work"
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = work / f"embeddings_{int(gone.stdout)}_x"  # a round killed mid-way left its embeddings
    stale.mkdir(parents=True)
    kw = dict(steps=2, device="cpu", model_config="tiny", progress=False)
    assert sam_rounds.finetune_sam(store, served, None, None, **kw).accepted  # nothing to beat: all train
    assert not list(work.glob("embeddings_*"))  # the round's own embeddings removed with it, the stale ones too
    assert seen["train"][-1] == [(f"img{i}.png", 1 + COPIES) for i in range(4)]
    assert seen["val"][-1] == [(f"img{i}.png", 1) for i in range(4)]
    sam_rounds.finetune_sam(store, served, served, served, **kw)  # a model to beat: img2 is held out
    assert seen["train"][-1] == [(f"img{i}.png", 1 + COPIES) for i in (0, 1, 3)]
    assert seen["val"][-2:] == [[("img2.png", 1)]] * 2  # candidate and model in service, on the same image
    sam_rounds.finetune_sam(store, served, served, served, augment=False, **kw)
    assert seen["train"][-1] == [(f"img{i}.png", 1) for i in (0, 1, 3)]


def test_an_unlabelled_study_is_never_drawn_more_often_than_a_corrected_one() -> None:
    from medprompt.trainers.sam_rounds import study_draws

    assert np.allclose(study_draws(1, 4, 0.5), [0.5, 0.125, 0.125, 0.125, 0.125])  # few corrections: half
    assert np.allclose(study_draws(4, 1, 0.5), [0.2] * 5)  # more corrections than unlabelled: all alike
    assert np.allclose(study_draws(3, 0, 0.5), [1 / 3] * 3)


def test_a_class_the_network_finds_too_little_of_takes_the_priors_region() -> None:
    from medprompt.model.prior_fusion import fuse

    prior = {"liver": np.zeros((4, 8, 8), bool), "pancreas": np.zeros((4, 8, 8), bool)}
    prior["liver"][:, 2:6, 2:6] = True  # 64 voxels
    prior["pancreas"][1:3, 4:6, 1:7] = True  # 24 voxels
    net = {name: np.zeros((4, 8, 8), bool) for name in ("liver", "pancreas", "lesion")}
    net["liver"][:, 1:5, 2:7] = True  # 80 voxels: the network's own region wins, even where it differs
    net["pancreas"][1, 4, 1:4] = True  # 3 voxels: under half the prior's -> the prior's region
    net["lesion"][0, 0, 0] = True  # a class the prior does not localise keeps the network's region
    out, taken = fuse(net, prior, cell_px=1)
    assert taken == ["pancreas"]
    assert np.array_equal(out["liver"], net["liver"]) and np.array_equal(out["pancreas"], prior["pancreas"])
    assert np.array_equal(out["lesion"], net["lesion"])
    assert fuse({"pancreas": np.zeros((4, 8, 8), bool)}, {"pancreas": np.zeros((4, 8, 8), bool)}, 1)[1] == []


def test_a_region_mostly_beyond_a_cell_of_the_priors_takes_the_priors_region() -> None:
    """The network learnt each class only within one cell of the prior's mask: a region of the right size that lies
    mostly elsewhere (a held-out CT's aorta drawn in the wrong place) is not what it was taught."""
    from medprompt.model.prior_fusion import fuse

    prior = {"aorta": np.zeros((4, 16, 16), bool)}
    prior["aorta"][:, 6:9, 6:9] = True  # 36 voxels
    beside = np.zeros((4, 16, 16), bool)
    beside[:, 6:9, 9:12] = True  # right next to it: every voxel within one cell (1 px) or two of the prior's
    away = np.zeros((4, 16, 16), bool)
    away[:, 12:15, 0:3] = True  # the same size, far off
    assert fuse({"aorta": beside}, prior, cell_px=2)[1] == []
    assert fuse({"aorta": beside}, prior, cell_px=1)[1] == ["aorta"]  # a third within 1 px: under half
    out, taken = fuse({"aorta": away}, prior, cell_px=2)
    assert taken == ["aorta"] and np.array_equal(out["aorta"], prior["aorta"])


def test_a_zero_shot_model_takes_the_priors_tube_and_a_corrected_one_keeps_its_own_region() -> None:
    """The aorta is found by the prior as a tube (method: vessel): a zero-shot network, which learnt it from that
    tube, takes the tube even where its own region lies right beside it; a corrected model keeps its region."""
    from medprompt.catalog import default_catalog
    from medprompt.model.prior_fusion import fuse, tubes

    catalog = default_catalog()
    entries = [catalog["aorta"], catalog["liver"], catalog["esophagus"]]
    assert tubes(entries, {"teacher": "prior+LiteMedSAM"}) == {"aorta", "esophagus"}
    assert tubes(entries, {"teacher": "prior+LiteMedSAM", "labelled": ["a.nii.gz"]}) == set()
    prior = {"aorta": np.zeros((4, 16, 16), bool), "liver": np.zeros((4, 16, 16), bool)}
    prior["aorta"][:, 6:9, 6:9] = True
    prior["liver"][:, 0:5, 0:12] = True
    net = {"aorta": np.zeros((4, 16, 16), bool), "liver": prior["liver"].copy()}
    net["aorta"][:, 6:9, 7:10] = True  # one pixel off the tube: kept by every other rule
    net["liver"][:, 5, 0:12] = True
    assert fuse(net, prior, cell_px=2)[1] == []
    out, taken = fuse(net, prior, cell_px=2, shaped=tubes(entries, {}))
    assert taken == ["aorta"] and np.array_equal(out["aorta"], prior["aorta"])
    assert np.array_equal(out["liver"], net["liver"])  # an organ keeps the network's region


def test_the_priors_regions_land_on_the_networks_grid_where_they_are_in_the_input(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An oblique-free but flipped, anisotropic study: the prior's mask, brought onto the network's
    localisation grid and painted back, covers the same input voxels (no flip or transpose lost)."""
    from medprompt.catalog import default_catalog
    from medprompt.io.volume import load_volume
    from medprompt.localization import Localization
    from medprompt.model.prior_fusion import prior_view_masks
    from medprompt.prior import geometry
    from medprompt.prior.engine import AnatomyPrior

    shape = (60, 44, 14)
    data = np.full(shape, 40.0, np.float32)
    label = np.zeros(shape, bool)
    label[6:30, 20:40, 3:9] = True  # off-centre in every axis
    nib.save(nib.Nifti1Image(data, np.diag([-2.5, 2.0, -4.0, 1.0])), tmp_path / "v.nii.gz")
    vol = load_volume(tmp_path / "v.nii.gz")
    canon, ornt, spacing = geometry.to_canonical(label.astype(np.uint8), vol.affine)
    frame = geometry.WorkFrame(ornt, canon.shape, canon.shape, spacing, spacing)
    def localize(self, v, entries, progress=False):
        return Localization({"liver": canon > 0}, frame, "CT", "prior")

    monkeypatch.setattr(AnatomyPrior, "localize", localize)
    stack = sf.study_stack(vol, pixel_segmenters)
    rows, cols = stack.geometry.shape
    got = prior_view_masks(vol, [default_catalog()["liver"]], stack, (rows // 2, cols // 2))["liver"]
    assert got.shape == (stack.view_shape[0], rows // 2, cols // 2)
    back = geometry.paint_input_labels([(1, sf.view_masks_to_work(got))], sf.localisation_frame(stack, rows // 2,
                                                                                                cols // 2)) == 1
    dice = 2 * (back & label).sum() / (back.sum() + label.sum())
    assert dice > 0.9, dice


def test_a_3d_round_with_a_class_the_prior_cannot_draw_teaches_the_unlabelled_studies_the_others(
        tmp_path: Path, one_torch_thread, monkeypatch: pytest.MonkeyPatch) -> None:
    """Corrections that name a lesion (an annotator's class, which the anatomy prior does not draw) beside the
    liver and spleen, and an unlabelled volume: the teacher draws the liver and spleen there and states
    nothing about the lesion (asking the prior for it stopped the whole round), so the round runs and serves a
    model that knows the lesion. A zero-shot round asked for such a class says so."""
    import json
    import shutil
    from types import SimpleNamespace

    import medprompt.sam
    import medprompt.sam.refine
    from medprompt.catalog import catalog_with, default_catalog
    from medprompt.errors import InputError
    from medprompt.model.sam_checkpoint import load_net
    from medprompt.phantoms import write_sample_data
    from medprompt.prior import geometry
    from medprompt.trainers import sam_rounds
    from medprompt.trainers.cells import teacher_studies

    def prior_masks(volume, loc, entries, segmenter_for, *a, **k):  # the teacher without LiteMedSAM's refinement
        return SimpleNamespace(labels=geometry.paint_input_labels(
            [(i + 1, loc.masks[e.name]) for i, e in enumerate(entries) if e.name in loc.masks], loc.frame))

    monkeypatch.setattr(sam_rounds, "_segmenter_for", lambda *a, **k: pixel_segmenters)
    monkeypatch.setattr(medprompt.sam, "segmenter_factory", lambda *a, **k: pixel_segmenters)
    monkeypatch.setattr(medprompt.sam.refine, "refine", prior_masks)
    store = tmp_path / "store"
    write_sample_data(store, n=2, seed=11, shape=(48, 48, 24))
    final = store / "labels" / "final"
    final.mkdir(parents=True)
    shutil.copy(store / "reference" / "phantom_000.nii.gz", final / "phantom_000.nii.gz")
    names = json.loads((store / "reference" / "phantom_000.json").read_text())["labels"]
    labels = {"liver": names["liver"], "spleen": names["spleen"], "lesion": names["bone"]}
    (final / "phantom_000.json").write_text(json.dumps({"labels": labels}))
    shutil.rmtree(store / "reference")

    classes = ["liver", "spleen", "lesion"]
    catalog = catalog_with(classes, default_catalog())
    (study,) = teacher_studies([store / "phantom_001.nii.gz"], classes, catalog, pixel_segmenters, 1,
                               tmp_path / "cache", progress=False)
    assert study.known.tolist() == [True, True, False]
    assert float(study.target[:, 1].sum()) > 0 and float(study.target[:, 3].sum()) == 0  # liver drawn, no lesion
    (again,) = teacher_studies([store / "phantom_001.nii.gz"], classes, catalog, pixel_segmenters, 1,
                               tmp_path / "cache", progress=False)  # from the teacher's cache: the same statement
    assert again.known.tolist() == [True, True, False] and torch.equal(again.target, study.target)

    served = tmp_path / "model" / "medprompt.pt"
    result = sam_rounds.finetune_sam(store, served, None, None, steps=5, device="cpu", model_config="tiny",
                                     progress=False)
    assert result.accepted and load_net(served)[1]["classes"] == ["lesion", "liver", "spleen"]
    assert result.details["teacher_cannot_draw"] == ["lesion"]  # said in the round's report
    with pytest.raises(InputError, match="cannot draw liver_tumour"):
        sam_rounds.zero_shot_sam([store / "phantom_001.nii.gz"], tmp_path / "zs.pt", ["liver", "liver_tumour"],
                                 steps=1, model_config="tiny", device="cpu", progress=False)
