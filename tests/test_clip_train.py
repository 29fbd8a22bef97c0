"""train-clip: DHN-NCE finetuning of a tiny open_clip model, resuming, the CLI, and pairs from a datastore."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from PIL import Image  # noqa: E402

from medprompt.cli import main  # noqa: E402
from medprompt.clip.dhn_nce import dhn_nce_loss  # noqa: E402
from medprompt.clip.model import load_clip, write_model_folder  # noqa: E402
from medprompt.clip.pairs import build_pairs  # noqa: E402
from medprompt.clip.train import ClipTrainConfig, exclusion_mask, read_pairs, read_image, train_clip  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SIZE = 32
TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": SIZE, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
CAPTIONS = ("a bright square", "a thin bright bar", "a dark disc", "plain noise")


def draw(kind: int, rng: np.random.Generator) -> np.ndarray:
    img = rng.normal(100, 12, (SIZE, SIZE))
    y, x = rng.integers(4, SIZE - 12, 2)
    if kind == 0:
        img[y:y + 9, x:x + 9] += 110
    elif kind == 1:
        img[y:y + 2, 2:SIZE - 2] += 110
    elif kind == 2:
        yy, xx = np.mgrid[:SIZE, :SIZE]
        img[(yy - y - 4) ** 2 + (xx - x - 4) ** 2 < 25] -= 80
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    torch.manual_seed(0)
    return write_model_folder(tmp_path_factory.mktemp("tiny_start"), open_clip.CLIP(**TINY).eval(), TINY,
                              OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)


@pytest.fixture(scope="module")
def pairs_csv(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    rows = []
    for kind, caption in enumerate(CAPTIONS):
        for i in range(6):
            name = f"img/{kind}_{i}.png"
            (folder / "img").mkdir(exist_ok=True)
            Image.fromarray(draw(kind, rng)).save(folder / name)
            rows.append((name, caption))
    with open(folder / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "text"), *rows])
    return folder / "pairs.csv"


def mean_loss(model_folder, csv_path) -> float:
    """DHN-NCE of every pair at once (same captions excluded as negatives), no gradient."""
    clip = load_clip(str(model_folder), fresh=True)
    pairs = read_pairs(csv_path)
    with torch.no_grad():
        img = clip.model.encode_image(torch.cat([clip.pixels(read_image(p.image)) for p in pairs]))
        txt = clip.model.encode_text(clip.tokenizer([p.text for p in pairs]))
        return float(dhn_nce_loss(img, txt, exclude=exclusion_mask(pairs)))


def test_finetuning_lowers_the_loss(tiny_model, pairs_csv, tmp_path):
    before = mean_loss(tiny_model, pairs_csv)
    result = train_clip(ClipTrainConfig(pairs=pairs_csv, model=str(tiny_model), out=tmp_path / "tuned", steps=40,
                                        batch_size=8, lr=1e-3, weight_decay=0.0), progress=False)
    assert result.steps_done == 40 and len(result.losses) == 40
    after = mean_loss(tmp_path / "tuned", pairs_csv)  # the written folder is a model spec
    assert after < before - 0.5, (before, after)
    assert np.mean(result.losses[-8:]) < np.mean(result.losses[:8])
    meta = json.loads((tmp_path / "tuned" / "train_clip.json").read_text())
    assert meta["tau"] == 0.6 and meta["beta1"] == meta["beta2"] == 0.15 and meta["step"] == 40


def test_an_interrupted_run_resumes_to_the_same_weights(tiny_model, pairs_csv, tmp_path):
    common = dict(pairs=pairs_csv, model=str(tiny_model), steps=6, batch_size=6, lr=1e-3)
    train_clip(ClipTrainConfig(out=tmp_path / "straight", **common), progress=False)
    stopped = train_clip(ClipTrainConfig(out=tmp_path / "resumed", time_limit_s=0.0, **common), progress=False)
    assert stopped.steps_done == 1
    assert load_clip(str(tmp_path / "resumed"), fresh=True)  # usable while unfinished
    resumed = train_clip(ClipTrainConfig(out=tmp_path / "resumed", **common), progress=False)
    assert resumed.steps_done == 6 and len(resumed.losses) == 5
    a = load_clip(str(tmp_path / "straight"), fresh=True).model.state_dict()
    b = load_clip(str(tmp_path / "resumed"), fresh=True).model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not list((tmp_path / "resumed").glob(".*tmp*"))  # no temporary file left behind


def test_cli_trains_and_reports_bad_input_in_one_line(tiny_model, pairs_csv, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cli"
    assert main(["train-clip", "--pairs", str(pairs_csv), "--model", str(tiny_model), "--out", str(out),
                 "--steps", "3", "--batch-size", "4"]) == 0
    assert "DHN-NCE" in capsys.readouterr().out and (out / "open_clip_config.json").is_file()

    bad = tmp_path / "bad.csv"
    bad.write_text("path,caption\nx.png,liver\n")
    assert main(["train-clip", "--pairs", str(bad), "--model", str(tiny_model), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "image,text" in err and "\n" not in err

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.delenv("MEDPROMPT_ALLOW_DOWNLOAD", raising=False)
    assert main(["train-clip", "--pairs", str(pairs_csv), "--model", "biomedclip", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "hf download microsoft/BiomedCLIP" in err and "\n" not in err


def test_pairs_from_saved_corrections(tmp_path, tiny_model, capsys):
    import nibabel as nib

    store = tmp_path / "datastore"
    final = store / "labels" / "final"
    final.mkdir(parents=True)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 200, (60, 80)).astype(np.uint8)
    labels = np.zeros((60, 80), np.uint8)
    labels[10:30, 20:50] = 1
    labels[40:50, 5:15] = 2
    Image.fromarray(image).save(store / "case1.png")
    Image.fromarray(labels).save(final / "case1.png")
    (final / "case1.json").write_text(json.dumps({"labels": {"liver": 1, "odd blob": 2}}))
    Image.fromarray(image).save(store / "unlabelled.png")
    volume = rng.normal(0, 50, (32, 32, 12)).astype(np.float32)
    vlabel = np.zeros((32, 32, 12), np.uint8)
    vlabel[8:20, 10:24, 2:10] = 1
    nib.save(nib.Nifti1Image(volume, np.diag([1.5, 1.5, 3.0, 1.0])), store / "ct1.nii.gz")
    nib.save(nib.Nifti1Image(vlabel, np.diag([1.5, 1.5, 3.0, 1.0])), final / "ct1.nii.gz")
    (final / "ct1.json").write_text(json.dumps({"labels": {"spleen": 1}}))

    csv_path = build_pairs(store, tmp_path / "out")
    rows = list(csv.DictReader(open(csv_path)))
    by_class: dict[str, list[dict]] = {}
    for row in rows:
        by_class.setdefault(row["class"], []).append(row)
    assert set(by_class) == {"liver", "odd blob", "spleen"}
    liver_texts = {r["text"] for r in by_class["liver"]}
    assert "liver" in liver_texts and len(liver_texts) > 2  # catalog aliases and descriptions too
    assert {r["text"] for r in by_class["odd blob"]} == {"odd blob"}
    crop = np.asarray(Image.open(csv_path.parent / by_class["liver"][0]["image"]).convert("L"))
    # box rows 10:30, cols 20:50, margin 15 % of the side (at least 4 px)
    assert crop.shape == (20 + 2 * 4, 30 + 2 * 4)
    spleen_crops = {r["image"] for r in by_class["spleen"]}
    assert len(spleen_crops) == 3 and all("_z" in c for c in spleen_crops)
    assert not any("unlabelled" in r["image"] for r in rows)

    out = tmp_path / "from_store"
    assert main(["train-clip", "--studies", str(store), "--model", str(tiny_model), "--out", str(out),
                 "--steps", "2", "--batch-size", "4"]) == 0
    assert (out / "pairs" / "pairs.csv").is_file() and (out / "open_clip_pytorch_model.bin").is_file()
    capsys.readouterr()
    empty = tmp_path / "empty_store"
    empty.mkdir()
    assert main(["train-clip", "--studies", str(empty), "--model", str(tiny_model), "--out", str(out)]) == 2
    assert "no saved labels" in capsys.readouterr().err


def test_model_folder_with_a_hugging_face_text_tower_loads_offline_after_a_move(tmp_path):
    # BiomedCLIP's text tower is a Hugging Face BERT: a written folder carries its config and
    # tokenizer, so it loads with no hub access, also once moved elsewhere. MiniLM stands in for it.
    import shutil

    from medprompt.errors import WeightsError
    from medprompt.text.weights import minilm_folder

    try:
        bert = minilm_folder()
    except WeightsError as missing:
        pytest.skip(str(missing))
    text_cfg = {"hf_model_name": str(bert), "hf_tokenizer_name": str(bert), "hf_proj_type": "linear",
                "hf_pooler_type": "mean_pooler", "context_length": 16}
    cfg = {"embed_dim": 32, "vision_cfg": TINY["vision_cfg"], "text_cfg": text_cfg}
    model = open_clip.CustomTextCLIP(**{**cfg, "text_cfg": {**text_cfg, "hf_model_pretrained": False}})
    written = write_model_folder(tmp_path / "hf_clip", model.eval(), cfg, (0.5,) * 3, (0.5,) * 3, tokenizer_folder=bert)
    moved = tmp_path / "elsewhere"
    shutil.move(str(written), moved)
    clip = load_clip(str(moved), fresh=True)
    assert clip.files.tokenizer_folder == moved and clip.mean == (0.5, 0.5, 0.5)
    vector = clip.text_vector(["liver", "the liver"])
    assert vector.shape == (32,) and float(vector.norm()) == pytest.approx(1.0, abs=1e-5)
    before = dict(model.state_dict())
    after = clip.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
