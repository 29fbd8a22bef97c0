"""Active learning: the uncertainty and disagreement scores, their cache, the strategies, and the server.

Scores are checked on hand-made inputs; the cache and the strategies on a real MONAI Label
LocalDatastore of small volumes (48x48x16 at 2.5 mm: the network's own grid, one tile) with the tiny
random checkpoint; the wiring end to end through MONAILabelClient against the session server.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import nibabel as nib
import numpy as np
import torch
import pytest
from conftest import console_script, launch_server, serving, write_tiny_checkpoint
from fastapi import HTTPException
from monailabel.client import MONAILabelClient
from monailabel.datastore.local import LocalDatastore

from medprompt.activelearning import (
    Disagreement,
    ImageScore,
    ScoreMethod,
    ScoreStrategy,
    ServedModel,
    Uncertainty,
    label_disagreement,
    mean_binary_entropy,
)
from medprompt.catalog import SYNAPSE8
from medprompt.configs.medprompt import Checkpoints
from medprompt.drafts import Segmentation
from medprompt.errors import PromptError

if TYPE_CHECKING:
    from conftest import RunningServer

    from medprompt.io.volume import Volume

SHAPE = (48, 48, 16)
AFFINE = np.diag([2.5, 2.5, 2.5, 1.0])


def h2(p: float) -> float:
    """Binary entropy in bits, written out independently of the code under test."""
    return float(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)))


def write_ct(path: Path, seed: int, tissue_hu: float = 40.0) -> Path:
    """A small CT: air around a soft-tissue block (the body) with noise; ``tissue_hu`` sets its mean."""
    rng = np.random.default_rng(seed)
    data = np.full(SHAPE, -1000.0, np.float32)
    data[8:40, 10:38, :] = tissue_hu + rng.normal(0, 30, size=(32, 28, SHAPE[2]))
    nib.save(nib.Nifti1Image(data, AFFINE), path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture
def model(tmp_path: Path, checkpoint: Path) -> ServedModel:
    """The tiny checkpoint served as the start checkpoint (a copy: tests change its mtime)."""
    start = tmp_path / "start.pt"
    start.write_bytes(checkpoint.read_bytes())
    return ServedModel(Checkpoints(rounds=tmp_path / "rounds", start=start), tuple(SYNAPSE8), None)


def datastore(directory: Path, tissue_hu: list[float]) -> LocalDatastore:
    """A MONAI Label datastore of small CTs ct_0, ct_1, ... with the given tissue intensities."""
    directory.mkdir(exist_ok=True)
    for i, hu in enumerate(tissue_hu):
        write_ct(directory / f"ct_{i}.nii.gz", seed=i, tissue_hu=hu)
    return LocalDatastore(str(directory), extensions=("*.nii.gz",))


def save_final_label(store: LocalDatastore, image: str, tmp_path: Path) -> None:
    label = tmp_path / f"{image}_label.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.uint8), AFFINE), label)
    store.save_label(image, str(label), "final", {})


class Brightness(ImageScore):
    """A score with a known ranking (mean intensity), counting its computations: the strategy's
    and the cache's behaviour does not depend on which score it ranks by."""

    name = "brightness"
    description = "mean intensity"

    def __init__(self, model: ServedModel) -> None:
        super().__init__(model)
        self.computed: list[float] = []

    def compute(self, volume: Volume, checkpoint: Path) -> float:
        score = float(volume.data.mean())
        self.computed.append(score)
        return score


# -- the scores on hand-made inputs ---------------------------------------------------------------

