"""Text encoders (tiny towers made here, the shipped MiniLM) and prompt resolution by similarity.

Everything runs offline on the CPU: the tiny Hugging Face and open_clip models are random networks
written to tmp_path by the tests, and loaded back through the same code paths as real weights.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import yaml

from medprompt.catalog import PromptCatalog, default_catalog
from medprompt.errors import PromptError, WeightsError
from medprompt.text import class_embedding, class_texts, get_text_encoder
from medprompt.text import encoders as enc_mod
from medprompt.text.similarity import SIMILARITY_FLOORS, eligible, landmarks
from medprompt.wording import other_request

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

DATA = Path(__file__).parent / "data" / "paraphrases.yaml"
INDEPENDENT = Path(__file__).parent / "data" / "paraphrases_independent.yaml"
WORDS = "the a of left right kidney liver organ spleen blood urine bile makes filters gland big vessel".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test its own embedding cache, an empty Hugging Face cache, and no network: any
    connection attempt (a hub lookup the loaders should never make) fails the test."""
    monkeypatch.setenv("MEDPROMPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.delenv("MEDPROMPT_ALLOW_DOWNLOAD", raising=False)
    attempts: list[object] = []

    def refuse(sock, address):
        attempts.append(address)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *args, **kwargs: refuse(None, host))
    yield tmp_path / "cache" / "text"
    assert not attempts, f"tried to reach the network: {attempts}"


@pytest.fixture(scope="module")
def minilm_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One embedding cache shared by the MiniLM tests, so the catalog's phrases are encoded once."""
    return str(tmp_path_factory.mktemp("minilm-cache"))


def write_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A random 1-layer BERT and its WordPiece tokenizer, saved as a Hugging Face model folder."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    BertTokenizer(vocab={w: i for i, w in enumerate(SPECIALS + WORDS)}).save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(SPECIALS + WORDS), hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    BertModel(config).save_pretrained(folder)
    return folder


