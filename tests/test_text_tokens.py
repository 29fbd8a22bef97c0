"""Text prompts for LiteMedSAM (medprompt.model.text_tokens): token shapes, their effect on the
decoder, the fast decoder with extra tokens against SAM's own, model files, the class of a refine
ask, and that training lowers its loss. Random weights of LiteMedSAM's architecture throughout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medprompt.catalog import default_catalog
from medprompt.errors import WeightsError
from medprompt.localization import Localization
from medprompt.model.checkpoint import write_model_file
from medprompt.model.text_segmenter import TextPromptSegmenter
from medprompt.model.text_tokens import (
    TextTokenConfig, TextTokens, load_text_tokens, low_res_logits, prompt_tokens, save_text_tokens,
)
from medprompt.prior import geometry
from medprompt.sam import segmenter_factory
from medprompt.sam import weights as sam_weights
from medprompt.sam.cache import EmbeddingCache
from medprompt.sam.preprocess import logits_to_slice
from medprompt.sam.refine import RefineSettings, refine

pytestmark = pytest.mark.usefixtures("sam_cache")
TEXT_DIM = 16


def _meta(names: list[str], seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"class_vectors": {n: rng.standard_normal(TEXT_DIM).astype(np.float32).tolist() for n in names},
            "text_encoder": "test"}


def _trained_like(model: TextTokens) -> TextTokens:
    """Tokens of the size SAM's own prompt embeddings have (an untrained map starts near zero)."""
    torch.manual_seed(1)
    with torch.no_grad():
        model.map[-1].weight.normal_(std=0.3)
        model.offset.normal_()
    return model.eval()


@pytest.mark.parametrize("tokens,hidden", [(1, 0), (2, 0), (2, 32)])
def test_each_text_vector_becomes_k_prompt_tokens_after_a_boxs_corners(random_sam_file: Path, tokens: int,
                                                                          hidden: int) -> None:
    net = sam_weights.load_sam(random_sam_file).net
    model = TextTokens(TextTokenConfig(text_dim=TEXT_DIM, tokens=tokens, hidden=hidden))
    text = torch.randn(3, TEXT_DIM)
    assert model(text).shape == (3, tokens, 256)
    assert prompt_tokens(net, model, text).shape == (3, tokens, 256)  # text alone
    boxes = torch.tensor([[10.0, 20, 80, 90], [0, 0, 255, 255], [40, 40, 60, 70]])
    with_box = prompt_tokens(net, model, text, boxes)
    assert with_box.shape == (3, 2 + tokens, 256)
    corners, _ = net.prompt_encoder(points=None, boxes=boxes, masks=None)
    torch.testing.assert_close(with_box[:, :2], corners)  # the box's own tokens come first, unchanged
    torch.testing.assert_close(with_box[:, 2:], model(text))


