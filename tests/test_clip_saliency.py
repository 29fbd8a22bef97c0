"""gScoreCAM and M2IB on a tiny open_clip ViT trained here to tell a planted bright square from a bar.

The model pools its class token, as BiomedCLIP does, and is saved and loaded as a BiomedCLIP-layout
folder, so the registry's real loading code runs. Both maps must peak on the square in new images.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from medprompt.clip import saliency  # noqa: E402
from medprompt.clip.model import image_to_unit_rgb, load_clip, write_model_folder  # noqa: E402
from medprompt.errors import InputError, WeightsError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SIZE = 40
SQUARE, PLAIN = "a bright square", "a plain image"
TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": SIZE, "patch_size": 8, "width": 48, "layers": 2, "head_width": 24},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def synthetic(rng: np.random.Generator, n: int, square: np.ndarray) -> tuple[np.ndarray, list]:
    """Noisy grey images; a bright square at a random place, or a bar of about the same brightness."""
    images = rng.normal(0.3, 0.06, (n, SIZE, SIZE)) + rng.normal(0, 0.05, (n, 1, 1))
    boxes = []
    for i in range(n):
        side = int(rng.integers(9, 13))
        if square[i]:
            y, x = rng.integers(0, SIZE - side, 2)
            images[i, y:y + side, x:x + side] += 0.5
            boxes.append((int(y), int(x), side))
        else:
            length = min(side * side // 3, SIZE - 4)
            y, x = rng.integers(0, SIZE - 3), rng.integers(0, SIZE - length)
            images[i, y:y + 3, x:x + length] += 0.5
            boxes.append(None)
    return np.clip(images, 0, 1).astype(np.float32), boxes


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("tiny_clip"))


def train_tiny(folder):
    """Train the tiny CLIP until it tells the two texts apart, then save it as a model folder."""
    import torch.nn.functional as F
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = open_clip.CLIP(**TINY)
    tokens = open_clip.get_tokenizer("ViT-B-32", context_length=TINY["text_cfg"]["context_length"])([SQUARE, PLAIN])
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    recent = []
    for step in range(150):
        label = rng.integers(0, 2, 16)
        images, _ = synthetic(rng, 16, label == 0)
        pixels = (torch.from_numpy(images)[:, None].repeat(1, 3, 1, 1) - mean) / std
        logits = model.logit_scale.exp() * F.normalize(model.encode_image(pixels), dim=-1) @ \
            F.normalize(model.encode_text(tokens), dim=-1).t()
        loss = F.cross_entropy(logits, torch.from_numpy(label))
        opt.zero_grad()
        loss.backward()
        opt.step()
        recent = (recent + [loss.item()])[-5:]
        if step >= 30 and max(recent) < 0.05:
            break
    assert max(recent) < 0.05, f"the tiny CLIP did not learn the task (losses {recent})"
    return write_model_folder(folder, model.eval(), TINY,
                              OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)


def contrast(method, seed: int = 1, n: int = 4) -> list[float]:
    """Mean saliency inside the square over mean outside, on images the model never saw (uint8 RGB)."""
    images, boxes = synthetic(np.random.default_rng(seed), n, np.ones(n, bool))
    ratios = []
    for image, (y, x, side) in zip(images, boxes):
        rgb = np.repeat((image * 255).astype(np.uint8)[..., None], 3, axis=2)
        m = method(rgb, SQUARE)
        assert m.shape == image.shape and m.dtype == np.float32
        assert m.min() >= 0.0 and m.max() <= 1.0 and m.max() == pytest.approx(1.0)
        inside = np.zeros(m.shape, bool)
        inside[y:y + side, x:x + side] = True
        ratios.append(float(m[inside].mean() / max(m[~inside].mean(), 1e-6)))
    return ratios


def test_gscorecam_peaks_on_the_planted_square(trained_folder):
    ratios = contrast(saliency.clip_saliency("gscorecam", str(trained_folder)))
    assert min(ratios) > 2.0, ratios


def test_gscorecam_few_channels_ranked_by_class_token_gradient(trained_folder):
    # The last block's norm2 is after the last attention: patch tokens there never reach a
    # class-token output, so channels are ranked by the class token's gradient; 8 of 48 suffice.
    clip = load_clip(str(trained_folder))
    ratios = contrast(lambda img, text: saliency.gscorecam(clip, img, text, top_k=8), seed=2)
    assert min(ratios) > 2.0, ratios
    last_norm2 = "visual.transformer.resblocks[1].ln_2"
    named = contrast(lambda img, text: saliency.gscorecam(clip, img, text, layer=last_norm2), seed=1)
    assert named == pytest.approx(contrast(saliency.clip_saliency("gscorecam", str(trained_folder)), seed=1))


def test_m2ib_peaks_on_the_planted_square(trained_folder):
    ratios = contrast(saliency.clip_saliency("m2ib", str(trained_folder)))
    assert min(ratios) > 2.0, ratios


def test_m2ib_reads_the_text(trained_folder):
    # The bar the model learned as "plain" carries the information for that text, not the square.
    clip = load_clip(str(trained_folder))
    ratios = []
    for image in synthetic(np.random.default_rng(3), 6, np.zeros(6, bool))[0]:
        bar = image > 0.6
        m = saliency.m2ib(clip, image, PLAIN)
        ratios.append(m[bar].mean() / m[~bar].mean())
    assert np.median(ratios) > 1.5, ratios
    assert saliency.m2ib_default_block(12) == 7 and saliency.m2ib_default_block(2) == 0


def test_registry_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.delenv("MEDPROMPT_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(WeightsError) as missing:
        saliency.clip_saliency("gscorecam", "biomedclip")
    text = str(missing.value)
    assert "BiomedCLIP" in text and "hf download microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224" in text
    assert "\n" not in text and str(tmp_path / "empty_cache") in text
    with pytest.raises(InputError, match="unknown saliency method"):
        saliency.clip_saliency("gradcam", "biomedclip")
    with pytest.raises(WeightsError, match="not an open_clip model"):
        saliency.clip_saliency("m2ib", str(tmp_path))


def test_images_of_any_kind_become_unit_rgb():
    grey16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    out = image_to_unit_rgb(grey16)
    assert out.shape == (8, 8, 3) and out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    rgba = np.full((4, 5, 4), 255, np.uint8)
    assert np.allclose(image_to_unit_rgb(rgba), 1.0)
    unit = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    assert np.allclose(image_to_unit_rgb(unit)[..., 1], unit)
    with pytest.raises(InputError, match="2D grey or RGB"):
        image_to_unit_rgb(np.zeros((4, 4, 4, 4)))


def test_pipeline_hook_takes_an_image2d_and_a_catalog_class(trained_folder, monkeypatch):
    from medprompt.catalog import PromptEntry
    from medprompt.io.image2d import Image2D

    monkeypatch.setenv(saliency.MODEL_ENV, str(trained_folder))
    entry = PromptEntry(name=SQUARE, aliases=(), descriptions=(), keywords=(), prior={}, source="test")
    images, boxes = synthetic(np.random.default_rng(4), 2, np.ones(2, bool))
    for image, (y, x, side) in zip(images, boxes):
        for method in (saliency.gscorecam_saliency, saliency.m2ib_saliency):
            m = method(Image2D(pixels=image * 255.0, source="synthetic"), entry)
            inside = np.zeros(m.shape, bool)
            inside[y:y + side, x:x + side] = True
            assert m.shape == image.shape and m[inside].mean() > 2.0 * m[~inside].mean()


def test_timm_trunk_as_in_biomedclip(tmp_path):
    # BiomedCLIP's image tower is a timm ViT under visual.trunk (class-token pooled, linear projection):
    # MedCLIP-SAM's layer path resolves, both methods run on it and give a map of the image's size.
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from medprompt.clip.model import block_norm2, find_layer, vit_blocks, vit_grid

    cfg = {"embed_dim": 32,
           "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
                          "timm_proj": "linear", "image_size": 160},
           "text_cfg": TINY["text_cfg"]}
    torch.manual_seed(0)
    folder = write_model_folder(tmp_path / "timm_clip", open_clip.CLIP(**cfg).eval(), cfg,
                                OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    clip = load_clip(str(folder))
    blocks = vit_blocks(clip.model.visual)
    assert find_layer(clip.model, f"visual.trunk.blocks[{len(blocks) - 1}].norm2") is block_norm2(blocks[-1])
    assert vit_grid(clip.model.visual) == (10, 10)
    image = np.random.default_rng(0).integers(0, 255, (90, 120, 3)).astype(np.uint8)
    for method in ("gscorecam", "m2ib"):
        m = saliency.clip_saliency(method, str(folder), **({"top_k": 20} if method == "gscorecam" else {}))(
            image, "anything")
        assert m.shape == (90, 120) and m.dtype == np.float32 and 0 <= m.min() and m.max() == pytest.approx(1.0)
    with pytest.raises(InputError, match="no layer"):
        saliency.gscorecam(clip, image, "x", layer="visual.trunk.blocks[99].norm2")
    with pytest.raises(InputError, match="out of range"):
        saliency.m2ib(clip, image, "x", layer=len(blocks))