def reference_mean_pooling(folder: Path, texts: list[str]) -> np.ndarray:
    """sentence-transformers' recipe by hand: token states averaged under the attention mask, L2-normalised."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (states * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(mean, dim=-1).numpy()


VISION = {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16}


def write_biomedclip_like(folder: Path, bert: Path, hub_name: str = "example/tiny-bert-not-on-this-machine") -> tuple:
    """A tiny CLIP in BiomedCLIP's layout: open_clip_config.json naming a hub text tower, weights, tokenizer files.

    Returns the in-memory model that was saved, to compare the loaded encoder against.
    """
    from open_clip.model import CustomTextCLIP

    text_cfg = {"hf_model_name": str(bert), "hf_tokenizer_name": str(bert), "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 16}
    torch.manual_seed(1)
    model = CustomTextCLIP(embed_dim=16, vision_cfg=VISION, text_cfg=text_cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    saved_cfg = {**text_cfg, "hf_model_name": hub_name, "hf_tokenizer_name": hub_name}  # as BiomedCLIP ships it
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {"embed_dim": 16, "vision_cfg": VISION, "text_cfg": saved_cfg}, "preprocess_cfg": {}}))
    for f in bert.iterdir():
        if f.name != "model.safetensors":  # config + tokenizer only: the CLIP checkpoint holds the weights
            (folder / f.name).write_bytes(f.read_bytes())
    return model


def encode_with(model, tokenizer, texts: list[str]) -> np.ndarray:
    with torch.no_grad():
        return torch.nn.functional.normalize(model.encode_text(tokenizer(texts)), dim=-1).numpy()


# --- loading -------------------------------------------------------------------------------------

def test_hf_folder_loads_as_open_clip_tower_with_mean_pooling(tmp_path: Path):
    folder = write_tiny_bert(tmp_path / "bert")
    encoder = get_text_encoder(str(folder))
    texts = ["left kidney makes urine", "liver", "left kidney makes urine"]
    vectors = encoder.encode(texts)
    assert encoder.key == f"hf:{folder.resolve()}" and encoder.dim == 32
    assert vectors.shape == (3, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vectors[0], vectors[2])
    np.testing.assert_allclose(vectors, reference_mean_pooling(folder, texts), atol=1e-5)
    assert type(encoder._model).__module__ == "open_clip.hf_model"  # the real open_clip code path ran


def test_minilm_is_the_shipped_sentence_transformer(minilm_cache: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MEDPROMPT_CACHE", minilm_cache)
    encoder = get_text_encoder()
    assert encoder is get_text_encoder("MiniLM") and encoder.key == "minilm-l6-v2" and encoder.dim == 384
    texts = ["The kidney filters blood to produce urine", "renal organ", "a slice of banana bread"]
    vectors = encoder.encode(texts)
    np.testing.assert_allclose(vectors, reference_mean_pooling(encoder.folder, texts), atol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2  # real weights: meaning, not noise
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return
    theirs = SentenceTransformer(str(encoder.folder), device="cpu").encode(texts, normalize_embeddings=True)
    assert np.min(np.sum(vectors * theirs, axis=1)) > 1 - 1e-4


def test_biomedclip_layout_folder_loads_offline_with_weights_from_the_checkpoint(tmp_path: Path):
    bert = write_tiny_bert(tmp_path / "bert")
    model = write_biomedclip_like(tmp_path / "clip", bert)
    encoder = get_text_encoder(str(tmp_path / "clip"))
    texts = ["the liver makes bile", "left kidney"]
    vectors = encoder.encode(texts)
    assert encoder.key.startswith("open_clip:") and encoder.dim == 16
    tokenizer = open_clip.tokenizer.HFTokenizer(str(bert), context_length=16)
    np.testing.assert_allclose(vectors, encode_with(model, tokenizer, texts), atol=1e-5)
    assert not hasattr(encoder._model, "visual")  # the image tower is not kept for text encoding


def test_whole_open_clip_model_for_its_vision_tower(tmp_path: Path):
    model = write_biomedclip_like(tmp_path / "clip", write_tiny_bert(tmp_path / "bert"))
    loaded = enc_mod.load_open_clip_model(str(tmp_path / "clip"))
    saved = model.visual.state_dict()
    for name, value in loaded.visual.state_dict().items():
        torch.testing.assert_close(value, saved[name])
    assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(WeightsError, match="not an open_clip model"):
        enc_mod.load_open_clip_model("minilm")


def test_biomedclip_from_the_hugging_face_cache(tmp_path: Path):
    """`biomedclip` is looked up in the hub cache layout (refs/main -> snapshots/<rev>/) without the network."""
    repo = tmp_path / "hf-hub" / "models--microsoft--BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    bert = write_tiny_bert(tmp_path / "bert")
    model = write_biomedclip_like(repo / "snapshots" / "0123abcd", bert)
    try:
        encoder = get_text_encoder("biomedclip")
        assert encoder.key == "biomedclip"
        tokenizer = open_clip.tokenizer.HFTokenizer(str(bert), context_length=16)
        np.testing.assert_allclose(encoder.encode(["spleen"]), encode_with(model, tokenizer, ["spleen"]), atol=1e-5)
    finally:
        enc_mod._encoder.cache_clear()  # this fake BiomedCLIP must not be what later tests get


def test_open_clip_model_name_with_checkpoint_path(tmp_path: Path):
    from open_clip.model import CLIP

    cfg = {"embed_dim": 16, "vision_cfg": VISION,
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / "medprompt-tiny-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "medprompt-tiny-test.json")
    torch.manual_seed(2)
    model = CLIP(**cfg).eval()
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    spec = f"open_clip:medprompt-tiny-test:{tmp_path / 'tiny.pt'}"
    encoder = get_text_encoder(spec)
    assert encoder.key == f"open_clip:medprompt-tiny-test:{(tmp_path / 'tiny.pt').resolve()}"
    texts = ["aorta", "the gallbladder stores bile"]
    tokenizer = open_clip.get_tokenizer("medprompt-tiny-test", context_length=16)
    np.testing.assert_allclose(encoder.encode(texts), encode_with(model, tokenizer, texts), atol=1e-5)


def test_missing_biomedclip_fails_fast_and_says_how_to_get_it(tmp_path: Path):
    start = time.perf_counter()
    with pytest.raises(WeightsError) as err:
        get_text_encoder("biomedclip")
    assert time.perf_counter() - start < 5.0
    msg = str(err.value)
    assert "\n" not in msg
    for part in ("microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "open_clip_config.json",
                 str(tmp_path / "hf-hub"), "hf download", "--text-encoder DIR", "MEDPROMPT_ALLOW_DOWNLOAD=1"):
        assert part in msg, part


def test_open_clip_folder_without_its_text_tokenizer_names_the_missing_repo(tmp_path: Path):
    bert = write_tiny_bert(tmp_path / "bert")
    write_biomedclip_like(tmp_path / "clip", bert, hub_name="example/pubmedbert-tokenizer")
    for name in ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "clip" / name).unlink(missing_ok=True)
    with pytest.raises(WeightsError, match="example/pubmedbert-tokenizer .*text tower.*`hf download example/pub"):
        get_text_encoder(str(tmp_path / "clip"))


@pytest.mark.parametrize("spec, match", [
    ("no-such-encoder", "unknown text encoder 'no-such-encoder'.*minilm.*biomedclip"),
    ("open_clip:ViT-B-32", "open_clip:MODEL:PRETRAINED_TAG_OR_PATH"),
])
def test_bad_specs_are_one_line_errors(spec: str, match: str):
    with pytest.raises(WeightsError, match=match):
        get_text_encoder(spec)


def test_folder_that_is_no_model_is_reported(tmp_path: Path):
    with pytest.raises(WeightsError, match="neither open_clip_config.json"):
        get_text_encoder(str(tmp_path))
    (tmp_path / "open_clip_config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="open_clip_config.json: unreadable"):
        get_text_encoder(str(tmp_path))


# --- cache -----------------------------------------------------------------------------------------

def test_disk_cache_serves_repeats_without_running_or_loading_the_model(tmp_path: Path, monkeypatch, cache_dir):
    folder = write_tiny_bert(tmp_path / "bert")
    calls: list[list[str]] = []
    real = enc_mod.HFTextTower._embed
    monkeypatch.setattr(enc_mod.HFTextTower, "_embed", lambda self, texts: calls.append(texts) or real(self, texts))
    first = get_text_encoder(str(folder)).encode(["liver", "spleen", "liver"])
    assert calls == [["liver", "spleen"]]  # duplicates encoded once
    again = get_text_encoder(str(folder)).encode(["spleen", "liver"])
    assert len(calls) == 1
    np.testing.assert_array_equal(again, first[[1, 0]])
    enc_mod._encoder.cache_clear()  # a new process: a fresh encoder object, only the disk cache left
    fresh = get_text_encoder(str(folder))
    np.testing.assert_array_equal(fresh.encode(["liver"]), first[:1])
    assert len(calls) == 1 and not fresh._loaded  # served from disk; the model was never built
    assert len(list(cache_dir.rglob("*.npy"))) == 2 and not list(cache_dir.rglob(".tmp-*"))


def test_encoding_is_deterministic_across_processes(tmp_path: Path, monkeypatch):
    folder = write_tiny_bert(tmp_path / "bert")
    a = get_text_encoder(str(folder)).encode(["big vessel", "the liver"])
    enc_mod._encoder.cache_clear()
    monkeypatch.setenv("MEDPROMPT_CACHE", str(tmp_path / "other-cache"))  # recomputed, not read back
    np.testing.assert_allclose(get_text_encoder(str(folder)).encode(["big vessel", "the liver"]), a, atol=1e-6)


def test_cache_entries_are_separate_per_encoder(tmp_path: Path):
    one = get_text_encoder(str(write_tiny_bert(tmp_path / "one", seed=0)))
    two = get_text_encoder(str(write_tiny_bert(tmp_path / "two", seed=1)))
    a, b = one.encode(["kidney"])[0], two.encode(["kidney"])[0]
    assert one.key != two.key and not np.allclose(a, b)
    np.testing.assert_array_equal(one.encode(["kidney"])[0], a)  # each reads back its own vector


def test_unwritable_or_damaged_cache_never_breaks_encoding(tmp_path: Path, monkeypatch, caplog):
    folder = write_tiny_bert(tmp_path / "bert")
    expected = reference_mean_pooling(folder, ["urine"])
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("MEDPROMPT_CACHE", str(blocker))
    with caplog.at_level(logging.WARNING, logger="medprompt.text.cache"):
        got = get_text_encoder(str(folder)).encode(["urine"])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert "not writable" in caplog.text

    monkeypatch.setenv("MEDPROMPT_CACHE", str(tmp_path / "cache2"))
    encoder = get_text_encoder(str(folder))
    encoder.encode(["urine"])
    (npy,) = (tmp_path / "cache2").rglob("*.npy")
    npy.write_bytes(b"garbage")  # a torn or foreign file reads as a miss and is rewritten
    np.testing.assert_allclose(encoder.encode(["urine"]), expected, atol=1e-5)
    assert np.load(npy).shape == (32,)


def test_class_embedding_is_the_normalised_mean_of_the_class_phrases(tmp_path: Path):
    encoder = get_text_encoder(str(write_tiny_bert(tmp_path / "bert")))
    entry = default_catalog()["kidney_left"]
    phrases = class_texts(entry)
    assert phrases[:2] == ["kidney left", "left kidney"] and set(entry.descriptions) <= set(phrases)
    mean = encoder.encode(phrases).mean(axis=0)
    np.testing.assert_allclose(class_embedding(entry, encoder), mean / np.linalg.norm(mean), atol=1e-6)


# --- resolution --------------------------------------------------------------------------------------

@pytest.fixture
def minilm_catalog(minilm_cache: str, monkeypatch: pytest.MonkeyPatch) -> PromptCatalog:
    monkeypatch.setenv("MEDPROMPT_CACHE", minilm_cache)
    catalog = default_catalog()
    assert catalog.text_encoder == "minilm"  # the wheel is a requirement: the default resolves by meaning
    return catalog


@pytest.mark.parametrize("text, expected", [
    ("The kidney filters blood to produce urine", "kidneys"),
    ("bean-shaped organ on the left that makes urine", "kidney_left"),
    ("the two bean-shaped organs", "kidneys"),  # read like the stomach ("J-shaped organ") before
    ("the right organ that makes urine", "kidney_right"),
    ("the glands on top of the kidneys", "adrenal_glands"),
    ("the hormone gland above the right kidney", "adrenal_gland_right"),
    ("the big blood vessel carrying blood out of the heart", "aorta"),
    ("pouch under the liver that stores bile", "gallbladder"),
    ("the organ that digests food", "stomach"),  # read like the gallbladder's "The organ that stores ..." before
])
def test_free_text_resolves_by_meaning(minilm_catalog: PromptCatalog, text: str, expected: str):
    assert minilm_catalog.resolve(text).name == expected


def test_sides_decide_between_left_right_and_both(minilm_catalog: PromptCatalog):
    assert {"kidney_left", "kidney_right"}.isdisjoint(eligible(minilm_catalog, "the kidney"))
    assert "kidneys" in eligible(minilm_catalog, "the kidney")
    assert {"kidneys", "kidney_right"}.isdisjoint(eligible(minilm_catalog, "left kidney area"))
    assert "lungs" in eligible(minilm_catalog, "left lung")  # no sided lung class: the pair stays
    assert landmarks(minilm_catalog, "the gland sitting on top of the left kidney") >= {"kidney_left"}
    assert not landmarks(minilm_catalog, "a tumour in the liver")


def test_a_sided_class_without_a_pair_needs_its_side(tmp_path: Path, minilm_cache, monkeypatch):
    monkeypatch.setenv("MEDPROMPT_CACHE", minilm_cache)
    for side in ("left", "right"):
        (tmp_path / f"lung_{side}.yaml").write_text(
            f"name: lung_{side}\ndescriptions: [The {side} lung, the air-filled organ of breathing on the {side}.]\n")
    (tmp_path / "liver.yaml").write_text("name: liver\ndescriptions: [The liver, the organ that makes bile.]\n")
    catalog = PromptCatalog.load([tmp_path])
    encoder = get_text_encoder()
    assert catalog.resolve("the air-filled breathing organ on the right", encoder).name == "lung_right"
    with pytest.raises(PromptError, match="lung_left and lung_right: say 'left' or 'right'"):
        catalog.resolve("the air-filled breathing organ", encoder)


def test_below_the_floor_is_an_error_listing_the_nearest_classes(minilm_catalog: PromptCatalog):
    with pytest.raises(PromptError) as err:
        minilm_catalog.resolve("a red sports car parked outside")
    msg = str(err.value)
    assert "'a red sports car parked outside'" in msg and f"< {SIMILARITY_FLOORS['minilm-l6-v2']:.2f}" in msg
    assert msg.split("closest known classes: ")[1].count("(0.") == 3
    # A floor above any similarity turns a good match into the same error, the right class first.
    encoder = get_text_encoder()
    from medprompt.text import similarity

    with pytest.raises(PromptError, match=r"closest known classes: liver \(0\.\d\d\)"):
        similarity.resolve(minilm_catalog, "the organ that makes bile and stores glycogen", encoder,
                           minilm_catalog.similarity_index(encoder), floor=0.99)


def test_anatomy_no_prompt_file_describes_is_refused_not_drafted_as_a_neighbour(minilm_catalog: PromptCatalog):
    """"prostate" must not become a bladder mask, nor "the colon" a colon tumour."""
    doc = yaml.safe_load(DATA.read_text(encoding="utf-8"))
    refused = []
    for text in doc["out_of_catalog"]:
        assert minilm_catalog.lookup(text) is None, text
        try:
            minilm_catalog.resolve(text)
        except PromptError:
            refused.append(text)
    assert len(refused) >= 0.8 * len(doc["out_of_catalog"]), sorted(set(doc["out_of_catalog"]) - set(refused))
    with pytest.raises(PromptError, match=r"'prostate': it reads like prostate \(1\.00\), which no prompt file "
                                          r"describes; closest known classes: urinary_bladder"):
        minilm_catalog.resolve("prostate")
    # Naming a class keeps it ("a tumour in the liver"); a structure named as a place is a landmark.
    assert minilm_catalog.resolve("tumour in the liver").name == "liver_tumour"
    assert minilm_catalog.resolve("the gland next to the duodenum that makes insulin").name == "pancreas"
    # The aorta's phrases run "along the vertebral column": the column itself had drawn the aorta. The
    # column is the trunk's bones, as "the vertebrae" and "the spine" are.
    for text in ("vertebral column", "the spine", "the vertebrae"):
        assert minilm_catalog.resolve(text).name == "bone", text
    assert minilm_catalog.resolve("the aorta in front of the spine").name == "aorta"


def test_other_anatomy_asked_by_its_function_is_refused_by_name(minilm_catalog: PromptCatalog):
    """A lay prompt says what an organ does ("the organ that pumps blood"); other anatomy known by name only
    was drawn as the class nearest in meaning (the heart as the aorta, the womb as the stomach)."""
    from medprompt.text.similarity import OTHER_ANATOMY, OTHER_FUNCTIONS

    assert set(OTHER_FUNCTIONS) <= set(OTHER_ANATOMY)
    for text, other in (("the organ that pumps blood", "heart"), ("the organ that thinks", "brain"),
                        ("the organ where the baby grows", "uterus"),
                        ("the tube that carries urine to the bladder", "ureter"),
                        # the prostate described by where it lies was drawn as the bladder it names
                        ("the gland under a man's bladder", "prostate"),
                        ("the small gland at the neck of the male bladder", "prostate")):
        with pytest.raises(PromptError, match=f"reads like {other} "):
            minilm_catalog.resolve(text)
    # The catalog's own organs asked the same way still resolve.
    for text, name in (("the organ that digests food", "stomach"), ("the organ that stores urine", "urinary_bladder"),
                       ("the organs that make urine", "kidneys"), ("the tube that carries food to the stomach", "esophagus"),
                       ("the big blood vessel carrying blood out of the heart", "aorta"),
                       ("the bladder in a man", "urinary_bladder"), ("the bladder neck", "urinary_bladder")):
        assert minilm_catalog.resolve(text).name == name, text


def test_a_side_landmark_finding_and_vessel_do_not_pick_a_neighbour(minilm_catalog: PromptCatalog):
    """Faults of whole words, each once drawn as a neighbour: a phrase naming only the other side ("the spleen
    under the ribs on the left side") does not count for a prompt naming one side; other anatomy named, in the
    plural too, only as a landmark ("from the ureters") does not refuse the prompt; findings named only as
    landmarks set the finding classes aside; the abdomen's named vessels that no prompt file describes are
    refused, not drawn as the organ they supply; the trunk's named bones are the bone class."""
    for text, name in (("the ribs on the right", "bone"),  # had been the spleen
                       ("the right hip", "bone"),  # had been the right kidney
                       ("the ribs on the left", "bone"),  # had been the spleen
                       ("the kidney near the cyst", "kidneys"),  # had been refused as a kidney cyst
                       ("the liver next to the mass", "liver"),
                       ("the spleen on the right", "spleen"),  # a class spelt keeps its own name's phrase
                       ("the gland above the right kidney", "adrenal_gland_right"),
                       ("the sac that collects urine from the ureters", "urinary_bladder"),  # was a ureter
                       ("the lung on the right", "lungs")):
        assert minilm_catalog.resolve(text).name == name, text
    for text, vessel in (("the renal arteries", "renal artery"), ("the hepatic veins", "hepatic vein"),
                         ("the superior mesenteric artery", "superior mesenteric artery")):
        with pytest.raises(PromptError, match=f"reads like {vessel}"):
            minilm_catalog.resolve(text)
    with pytest.raises(PromptError, match="reads like kidney cyst"):  # the cyst asked for, the kidney its place
        minilm_catalog.resolve("a cyst beside the kidney")
    assert minilm_catalog.resolve("the portal vein").name == "portal_vein_and_splenic_vein"
    assert minilm_catalog.resolve("left renal organ").name == "kidney_left"


def test_the_heart_is_not_the_stomach(minilm_catalog: PromptCatalog):
    """The stomach's Latin alias "ventriculus" reads like the heart's ventricles to the embedding: the
    index holds aliases in plain nouns, and a prompt spelling only other anatomy loses the margin."""
    for text in ("the ventricles of the heart", "cardiac chambers", "the heart and its chambers"):
        with pytest.raises(PromptError, match="which no prompt file describes"):
            minilm_catalog.resolve(text)
    for text in ("ventriculus", "the ventriculus", "gaster"):
        assert minilm_catalog.resolve(text).name == "stomach", text
    # Other anatomy named as a landmark, or beside a class word, keeps the class.
    assert minilm_catalog.resolve("the blood vessel leaving the heart").name == "aorta"
    assert minilm_catalog.resolve("a lump in the breast").name == "breast_tumor"


def test_a_finding_is_never_drawn_as_an_organ_or_another_organ_s_finding(minilm_catalog: PromptCatalog):
    """A prompt that asks for a finding (tumour, lesion, mass, stone, ...) is refused when the class it reads like is
    a whole organ (the spleen drawn for "a lesion of the spleen") or a finding whose phrases never name the
    organ the prompt spells ("tumour of the heart" had been breast_tumor); a finding class of the named organ,
    and an organ named beside a finding as a landmark, still resolve."""
    whole = r"asks for a finding \({}\), and {} would draw the whole organ"
    other = r"asks for a finding \({}\) of the {}, and breast_tumor is another organ's"
    for text, why in (("a lesion of the spleen", whole.format("lesion", "spleen")),
                      ("bone tumour", whole.format("tumour", "bone")),
                      ("tumour of the oesophagus", whole.format("tumour", "esophagus")),
                      ("kidney stones", whole.format("stones", "kidneys")),
                      ("rib fracture", whole.format("fracture", "bone")),  # had drawn the spleen
                      ("tumour of the heart", other.format("tumour", "heart")),
                      ("heart mass", other.format("mass", "heart")),
                      ("cardiac tumour", other.format("tumour", "heart")),  # "cardiac" read as the heart
                      ("thyroid nodule", other.format("nodule", "thyroid gland")),  # a gland by its adjective
                      ("the cyst on my spleen", other.format("cyst", "spleen")),  # read 0.001 nearer breast_tumor
                      ("Is there a lump on my spleen? Can you mark it?", whole.format("lump", "spleen"))):
        with pytest.raises(PromptError, match=why):
            minilm_catalog.resolve(text)
    for text, name in (("a tumour in the brain", "brain_tumor"), ("breast cyst", "breast_tumor"),
                       ("a lump in the breast", "breast_tumor"), ("nodule in the liver", "liver_tumour"),
                       ("bowel cancer", "colon_tumour"), ("liver mets", "liver_tumour"),
                       ("the spleen next to the lesion", "spleen"), ("the cardiac part of the stomach", "stomach"),
                       ("a breast mass near the thyroid", "breast_tumor"),  # other anatomy as a landmark
                       ("where gallstones form", "gallbladder"),
                       ("What is this dark spot in my liver? Outline it please.", "liver_tumour")):  # "it" points back
        assert minilm_catalog.resolve(text).name == name, text


def test_an_organ_asked_for_without_a_finding_is_the_organ_not_its_tumour(minilm_catalog: PromptCatalog):
    """"an abnormal liver" read closer to liver_tumour's phrases than to the liver's; a prompt that spells
    the organ and asks for no finding is the organ. A finding, even as an adjective or a "growth", keeps
    the finding class."""
    for text in ("fatty liver disease", "steatosis of the liver", "an abnormal liver", "the enlarged liver",
                 "the liver next to the mass"):
        assert minilm_catalog.resolve(text).name == "liver", text
    for text in ("a growth in the liver", "malignant liver", "a growth inside the skull"):
        assert minilm_catalog.resolve(text).name in ("liver_tumour", "brain_tumor"), text


def test_an_organ_s_wall_is_the_organ_not_the_abdominal_wall(minilm_catalog: PromptCatalog):
    """MiniLM reads "stomach wall" 0.90 like "abdominal wall", which no prompt file describes; a prompt that
    spells a class and shares only a part word ("wall") with other anatomy asks for that class's part."""
    for text in ("stomach wall", "gastric wall", "the wall of the stomach", "the lining of the stomach"):
        assert minilm_catalog.resolve(text).name == "stomach", text
    for text in ("abdominal wall", "the wall of the abdomen", "the abdominal wall over the stomach"):
        with pytest.raises(PromptError, match="reads like abdominal wall"):
            minilm_catalog.resolve(text)


def test_the_superior_vena_cava_is_not_the_inferior_one(minilm_catalog: PromptCatalog):
    """"inferior vena cava" reads 0.91 like "superior vena cava", which had taken the reference entry out of
    the list as if the class described it; names of opposite ends never cover each other."""
    for text in ("the superior vena cava", "SVC"):
        with pytest.raises(PromptError, match="reads like superior vena cava"):
            minilm_catalog.resolve(text)
    for text in ("the inferior vena cava", "IVC", "vena cava"):
        assert minilm_catalog.resolve(text).name == "inferior_vena_cava", text


def test_chest_x_ray_findings_are_not_the_lungs(minilm_catalog: PromptCatalog):
    """The 2D path segments the lungs on chest X-rays; what else a reader names there is refused, not
    drawn as the lungs (a pneumothorax is air outside them)."""
    for text in ("pneumothorax", "pleural effusion", "cardiac silhouette"):
        with pytest.raises(PromptError, match="which no prompt file describes"):
            minilm_catalog.resolve(text)
    assert minilm_catalog.resolve("the lung bases above the diaphragm").name == "lungs"


def test_a_tumour_of_an_organ_without_a_tumour_class_is_not_the_organ(minilm_catalog: PromptCatalog):
    for text in ("adrenal adenoma", "gallbladder carcinoma"):
        with pytest.raises(PromptError, match="which no prompt file describes"):
            minilm_catalog.resolve(text)
    assert minilm_catalog.resolve("hepatic metastasis").name == "liver_tumour"
    assert minilm_catalog.resolve("cholecystitis").name == "gallbladder"  # a disease of the organ is the organ


def test_a_part_of_an_organ_is_that_organ_and_a_part_of_a_landmark_a_landmark(minilm_catalog: PromptCatalog):
    """The gallbladder's file describes it "on the undersurface of the right liver lobe": the liver's own
    file names its lobes, and "under the right lobe of the liver" sets the liver aside as a landmark."""
    for text in ("right lobe of the liver", "the left hepatic lobe", "the caudate lobe"):
        assert minilm_catalog.resolve(text).name == "liver", text
    assert landmarks(minilm_catalog, "the pouch beneath the right lobe of the liver") == {"liver"}
    assert not landmarks(minilm_catalog, "a tumour in the right lobe of the liver")
    assert minilm_catalog.resolve("the pouch beneath the right lobe of the liver").name == "gallbladder"
    assert minilm_catalog.resolve("a tumour in the right lobe of the liver").name == "liver_tumour"


def test_a_users_own_class_for_other_anatomy_is_resolved_to_it(tmp_path: Path, minilm_cache, monkeypatch):
    monkeypatch.setenv("MEDPROMPT_CACHE", minilm_cache)
    (tmp_path / "thyroid.yaml").write_text(
        "name: thyroid\naliases: [thyroid gland]\n"
        "descriptions: [The butterfly-shaped endocrine gland in the front of the neck.]\n")
    (tmp_path / "liver.yaml").write_text("name: liver\ndescriptions: [The liver, the organ that makes bile.]\n")
    catalog = PromptCatalog.load([tmp_path])
    encoder = get_text_encoder()
    assert "thyroid gland" not in catalog.similarity_index(encoder).others
    assert catalog.resolve("the gland in the neck that makes thyroxine", encoder).name == "thyroid"
    with pytest.raises(PromptError, match="reads like heart"):
        catalog.resolve("the heart", encoder)


def test_misspellings_are_read_as_corrected(minilm_catalog: PromptCatalog):
    """"livr" reads like the spleen to MiniLM; it was refused naming both, and is now read as the liver it spells
    (the response's prompts_resolved shows the class each prompt became)."""
    assert minilm_catalog.resolve("livr").name == "liver"
    assert minilm_catalog.resolve("spleeen").name == "spleen"


def test_exact_names_never_load_the_encoder():
    catalog = PromptCatalog(dict(default_catalog().entries), text_encoder="an-encoder-that-does-not-exist")
    assert catalog.resolve("Left Kidney").name == "kidney_left"  # alias: no encoder needed
    with pytest.raises(WeightsError, match="an-encoder-that-does-not-exist"):
        catalog.resolve("the organ that makes bile")  # free text: now the encoder is needed


def test_keyword_resolver_remains_without_an_encoder():
    catalog = PromptCatalog(dict(default_catalog().entries))
    assert catalog.text_encoder is None
    assert catalog.resolve("organ that stores bile").name == "gallbladder"


def test_paraphrases_written_elsewhere_resolve_at_least_90_percent(minilm_catalog: PromptCatalog):
    doc = yaml.safe_load(DATA.read_text(encoding="utf-8"))
    cases = doc["paraphrases"] + doc["heldout"]
    assert len(cases) >= 60 and {c["class"] for c in cases} == set(minilm_catalog.names)
    prompt_sentences = {d.lower() for e in minilm_catalog.entries.values() for d in e.descriptions}
    right = 0
    for case in cases:
        assert minilm_catalog.lookup(case["text"]) is None, case  # a sentence, not a name or alias
        assert case["text"].lower() not in prompt_sentences, case
        try:
            right += minilm_catalog.resolve(case["text"]).name == case["class"]
        except PromptError:
            pass
    assert right / len(cases) >= 0.90, f"{right}/{len(cases)}"
    assert len(doc["unrelated"]) >= 30
    for text in doc["unrelated"]:  # the floor was set just above the best of these (see similarity.py); a command
        # of another kind ("please send the invoice") is refused as such before any similarity is read
        why = "no drawing request" if other_request(text) is not None else "no class is similar enough"
        with pytest.raises(PromptError, match=why):
            minilm_catalog.resolve(text)


def test_paraphrases_by_independent_writers(minilm_catalog: PromptCatalog):
    """Nine writers who saw only the class list (tests/data/paraphrases_independent.yaml): 80.6 % of the first
    eight's prompts resolved before the word tie-break, clinical relations and reasons (7 Dec), 89.9 % after;
    and prompts for what no class describes are refused: 105 / 160 before, 123 / 160 after, and with the
    first noun phrase rule and the devices and artefacts 212 / 220 of four sets (refusals_d blind 41 -> 51 / 60)."""
    doc = yaml.safe_load(INDEPENDENT.read_text(encoding="utf-8"))
    cases = [c for name, items in doc.items() if name.startswith("writer") for c in items]
    refusals = [c for name, items in doc.items() if name.startswith("refusals") for c in items]
    assert len(cases) >= 600 and {c["class"] for c in cases} == set(minilm_catalog.names)
    right = 0
    for case in cases:
        try:
            right += minilm_catalog.resolve(case["text"]).name == case["class"]
        except PromptError:
            pass
    assert right / len(cases) >= 0.88, f"{right}/{len(cases)}"
    refused = 0
    for case in refusals:
        try:
            minilm_catalog.resolve(case["text"])
        except PromptError:
            refused += 1
    assert refused / len(refusals) >= 0.90, f"{refused}/{len(refusals)}"


def test_a_near_tie_is_told_apart_by_words(minilm_catalog: PromptCatalog):
    """MiniLM reads "the organ that makes bile" 0.82 like the gallbladder's phrase about "the bile made by the
    liver" and 0.80 like the liver's "makes bile": within WORD_TIE the class whose own phrases hold the
    prompt's descriptive words wins (each of these four had resolved to the class named second)."""
    for text, name in (("the organ that makes bile", "liver"),  # gallbladder
                       ("the organ on the left side that recycles worn-out blood cells", "spleen"),  # kidney_left
                       ("the big blood vessel in front of the spine", "aorta"),  # inferior_vena_cava
                       ("the organ that goes wrong in diabetes and produces digestive juices", "pancreas")):  # liver
        assert minilm_catalog.resolve(text).name == name, text
    assert minilm_catalog.resolve("the organ that stores bile").name == "gallbladder"


def test_where_a_prompt_places_it_is_evidence_too(minilm_catalog: PromptCatalog):
    """"on top of each kidney" shares "above:kidney" with the adrenals' "on top of the left kidney": with the
    kidneys set aside as the place, the words of place decide among the near classes (both had resolved to
    the kidneys or the liver)."""
    for text in ("the two tiny triangular shapes sitting on top of each kidney", "the soft tissue just above both kidneys"):
        assert minilm_catalog.resolve(text).name == "adrenal_glands", text


def test_clinical_wording_of_place_makes_landmarks():
    """'posterior to', 'left of', 'from ... to', 'the upper pole of', and the next item of a list of landmarks,
    as 'above' does; a kidney named as the place makes every kidney class a landmark."""
    from medprompt.text.similarity import landmarks

    catalog = default_catalog()
    kidneys = {"kidney_left", "kidney_right", "kidneys"}
    for text, named in (("the gland posterior to the pancreas", {"pancreas"}),
                        ("the vessel left of the inferior vena cava", {"inferior_vena_cava"}),
                        ("the veins from the splenic hilum to the liver", {"liver"}),
                        ("the passage between the throat and the stomach", {"stomach"}),
                        ("the gland superomedial to the upper pole of the left kidney", kidneys),
                        ("the organ near the left kidney and stomach", kidneys | {"stomach"}),
                        ("the fat around the kidneys and the liver", kidneys)):  # "and the liver" may be asked
        assert landmarks(catalog, text) == named, text


def test_a_reason_or_a_landmark_is_not_what_is_asked(minilm_catalog: PromptCatalog):
    """A finding named as the reason ("for stones", "to check for metastases", in another sentence than the
    request) does not make the prompt ask for a finding; other anatomy named as a landmark or as part of the
    target is not refused; a finding asked of an organ that has a finding class is that class."""
    for text, name in (("organ removed in cholecystectomy for stones", "gallbladder"),
                       ("the entire skeleton, to check for lytic metastases", "bone"),
                       ("the small pouch under the liver where stones can form", "gallbladder"),
                       ("Lumpectomy planning for carcinoma; outline the mass on the ultrasound image", "breast_tumor"),
                       ("look for lesions in the liver", "liver_tumour"),  # the request first: lesions are asked
                       ("hypodense hepatic lesion on portal venous phase", "liver_tumour"),
                       ("the spot they found on my liver", "liver_tumour"),
                       ("the patient outline including skin and subcutaneous fat", "body"),
                       ("the vessel left of the inferior vena cava", "aorta"),  # had read like the superior one
                       ("the bean-shaped organ on the left that filters blood", "kidney_left")):  # like "pumps blood"
        assert minilm_catalog.resolve(text).name == name, text
    for text in ("the heart next to the left lung", "the prostate below the bladder",
                 "the organ that pumps blood around the body", "kidney stones", "gallstones in the gallbladder"):
        with pytest.raises(PromptError):
            minilm_catalog.resolve(text)


# --- command line --------------------------------------------------------------------------------------

def test_infer_passes_text_encoder_to_draft(tmp_path: Path, monkeypatch):
    import nibabel as nib

    from medprompt import cli, drafts

    image = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), image)
    seen = {}

    def fake_draft(volume, prompts, **kwargs):
        seen.update(kwargs)
        return drafts.Segmentation(np.zeros(volume.data.shape, np.uint16), {"liver": 1}, {"liver": "liver"})

    monkeypatch.setattr(drafts, "draft", fake_draft)
    out = tmp_path / "out.nii.gz"
    assert cli.main(["infer", str(image), str(out), "--prompts", "liver", "--model", "medprompt",
                     "--text-encoder", "biomedclip"]) == 0
    assert seen["text_encoder"] == "biomedclip" and seen["model"] == "medprompt" and out.is_file()


