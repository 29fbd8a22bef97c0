"""Volume reading (NIfTI, NRRD, DICOM) into one RAS+ convention, label-map writing, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest

from medprompt.errors import InputError
from medprompt.io import (
    find_volumes,
    load_labelmap,
    load_volume,
    read_label_names,
    save_labelmap,
    sidecar_path,
)

LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS, its own inverse


def rotation(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    yaw, pitch = np.deg2rad(yaw_deg), np.deg2rad(pitch_deg)
    about_z = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
    return about_x @ about_z


def make_affine(directions: np.ndarray, spacing, origin) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = directions @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


SPACING = (0.7, 0.9, 2.5)  # anisotropic on purpose: swapped axes would change it
ORIENTATIONS = {
    "RAS": make_affine(np.eye(3), SPACING, (-40.0, 12.0, -300.0)),
    "LPS": make_affine(LPS, SPACING, (40.0, 80.0, -300.0)),  # stored like DICOM: x and y reversed
    "oblique": make_affine(rotation(20, 10), SPACING, (-5.0, 3.0, 7.0)),
}


def world(affine: np.ndarray, ijk) -> np.ndarray:
    return affine[:3, :3] @ np.asarray(ijk, float) + affine[:3, 3]


DATA = np.random.default_rng(0).normal(0, 100, (7, 6, 5)).astype(np.float32)


def single_line_error(excinfo: pytest.ExceptionInfo, path: Path, *words: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    assert str(path) in message
    for word in words:
        assert word in message.lower(), message
    return message


# -- NIfTI / NRRD ------------------------------------------------------------------------------

@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_nifti_keeps_grid_and_affine(tmp_path: Path, orientation: str) -> None:
    affine = ORIENTATIONS[orientation]
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(DATA, affine), path)
    volume = load_volume(path)
    assert volume.data.dtype == np.float32 and volume.data.shape == DATA.shape
    np.testing.assert_array_equal(volume.data, DATA)  # no reorientation of the stored grid
    np.testing.assert_allclose(world(volume.affine, (2, 3, 4)), world(affine, (2, 3, 4)), atol=1e-4)
    np.testing.assert_allclose(volume.spacing, SPACING, atol=1e-5)
    assert volume.modality is None and volume.source == str(path)


@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
@pytest.mark.parametrize("space", ["left-posterior-superior", "right-anterior-superior", "LAS"])
def test_nrrd_space_is_converted_to_ras(tmp_path: Path, orientation: str, space: str) -> None:
    """The same physical image, stored in any NRRD patient space, reads to the same RAS affine."""
    affine = ORIENTATIONS[orientation]
    flips = {"left-posterior-superior": LPS, "right-anterior-superior": np.eye(3),
             "LAS": np.diag([-1.0, 1.0, 1.0])}[space]
    header = {"space": space, "space directions": (flips @ affine[:3, :3]).T,
              "space origin": flips @ affine[:3, 3]}
    path = tmp_path / "ct.nrrd"
    nrrd.write(str(path), DATA, header)
    volume = load_volume(path)
    np.testing.assert_array_equal(volume.data, DATA)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-6)
    np.testing.assert_allclose(world(volume.affine, (6, 0, 3)), world(affine, (6, 0, 3)), atol=1e-6)


def test_nifti_single_frame_4d_is_squeezed(tmp_path: Path) -> None:
    path = tmp_path / "one_frame.nii"
    nib.save(nib.Nifti1Image(DATA[..., None], ORIENTATIONS["RAS"]), path)
    np.testing.assert_array_equal(load_volume(path).data, DATA)


# -- DICOM -------------------------------------------------------------------------------------

def write_dicom_series(folder: Path, data: np.ndarray, affine: np.ndarray, modality: str = "MR",
                       series_uid: str = "1.2.826.0.1.3680043.2.1125.1", skip: int | None = None,
                       jitter_mm: float = 0.0) -> list[Path]:
    """One 2D DICOM file per k-slice, written with ITK, geometry taken from a RAS affine."""
    import itk

    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS @ affine[:3, :3]  # DICOM patient coordinates are LPS
    spacing = np.linalg.norm(lps, axis=0)
    directions = lps / spacing
    origin = LPS @ affine[:3, 3]
    paths = []
    for k in range(data.shape[2]):
        if k == skip:
            continue
        image = itk.image_from_array(np.ascontiguousarray(data[:, :, k].T.astype(np.int16)))
        image.SetSpacing([float(spacing[0]), float(spacing[1])])
        tags = image.GetMetaDataDictionary()
        position = origin + lps[:, 2] * k + (jitter_mm if k % 2 else 0.0)  # odd slices a hair off the grid
        for key, value in {
            "0008|0060": modality,
            "0008|0016": "1.2.840.10008.5.1.4.1.1.4",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.0",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.9f}" for v in position),
            "0020|0037": "\\".join(f"{v:.8f}" for v in np.r_[directions[:, 0], directions[:, 1]]),
            "0018|0050": f"{spacing[2]:.6f}",
        }.items():
            tags[key] = value
        dicom_io = itk.GDCMImageIO.New()
        dicom_io.KeepOriginalUIDOn()
        path = folder / f"slice{k:03d}.dcm"
        writer = itk.ImageFileWriter[type(image)].New(Input=image, FileName=str(path), ImageIO=dicom_io)
        writer.Update()
        paths.append(path)
    return paths


DICOM_DATA = np.round(DATA * 3).astype(np.int16)


@pytest.mark.parametrize("orientation", ["LPS", "oblique"])
def test_dicom_series_reads_as_ras(tmp_path: Path, orientation: str) -> None:
    affine = ORIENTATIONS[orientation] if orientation == "LPS" else \
        make_affine(rotation(25, 0), SPACING, (-5.0, 3.0, 7.0))  # in-plane obliquity, axial stack
    files = write_dicom_series(tmp_path / "series", DICOM_DATA, affine)
    for source in (tmp_path / "series", files[2]):  # the folder, or any file inside it
        volume = load_volume(source)
        assert volume.data.shape == DICOM_DATA.shape
        np.testing.assert_array_equal(volume.data, DICOM_DATA)
        np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
        assert volume.modality == "MR"


def test_dicom_slices_off_the_grid_by_rounding_noise_read_as_evenly_spaced(tmp_path: Path) -> None:
    # A real GE series read as uneven with a deviation of 7e-15 mm; positions written with a few
    # decimals are off by up to 5e-7 mm. Both are far below any missing slice.
    write_dicom_series(tmp_path / "noisy", DICOM_DATA, ORIENTATIONS["LPS"], jitter_mm=2e-6)
    volume = load_volume(tmp_path / "noisy")
    np.testing.assert_array_equal(volume.data, DICOM_DATA)
    np.testing.assert_allclose(volume.affine, ORIENTATIONS["LPS"], atol=1e-4)


def test_volumes_declaring_more_voxels_than_the_limit_are_refused_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A NIfTI header claiming a huge volume over a tiny payload: refused by its header, in one line.
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))  # NIfTI-1 sizes are int16
    header.set_data_dtype(np.int16)
    huge = tmp_path / "huge.nii"
    huge.write_bytes(header.binaryblock + b"\0" * 4 + b"\1" * 64)
    with pytest.raises(InputError) as excinfo:
        load_volume(huge)
    single_line_error(excinfo, huge, "voxels", "above the limit", "medprompt_max_voxels")
    gz = tmp_path / "huge.nii.gz"
    import gzip

    gz.write_bytes(gzip.compress(huge.read_bytes()))
    with pytest.raises(InputError, match="above the limit"):
        load_volume(gz)
    # Under the limit but truncated: the uncompressed payload is checked against the header.
    header.set_data_shape((64, 64, 64))
    short = tmp_path / "short.nii"
    short.write_bytes(header.binaryblock + b"\0" * 4 + b"\1" * 64)
    with pytest.raises(InputError) as excinfo:
        load_volume(short)
    single_line_error(excinfo, short, "truncated")
    # The limit is the user's to set; NRRD and DICOM are checked the same way.
    monkeypatch.setenv("MEDPROMPT_MAX_VOXELS", "1000")
    nrrd_path = tmp_path / "small.nrrd"
    nrrd.write(str(nrrd_path), np.zeros((12, 12, 12), np.int16))
    with pytest.raises(InputError, match="1,728 voxels, above the limit of 1,000"):
        load_volume(nrrd_path)
    write_dicom_series(tmp_path / "series", DICOM_DATA, ORIENTATIONS["LPS"])
    monkeypatch.setenv("MEDPROMPT_MAX_VOXELS", str(DICOM_DATA.size - 1))
    with pytest.raises(InputError, match="above the limit"):
        load_volume(tmp_path / "series")


def test_folder_with_two_series_asks_for_one(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "study", DICOM_DATA, ORIENTATIONS["LPS"], series_uid="1.2.3.1")
    shifted = ORIENTATIONS["LPS"].copy()
    shifted[2, 3] += 500
    other = write_dicom_series(tmp_path / "other", DICOM_DATA[:, :, :3], shifted, series_uid="1.2.3.2")
    for path in other:
        path.rename(tmp_path / "study" / f"b_{path.name}")
    with pytest.raises(InputError) as excinfo:
        load_volume(tmp_path / "study")
    single_line_error(excinfo, tmp_path / "study", "2 dicom series")
    # Naming one file picks its series.
    assert load_volume(tmp_path / "study" / "b_slice000.dcm").data.shape == (7, 6, 3)


def test_real_dicom_matches_its_las_label_grid(real_data: Path) -> None:
    """The JPEG2000 series loads LPS-stored; its label is stored LAS: same voxels, j reversed."""
    case = real_data / "ct_abdomen_b_dicom"
    volume = load_volume(case / "dicom")
    labels, label_affine, names = load_labelmap(case / "label.nii.gz")
    assert volume.data.shape == labels.shape == (512, 512, 20)
    assert volume.modality == "CT" and names is None
    assert nib.aff2axcodes(volume.affine) == ("L", "P", "S")
    assert nib.aff2axcodes(label_affine) == ("L", "A", "S")
    np.testing.assert_allclose(volume.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-4)
    for i, j, k in [(0, 0, 0), (511, 0, 19), (100, 300, 7), (511, 511, 0)]:
        np.testing.assert_allclose(world(volume.affine, (i, j, k)),
                                   world(label_affine, (i, 511 - j, k)), atol=1e-3)
    # The flip is physical, not just arithmetic: under the label, contrast CT looks like anatomy.
    on_image = labels[:, ::-1, :]
    values = json.loads((case / "labels.json").read_text())["labels"]
    assert np.median(volume.data[on_image == values["aorta"]]) > 100  # contrast-filled
    assert np.median(volume.data[on_image == values["vertebrae_T12"]]) > 150
    assert 40 < np.median(volume.data[on_image == values["spleen"]]) < 200
    assert volume.data.min() <= -1000  # rescale intercept applied: air, not raw stored values


# -- errors ------------------------------------------------------------------------------------

def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError) as excinfo:
        load_volume(tmp_path / "nope.nii.gz")
    single_line_error(excinfo, tmp_path / "nope.nii.gz", "no such file")


def test_truncated_gzip(tmp_path: Path) -> None:
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(1).normal(size=(40, 40, 30)).astype(np.float32),
                             np.eye(4)), good)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError) as excinfo:
        load_volume(bad)
    single_line_error(excinfo, bad, "cannot read nifti")


def test_garbage_nrrd(tmp_path: Path) -> None:
    bad = tmp_path / "bad.nrrd"
    bad.write_text("not an nrrd header\n")
    with pytest.raises(InputError) as excinfo:
        load_volume(bad)
    single_line_error(excinfo, bad, "nrrd")


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(InputError) as excinfo:
        load_volume(path)
    single_line_error(excinfo, path, "unknown file type")


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError) as excinfo:
        load_volume(tmp_path)
    single_line_error(excinfo, tmp_path, "no readable dicom series")


@pytest.mark.parametrize(("shape", "word"), [((8, 8), "2d"), ((8, 8, 1), "2d"), ((8, 8, 8, 3), "4d")])
def test_not_3d(tmp_path: Path, shape: tuple[int, ...], word: str) -> None:
    path = tmp_path / "odd.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), path)
    with pytest.raises(InputError) as excinfo:
        load_volume(path)
    single_line_error(excinfo, path, word, "3d volume")


@pytest.mark.parametrize("directions", [[[1, 0, 0], [0, 1, 0]], [[1, 0, 0], [0, 1, 0], [0, 0, 1]]])
def test_one_slice_nrrd_is_not_a_volume_but_a_2d_image(tmp_path: Path, directions: list) -> None:
    """A one-slice NRRD (a 2D grid in 3D space, or X x Y x 1) is refused as a volume and read as a 2D image."""
    from medprompt.io.image2d import is_image2d, load_image2d

    path = tmp_path / "slice.nrrd"
    data = np.arange(64, dtype=np.int16).reshape((8, 8) if len(directions) == 2 else (8, 8, 1))
    nrrd.write(str(path), data, {"space": "left-posterior-superior", "space directions": directions})
    with pytest.raises(InputError) as excinfo:
        load_volume(path)
    single_line_error(excinfo, path, "3d volume")
    assert is_image2d(path) and load_image2d(path).pixels.T.tolist() == data.reshape(8, 8).tolist()


def test_non_numeric_voxels(tmp_path: Path) -> None:
    rgb = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path = tmp_path / "rgb.nii.gz"
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), path)
    with pytest.raises(InputError) as excinfo:
        load_volume(path)
    single_line_error(excinfo, path, "not numeric")


def test_nrrd_with_vector_axis_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vectors.nrrd"
    header = {"space": "left-posterior-superior", "kinds": ["vector", "domain", "domain", "domain"],
              "space directions": [[np.nan] * 3, [1, 0, 0], [0, 1, 0], [0, 0, 1]]}
    nrrd.write(str(path), np.zeros((3, 4, 4, 4), np.float32), header)
    with pytest.raises(InputError) as excinfo:
        load_volume(path)
    single_line_error(excinfo, path, "4d")


# -- label maps --------------------------------------------------------------------------------

def test_save_and_load_labelmap(tmp_path: Path) -> None:
    labels = np.zeros((6, 5, 4), np.int64)
    labels[1:3, 1:3, 1:3] = 1
    labels[4, 4, 3] = 7
    path = tmp_path / "out" / "case.nii.gz"  # missing folder is created
    sidecar = save_labelmap(path, labels, ORIENTATIONS["oblique"], {"liver": 1, "spleen": 7})
    assert sidecar == tmp_path / "out" / "case.json" == sidecar_path(path)
    assert json.loads(sidecar.read_text()) == {"labels": {"liver": 1, "spleen": 7}}
    assert nib.load(path).get_data_dtype() == np.uint8
    loaded, affine, names = load_labelmap(path)
    np.testing.assert_array_equal(loaded, labels)
    np.testing.assert_allclose(affine, ORIENTATIONS["oblique"], atol=1e-5)
    assert names == {"liver": 1, "spleen": 7}
    assert sorted(p.name for p in path.parent.iterdir()) == ["case.json", "case.nii.gz"]  # no temp files


def test_large_label_values_use_uint16(tmp_path: Path) -> None:
    labels = np.zeros((4, 4, 4), np.uint16)
    labels[0, 0, 0] = 300
    save_labelmap(tmp_path / "big.nii", labels, np.eye(4), {"many": 300})
    assert nib.load(tmp_path / "big.nii").get_data_dtype() == np.uint16
    assert load_labelmap(tmp_path / "big.nii")[0][0, 0, 0] == 300


def test_failed_write_leaves_previous_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "case.nii.gz"
    first = np.ones((4, 4, 4), np.uint8)
    save_labelmap(path, first, np.eye(4), {"liver": 1})

    def broken_save(image, filename):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_labelmap(path, np.zeros((4, 4, 4), np.uint8), np.eye(4), {"liver": 1})
    monkeypatch.undo()
    np.testing.assert_array_equal(load_labelmap(path)[0], first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.json", "case.nii.gz"]


def test_labelmap_as_nrrd_is_written_in_lps_and_reads_back_in_place(tmp_path: Path) -> None:
    """3D Slicer asks for drafts as .nrrd; the file must land on the same voxels in world space."""
    import nrrd

    labels = np.zeros((6, 5, 4), np.uint8)
    labels[1:3, 1:4, 2] = 3
    affine = ORIENTATIONS["oblique"]
    save_labelmap(tmp_path / "case.nrrd", labels, affine, {"liver": 3})
    header = nrrd.read_header(str(tmp_path / "case.nrrd"))
    assert header["space"] == "left-posterior-superior" and header["type"] in ("uint8", "unsigned char")
    # LPS directions are the RAS ones with x and y negated.
    np.testing.assert_allclose(header["space directions"], (np.diag([-1, -1, 1]) @ affine[:3, :3]).T, atol=1e-9)
    loaded, loaded_affine, names = load_labelmap(tmp_path / "case.nrrd")
    np.testing.assert_array_equal(loaded, labels)
    np.testing.assert_allclose(loaded_affine, affine, atol=1e-9)
    assert names == {"liver": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.json", "case.nrrd"]


def test_labelmap_output_must_be_nifti_or_nrrd(tmp_path: Path) -> None:
    with pytest.raises(InputError) as excinfo:
        save_labelmap(tmp_path / "case.mha", np.zeros((2, 2, 2), np.uint8), np.eye(4), {})
    single_line_error(excinfo, tmp_path / "case.mha", ".nrrd")


def test_fractional_values_are_not_a_labelmap(tmp_path: Path) -> None:
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.full((3, 3, 3), 0.5, np.float32), np.eye(4)), path)
    with pytest.raises(InputError) as excinfo:
        load_labelmap(path)
    single_line_error(excinfo, path, "whole numbers")


def test_label_names_file_formats(tmp_path: Path) -> None:
    wrapped = tmp_path / "labels.json"
    wrapped.write_text(json.dumps({"labels": {"liver": 5}, "voxels": {"liver": 10}}))
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"liver": 5}))
    assert read_label_names(wrapped) == read_label_names(plain) == {"liver": 5}
    for content in ("{not json", json.dumps({"liver": "five"}), json.dumps({"a": 1, "b": 1})):
        bad = tmp_path / "bad.json"
        bad.write_text(content)
        with pytest.raises(InputError) as excinfo:
            read_label_names(bad)
        single_line_error(excinfo, bad)


def test_find_volumes_lists_files_and_series_folders(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(DATA, np.eye(4)), tmp_path / "b.nii.gz")
    nrrd.write(str(tmp_path / "a.nrrd"), DATA)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    write_dicom_series(tmp_path / "series", DICOM_DATA[:, :, :2], ORIENTATIONS["LPS"])
    assert [p.name for p in find_volumes(tmp_path)] == ["a.nrrd", "b.nii.gz", "series"]
    assert find_volumes(tmp_path / "series") == [tmp_path / "series"]
    assert find_volumes(tmp_path / "empty") == []


def test_numpy_integer_label_values_are_accepted(tmp_path: Path) -> None:
    sidecar = save_labelmap(tmp_path / "np.nii.gz", np.ones((2, 2, 2), np.uint8), np.eye(4),
                            {"liver": np.int64(1)})
    assert json.loads(sidecar.read_text()) == {"labels": {"liver": 1}}
