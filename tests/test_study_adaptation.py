"""A zero-shot model adapted to the study it drafts (medprompt.trainers.study_adaptation).

LiteMedSAM is the pixel stand-in of test_sam_net and the teacher is the study's own box label, so the
test checks the adaptation's logic in seconds; its effect on real CTs is in BENCHMARKS.md.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medprompt.model import sam_features as sf
from tests.test_sam_net import pixel_segmenters


def _study(path: Path) -> tuple:
    from medprompt.io.volume import load_volume

    shape, box = (40, 44, 16), np.s_[20:32, 6:20, 4:13]
    data = np.full(shape, -1000.0, np.float32)
    data[2:-2, 2:-2, :] = 40.0
    data[box] = 250.0
    label = np.zeros(shape, np.uint8)
    label[box] = 1
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 4.0, 1.0])), path)
    return load_volume(path), label


@pytest.fixture
def setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_torch_thread):
    """A study, an untrained zero-shot model file of one class, and a teacher that draws the study's box."""
    import medprompt.model.prior_fusion as fusion
    import medprompt.sam
    import medprompt.trainers.cells as cells
    import medprompt.trainers.study_adaptation as sa
    from medprompt.catalog import default_catalog
    from medprompt.model.sam_checkpoint import save_net
    from medprompt.model.sam_net import SamNetConfig, SamPromptNet
    from medprompt.trainers.zero_shot import class_vectors

    volume, label = _study(tmp_path / "study.nii.gz")
    vectors, key = class_vectors(["liver"], default_catalog(), None)
    torch.manual_seed(0)
    net = SamPromptNet(SamNetConfig.preset("tiny", vectors.shape[1]))
    meta = {"text_encoder": key, "classes": ["liver"], "class_vectors": {"liver": vectors[0].tolist()},
            "teacher": "prior+LiteMedSAM", "modalities": ["CT"]}
    model = save_net(tmp_path / "zero_shot.pt", net, meta)
    taught: list[str] = []

    def teach(volume, stack, classes, catalog, segmenter_for):
        taught.append(volume.source)
        cells = sf.to_cells(sf.label_view(label, stack.frame)[stack.slices], stack.geometry, [1]).half()
        return cells, cells  # teacher and prior agree everywhere: every pure cell is trusted

    monkeypatch.setattr(cells, "teach", teach)
    monkeypatch.setattr(sa, "ADAPT_STEPS", 150)
    monkeypatch.setattr(medprompt.sam, "segmenter_factory", lambda *a, **k: pixel_segmenters)
    monkeypatch.setattr(fusion, "prior_view_masks", lambda *a, **k: {})  # the network's own regions
    sa._ADAPTED.clear()
    return volume, label, model, meta, taught


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def test_a_zero_shot_model_learns_the_study_it_drafts_and_keeps_it_for_re_prompts(setting) -> None:
    from medprompt.drafts import draft, predictor, study_localiser

    volume, label, model, _, taught = setting
    before = model.read_bytes()
    as_is = draft(volume, ["liver"], model="medprompt", checkpoint=model, refine="none", adapt=False)
    adapted = draft(volume, ["liver"], model="medprompt", checkpoint=model, refine="none")
    assert _dice(as_is.labels == 1, label == 1) < 0.3  # an untrained network finds little of the box
    assert _dice(adapted.labels == 1, label == 1) > 0.7  # the adapted one draws it
    assert taught == [volume.source]
    again = draft(volume, ["liver"], model="medprompt", checkpoint=model, refine="none")
    assert taught == [volume.source] and np.array_equal(again.labels, adapted.labels)  # kept, not re-taught
    assert model.read_bytes() == before  # the model file is never touched
    assert study_localiser(predictor(model), volume).source == "adapted medprompt"  # as stages say


def test_a_model_of_another_modality_is_not_adapted(setting, tmp_path: Path) -> None:
    from medprompt.drafts import predictor, study_localiser
    from medprompt.model.sam_checkpoint import load_net, save_net

    volume, _, model, meta, taught = setting
    net, _ = load_net(model)
    pred = predictor(save_net(tmp_path / "mr_only.pt", net, {**meta, "modalities": ["MR"]}))
    assert study_localiser(pred, volume) is pred and taught == []  # the teacher was not asked