def test_what_the_first_noun_phrase_names_is_what_is_asked(minilm_catalog: PromptCatalog):
    """Anatomy no class describes, or no anatomy at all (a device, the table, an artefact), spelt as the first
    noun phrase of the request is refused by name however near a class the whole sentence reads; spelt as the
    reason, a landmark or a modifier it is not what is asked."""
    for text, named in (("outline the duodenum lying around the pancreatic head", "duodenum"),
                        ("the right renal artery running behind the IVC", "renal artery"),
                        ("the heart resting on the diaphragm above the liver", "heart"),
                        ("contour the endotracheal tube down to the lungs", "endotracheal tube"),
                        ("the scanner table under the patient's body", "scanner table"),
                        ("mark the catheter in the bladder", "catheter"),
                        ("metal artefact from the spinal rods over the kidneys", "artefact"),
                        ("the fat surrounding the right kidney", "fat"),
                        ("the tiny duct draining the gallbladder into the bile duct", "duct"),
                        ("the muscles under the skin of the belly", "muscle"),
                        ("the ghosting from breathing over the liver", "ghosting")):
        with pytest.raises(PromptError, match=f"asks for the {named}|reads like {named}"):
            minilm_catalog.resolve(text)
    with pytest.raises(PromptError, match="asks for a finding"):
        minilm_catalog.resolve("the intimal flap of the dissection in the abdominal aorta")
    for text, name in (("the breathing organs inside the rib cage", "lungs"),
                       ("the muscular tube between the throat and the stomach where we may place a stent", "esophagus"),
                       ("the breast imaging lesion seen before a core needle biopsy", "breast_tumor"),
                       ("the gland sitting on top of the left kidney", "adrenal_gland_left"),
                       ("the vein draining the spleen into the liver", "portal_vein_and_splenic_vein"),
                       ("the abdominal aorta, checking for a dissection", "aorta"),
                       ("the fatty liver before a transplant", "liver"),
                       ("the muscular sac that stores urine", "urinary_bladder")):
        assert minilm_catalog.resolve(text).name == name, text


