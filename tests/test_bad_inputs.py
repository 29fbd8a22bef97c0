"""A corpus of bad inputs, made here, thrown at the CLI and the server as users' mistakes and probes would be.

Every case must end in one line and exit 2 from the CLI, and a 4xx naming the problem from the server,
which keeps serving; nothing may be written outside the datastore, and what the datastore held survives.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import nibabel as nib
import numpy as np
import pytest
import requests

from medprompt.cli import main

if TYPE_CHECKING:
    from conftest import RunningServer

MODEL = "medprompt_prior"
IMAGE = "phantom_000"
SHAPE = (24, 24, 12)
RNG = np.random.default_rng(0)
CT = RNG.normal(0, 300, SHAPE).astype(np.int16)


def _nifti(data: np.ndarray, affine: np.ndarray | None = None) -> Callable[[Path], None]:
    return lambda path: nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 3.0, 1.0]) if affine is None else affine),
                                 path)


def _bytes(content: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(content)


def _valid_gz() -> bytes:
    image = nib.Nifti1Image(CT, np.diag([1.5, 1.5, 3.0, 1.0]))
    return gzip.compress(image.to_bytes())


def _huge_header() -> bytes:
    """A valid NIfTI header declaring 4096^3 voxels over a 1 kB payload."""
    image = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    header = image.header.copy()
    header.set_data_shape((4096, 4096, 4096))
    return gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 1024)


def _nrrd(text: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(text)


NAN = CT.astype(np.float32)
NAN[:] = np.nan
PARALLEL = np.array([[1.0, 1.0, 0, 0], [0, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]])

# name -> (file name, writer, a word the error must contain)
CORPUS: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "empty_nii_gz": ("empty.nii.gz", _bytes(b""), "empty"),
    "truncated_nii_gz": ("trunc.nii.gz", lambda p: p.write_bytes(_valid_gz()[:400]), "cannot read"),
    "truncated_nii": ("trunc.nii", lambda p: p.write_bytes(gzip.decompress(_valid_gz())[:600]), "truncated"),
    "png_named_nii": ("picture.nii.gz", _bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2), "cannot read"),
    "random_bytes_nii": ("noise.nii", _bytes(bytes(RNG.integers(0, 256, 2000, dtype=np.uint8))), "cannot read"),
    "garbage_nrrd": ("text.nrrd", _nrrd("hello, this is not an image\n"), "cannot read"),
    "nrrd_wrong_sizes": ("sizes.nrrd", _nrrd("NRRD0004\ntype: float\ndimension: 3\nsizes: 10 10\nencoding: raw\n\n"),
                         "cannot read"),
    "png": ("picture.png", _bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64), "cannot read"),  # a cut-short 2D picture
    "one_voxel_thick": ("thin.nii.gz", _nifti(CT[:1]), "2D"),
    "four_d": ("frames.nii.gz", _nifti(np.stack([CT, CT], -1)), "4D"),
    "all_nan": ("nan.nii.gz", _nifti(NAN), "finite"),
    "beyond_float32": ("big.nii.gz", _nifti(CT.astype(np.float64) * 1e300), "float32"),
    "absurd_spacing": ("huge_voxels.nii.gz", _nifti(CT, np.diag([1e6, 1e6, 1e6, 1.0])), "voxel size"),
    "parallel_axes": ("parallel.nrrd", _nrrd("NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nspace: RAS\n"
                                             "space directions: (1,0,0) (1,0,0) (0,0,3)\nendian: little\nencoding: raw\n\n"
                                             + "\0" * 128), "degenerate"),
    "huge_declared": ("huge.nii.gz", _bytes(_huge_header()), "voxels"),
    "dicom_garbage": ("garbage.dcm", _bytes(b"\0" * 128 + b"DICM" + bytes(300)), "DICOM"),
}


def _truncated_dicom_series(folder: Path) -> None:
    """A valid 5-slice CT series whose middle file lost the second half of its pixel data."""
    from test_io import ORIENTATIONS, write_dicom_series

    files = write_dicom_series(folder, CT[:8, :8, :5], ORIENTATIONS["LPS"], modality="CT")
    data = files[2].read_bytes()
    files[2].write_bytes(data[: len(data) - 40])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    files = {}
    for name, (filename, write, _) in CORPUS.items():
        folder = root / name
        folder.mkdir()
        write(folder / filename)
        files[name] = folder / filename
    _truncated_dicom_series(root / "truncated_dicom" / "series")
    files["truncated_dicom"] = root / "truncated_dicom" / "series"
    return files


@pytest.fixture
def small_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDPROMPT_MAX_VOXELS", str(10**8))


def test_cli_refuses_a_dicom_series_with_a_truncated_slice(corpus: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    code = main(["infer", str(corpus["truncated_dicom"]), str(tmp_path / "out.nii.gz"), "--refine", "none"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "series" in lines[0] and not (tmp_path / "out.nii.gz").exists()


def test_nan_and_inf_voxels_become_the_image_minimum_with_a_warning(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    from medprompt.io.volume import load_volume

    data = CT.astype(np.float32)
    data[0, 0, 0], data[1, 1, 1], data[2, 2, 2] = np.nan, np.inf, -np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "holes.nii.gz")
    volume = load_volume(tmp_path / "holes.nii.gz")
    lowest = data[np.isfinite(data)].min()
    assert np.isfinite(volume.data).all() and volume.data[0, 0, 0] == volume.data[2, 2, 2] == lowest
    np.testing.assert_array_equal(volume.data[3:], data[3:])
    assert "3 NaN/Inf voxels" in caplog.text


# A 2D NIfTI slice is a valid 2D study (tests/test_image2d.py, tests/test_server_2d.py), so not in the corpus.
@pytest.mark.parametrize("case", sorted(CORPUS))
def test_cli_refuses_each_bad_file_in_one_line_with_exit_2(
    case: str, corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, small_limit: None
) -> None:
    out = tmp_path / "out.nii.gz"
    code = main(["infer", str(corpus[case]), str(out), "--refine", "none", "--prompts", "liver"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert corpus[case].name in lines[0] and CORPUS[case][2].lower() in lines[0].lower(), lines[0]
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("prompt", ["", "   ", "\x00", "liv\x1b[31mer", "x" * 100_000, "肝臓", "🫀", ",,,"],
                         ids=["empty", "blank", "nul", "escape", "huge", "unicode", "emoji", "commas"])
def test_cli_refuses_unusable_prompts_in_one_short_line(
    prompt: str, phantom_file: tuple[Path, np.ndarray, dict[str, int]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(["infer", str(phantom_file[0]), str(tmp_path / "out.nii.gz"), "--refine", "none", "--prompts", prompt])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert len(lines[0]) < 500 and "\x00" not in lines[0] and "\x1b" not in lines[0]


# -- the server ----------------------------------------------------------------------------------

def _outside(server: RunningServer) -> set[Path]:
    """Every file under the server's root except its datastore, its logs, model folder, caches and temp folder."""
    root = server.studies.parent
    skip = (server.studies, server.model_dir, root / "cache", root / "tmp", server.log)
    return {p for p in root.rglob("*") if p.is_file() and not any(p == s or s in p.parents for s in skip)}