@pytest.mark.parametrize("finetuned", [False, True])
def test_text_tokens_change_the_mask_and_the_fast_decoder_is_sams_own_with_them(random_sam_file: Path,
                                                                                tmp_path: Path, finetuned: bool) -> None:
    """With LiteMedSAM's decoder, or with the model's finetuned copy of it (its own decoder context)."""
    make = segmenter_factory(random_sam_file, "cpu", EmbeddingCache(tmp_path / "c"))
    seg = make((np.random.default_rng(3).random((1, 120, 160)) * 255).astype(np.uint8), (0.9, 0.7))
    seg.decoder_dtype = torch.float32  # exactness against SAM's own decoder (drafts may decode in bf16)
    model = _trained_like(TextTokens(TextTokenConfig(text_dim=TEXT_DIM, tokens=2, decoder=finetuned),
                                     seg.sam.net.mask_decoder))
    if finetuned:
        with torch.no_grad():
            for p in model.decoder.transformer.layers[0].parameters():
                p.mul_(1.5)  # the copy differs from LiteMedSAM's, also in the first layer the context holds
    meta = _meta(["liver", "spleen"])
    texted = TextPromptSegmenter(seg, model, meta)
    boxes = np.array([[20, 30, 90, 100], [60, 10, 150, 70]], np.float32)
    asks = [(boxes[:1], (0, 120, 0, 160)), (boxes[1:], (5, 80, 40, 160))]
    box_only = seg.predict_regions(0, asks)
    liver_spleen = texted.predict_regions(0, asks, ["liver", "spleen"])
    spleen_liver = texted.predict_regions(0, asks, ["spleen", "liver"])
    for a, b, c in zip(box_only, liver_spleen, spleen_liver):
        assert a.shape == b.shape == c.shape
        assert (a - b).abs().max() > 1e-2 and (b - c).abs().max() > 1e-2  # text moves the mask, per class
    # None: no text for that ask, exactly the box-only logits.
    mixed = texted.predict_regions(0, asks, [None, "spleen"])
    torch.testing.assert_close(mixed[0], box_only[0])
    torch.testing.assert_close(mixed[1], liver_spleen[1])
    # The re-associated decoder (medprompt.sam.decoder) with 2 + 2 prompt tokens is SAM's decoder.
    net, g = seg.sam.net, seg.geometry
    text = torch.tensor([meta["class_vectors"]["liver"]])
    sparse = prompt_tokens(net, model, text, torch.from_numpy(g.box_to_model(boxes[:1])))
    with torch.no_grad():
        low = low_res_logits(net, model, seg.embedding(0).float()[None], sparse)
    theirs = logits_to_slice(low, g)
    scale = max(1.0, float(theirs.abs().max()))
    torch.testing.assert_close(liver_spleen[0], theirs, atol=1e-4 * scale, rtol=1e-4)
    # Text alone gives a mask on the whole slice, and different ones per class.
    alone = texted.text_only(0, ["liver", "spleen"])
    assert alone.shape == (2, 256, 256) and (alone[0] - alone[1]).abs().max() > 1e-2


@pytest.mark.parametrize("decoder", [False, True])
def test_model_files_round_trip_map_and_finetuned_decoder(random_sam_file: Path, tmp_path: Path,
                                                          decoder: bool) -> None:
    net = sam_weights.load_sam(random_sam_file).net
    model = _trained_like(TextTokens(TextTokenConfig(text_dim=TEXT_DIM, tokens=2, hidden=8, decoder=decoder),
                                     net.mask_decoder))
    if decoder:
        with torch.no_grad():
            model.decoder.iou_token.weight.add_(1.0)  # a finetuned decoder differs from LiteMedSAM's
    meta = _meta(["liver"])
    path = save_text_tokens(tmp_path / "text.pt", model, meta)
    back, back_meta = load_text_tokens(path)
    assert back.cfg == model.cfg and back_meta["class_vectors"] == meta["class_vectors"]
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        torch.testing.assert_close(b, a.half().float(), msg=name)  # stored in half precision
    assert (back.decoder is not None) == decoder
    if decoder:
        assert not torch.equal(back.decoder.iou_token.weight, net.mask_decoder.iou_token.weight.half().float())
    text = torch.tensor([meta["class_vectors"]["liver"]])
    torch.testing.assert_close(back(text), model(text), atol=1e-2, rtol=1e-2)


def test_missing_or_foreign_model_files_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found.*text_prompt_sam.py"):
        load_text_tokens(tmp_path / "absent.pt")
    other = write_model_file(tmp_path / "other.pt", "medprompt-samnet/1",
                             TextTokens(TextTokenConfig(text_dim=TEXT_DIM)), {})
    with pytest.raises(WeightsError, match="expected format medprompt-sam-text/1"):
        load_text_tokens(other)


class RecordingSegmenter:
    """Stands in for SliceSegmenter in refine: records each slice's asks, answers -4 everywhere."""

    def __init__(self) -> None:
        self.asks: list[tuple[int, np.ndarray, tuple]] = []
        self.encoded = 0

    def prepare(self, ks, progress: bool = False) -> None:
        pass

    def predict_regions(self, k, asks, classes=None):
        self.asks += [(k, np.asarray(b), tuple(r), c) for (b, r), c in zip(asks, classes)]
        return [torch.full((len(b), r[1] - r[0], r[3] - r[2]), -4.0) for b, r in asks]