@pytest.mark.parametrize("text, name", [
    # a drawing request after clinical context: the context's findings and sides are why, not what
    ("hx of hypertension, ?adenoma on the right, please outline the right adrenal only", "adrenal_gland_right"),
    ("s/p left nephrectomy, segment the remaining solitary right kidney", "kidney_right"),
    ("r/o thrombus from a left renal carcinoma, outline the inferior vena cava", "inferior_vena_cava"),
    ("known prostate ca, r/o bone mets, need the whole skeleton segmented", "bone"),
    ("s/p fall, splenic laceration, outline the spleen", "spleen"),
    # "r/o" is no right side, "RT" radiotherapy where no organ follows it, "bilateral" both sides
    ("kidney outlines bilaterally, r/o hydronephrosis", "kidneys"),
    ("bilateral renal parenchyma as OAR for abdominal RT", "kidneys"),
    ("RT kidney", "kidney_right"),
    # shorthand and Latin
    ("colon ca", "colon_tumour"), ("Ao for the EVAR plan", "aorta"), ("eso for RT", "esophagus"),
    ("v. portae et v. lienalis", "portal_vein_and_splenic_vein"), ("bony structures, whole scan", "bone"),
    ("EXTERNAL contour for dose calc", "body"),
    # telegraphic: the finding in the organ named after it
    ("suspicious mass right breast", "breast_tumor"),
    # a name before a comma with a landmark after it, sides of its own
    ("left kidney under the spleen, higher than the right one", "kidney_left"),
    # a purpose before a colon says why; "as" ends the noun phrase (writer_t, writer_u)
    ("for the microwave ablation: the hepatic lesion", "liver_tumour"),
    ("the spleen as OAR for gastric SBRT", "spleen"),
    ("splenoportal axis", "portal_vein_and_splenic_vein"),
    # writer_v, writer_w: a Couinaud segment is the liver's, the colon's flexures are no liver, operations name
    # their organ, tumour kinds and shorthand, a heading's purpose and a reason's anatomy are not what is asked
    ("TACE planning: contour the hypervascular mass in segment VII", "liver_tumour"),
    ("the malignant growth of the large bowel wall at the hepatic flexure", "colon_tumour"),
    ("organ removed in a gastrectomy for adenocarcinoma", "stomach"),
    ("retroperitoneal glandular organ next to the duodenum, for Whipple planning", "pancreas"),
    ("IDC mass seg on MRI, not the axillary nodes", "breast_tumor"), ("menigioma seg pls", "brain_tumor"),
    ("GTV for SRS -- the cerebellar metastasis", "brain_tumor"), ("splenomegaly volume pls", "spleen"),
    ("External ROI for dose calc", "body"), ("OAR gastric for pancreas SBRT", "stomach"),
    ("the urine reservoir in the pelvis, OAR for prostate RT", "urinary_bladder"),
    ("where is the tumor in my dad's brain on his MRI", "brain_tumor"),
    ("For a metastatic survey, delineate the whole skeletal system in one mask.", "bone"),  # a purpose first
])
def test_clinical_requests_shorthand_and_telegraphic_prompts(minilm_catalog: PromptCatalog, text: str, name: str):
    """Ways of writing that blind writers used (writer_p to writer_w): each of these failed before."""
    assert minilm_catalog.resolve(text).name == name