def _temporary(server: RunningServer) -> set[Path]:
    """The files in the server's temp folder (its TMPDIR): uploads' copies and drafts' results while in use."""
    return set((server.studies.parent / "tmp").iterdir())


def _detail(answer: requests.Response) -> str:
    try:
        return str(answer.json().get("detail"))
    except ValueError:
        return answer.text


@pytest.fixture(scope="module")
def before(server: RunningServer) -> dict[str, object]:
    """What the datastore held and which files lay outside it before the corpus was thrown."""
    images = {p.name: p.read_bytes() for p in server.studies.glob("*.nii.gz")}
    return {"images": images, "outside": _outside(server), "temporary": _temporary(server)}


@pytest.mark.parametrize("case", sorted(set(CORPUS) - {"dicom_garbage", "png"}))
def test_server_refuses_each_bad_file_as_upload_draft_and_label_with_4xx(
    case: str, corpus: dict[str, Path], server: RunningServer, before: dict[str, object]
) -> None:
    path, word = corpus[case], CORPUS[case][2]
    with path.open("rb") as f:
        upload = requests.put(f"{server.url}/datastore/image?image=bad_{case}", files={"file": (path.name, f)},
                              timeout=60)
    assert 400 <= upload.status_code < 500 and word.lower() in _detail(upload).lower(), (upload.status_code, upload.text)
    with path.open("rb") as f:
        drafted = requests.post(f"{server.url}/infer/{MODEL}?output=json", files={"file": (path.name, f)},
                                data={"params": json.dumps({"prompts": ["liver"]})}, timeout=120)
    assert 400 <= drafted.status_code < 500 and word.lower() in _detail(drafted).lower(), (drafted.status_code, drafted.text)
    with path.open("rb") as f:
        label = requests.put(f"{server.url}/datastore/label?image={IMAGE}&tag=bad_inputs",
                             files={"label": (path.name, f)}, timeout=60)
    assert 400 <= label.status_code < 500, (label.status_code, label.text)
    objects = requests.get(f"{server.url}/datastore/?output=all", timeout=30).json()["objects"]
    assert f"bad_{case}" not in objects and "bad_inputs" not in objects[IMAGE]["labels"]


