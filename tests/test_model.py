"""MedPromptNet, its losses, checkpoints and full-volume inference (tiny models, CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medprompt.catalog import SYNAPSE8, default_catalog
from medprompt.drafts import draft
from medprompt.errors import WeightsError
from medprompt.evaluation import evaluate
from medprompt.io.volume import Volume, load_volume
from medprompt.model.checkpoint import DEFAULT_CHECKPOINT, VIT_CHECKPOINT, load_model, save_model
from medprompt.model.losses import consistency_loss, mask_loss, patch_targets, region_text_loss
from medprompt.model.network import MedPromptNet, NetConfig
from medprompt.model.predictor import centred_starts, load_checkpoint
from medprompt.phantoms import make_phantom


def test_mask_loss_ignores_unconfident_pixels_and_matches_hand_values():
    logits = torch.zeros(1, 1, 2, 2)  # p = 0.5 everywhere
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    weight = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    # BCE at p=0.5 is ln 2 on each weighted pixel; Dice over weighted pixels: 2*0.5/(1+1) -> 1 - (1+1)/(2+1)
    expected = math.log(2) + (1 - (2 * 0.5 + 1) / (1.0 + 1.0 + 1))
    assert mask_loss(logits, target, weight).item() == pytest.approx(expected, rel=1e-5)
    # Changing a zero-weight pixel's logit changes nothing.
    logits2 = logits.clone()
    logits2[0, 0, 1, 0] = 9.0
    assert mask_loss(logits2, target, weight).item() == pytest.approx(expected, rel=1e-5)


def test_patch_targets_take_the_majority_class_or_nothing():
    target = torch.zeros(1, 2, 4, 4)
    target[0, 0, :2, :2] = 1  # top-left patch: class 1 everywhere
    target[0, 1, 2:, 2:3] = 1  # bottom-right patch: class 2 on half
    weight = torch.ones(1, 2, 4, 4)
    weight[0, :, 2:, :2] = 0  # bottom-left patch: unknown
    cls, w = patch_targets(target, weight, patch=2)
    # class 1 | background ; unknown (weight 0) | half class 2 vs half background: a tie, weight 0.5
    assert cls[0].tolist() == [[1, 0], [0, 0]]
    assert w[0].tolist() == [[1.0, 1.0], [0.0, 0.5]]


def test_region_text_loss_is_weighted_cross_entropy():
    logits = torch.tensor([[[[2.0]], [[0.0]], [[-1.0]]]])  # (B=1, K=3, 1, 1)
    cls = torch.tensor([[[0]]])
    expected = -torch.log_softmax(logits[0, :, 0, 0], 0)[0]
    assert region_text_loss(logits, cls, torch.ones(1, 1, 1)).item() == pytest.approx(expected.item())
    assert region_text_loss(logits, cls, torch.zeros(1, 1, 1)).item() == 0.0


def test_consistency_is_zero_for_identical_views_and_positive_otherwise():
    a = torch.randn(2, 3, 8, 8)
    assert consistency_loss(a, a).item() == 0.0
    assert consistency_loss(a, a + 1).item() > 0


@pytest.mark.parametrize("prompts", [1, 4])
def test_network_shapes_any_number_of_prompts(prompts):
    cfg = NetConfig.preset("tiny", text_dim=12)
    net = MedPromptNet(cfg)
    x = torch.randn(2, 3, cfg.tile, cfg.tile)
    logits, patches = net(x, torch.randn(prompts, 12))
    assert logits.shape == (2, prompts, cfg.tile, cfg.tile)
    assert patches.shape == (2, cfg.joint_dim, cfg.tile // cfg.patch, cfg.tile // cfg.patch)
    assert torch.allclose(patches.norm(dim=1), torch.ones(1), atol=1e-5)
    region = net.region_logits(patches, torch.randn(prompts, 12))
    assert region.shape == (2, 1 + prompts, cfg.tile // cfg.patch, cfg.tile // cfg.patch)


def test_prompts_change_the_mask():
    torch.manual_seed(0)
    net = MedPromptNet(NetConfig.preset("tiny", text_dim=12)).eval()
    x = torch.randn(1, 3, 64, 64)
    logits, _ = net(x, torch.randn(2, 12))
    assert not torch.allclose(logits[0, 0], logits[0, 1])


def test_centred_tiles_cover_the_axis():
    for size, tile, centre in [(100, 64, 50), (64, 64, 32), (300, 64, 10), (300, 64, 290)]:
        starts = centred_starts(size, tile, centre)
        covered = np.zeros(size, bool)
        for s in starts:
            assert 0 <= s <= max(0, size - tile)
            covered[s : s + tile] = True
        assert covered.all()


def _tiny_checkpoint(path: Path) -> Path:
    cat = default_catalog()
    rng = np.random.default_rng(0)
    vectors = {c: (v / np.linalg.norm(v)).tolist() for c in SYNAPSE8 for v in [rng.normal(size=12)]}
    torch.manual_seed(0)
    net = MedPromptNet(NetConfig.preset("tiny", text_dim=12))
    assert set(vectors) <= set(cat.names)
    return save_model(path, net, {"text_encoder": "test-encoder", "classes": list(SYNAPSE8), "class_vectors": vectors})


def test_checkpoint_round_trip_and_clear_errors(tmp_path: Path):
    path = _tiny_checkpoint(tmp_path / "m.pt")
    net, meta = load_model(path)
    assert meta["text_encoder"] == "test-encoder" and net.cfg.tile == 64
    assert not list(tmp_path.glob("*.tmp"))  # written atomically, nothing left behind
    with pytest.raises(WeightsError, match="not found.*train-zero-shot"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pt"):
        load_model(tmp_path / "junk.pt")


def test_every_kind_of_model_file_refuses_the_others_naming_the_file_and_the_command(tmp_path: Path):
    """The ViT model, the network on LiteMedSAM features and the weak 2D model read files the same way:
    a missing file names the command that makes it, a foreign one the kind expected."""
    from medprompt.model.sam_checkpoint import load_net
    from medprompt.weak.model import WeakModel

    vit = _tiny_checkpoint(tmp_path / "vit.pt")
    with pytest.raises(WeightsError, match="vit.pt: not a MedPrompt checkpoint on LiteMedSAM features"):
        load_net(vit)
    with pytest.raises(WeightsError, match="vit.pt: not a weak-supervision model"):
        WeakModel.load(vit)
    with pytest.raises(WeightsError, match="not found: .*none.pt; make one with `medprompt train-weak"):
        WeakModel.load(tmp_path / "none.pt")
    with pytest.raises(WeightsError, match="not found: .*none.pt; make one with `medprompt train-zero-shot"):
        load_net(tmp_path / "none.pt")
    (tmp_path / "cut.pt").write_bytes(vit.read_bytes()[:200])  # a truncated copy
    with pytest.raises(WeightsError, match="cut.pt: not a readable"):
        WeakModel.load(tmp_path / "cut.pt")


def test_predictor_is_invariant_to_storage_orientation(tmp_path: Path):
    """Same anatomy stored RAS and LPS with permuted axes: the same voxels, every class."""
    path = _tiny_checkpoint(tmp_path / "m.pt")
    predictor = load_checkpoint(path)
    entries = [default_catalog()[c] for c in ("liver", "spleen", "kidney_left")]
    volume, _, _ = make_phantom(3, shape=(48, 48, 24))
    ref = predictor.predict(volume, entries)
    assert ref.shape == volume.data.shape and ref.dtype == np.uint16
    data = np.flip(np.flip(volume.data, 0), 1)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = volume.data.shape[0] - 1, volume.data.shape[1] - 1
    affine = volume.affine @ flip
    perm = (2, 0, 1)
    moved = Volume(np.ascontiguousarray(np.transpose(data, perm)), affine[:, list(perm) + [3]], "moved", None)
    out = predictor.predict(moved, entries)
    back = np.flip(np.flip(np.transpose(out, np.argsort(perm)), 0), 1)
    assert np.array_equal(back, ref)


def test_shipped_checkpoints_are_described_and_load():
    from medprompt.drafts import checkpoint_arch
    from medprompt.model.sam_checkpoint import load_net

    net, meta = load_model(VIT_CHECKPOINT)
    assert set(SYNAPSE8) <= set(meta["classes"])
    assert meta["text_encoder"] == "minilm-l6-v2" and len(meta["class_vectors"]["liver"]) == net.cfg.text_dim
    assert checkpoint_arch(DEFAULT_CHECKPOINT) == "sam"  # the default is the network on LiteMedSAM's features
    sam_net, sam_meta = load_net(DEFAULT_CHECKPOINT)
    assert set(SYNAPSE8) <= set(sam_meta["classes"]) and sam_meta["text_encoder"] == "minilm-l6-v2"
    for path in (DEFAULT_CHECKPOINT, VIT_CHECKPOINT):
        assert path.stat().st_size < 20 * 2**20  # small enough to ship in git


def test_shipped_checkpoint_on_real_ct(real_data: Path):
    """The default model (on LiteMedSAM's features, trained with no labels; BENCHMARKS.md: 0.786 with
    LiteMedSAM, prior + LiteMedSAM 0.760): measured figures, asserted floors."""
    case = real_data / "ct_abdomen_a"
    volume = load_volume(case / "image.nii.gz")
    seg = draft(volume, model="medprompt")
    ref = nib.load(case / "label.nii.gz")
    names = json.loads((case / "labels.json").read_text())["labels"]
    ev = evaluate(seg.labels, volume.affine, seg.names, np.asarray(ref.dataobj), ref.affine, names)
    dice = {s.name: s.dice for s in ev.scores}
    assert ev.mdice >= 0.76, dice
    assert dice["liver"] >= 0.90 and dice["spleen"] >= 0.90, dice


def test_the_older_vit_checkpoint_still_drafts_a_real_ct(real_data: Path):
    """The ViT trained from pixels (`--arch vit`), its own regions: kept working, not the default."""
    case = real_data / "ct_abdomen_a"
    volume = load_volume(case / "image.nii.gz")
    seg = draft(volume, model="medprompt", checkpoint=VIT_CHECKPOINT, refine="none")
    ref = nib.load(case / "label.nii.gz")
    names = json.loads((case / "labels.json").read_text())["labels"]
    ev = evaluate(seg.labels, volume.affine, seg.names, np.asarray(ref.dataobj), ref.affine, names)
    dice = {s.name: s.dice for s in ev.scores}
    assert ev.mdice >= 0.50, dice  # 0.556 (BENCHMARKS.md)
    assert dice["liver"] >= 0.80, dice