@pytest.mark.parametrize("text, name", [
    # a correction names its label first (was the oesophagus; the right kidney, a side of the renal vein's)
    ("vendor QC: aorta label stops at the hiatus, extend it down to the iliac bifurcation", "aorta"),
    ("QC: IVC label merges with the right renal vein, cut the renal vein off", "inferior_vena_cava"),
    ("mask on the kidney on the spleen side misses the lower pole, redo", "kidney_left"),
    # a side said of a landmark is no bar to a class without sided twins (was the right kidney)
    ("IR planning for a filter: segment the cava from the iliac confluence up to the right atrium so I can see the "
     "renal vein level", "inferior_vena_cava"),
    ("Kindly help me segment the stomach, last time the mask leaked into the spleen", "stomach"),  # was the portal vein
    ("main artery coming out of the left ventricle", "aorta"),  # "out of": a landmark (refused as the ventricle)
    ("hypoechoic irregular lesion with posterior acoustic shadowing at 10 o'clock, please segment",
     "breast_tumor"),  # a clock-face position is the breast's (was brain_tumor)
])
def test_corrections_landmark_sides_and_clock_faces(minilm_catalog: PromptCatalog, text: str, name: str):
    """Ways of writing of writer_ab and writer_ac (QC reviewers, report phrases, interventional radiologists)."""
    assert minilm_catalog.resolve(text).name == name