def test_a_model_annotators_taught_learns_a_new_study_only_where_it_agrees_with_the_teacher(
        setting, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finetuned model that draws the box, and a teacher that draws a wrong block beside it: adapted as a
    finetune round treats an unlabelled study, the model keeps its box; the zero-shot recipe (the teacher
    trusted wherever it agrees with the prior) unlearns it."""
    import medprompt.trainers.cells as cells
    from medprompt.drafts import draft, predictor, study_localiser
    from medprompt.model.sam_checkpoint import save_net

    volume, label, model, meta, taught = setting
    knows_box = study_localiser(predictor(model), volume).net  # the setting's teacher draws the true box
    wrong = np.zeros_like(label)
    wrong[8:18, 24:40, 4:13] = 1  # a block of the study's soft tissue beside the box

    def wrong_teacher(volume, stack, classes, catalog, segmenter_for):
        taught.append(volume.source)
        cells = sf.to_cells(sf.label_view(wrong, stack.frame)[stack.slices], stack.geometry, [1]).half()
        return cells, cells

    monkeypatch.setattr(cells, "teach", wrong_teacher)
    finetuned = save_net(tmp_path / "finetuned.pt", knows_box, {**meta, "labelled": ["other.nii.gz"]})
    zero_shot = save_net(tmp_path / "zero_shot_too.pt", knows_box, meta)
    taught.clear()
    kept = draft(volume, ["liver"], model="medprompt", checkpoint=finetuned, refine="none")
    followed = draft(volume, ["liver"], model="medprompt", checkpoint=zero_shot, refine="none")
    assert taught == [volume.source] * 2  # both were adapted
    again = study_localiser(predictor(finetuned), volume)  # kept for re-prompts
    assert again.source == "adapted medprompt" and again.meta["labelled"] == ["other.nii.gz"]  # its record kept
    assert _dice(kept.labels == 1, label == 1) > 0.7
    assert _dice(followed.labels == 1, label == 1) < 0.5  # taught the wrong block, it unlearnt the box


def test_classes_the_teacher_cannot_draw_go_untaught_not_the_whole_adaptation(
        setting, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model finetuned on liver tumours too: the anatomy prior draws no tumour (and refuses to be asked), so
    the teacher is asked for the liver only, the study states the liver only, and the draft goes on."""
    import medprompt.trainers.cells as cells
    from medprompt.catalog import default_catalog
    from medprompt.drafts import draft, predictor, study_localiser
    from medprompt.model.sam_checkpoint import load_net, save_net
    from medprompt.trainers.zero_shot import class_vectors

    volume, label, model, meta, _ = setting
    asked: list[list[str]] = []

    def teach(volume, stack, classes, catalog, segmenter_for):
        asked.append(list(classes))
        cells = sf.to_cells(sf.label_view(label, stack.frame)[stack.slices], stack.geometry, [1]).half()
        return cells, cells

    monkeypatch.setattr(cells, "teach", teach)
    vectors, _ = class_vectors(["liver", "liver_tumour"], default_catalog(), None)
    net, _ = load_net(model)
    two = {**meta, "classes": ["liver", "liver_tumour"], "labelled": ["a.nii.gz"],
           "class_vectors": {"liver": vectors[0].tolist(), "liver_tumour": vectors[1].tolist()}}
    path = save_net(tmp_path / "with_tumour.pt", net, two)
    out = draft(volume, ["liver"], model="medprompt", checkpoint=path, refine="none")
    assert asked == [["liver"]] and out.labels.shape == label.shape
    assert study_localiser(predictor(path), volume).source == "adapted medprompt"
    only_tumour = save_net(tmp_path / "only_tumour.pt", net, {**two, "classes": ["liver_tumour"]})
    pred = predictor(only_tumour)
    assert study_localiser(pred, volume) is pred and asked == [["liver"]]  # nothing the teacher draws


def test_widened_cells_keep_each_taught_class_in_its_channel() -> None:
    from medprompt.trainers.cells import widened

    cells = torch.arange(3.0)[None, :, None, None].expand(2, 3, 4, 4)  # background 0, "b" 1, "d" 2
    out = widened(cells, ["a", "b", "c", "d"], ["b", "d"])
    assert out.shape == (2, 5, 4, 4)
    assert [float(out[0, i, 0, 0]) for i in range(5)] == [0.0, 0.0, 1.0, 0.0, 2.0]


def test_a_study_the_models_round_learnt_is_not_adapted_to_again(setting, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import medprompt.trainers.study_adaptation as sa
    from medprompt.drafts import predictor, study_localiser
    from medprompt.model.sam_checkpoint import load_net, save_net

    monkeypatch.setattr(sa, "ADAPT_STEPS", 2)  # whether it adapts, not how well

    volume, _, model, meta, taught = setting
    net, _ = load_net(model)
    learnt = save_net(tmp_path / "learnt.pt", net, {**meta, "learnt_studies": ["0" * 64, volume.digest]})
    pred = predictor(learnt)
    assert study_localiser(pred, volume) is pred and taught == []
    other = save_net(tmp_path / "other.pt", net, {**meta, "learnt_studies": ["0" * 64]})
    assert study_localiser(predictor(other), volume) is not predictor(other) and taught == [volume.source]


def test_a_round_records_the_studies_it_learnt_and_those_of_its_starting_model(tmp_path: Path,
                                                                              one_torch_thread) -> None:
    from dataclasses import replace

    from medprompt.trainers.sam_net_train import SamNetTrainConfig, train_cells
    from tests.test_sam_net import _planted_study

    vectors = np.random.default_rng(1).normal(size=(2, 12)).astype(np.float32)

    def run(out: Path, studies, init=None) -> dict:
        cfg = SamNetTrainConfig(out=out, classes=["a", "b"], steps=2, batch_size=2, model_config="tiny", device="cpu")
        train_cells(cfg, studies, vectors, "test", init=init, progress=False)
        return torch.load(out, weights_only=False)

    first = run(tmp_path / "first.pt", [replace(_planted_study(0), digest="b" * 64), _planted_study(1)])
    assert first["learnt_studies"] == ["b" * 64]  # a study without a digest (an image, a test) is not recorded
    second = run(tmp_path / "second.pt", [replace(_planted_study(2), digest="a" * 64)], init=tmp_path / "first.pt")
    assert second["learnt_studies"] == ["a" * 64, "b" * 64]
    assert "learnt_studies" not in run(tmp_path / "none.pt", [_planted_study(3)])


def test_next_samples_prefetch_adapts_a_model_in_use_so_the_first_draft_finds_it_ready(
        setting, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import medprompt.sam.refine as refine
    import medprompt.trainers.study_adaptation as sa
    from medprompt.configs.medprompt import Checkpoints, MedPromptConfig
    from medprompt.drafts import draft
    from medprompt.infers.medprompt import MedPromptInfer

    volume, _, model, _, taught = setting
    prepared: list[str] = []
    monkeypatch.setattr(refine, "precompute", lambda vol, make, stop=None: prepared.append(vol.source) or 3)
    config = MedPromptConfig.__new__(MedPromptConfig)  # the fields prefetch reads; init needs a running app
    config.checkpoints, config.text_encoder, config.sam_checkpoint = Checkpoints(tmp_path / "rounds", model), None, None
    config.adapt, config.in_use = False, threading.Event()
    config.in_use.set()
    assert config.prefetch(str(volume.source), threading.Event()) == 3 and taught == []  # --conf adapt false
    config.adapt, config.in_use = True, threading.Event()
    config.prefetch(str(volume.source), threading.Event())
    assert taught == []  # nobody has drafted with the model yet: annotators may be using the prior alone
    task = MedPromptInfer(labels={"liver": 1}, default_prompts=["liver"], checkpoints=config.checkpoints,
                          text_encoder=None, description="", refine="none", in_use=config.in_use)
    task.segment(volume, ["liver"], "none")  # the server's first draft with the model
    assert config.in_use.is_set() and taught == [volume.source]
    sa._ADAPTED.clear()
    taught.clear()
    config.prefetch(str(volume.source), threading.Event())
    assert prepared == [volume.source] * 3 and taught == [volume.source]
    draft(volume, ["liver"], model="medprompt", checkpoint=model, refine="none")
    assert taught == [volume.source]  # the draft found the adapted network ready


def test_a_corrected_study_is_recorded_as_learnt(tmp_path: Path, one_torch_thread) -> None:
    """A finetune round learnt its corrected volumes: its model file records them, so drafting one again
    does not adapt the model to what the teacher draws there."""
    from medprompt.trainers.sam_rounds import labelled_cells

    volume, label = _study(tmp_path / "corrected.nii.gz")
    nib.save(nib.Nifti1Image(label, np.diag([2.0, 2.0, 4.0, 1.0])), tmp_path / "label.nii.gz")
    study = labelled_cells(tmp_path / "corrected.nii.gz", tmp_path / "label.nii.gz", {"liver": 1}, ["liver"],
                           pixel_segmenters, 1)
    assert study.labelled and study.digest == volume.digest