def test_refine_names_the_class_of_every_ask() -> None:
    """A text-prompted segmenter adds the tokens of the class refine names; the box must be that class's."""
    from medprompt.io.volume import Volume
    from medprompt.sam.preprocess import axial_view

    n, nz = 48, 8
    volume = Volume(data=np.zeros((n, n, nz), np.float32), affine=np.diag([1.0, 1.0, 3.0, 1.0]), source="scene",
                    modality="CT")
    _, frame = geometry.to_work(volume.data, volume.affine, 1.0)
    yy, xx = np.mgrid[:n, :n]
    liver, spleen = np.zeros((n, n, nz), bool), np.zeros((n, n, nz), bool)
    liver[..., 1:6] = ((yy - 14) ** 2 + (xx - 14) ** 2 <= 36)[..., None]
    spleen[..., 2:7] = ((yy - 34) ** 2 + (xx - 32) ** 2 <= 25)[..., None]
    catalog = default_catalog()
    entries = [catalog["liver"], catalog["spleen"]]
    loc = Localization(masks={"liver": liver, "spleen": spleen}, frame=frame, modality="CT", source="prior")
    seg = RecordingSegmenter()
    refine(volume, loc, entries, lambda slices, px: seg, RefineSettings(step_mm=1.0))
    views = {"liver": axial_view(liver), "spleen": axial_view(spleen)}
    assert sorted(name for *_, name in seg.asks) == ["liver"] * 5 + ["spleen"] * 5
    for k, boxes, region, name in seg.asks:
        x0, y0, x1, y1 = boxes[0]
        cy, cx = int((y0 + y1) / 2), int((x0 + x1) / 2)
        assert views[name][k, cy, cx], (k, name)  # the box is around that class's mask on that slice


def test_training_on_teacher_masks_lowers_the_loss_and_leaves_litemedsam_alone(random_sam_file: Path,
                                                                               tmp_path: Path) -> None:
    from medprompt.trainers.text_tokens_train import TextTeacher, TextTrainConfig, train_text_tokens

    torch.set_num_threads(1)
    net = sam_weights.load_sam(random_sam_file).net
    decoder_before = {k: v.clone() for k, v in net.mask_decoder.state_dict().items()}
    flags_before = [p.requires_grad for p in net.parameters()]
    rng = np.random.default_rng(0)
    emb = torch.from_numpy(rng.standard_normal((2, 256, 64, 64)).astype(np.float16))
    target = torch.zeros(2, 256, 256, dtype=torch.uint8)
    target[:, 40:120, 30:100] = 1
    target[:, 150:200, 140:220] = 2
    boxes = torch.tensor([[[30.0, 40, 99, 119], [140, 150, 219, 199]]] * 2)
    teacher = TextTeacher("synthetic", emb, target, torch.ones(2, 256, 256).half(), boxes)
    cfg = TextTrainConfig(out=tmp_path / "text.pt", classes=["liver", "spleen"],
                          model=TextTokenConfig(text_dim=TEXT_DIM), steps=24, slices_per_step=1,
                          prompts_per_slice=2, lr=1e-2)
    vectors = rng.standard_normal((2, TEXT_DIM)).astype(np.float32)
    losses: list[float] = []
    path = train_text_tokens(cfg, [teacher], vectors, "test", net, on_step=lambda s, d: losses.append(d["loss"]))
    assert np.mean(losses[-6:]) < np.mean(losses[:6])
    _, meta = load_text_tokens(path)
    assert meta["trained_on"] == ["synthetic"] and sorted(meta["class_vectors"]) == ["liver", "spleen"]
    for k, v in net.mask_decoder.state_dict().items():
        assert torch.equal(v, decoder_before[k]), k  # only the map was trained
    assert [p.requires_grad for p in net.parameters()] == flags_before  # the shared network is given back as it was
