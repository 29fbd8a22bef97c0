"""Weak supervision in 2D: a network trained on given (or zero-shot) masks drafts new images.

Synthetic images with a planted shape (a bright blob of random place and size on a shaded, noisy
background with a dark distractor) train a tiny model in a few seconds; its drafts on images it never
saw are scored by Dice. Real inference throughout: the CLI's own train-weak and infer commands.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medprompt.cli import main as cli

SIZE = 64  # network grid for the tests (the product's default is 256)
STEPS = 60


def synthetic(rng: np.random.Generator, shape: tuple[int, int] = (72, 96)) -> tuple[np.ndarray, np.ndarray]:
    """uint8 picture and its boolean mask: an ellipse brighter than a shaded background, and a dark square."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    ry, rx = rng.uniform(0.12, 0.22) * h, rng.uniform(0.12, 0.22) * w
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    picture = 60 + 50 * xx / w + rng.normal(0, 12, shape)
    sy, sx = int(rng.integers(0, h - 12)), int(rng.integers(0, w - 12))
    picture[sy:sy + 10, sx:sx + 10] = 10
    picture[mask] += 90
    return np.clip(picture, 0, 255).astype(np.uint8), mask


def write_set(folder: Path, n: int, seed: int, masks: Path | None = None) -> list[tuple[Path, np.ndarray]]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        picture, mask = synthetic(rng)
        path = folder / f"img{i:02d}.png"
        Image.fromarray(picture).save(path)
        if masks is not None:
            masks.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8)).save(masks / f"img{i:02d}.png")
        out.append((path, mask))
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def train_args(images: Path, masks: Path, out: Path, steps: int = STEPS) -> list[str]:
    return ["train-weak", "--images", str(images), "--masks", str(masks), "--prompts", "brain tumor",
            "--out", str(out), "--steps", str(steps), "--size", str(SIZE), "--batch-size", "4", "--lr", "0.01"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("weak")
    write_set(root / "images", 8, seed=1, masks=root / "masks")
    model = root / "model.pt"
    assert cli(train_args(root / "images", root / "masks", model)) == 0
    return model


def test_trained_model_drafts_new_images(trained: Path, tmp_path: Path) -> None:
    """Drafts of the checkpoint ensemble on six unseen images match their planted shapes (CLI infer)."""
    import torch

    blob = torch.load(trained, map_location="cpu", weights_only=False)
    assert len(blob["snapshots"]) == 3 and blob["classes"] == ["brain_tumor"]
    assert 0.0 < blob["meta"]["excluded_pixels"] < 0.5  # pass 2 left out some, not most, pixels
    scores = []
    for path, mask in write_set(tmp_path / "new", 6, seed=99):
        out = tmp_path / f"{path.stem}_label.png"
        assert cli(["infer", str(path), str(out), "--model", f"weak:{trained}", "--refine", "none"]) == 0
        scores.append(dice(np.asarray(Image.open(out)) == 1, mask))
    assert np.mean(scores) > 0.8, scores


def test_served_2d_drafts_are_localised_by_the_weak_model_once_a_round_wrote_it(trained: Path, tmp_path: Path) -> None:
    """The server's 2D route (the prior model's infer) uses the weak model for the classes it learnt, unless the
    request names a saliency method; a model that does not know the class leaves the request to the others."""
    from medprompt.infers.draft2d import infer_2d

    def served(request: dict, path: Path, prompts: list[str]) -> tuple[np.ndarray, dict]:
        """The result map and response; the result file removed, as the server removes it once sent."""
        result, response = infer_2d(request, str(path), prompts, "none", None, None, weak_model=trained)
        try:
            return np.asarray(Image.open(result)), response
        finally:
            Path(result).unlink()

    scores = []
    for path, mask in write_set(tmp_path / "new", 4, seed=7):
        labels, response = served({}, path, ["brain tumour"])
        assert response["saliency"] == f"weak:{trained.resolve()}".lower()
        scores.append(dice(labels == response["label_names"]["brain_tumor"], mask))
    assert np.mean(scores) > 0.8, scores
    # Lungs: not learnt, so the attribute prior answers; a request naming a method gets that method.
    assert served({}, path, ["lungs"])[1]["saliency"] == "attribute"
    assert served({"saliency": "attribute"}, path, ["brain tumour"])[1]["saliency"] == "attribute"


def test_untrained_ensemble_is_no_better_than_chance(trained: Path, tmp_path: Path) -> None:
    """The score above comes from training: the same network with its first snapshot reinitialised fails."""
    from medprompt.io.image2d import load_image2d
    from medprompt.weak.model import WeakModel, build_net

    model = WeakModel([build_net(1).state_dict()], ["brain_tumor"], SIZE)
    (path, mask), = write_set(tmp_path / "new", 1, seed=5)
    probs, _ = model.probabilities(load_image2d(path))
    assert dice(probs.argmax(0) == 1, mask) < 0.6


def test_resume_continues_from_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A run killed at step 11 (state saved at 10) resumes at step 11 and ends with a model file."""
    from medprompt.weak.train import WeakConfig, train_weak

    write_set(tmp_path / "images", 4, seed=2, masks=tmp_path / "masks")
    cfg = WeakConfig(images=tmp_path / "images", prompts=["brain tumor"], out=tmp_path / "m.pt",
                     masks=tmp_path / "masks", steps=24, size=32, lr=0.01, save_every=10)

    class Killed(Exception):
        pass

    def kill_at_11(step: int, stats: dict) -> None:
        if step == 11:
            raise Killed

    with pytest.raises(Killed):
        train_weak(cfg, progress=False, on_step=kill_at_11)
    assert not cfg.out.exists() and (tmp_path / "m.pt.state").is_file()
    seen: list[int] = []
    result = train_weak(cfg, progress=False, on_step=lambda step, stats: seen.append(step))
    assert seen[0] == 11 and seen[-1] == 24 and result.complete and cfg.out.is_file()
    assert len(result.history) == 24  # the first 10 losses came back with the state
    # Finished: a third call trains nothing.
    seen.clear()
    again = train_weak(cfg, progress=False, on_step=lambda step, stats: seen.append(step))
    assert seen == [] and again.complete and again.start == again.steps == 24
    cfg.lr = 0.02  # another run under the same --out: set aside, said so, trained from step 1
    train_weak(cfg, progress=True, on_step=lambda step, stats: seen.append(step))
    assert seen[0] == 1 and "belongs to a run with other lr; starting over" in capsys.readouterr().out


def test_zero_shot_drafts_are_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --masks every image is drafted once by the zero-shot path (here without SAM) and cached."""
    import medprompt.drafts2d as drafts2d
    from medprompt.weak.data import build_training_set

    write_set(tmp_path / "images", 3, seed=3)
    images = sorted((tmp_path / "images").iterdir())
    calls: list[str] = []
    real = drafts2d.draft2d

    def counting(image, prompts, **kwargs):
        calls.append(image.source)
        return real(image, prompts, saliency=kwargs.get("saliency"), refine="none")

    monkeypatch.setattr(drafts2d, "draft2d", counting)
    first = build_training_set(images, ["brain_tumor"], SIZE, tmp_path / "cache", progress=False)
    second = build_training_set(images, ["brain_tumor"], SIZE, tmp_path / "cache", progress=False)
    assert len(calls) == 3 and np.array_equal(first.y, second.y)
    assert len(list((tmp_path / "cache").glob("*.png"))) == 3


@pytest.mark.parametrize("case", ["missing", "empty", "file", "no_mask", "bad_prompt", "confidence"])
def test_train_weak_bad_input_exits_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_set(tmp_path / "images", 2, seed=4, masks=tmp_path / "masks")
    (tmp_path / "empty").mkdir()
    (tmp_path / "masks" / "img01.png").unlink()
    images, masks, prompt = tmp_path / "images", tmp_path / "masks", "brain tumor"
    if case == "missing":
        images = tmp_path / "nowhere"
    elif case == "empty":
        images = tmp_path / "empty"
    elif case == "file":
        images = tmp_path / "images" / "img00.png"
    elif case == "bad_prompt":
        prompt = "qwertyuiop"
    argv = ["train-weak", "--images", str(images), "--masks", str(masks), "--prompts", prompt,
            "--out", str(tmp_path / "m.pt"), "--steps", "4", "--size", "32"]
    if case == "confidence":
        argv += ["--min-confidence", "1.5"]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    expected = {"missing": "no such folder", "empty": "no 2D images", "file": "not a folder",
                "no_mask": "no mask for img01.png", "bad_prompt": "qwertyuiop",
                "confidence": "--min-confidence must be in [0, 1], got 1.5"}[case]
    assert expected in err[0]
    assert not (tmp_path / "m.pt").exists()


def test_infer_with_missing_weak_model_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (path, _), = write_set(tmp_path / "images", 1, seed=6)
    assert cli(["infer", str(path), str(tmp_path / "o.png"), "--model", f"weak:{tmp_path / 'none.pt'}"]) == 2
    err = capsys.readouterr().err
    assert "none.pt" in err and "train-weak" in err


def test_monai_label_task_trains_on_datastore_2d_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The medprompt_weak2d train task drafts the datastore's 2D images (no labels read), trains, and
    serves its model file, which then drafts."""
    import medprompt.drafts2d as drafts2d
    from medprompt.io.image2d import load_image2d
    from medprompt.weak.draft import draft_weak
    from medprompt.weak.task import WeakTrainTask

    pairs = write_set(tmp_path / "images", 4, seed=7)
    real = drafts2d.draft2d
    monkeypatch.setattr(drafts2d, "draft2d", lambda image, prompts, **kw: real(image, prompts, refine="none"))

    class Store:
        def list_images(self) -> list[str]:
            return [p.stem for p, _ in pairs]

        def get_image_uri(self, image_id: str) -> str:
            return str(tmp_path / "images" / f"{image_id}.png")

    task = WeakTrainTask(tmp_path / "model", ["brain tumor"])
    stats = task({"steps": "6", "size": "32"}, Store())
    assert stats["images"] == 4 and task.model.is_file() and task.stats()["steps"] == 6
    result = draft_weak(load_image2d(pairs[0][0]), task.model, refine="none")
    assert result.labels.shape == (72, 96) and result.names == {"brain_tumor": 1}


def test_unsure_drafts_are_left_out_of_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each draft's confidence is cached with it and read back; training leaves out drafts under
    min_confidence (a near tie between two places) and learns from the rest; when every draft is unsure,
    all are kept."""
    import torch

    import medprompt.drafts2d as drafts2d
    from medprompt.weak.data import build_training_set
    from medprompt.weak.train import WeakConfig, confident, train_weak

    write_set(tmp_path / "images", 4, seed=8)
    images = sorted((tmp_path / "images").iterdir())
    told = {"img00": 0.9, "img01": 0.05, "img02": 0.6, "img03": 0.1}
    real = drafts2d.draft2d

    def with_confidence(image, prompts, **kwargs):
        result = real(image, prompts, refine="none")
        result.confidence = {"brain_tumor": told[Path(image.source).stem]}
        return result

    monkeypatch.setattr(drafts2d, "draft2d", with_confidence)
    data = build_training_set(images, ["brain_tumor"], SIZE, tmp_path / "cache", progress=False)
    monkeypatch.setattr(drafts2d, "draft2d", real)  # from the cache now: confidence read from the sidecars
    again = build_training_set(images, ["brain_tumor"], SIZE, tmp_path / "cache", progress=False)
    assert again.confidence == data.confidence == [0.9, 0.05, 0.6, 0.1]

    kept, left_out = confident(again, 0.25)
    assert left_out == ["img01.png", "img03.png"] and kept.names == ["img00.png", "img02.png"]
    assert np.array_equal(kept.y, again.y[[0, 2]])
    everything, none_left = confident(again, 0.95)
    assert none_left == [] and everything.names == again.names

    out = tmp_path / "m.pt"
    result = train_weak(WeakConfig(images=images, prompts=["brain tumor"], out=out, steps=4, size=32,
                                   drafts=tmp_path / "cache"), progress=False)
    meta = torch.load(out, map_location="cpu", weights_only=False)["meta"]
    assert result.left_out == meta["left_out_drafts"] == ["img01.png", "img03.png"]
    assert meta["trained_on"] == ["img00.png", "img02.png"]
    # The command line sets the threshold: 0 keeps every draft.
    monkeypatch.setattr(drafts2d, "draft2d", with_confidence)
    every = tmp_path / "every.pt"
    assert cli(["train-weak", "--images", str(tmp_path / "images"), "--prompts", "brain tumor", "--out", str(every),
                "--steps", "4", "--size", "32", "--min-confidence", "0"]) == 0
    meta = torch.load(every, map_location="cpu", weights_only=False)["meta"]
    assert meta["left_out_drafts"] == [] and len(meta["trained_on"]) == 4
