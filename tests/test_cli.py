"""The ``medprompt`` command, run in-process: outputs, printed results, exit codes, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medprompt.cli import main
from medprompt.evaluation import evaluate
from medprompt.io import load_labelmap, save_labelmap, save_volume
from medprompt.phantoms import make_phantom

SMALL = (64, 64, 40)


def assert_one_line_error(capsys: pytest.CaptureFixture, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert lines, err
    for fragment in fragments:
        assert any(fragment in line for line in lines), err
    return err


def test_sample_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["sample-data", str(tmp_path / "store"), "--n", "2", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    images = sorted((tmp_path / "store").glob("*.nii.gz"))
    assert [p.name for p in images] == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    assert str(images[0]) in out
    labels, _, names = load_labelmap(tmp_path / "store" / "reference" / "phantom_001.nii.gz")
    np.testing.assert_array_equal(labels, make_phantom(6)[1])  # seed 5 + index 1
    assert names == make_phantom(6)[2]


def write_pair(tmp_path: Path) -> tuple[Path, Path]:
    ref = np.zeros((5, 5, 5), np.uint8)
    ref[0:2] = 3  # liver: 50 voxels
    ref[4, 4, 4] = 9  # aorta: 1 voxel
    pred = np.zeros_like(ref)
    pred[1:3] = 1  # liver: 50 voxels, 25 shared
    pred[0, 0, 0] = 2  # spleen: not in the reference
    save_labelmap(tmp_path / "pred.nii.gz", pred, np.eye(4), {"liver": 1, "spleen": 2})
    nib.save(nib.Nifti1Image(ref, np.eye(4)), tmp_path / "ref.nii.gz")
    (tmp_path / "labels.json").write_text(json.dumps({"labels": {"liver": 3, "aorta": 9}}))
    return tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz"


def test_evaluate_prints_table_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pred, ref = write_pair(tmp_path)
    code = main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--ref-labels",
                 str(tmp_path / "labels.json"), "--json", str(tmp_path / "scores.json")])
    assert code == 0
    out = capsys.readouterr().out
    liver_row = next(line for line in out.splitlines() if line.startswith("liver"))
    assert liver_row.split()[1:] == ["0.500", "0.333", "50/50"]
    assert "only in prediction (not averaged): spleen" in out
    assert "only in reference (not averaged): aorta" in out
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["classes"]["liver"]["dice"] == pytest.approx(0.5)
    assert scores["miou"] == pytest.approx(1 / 3)
    assert scores["only_ref"] == ["aorta"]


def test_evaluate_without_reference_names_says_which_option(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    pred, ref = write_pair(tmp_path)
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref)]) == 2
    assert_one_line_error(capsys, str(ref), "--ref-labels")


@pytest.mark.parametrize("argv", [["infer", "{missing}", "{tmp}/out.nii.gz"],
                                  ["evaluate", "--pred", "{missing}", "--ref", "{missing}"]])
def test_missing_input_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str]) -> None:
    missing = tmp_path / "no_such_scan.nii.gz"
    argv = [a.format(missing=missing, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    assert_one_line_error(capsys, str(missing), "no such file")


def test_corrupt_input_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "scan.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00 definitely not a gzip stream")
    assert main(["infer", str(bad), str(tmp_path / "out.nii.gz")]) == 2
    assert_one_line_error(capsys, str(bad), "cannot read")


@pytest.mark.parametrize("argv", [[], ["infer"], ["evaluate", "--pred", "x"], ["nonsense"],
                                  ["sample-data", "d", "--n", "many"],
                                  ["train-zero-shot", "--studies", "d"]])  # no --out: never the shipped model
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    assert "usage: medprompt" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    assert "infer" in capsys.readouterr().out


def test_infer_one_volume(tmp_path: Path, capsys: pytest.CaptureFixture, phantom_file, sam_cache: Path) -> None:
    image, truth, truth_names = phantom_file
    output = tmp_path / "drafts" / "ct_draft.nii.gz"
    assert main(["infer", str(image), str(output), "--prompts", "liver", "spleen"]) == 0
    out = capsys.readouterr().out
    assert str(output) in out and '"liver": 1' in out
    labels, affine, names = load_labelmap(output)
    assert names == {"liver": 1, "spleen": 2}
    sidecar = json.loads((tmp_path / "drafts" / "ct_draft.json").read_text())
    assert sidecar["labels"] == names
    # The default draft is the prior's regions drawn by LiteMedSAM, and the sidecar says so per class.
    assert set(sidecar["stages"]) == {"liver", "spleen"}
    assert all(stage.startswith("prior + LiteMedSAM") for stage in sidecar["stages"].values()), sidecar["stages"]
    assert labels.shape == truth.shape
    np.testing.assert_allclose(affine, nib.load(image).affine, atol=1e-5)
    scores = {s.name: s.dice for s in evaluate(labels, affine, names, truth, affine, truth_names).scores}
    assert scores["liver"] > 0.5


def test_infer_folder_continues_past_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inputs = tmp_path / "in"
    for seed in (2, 3):
        volume, _, _ = make_phantom(seed, SMALL)
        save_volume(inputs / f"case{seed}.nii.gz", volume)
    (inputs / "broken.nii.gz").write_bytes(b"not a volume")
    assert main(["infer", str(inputs), str(tmp_path / "out"), "--prompts", "liver", "--refine", "none"]) == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        ["case2.json", "case2.nii.gz", "case3.json", "case3.nii.gz"]
    assert_one_line_error(capsys, str(inputs / "broken.nii.gz"), "1 of 3 volumes failed")


def test_infer_folder_needs_an_output_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    save_volume(tmp_path / "a.nii.gz", make_phantom(0, (16, 16, 16))[0])
    save_volume(tmp_path / "b.nii.gz", make_phantom(1, (16, 16, 16))[0])
    assert main(["infer", str(tmp_path), str(tmp_path / "out.nii.gz")]) == 2
    assert_one_line_error(capsys, "holds 2 volumes; give an output folder")


def test_infer_unknown_prompt_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  phantom_file) -> None:
    image, _, _ = phantom_file
    assert main(["infer", str(image), str(tmp_path / "o.nii.gz"), "--prompts", "flux capacitor"]) == 2
    assert_one_line_error(capsys, "flux capacitor")
    assert not (tmp_path / "o.nii.gz").exists()


def test_serve_delegates_to_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    import medprompt.server

    calls = []
    monkeypatch.setattr(medprompt.server, "serve", lambda **kwargs: calls.append(kwargs) or 0)
    assert main(["serve", "--studies", "/data/ct", "--port", "8123", "--conf", "models", "prior"]) == 0
    assert calls == [{"studies": "/data/ct", "host": "127.0.0.1", "port": 8123, "conf": {"models": "prior"}}]