def test_the_side_said_of_an_organ_before_its_request_is_its_side(minilm_catalog: PromptCatalog):
    """"my left kidney has a cyst, ... the whole kidney" is that kidney (writer_r, _aa, _ab: each was both kidneys);
    not after an organ was removed ("s/p right nephrectomy, segment the remaining kidney" is not the right one), nor
    when the side was said of another organ."""
    assert minilm_catalog.resolve("rt kidney has a big cyst, can you outline the whole kidney including it?").name \
        == "kidney_right"
    assert minilm_catalog.resolve("The doctor said my left kidney has a cyst. Can you show me the whole kidney "
                                  "please?").name == "kidney_left"
    assert minilm_catalog.resolve("s/p right nephrectomy, segment the remaining kidney").name != "kidney_right"
    assert minilm_catalog.resolve("right adrenal nodule, segment the kidney").name == "kidneys"


@pytest.mark.parametrize("text", ["ovarian cyst on the right", "pulmonary trunk", "deep vein thrombosis, popliteal",
                                  "the sciatic nerve", "prostate gland, including the seminal vesicles",
                                  "pulmonary emboli on the CTPA", "pneumonia in the left lower lobe",
                                  "prostate, for RT",  # named before the reason: what is asked
                                  "heart contour", "cardiac contour for the mean heart dose",  # not the body's
                                  "the CT couch under the patient", "Free fluid in the pelvis",
                                  "para-aortic lymphadenopathy", "the ECG electrodes on the skin",  # writer_ac, _ab
                                  "what window level is best for the pancreas?"])