@pytest.mark.parametrize("params, status, named", [
    ({"prompts": ""}, 400, "prompt"),
    ({"prompts": "   "}, 400, "prompt"),
    ({"prompts": ["liver", 3]}, 400, "prompt"),
    ({"prompts": 42}, 400, "prompt"),
    ({"prompts": {"liver": 1}}, 400, "prompt"),
    ({"prompts": "x" * 100_000}, 400, "prompt"),
    ({"prompts": "liv\x00er"}, 400, "prompt"),
    ({"prompts": "肝臓"}, 400, "prompt"),
    ({"prompts": float("nan")}, 400, "prompt"),
    ({"refine": "bogus"}, 400, "refine"),
    ({"refine": ["sam"]}, 400, "refine"),
], ids=lambda v: repr(v)[:24])
def test_server_refuses_malformed_params_with_400_naming_them(
    server: RunningServer, params: dict, status: int, named: str
) -> None:
    answer = requests.post(f"{server.url}/infer/{MODEL}?image={IMAGE}&output=json",
                           data={"params": json.dumps(params)}, timeout=120)
    assert answer.status_code == status and named in _detail(answer).lower(), (answer.status_code, answer.text)
    assert len(_detail(answer)) < 500 and "\x00" not in _detail(answer)


@pytest.mark.parametrize("raw", ["[1, 2]", '"liver"', "null", "{", "3"])
def test_server_refuses_params_that_are_not_a_json_object(server: RunningServer, raw: str) -> None:
    answer = requests.post(f"{server.url}/infer/{MODEL}?image={IMAGE}&output=json", data={"params": raw},
                           timeout=120)
    assert answer.status_code == 400 and "params" in _detail(answer), (answer.status_code, answer.text)


@pytest.mark.parametrize("image", ["../../etc/passwd", "/etc/passwd", "phantom_000\x00", "..", "phantom_000/..",
                                   "x" * 5000, ""])