def test_entropy_is_the_mean_binary_entropy_in_bits_over_classes_within_the_region() -> None:
    region = np.zeros((6, 4, 2), bool)
    region[:3] = True
    prob = np.empty((2, 6, 4, 2), np.float32)
    prob[0] = 0.5  # a coin flip: 1 bit everywhere
    prob[1, :3] = 0.1
    prob[1, 3:] = 0.5  # outside the region: must not count
    assert mean_binary_entropy(prob, region) == pytest.approx((1.0 + h2(0.1)) / 2, abs=1e-6)
    # Saturated masks are certain (and stay finite); an empty region has nothing to be uncertain about.
    certain = np.stack([np.zeros((6, 4, 2)), np.ones((6, 4, 2))]).astype(np.float32)
    assert mean_binary_entropy(certain, region) == pytest.approx(0.0, abs=1e-4)
    assert mean_binary_entropy(prob, np.zeros_like(region)) == 0.0


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        ("half-overlap+equal+empty", 1 - (0.5 + 1.0) / 2),  # class 3 is empty in both: ignored, not Dice 0
        ("disjoint", 1.0),
        ("identical", 0.0),
        ("all-empty", 0.0),
    ],
)
def test_disagreement_is_one_minus_mean_dice_ignoring_classes_empty_in_both(build: str, expected: float) -> None:
    names = {"liver": 1, "spleen": 2, "aorta": 3}
    a = np.zeros((10, 10, 2), np.uint16)
    b = np.zeros_like(a)
    if build == "half-overlap+equal+empty":
        a[0:4, 0:5, 0] = 1  # 20 voxels
        b[2:6, 0:5, 0] = 1  # 20 voxels, 10 shared: Dice 0.5
        a[8:10, 8:10, :] = b[8:10, 8:10, :] = 2  # Dice 1
    elif build == "disjoint":
        a[0:3, 0:3, 0] = 1
        b[5:8, 5:8, 0] = 1
    elif build == "identical":
        a[1:4, 1:4, :] = b[1:4, 1:4, :] = 2
    assert label_disagreement(a, b, names) == pytest.approx(expected)
    assert label_disagreement(b, a, names) == pytest.approx(expected)