def test_more_anatomy_no_class_describes_is_refused(minilm_catalog: PromptCatalog, text: str):
    with pytest.raises(PromptError):
        minilm_catalog.resolve(text)


def test_an_option_box_keeps_a_description_with_the_class_it_describes(minilm_catalog: PromptCatalog):
    """Slicer's and OHIF's option boxes send one comma-separated string. A piece that says where the class named
    before it lies, and names no target of its own, describes it: before, "left adrenal, the inverted-Y ... crus"
    was drafted as two prompts. A bare name, a finding, or a piece whose own noun is a target stays a prompt."""
    from medprompt.infers.draft import parse_prompts

    cases = {
        "left adrenal, the inverted-Y shaped structure lateral to the left crus": ["adrenal_gland_left"],
        "pancreas, the gland behind the stomach, spleen": ["pancreas", "spleen"],
        "the right kidney, next to the left adrenal": ["kidney_right"],
        "stomach, below the liver, aorta": ["stomach", "aorta"],
        "liver, spleen, left kidney": ["liver", "spleen", "kidney_left"],
    }
    for text, names in cases.items():
        prompts = parse_prompts(text)
        assert len(prompts) == len(names), prompts
        assert [e.name for _, e in minilm_catalog.resolve_all(prompts)] == names, text
    # A finding, or its own target said with a place: a prompt of its own, refused alone if it must be, not lost.
    assert parse_prompts("liver, hypodense lesion in segment 4") == ["liver", "hypodense lesion in segment 4"]
    assert parse_prompts("urinary bladder, prostate") == ["urinary bladder", "prostate"]
    assert parse_prompts("urinary bladder, the prostate below it") == ["urinary bladder", "the prostate below it"]


def test_a_name_before_a_comma_or_as_the_first_noun_phrase_is_what_is_asked(minilm_catalog: PromptCatalog):
    """A prompt that names a class and then describes it after a comma, colon or dash, or whose first noun phrase
    is the class's name, is that class, however near another class its description reads ("... lateral to the
    left diaphragmatic crus" read like the left kidney, "... on the portal venous phase" like the portal vein);
    not when it lists classes, asks for a finding or names a side the class lacks."""
    for text, name in (("left adrenal, the inverted-Y shaped structure lateral to the left diaphragmatic crus",
                        "adrenal_gland_left"),
                       ("segment the inferior vena cava on the portal venous phase", "inferior_vena_cava"),
                       ("segment the spleen volume in cirrhosis", "spleen"),
                       ("whole-liver mask including all Couinaud segments", "liver"),
                       ("GB please, the one full of stones", "gallbladder"),  # "full of": what it holds
                       ("my left kidney, the one with the stone", "kidney_left"),  # "the one with": what it holds
                       ("please segment the gallbladder, patient has gallstones", "gallbladder"),  # "patient": no list
                       ("the right kidney, it has a stone", "kidney_right"),  # "it has": what it holds
                       ("right renal parenchyma and sinus", "kidney_right"),  # "parenchyma" says no more (was lungs)
                       ("L adrenal, pt with suspected adenoma, need volume", "adrenal_gland_left"),  # "pt with": why
                       ("LK only, living donor nephrectomy workup", "kidney_left"),  # the side in plain nouns
                       ("all the bones in the scan", "bone"),  # a plural folded (had been the body)
                       # its own side, not the landmark's
                       ("the right kidney, next to the left adrenal", "kidney_right"),
                       ("liver, near the right kidney", "liver"),  # no sided liver: the side is the landmark's
                       ("kidney, the left one", "kidney_left"),  # a side the name lacks: read whole
                       ("liver, outline the lesions", "liver_tumour")):  # a finding: read whole
        assert minilm_catalog.resolve(text).name == name, text
    with pytest.raises(PromptError, match="names 2 classes"):
        minilm_catalog.resolve("kidneys, liver")
    with pytest.raises(PromptError, match="asks for the brain"):  # its own tissue, not a part of what follows
        minilm_catalog.resolve("the whole brain parenchyma, for atrophy measurement")  # had been the kidneys