def test_server_image_ids_are_datastore_ids_never_paths(server: RunningServer, image: str) -> None:
    draft = requests.post(f"{server.url}/infer/{MODEL}", params={"image": image, "output": "json"},
                          data={"params": "{}"}, timeout=60)
    assert draft.status_code in (400, 404), (draft.status_code, draft.text)
    download = requests.get(f"{server.url}/datastore/image", params={"image": image}, timeout=60)
    assert download.status_code in (400, 404), (download.status_code, download.text[:200])
    phantom = server.studies / f"{IMAGE}.nii.gz"
    with phantom.open("rb") as f:
        upload = requests.put(f"{server.url}/datastore/image", params={"image": image},
                              files={"file": ("x.nii.gz", f)}, timeout=60)
    assert upload.status_code in (400, 404) or (image == "" and upload.status_code == 200), (upload.status_code, upload.text)
    if upload.status_code == 200:  # no id: MONAI Label takes the file's name, a plain one
        assert upload.json()["image"] == "x"
        requests.delete(f"{server.url}/datastore/image", params={"id": "x"}, timeout=60)


def test_requests_missing_what_they_need_are_4xx(server: RunningServer) -> None:
    no_image = requests.post(f"{server.url}/infer/{MODEL}?output=json", data={"params": "{}"}, timeout=60)
    assert no_image.status_code == 400, no_image.text
    # Refused before drafting: MONAI Label's own refusal came after the draft and left its result file behind.
    drafts, files = server.log.read_bytes().count(b"Infer Request"), _temporary(server)
    seg = requests.post(f"{server.url}/infer/{MODEL}?image={IMAGE}&output=dicom_seg", data={"params": "{}"},
                        timeout=120)
    assert seg.status_code == 400 and "DICOMweb" in _detail(seg), (seg.status_code, seg.text[:200])
    assert server.log.read_bytes().count(b"Infer Request") == drafts, server.log_tail()
    assert _temporary(server) <= files
    # Accepted with a 200 by MONAI Label and failed later in a background task, or a 500.
    for path in ("/scoring/most_confusing", "/batch/infer/medclip_sam"):
        unknown = requests.post(f"{server.url}{path}", json={}, timeout=60)
        assert unknown.status_code == 404 and path.rsplit("/", 1)[1] in _detail(unknown), (path, unknown.text)
    proxy = requests.get(f"{server.url}/proxy/dicom/studies", timeout=60)
    assert proxy.status_code == 404 and "DICOMweb" in _detail(proxy)
    reference = server.studies / "reference" / f"{IMAGE}.nii.gz"
    with reference.open("rb") as f:
        listed = requests.put(f"{server.url}/datastore/label?image={IMAGE}&tag=bad_inputs", data={"params": "[1]"},
                              files={"label": ("label.nii.gz", f)}, timeout=60)
    assert listed.status_code == 400 and "JSON object" in _detail(listed), listed.text
    small = server.studies.parent / "small_label.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), small)
    with small.open("rb") as f:
        misfit = requests.put(f"{server.url}/datastore/label?image={IMAGE}&tag=bad_inputs",
                              files={"label": ("label.nii.gz", f)}, timeout=60)
    small.unlink()
    assert misfit.status_code == 422 and "grid" in _detail(misfit), misfit.text


def test_after_the_corpus_the_server_serves_and_nothing_changed_outside_the_datastore(
    server: RunningServer, before: dict[str, object], corpus: dict[str, Path]
) -> None:
    """Runs after the corpus tests above (file order): the images are untouched and nothing leaked out,
    not even a refused upload's copy in the server's temp folder."""
    assert {p.name: p.read_bytes() for p in server.studies.glob("*.nii.gz")} == before["images"]
    assert _outside(server) == before["outside"]
    assert _temporary(server) <= before["temporary"], sorted(p.name for p in _temporary(server) - before["temporary"])
    assert not [p for p in server.studies.rglob("*") if "bad_" in p.name or "etc" == p.name]
    info = requests.get(f"{server.url}/info/", timeout=30)
    assert info.status_code == 200 and MODEL in info.json()["models"]
    draft = requests.post(f"{server.url}/infer/{MODEL}?image={IMAGE}&output=json",
                          data={"params": json.dumps({"prompts": ["liver"]})}, timeout=120)
    assert draft.status_code == 200 and draft.json()["label_names"] == {"liver": 1}