def test_uncertainty_counts_only_the_body(tmp_path: Path, model: ServedModel,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Masks certain inside the patient and coin flips in the air around it score ~0: air is not the question."""
    from medprompt.io.volume import load_volume
    from medprompt.model.predictor import Predictor

    def probabilities(self: Predictor, grid, text, progress: bool = False) -> torch.Tensor:
        inside = grid.raw > -500
        return torch.from_numpy(np.stack([np.where(inside, 0.0, 0.5)] * text.shape[0]).astype(np.float32))

    monkeypatch.setattr(Predictor, "probabilities", probabilities)
    volume = load_volume(write_ct(tmp_path / "ct.nii.gz", seed=0))
    assert Uncertainty(model).compute(volume, model.checkpoints.served()) == pytest.approx(0.0, abs=1e-3)


def test_disagreement_compares_the_served_models_draft_with_the_priors(
    tmp_path: Path, model: ServedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    import medprompt.drafts
    from medprompt.io.volume import load_volume

    prior = np.zeros(SHAPE, np.uint16)
    learned = np.zeros(SHAPE, np.uint16)
    prior[0:4, 0:5, 0] = 1
    learned[2:6, 0:5, 0] = 1  # Dice 0.5 for liver; every other class empty in both
    calls = []

    def draft(volume, prompts, model="prior", checkpoint=None, text_encoder=None, **kwargs) -> Segmentation:
        calls.append((model, tuple(prompts), checkpoint))
        names = {name: i + 1 for i, name in enumerate(["liver", *(n for n in SYNAPSE8 if n != "liver")])}
        return Segmentation(labels=prior if model == "prior" else learned, names=names, resolved={})

    monkeypatch.setattr(medprompt.drafts, "draft", draft)
    served = model.checkpoints.served()
    volume = load_volume(write_ct(tmp_path / "ct.nii.gz", seed=0))
    # A prompt the prior cannot segment (a tumour) has no prior draft: it is left out, not an error.
    with_tumour = ServedModel(model.checkpoints, (*SYNAPSE8, "liver_tumour"), None)
    assert Disagreement(with_tumour).compute(volume, served) == pytest.approx(0.5)
    assert sorted(calls, key=str) == [("medprompt", tuple(SYNAPSE8), served), ("prior", tuple(SYNAPSE8), None)]
    with pytest.raises(PromptError, match="liver_tumour"):
        Disagreement(ServedModel(model.checkpoints, ("liver_tumour",), None)).compute(volume, served)


# -- the cache ----------------------------------------------------------------------------------

def test_scores_are_cached_in_the_image_info_until_the_checkpoint_or_prompts_change(
    tmp_path: Path, model: ServedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = datastore(tmp_path / "studies", [40.0, 60.0])
    score = Uncertainty(model)
    computed = []
    real = Uncertainty.compute
    monkeypatch.setattr(Uncertainty, "compute", lambda self, *a: computed.append(1) or real(self, *a))

    first = score.update(store, ["ct_0", "ct_1"])
    assert len(computed) == 2 and all(0.0 <= s <= 1.0 for s in first.values())
    assert score.update(store, ["ct_0", "ct_1"]) == first and len(computed) == 2

    # Stored in the datastore file, with what it was computed with: a fresh datastore object reads it.
    reopened = LocalDatastore(str(tmp_path / "studies"), extensions=("*.nii.gz",))
    entry = reopened.get_image_info("ct_0")["uncertainty"]
    assert entry["score"] == first["ct_0"]
    assert entry["key"]["checkpoint"] == str(model.checkpoints.start) and entry["key"]["prompts"] == list(SYNAPSE8)
    assert score.update(reopened, ["ct_0", "ct_1"]) == first and len(computed) == 2

    # A new checkpoint (a training round replacing the file) makes every cached score stale.
    stat = model.checkpoints.start.stat()
    os.utime(model.checkpoints.start, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert score.update(reopened, ["ct_0", "ct_1"]) == pytest.approx(first) and len(computed) == 4
    assert score.update(reopened, ["ct_0", "ct_1"]) and len(computed) == 4

    # Other prompts are another question.
    liver_only = Uncertainty(ServedModel(model.checkpoints, ("liver",), None))
    liver_only.update(reopened, ["ct_0"])
    assert len(computed) == 5


def test_a_study_of_a_modality_the_model_never_learnt_scores_highest_without_computing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model on LiteMedSAM features that records the modalities it learnt: on a study of another its drafts are
    the prior's, so neither its entropy nor its disagreement with the prior says anything; the study is the one
    to correct (its label teaches the modality). The same model recorded as CT computes the score."""
    from medprompt.activelearning import UNLEARNT_SCORE
    from medprompt.model.sam_checkpoint import save_net
    from medprompt.model.sam_net import SamNetConfig, SamPromptNet

    store = datastore(tmp_path / "studies", [40.0, 60.0])  # CTs
    net = SamPromptNet(SamNetConfig.preset("tiny", text_dim=8))
    vectors = {c: np.eye(8, dtype=np.float32)[i % 8].tolist() for i, c in enumerate(SYNAPSE8)}
    record = {"text_encoder": "none", "classes": list(SYNAPSE8), "class_vectors": vectors}
    for learnt, expect_computed in ((["MR"], 0), (["CT"], 2)):
        start = save_net(tmp_path / f"learnt_{learnt[0]}.pt", net, {**record, "modalities": learnt})
        score = Brightness(ServedModel(Checkpoints(rounds=tmp_path / "rounds", start=start), tuple(SYNAPSE8), None))
        scores = score.update(store, ["ct_0", "ct_1"])
        assert len(score.computed) == expect_computed, learnt
        if not expect_computed:
            assert scores == {"ct_0": UNLEARNT_SCORE, "ct_1": UNLEARNT_SCORE}
        else:
            assert scores == pytest.approx(dict(zip(["ct_0", "ct_1"], score.computed)))


# -- the strategies and the scoring method ---------------------------------------------------------

def test_strategy_returns_the_highest_scoring_unlabelled_image_and_never_a_labelled_one(
    tmp_path: Path, model: ServedModel
) -> None:
    store = datastore(tmp_path / "studies", [10.0, 80.0, 50.0, 120.0])  # brightness ranks ct_3, ct_1, ct_2, ct_0
    save_final_label(store, "ct_3", tmp_path)
    score = Brightness(model)
    strategy = ScoreStrategy(score)

    picked = strategy({"strategy": "brightness"}, store)
    assert picked["id"] == "ct_1"
    assert picked["score"] == pytest.approx(nib.load(tmp_path / "studies" / "ct_1.nii.gz").get_fdata().mean(), rel=1e-4)
    assert len(score.computed) == 3  # the labelled image is never scored
    assert "brightness" not in store.get_image_info("ct_3")

    save_final_label(store, "ct_1", tmp_path)
    assert strategy({"strategy": "brightness"}, store)["id"] == "ct_2"
    assert len(score.computed) == 3  # the others were cached

    for image in ("ct_0", "ct_2"):
        save_final_label(store, image, tmp_path)
    assert strategy({"strategy": "brightness"}, store) is None  # MONAI Label answers {}: nothing to label


def test_unreadable_image_ranks_last_and_does_not_stop_scoring(tmp_path: Path, model: ServedModel) -> None:
    store = datastore(tmp_path / "studies", [10.0])
    (tmp_path / "studies" / "broken.nii.gz").write_bytes(b"not a NIfTI file")
    store.refresh()
    score = Brightness(model)
    assert ScoreStrategy(score)({"strategy": "brightness"}, store)["id"] == "ct_0"
    summary = ScoreMethod(score)({"method": "brightness"}, store)
    assert (summary["total"], summary["scored"], summary["failed"]) == (2, 1, 1)


def test_scoring_method_scores_only_unlabelled_images(tmp_path: Path, model: ServedModel) -> None:
    store = datastore(tmp_path / "studies", [10.0, 20.0, 30.0])
    save_final_label(store, "ct_0", tmp_path)
    score = Brightness(model)
    summary = ScoreMethod(score)({"method": "brightness"}, store)
    assert (summary["total"], summary["scored"], summary["failed"]) == (2, 2, 0)
    assert [i for i in ("ct_0", "ct_1", "ct_2") if "brightness" in store.get_image_info(i)] == ["ct_1", "ct_2"]


def test_missing_checkpoint_is_a_503_naming_it(tmp_path: Path) -> None:
    store = datastore(tmp_path / "studies", [10.0])
    missing = ServedModel(Checkpoints(rounds=tmp_path / "rounds", start=tmp_path / "nowhere.pt"), ("liver",), None)
    with pytest.raises(HTTPException) as caught:
        ScoreStrategy(Uncertainty(missing))({"strategy": "uncertainty"}, store)
    assert caught.value.status_code == 503 and "nowhere.pt" in caught.value.detail


# -- through the server ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[RunningServer]:
    """``medprompt serve`` on three small CTs: the session server's phantoms cost the tiny network
    seconds each to score, and this module labels its studies, which other tests must not see."""
    root = tmp_path_factory.mktemp("al_server")
    studies = root / "studies"
    studies.mkdir()
    for i, hu in enumerate([20.0, 40.0, 60.0]):
        write_ct(studies / f"ct_{i}.nii.gz", seed=i, tissue_hu=hu)
    with serving(launch_server(root, [str(console_script("medprompt")), "serve"], studies, checkpoint)) as running:
        yield running


def post_json(url: str) -> dict:
    request = urllib.request.Request(url, data=b"{}", headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def test_server_serves_the_most_uncertain_unlabelled_study_until_none_is_left(
    small_server: RunningServer, tmp_path: Path
) -> None:
    client = MONAILabelClient(small_server.url, tmpdir=str(tmp_path))
    info = client.info()
    assert {"random", "first", "uncertainty", "disagreement"} <= set(info["strategies"])
    assert {"uncertainty", "disagreement"} <= set(info["scoring"])

    # The scoring method (MONAI Label runs it in a child process; run_sync runs it in the server).
    summary = post_json(f"{small_server.url}/scoring/uncertainty?run_sync=true")
    assert (summary["total"], summary["scored"], summary["failed"]) == (3, 3, 0)
    scored = {i: o["image"]["info"]["uncertainty"] for i, o in client.datastore()["objects"].items()}
    assert {e["key"]["checkpoint"] for e in scored.values()} == {str(small_server.checkpoint)}

    # The other strategy scores on demand (no scoring run first), with the real prior and network.
    picked = client.next_sample("disagreement", {})
    disagreement = {i: o["image"]["info"]["disagreement"]["score"] for i, o in client.datastore()["objects"].items()}
    assert picked["id"] == max(sorted(disagreement), key=disagreement.get)
    assert all(0.0 <= d <= 1.0 for d in disagreement.values())

    served = []
    while picked := client.next_sample("uncertainty", {}):
        unlabelled = [i for i, o in client.datastore()["objects"].items() if "final" not in o["labels"]]
        assert picked["id"] in unlabelled
        assert picked["score"] == max(scored[i]["score"] for i in unlabelled)  # the cached scores, the top one
        served.append(picked["id"])
        label = tmp_path / f"{picked['id']}.nii.gz"
        nib.save(nib.Nifti1Image(np.ones(SHAPE, np.uint8), AFFINE), label)
        client.save_label(picked["id"], str(label), tag="final")  # the annotator's correction
    # Each study once, most uncertain first; then {} (MONAI Label's "nothing to label").
    assert served == sorted(scored, key=lambda i: -scored[i]["score"])