def test_a_name_spelt_as_the_target_is_no_landmark_and_no_list(minilm_catalog: PromptCatalog):
    """What the first noun phrase names stays the target when the prompt names it again as a place ("the whole
    patient outline, down to the skin surface" had been the bladder), and a class's alias in plain nouns is one name,
    not a list ("the splenic vein" is "the spleen vein" in the second reading: had been refused as two classes)."""
    assert minilm_catalog.resolve("the whole patient outline, down to the skin surface").name == "body"
    assert minilm_catalog.resolve("outline the portal vein and the splenic vein for portal hypertension "
                                  "assessment").name == "portal_vein_and_splenic_vein"
    assert minilm_catalog.resolve("PV and SV for TIPS planning").name == "portal_vein_and_splenic_vein"


def test_a_tumour_class_draws_tumours_of_its_organ_and_its_parts(minilm_catalog: PromptCatalog):
    """A tumour class is no haemorrhage, abscess or haematoma of its organ (each had been brain_tumor or
    liver_tumour), and a tumour of a part of its organ (the sigmoid colon, the cerebellum: other anatomy that had
    been refused) is that class."""
    for text in ("the intracerebral haemorrhage", "brain abscess", "liver haematoma", "subdural haematoma",
                 "pancreatic adenocarcinoma in the head of the pancreas", "the hippocampus on the MRI"):
        with pytest.raises(PromptError):
            minilm_catalog.resolve(text)
    for text, name in (("outline the sigmoid cancer causing the stricture", "colon_tumour"),
                       ("tumour of the sigmoid colon", "colon_tumour"), ("mass in the cerebellum", "brain_tumor"),
                       ("enhancing intra-axial mass with surrounding oedema in the cerebrum", "brain_tumor"),
                       ("breast cyst", "breast_tumor"), ("nodule in the liver", "liver_tumour"),
                       ("my son has a tumour in his brain, can you show it", "brain_tumor")):  # "has" no reason here
        assert minilm_catalog.resolve(text).name == name, text
    for text in ("the sigmoid colon", "the cerebellum"):  # the part itself is still other anatomy
        with pytest.raises(PromptError, match="no prompt file describes"):
            minilm_catalog.resolve(text)


def test_a_request_that_names_nothing_points_to_what_follows(minilm_catalog: PromptCatalog):
    """"Label: <finding>, ..." asks for what follows the colon: the finding is asked, not a reason (colon_tumour
    had been set aside as named only as a landmark once "adenocarcinoma" was a finding word)."""
    text = "Label: primary colorectal adenocarcinoma, circumferential wall thickening of the colon on portal venous CT."
    assert minilm_catalog.resolve(text).name == "colon_tumour"
    # a heading that names nothing is no request either (writer_y: the pancreas, refused, the body)
    for text, name in (("BraTS-style label: whole tumour region in the brain", "brain_tumor"),
                       ("Neoadjuvant trial: volume of the target breast cancer lesion, please", "breast_tumor"),
                       ("Label instruction: breast tumour mask on the ultrasound frames", "breast_tumor"),
                       ("ROI: hepatic masses only (primary or metastatic), exclude surrounding healthy parenchyma",
                        "liver_tumour"),
                       ("liver: the large organ under the right ribs", "liver")):  # a heading that names: kept
        assert minilm_catalog.resolve(text).name == name, text


def test_what_a_prompt_says_not_to_draw_is_not_drawn(minilm_catalog: PromptCatalog):
    """Read whole, each of these resolved to what it excludes (liver_tumour, kidneys, adrenal_glands,
    gallbladder) or was refused (the spleen with "no tumour", the stomach "without the duodenum"); a finding whose
    organ is named only as what not to draw is that organ's finding."""
    for text, name in (("liver without the tumour", "liver"), ("the right kidney, not the left one", "kidney_right"),
                       ("kidneys but not the adrenals", "kidneys"), ("whole liver but not the gallbladder", "liver"),
                       ("the spleen, no tumour", "spleen"), ("non-tumorous liver", "liver"),
                       ("stomach without the duodenum", "stomach"), ("liver parenchyma sparing the tumour", "liver"),
                       ("right kidney mask, exclude the left", "kidney_right"),  # had been both kidneys
                       ("left suprarenal, don't include the right one", "adrenal_gland_left"),
                       # a finding with no organ of its own is placed in the organ it excludes (was brain_tumor)
                       ("the tumour, not the whole liver", "liver_tumour"),
                       ("the lesion, not the liver", "liver_tumour"),
                       # but one that names its class is not placed ("... in the body": refused)
                       ("Segment the breast carcinoma, excluding the normal fibroglandular tissue and the skin.",
                        "breast_tumor")):
        assert minilm_catalog.resolve(text).name == name, text
    # one side of a both-sides class left out leaves the other side's class (had been the side left out)
    for text, name in (("both kidneys, right side excluded", "kidney_left"),
                       ("the adrenals, not the right", "adrenal_gland_left"),
                       ("kidneys but not the left adrenal", "kidneys"),  # another structure's side
                       ("ROI: L renal, cortex + medulla + pelvis, right side excluded", "kidney_left")):
        assert minilm_catalog.resolve(text).name == name, text
    with pytest.raises(PromptError, match="kidney tumour"):  # no class draws it
        minilm_catalog.resolve("the tumour, not the kidney")
    with pytest.raises(PromptError, match="only says what not to draw"):
        minilm_catalog.resolve("not the liver")
    with pytest.raises(PromptError, match=r"only a side .*\(read without 'not the left kidney'\)"):
        minilm_catalog.resolve("not the left kidney but the right one")


def test_quadrants_by_their_shorthand_and_a_real_word_that_is_no_typo(minilm_catalog: PromptCatalog):
    """"LUQ" is the left upper quadrant (the spleen's place; the liver had won), and "enema" of "barium enema" is a
    word, not a misspelling of "edema" (the prompt had been refused as a misspelt brain_tumor)."""
    assert minilm_catalog.resolve("homogeneous crescent-shaped organ in the LUQ against the left "
                                  "hemidiaphragm").name == "spleen"
    assert minilm_catalog.resolve("apple-core lesion on barium enema").name == "colon_tumour"
