"""DICOM geometry from real scanners: uneven slices, gantry tilt, multi-frame files.

Every file here is written with pydicom from a known geometry (a RAS affine, or explicit slice
positions), so each test can say where every voxel must land in the world.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medprompt.errors import InputError
from medprompt.io import load_volume
from test_io import LPS, SPACING, make_affine, rotation

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
STUDY_UID = "1.2.826.0.1.3680043.2.1125.9.1"
SERIES_UID = "1.2.826.0.1.3680043.2.1125.9.2"

OBLIQUE = make_affine(rotation(20, 10), SPACING, (-5.0, 3.0, 7.0))
STORED = np.random.default_rng(0).integers(-300, 300, (7, 6, 5)).astype(np.int16)  # i, j, k


def plane_of(affine: np.ndarray, count: int) -> tuple[np.ndarray, list[float], tuple[float, float]]:
    """LPS positions of ``count`` slices of a RAS affine, its orientation cosines, pixel spacing i, j."""
    lps = LPS @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    directions = lps / spacing
    positions = LPS @ affine[:3, 3] + np.outer(np.arange(count), lps[:, 2])
    return positions, list(np.r_[directions[:, 0], directions[:, 1]]), (spacing[0], spacing[1])


def new_file(path: Path, sop_class: str, pixels: np.ndarray, modality: str = "CT") -> FileDataset:
    """A DICOM dataset holding int16 ``pixels`` (rows, columns) or (frames, rows, columns)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_UID, SERIES_UID
    ds.FrameOfReferenceUID = STUDY_UID + ".3"
    ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape[-2], pixels.shape[-1]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    return ds


def ds_numbers(values) -> list[str]:
    return [f"{float(v):.10g}" for v in values]


def write_series(folder: Path, stored: np.ndarray, positions: np.ndarray, orientation, spacing,
                 rescale: np.ndarray | None = None, keep=None) -> list[Path]:
    """One CT file per k-slice of ``stored`` (i, j, k) at LPS ``positions``; ``keep``: the k written."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(stored.shape[2]) if keep is None else keep:
        path = folder / f"slice{k:03d}.dcm"
        ds = new_file(path, CT_IMAGE, stored[:, :, k].T)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = ds_numbers(positions[k])
        ds.ImageOrientationPatient = ds_numbers(orientation)
        ds.PixelSpacing = ds_numbers([spacing[1], spacing[0]])  # rows (j) first, as DICOM does
        if rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = ds_numbers(rescale[k])
        ds.save_as(str(path), write_like_original=False)
        paths.append(path)
    return paths


def write_enhanced(path: Path, stored: np.ndarray, positions: np.ndarray, orientation, spacing,
                   rescale: np.ndarray, frame_order) -> Path:
    """One Enhanced CT file whose frame f is slice ``frame_order[f]``, geometry and rescale per frame."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.stack([stored[:, :, k].T for k in frame_order])
    ds = new_file(path, ENHANCED_CT_IMAGE, frames)
    ds.NumberOfFrames = len(frame_order)
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = ds_numbers(orientation)
    shared.PixelMeasuresSequence = Sequence([Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = ds_numbers([spacing[1], spacing[0]])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k in frame_order:
        item = Dataset()
        item.PlanePositionSequence = Sequence([Dataset()])
        item.PlanePositionSequence[0].ImagePositionPatient = ds_numbers(positions[k])
        item.PixelValueTransformationSequence = Sequence([Dataset()])
        values = item.PixelValueTransformationSequence[0]
        values.RescaleSlope, values.RescaleIntercept = ds_numbers(rescale[k])
        values.RescaleType = "HU"
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.save_as(str(path), write_like_original=False)
    return path


def voxel_world(affine: np.ndarray, shape) -> np.ndarray:
    """RAS centre of every voxel, shape (*shape, 3)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def dicom_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "medprompt.io.dicom" and r.levelno >= logging.WARNING]


# -- uneven slices -----------------------------------------------------------------------------

def test_missing_slice_is_filled_by_interpolation_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    positions, orientation, spacing = plane_of(OBLIQUE, 5)
    write_series(tmp_path / "gap", STORED, positions, orientation, spacing,
                 rescale=np.tile([1.0, -1024.0], (5, 1)), keep=[0, 1, 3, 4])
    with caplog.at_level(logging.WARNING, logger="medprompt.io.dicom"):
        volume = load_volume(tmp_path / "gap")
    hu = STORED.astype(np.float32) - 1024
    # The median gap (2.5 mm) rebuilds the original grid: acquired slices are copied exactly,
    # the missing one is the mean of its neighbours, and the affine is the scanner's.
    assert volume.data.shape == STORED.shape
    np.testing.assert_allclose(volume.affine, OBLIQUE, atol=1e-4)
    for k in (0, 1, 3, 4):
        np.testing.assert_array_equal(volume.data[:, :, k], hu[:, :, k])
    np.testing.assert_allclose(volume.data[:, :, 2], (hu[:, :, 1] + hu[:, :, 3]) / 2, atol=1e-4)
    [message] = dicom_warnings(caplog)
    assert str(tmp_path / "gap") in message and "unevenly spaced" in message
    assert "0.833 mm" in message  # slices at 0, 2.5, 7.5, 10 vs a grid of 10/3: worst 5/6 mm off


def test_varying_slice_spacing_is_resampled_linearly_at_the_median_gap(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    along = np.array([0.0, 2.0, 4.0, 7.0, 10.0, 13.0])  # gaps 2, 2, 3, 3, 3: median 3
    stored = np.random.default_rng(1).integers(-500, 500, (4, 3, len(along))).astype(np.int16)
    affine = make_affine(rotation(-15, 25), (0.8, 0.6, 1.0), (12.0, -4.0, 30.0))
    _, orientation, spacing = plane_of(affine, 1)
    normal = LPS @ affine[:3, 2]
    positions = LPS @ affine[:3, 3] + np.outer(along, normal)
    write_series(tmp_path / "varying", stored, positions, orientation, spacing)
    with caplog.at_level(logging.WARNING, logger="medprompt.io.dicom"):
        volume = load_volume(tmp_path / "varying")
    # 13 mm at a median gap of 3 mm: 5 planes, spaced 13/4 = 3.25 mm to end on the last slice.
    targets = np.arange(5) * 3.25
    expected = np.apply_along_axis(lambda v: np.interp(targets, along, v), 2, stored.astype(np.float64))
    assert volume.data.shape == (4, 3, 5)
    np.testing.assert_allclose(volume.data, expected, atol=1e-3)
    np.testing.assert_allclose(volume.affine, make_affine(rotation(-15, 25), (0.8, 0.6, 3.25), affine[:3, 3]),
                               atol=1e-4)
    [message] = dicom_warnings(caplog)
    assert "gaps 2 to 3 mm" in message and "5 slices 3.25 mm apart" in message


@pytest.mark.parametrize("noise", ["jitter", "3 decimals"])
def test_slices_off_the_grid_by_rounding_noise_read_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, noise: str
) -> None:
    # Positions a few micrometres off the grid, in-plane too (scanner float noise, positions
    # written with few decimals), are no missing slice and no tilt: read as stored, no warning.
    affine, stored = OBLIQUE, STORED
    if noise == "3 decimals":  # thin pixels and slices: rounding drifts 1.3e-3 pixel in-plane
        affine = make_affine(rotation(20, 10), (0.45, 0.45, 0.8), (-5.1234, 3.5678, 7.9))
        stored = np.random.default_rng(3).integers(-300, 300, (5, 4, 12)).astype(np.int16)
    positions, orientation, spacing = plane_of(affine, stored.shape[2])
    if noise == "jitter":
        positions[1::2] += 2e-6
    else:
        positions = np.round(positions, 3)
    write_series(tmp_path / "noisy", stored, positions, orientation, spacing)
    with caplog.at_level(logging.WARNING, logger="medprompt.io.dicom"):
        volume = load_volume(tmp_path / "noisy")
    np.testing.assert_array_equal(volume.data, stored)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-3)
    assert dicom_warnings(caplog) == []


def test_two_slices_at_one_position_are_refused(tmp_path: Path) -> None:
    positions, orientation, spacing = plane_of(OBLIQUE, 5)
    positions[3] = positions[2]  # e.g. two echoes in one series
    write_series(tmp_path / "echoes", STORED, positions, orientation, spacing)
    with pytest.raises(InputError) as excinfo:
        load_volume(tmp_path / "echoes")
    message = str(excinfo.value)
    assert "\n" not in message and str(tmp_path / "echoes") in message and "same position" in message


# -- gantry tilt -------------------------------------------------------------------------------

TILT_DEG = 20.0
CUBE_LPS = np.array([[4.0, 10.0], [8.0, 14.0], [3.0, 17.0]])  # x, y, z ranges in mm


@pytest.mark.parametrize("missing", [None, 4])
def test_tilted_series_puts_a_cube_where_it_is(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, missing: int | None
) -> None:
    """A bright cube sampled by tilted slices reads back on an orthogonal grid at its true place."""
    size, spacing, step, count = (20, 20), (0.8, 1.0), 2.0, 10
    row, column, normal = np.eye(3)
    drift = step * np.tan(np.deg2rad(TILT_DEG))  # each slice starts this far along y (column)
    positions = np.array([k * step * normal + k * drift * column for k in range(count)])
    u, v = np.meshgrid(np.arange(size[0]), np.arange(size[1]), indexing="ij")
    rng = np.random.default_rng(2)
    stored = np.empty(size + (count,), np.int16)
    for k in range(count):
        world = positions[k] + u[..., None] * spacing[0] * row + v[..., None] * spacing[1] * column
        inside = np.all((world >= CUBE_LPS[:, 0]) & (world <= CUBE_LPS[:, 1]), axis=-1)
        stored[:, :, k] = np.where(inside, 1000, rng.integers(-1000, -900, size))
    keep = [k for k in range(count) if k != missing]
    write_series(tmp_path / "tilted", stored, positions, [*row, *column], spacing, keep=keep)

    with caplog.at_level(logging.WARNING, logger="medprompt.io.dicom"):
        volume = load_volume(tmp_path / "tilted")
    data, affine = volume.data, volume.affine
    # Orthogonal grid: in-plane axes and spacing kept, slices along the planes' normal.
    np.testing.assert_allclose(affine[:3, :3], LPS @ np.diag([0.8, 1.0, 2.0]), atol=1e-6)
    np.testing.assert_allclose(affine[:3, 3], [0.0, 0.0, 0.0], atol=1e-6)
    shift = int(np.ceil((count - 1) * drift / spacing[1]))
    assert data.shape == (20, 20 + shift, count)  # widened so every slice fits whole
    # Every voxel centre clearly inside the cube is bright, clearly outside is background: the
    # cube is where it is in the world (margins: one pixel in-plane, one slice gap along z).
    lps = voxel_world(affine, data.shape) @ LPS
    margin = np.array([0.8, 1.0, 2.0 * (2 if missing else 1)]) + 1e-3
    inside = np.all((lps >= CUBE_LPS[:, 0] + margin) & (lps <= CUBE_LPS[:, 1] - margin), axis=-1)
    outside = np.any((lps < CUBE_LPS[:, 0] - margin) | (lps > CUBE_LPS[:, 1] + margin), axis=-1)
    assert inside.sum() > 20 and outside.sum() > 1000
    assert np.all(data[inside] > 999)
    assert np.all(data[outside] <= -900)
    bright = voxel_world(affine, data.shape)[data > 0]
    np.testing.assert_allclose(bright.mean(axis=0), LPS @ CUBE_LPS.mean(axis=1), atol=0.6)
    # Outside the tilted fields: the image minimum (first slice's top, last slice's bottom rows).
    assert np.all(data[:, -1, 0] == stored.min()) and np.all(data[:, 0, -1] == stored.min())
    messages = dicom_warnings(caplog)
    assert len(messages) == (2 if missing else 1)
    [tilt] = [m for m in messages if "gantry tilt" in m]
    assert str(tmp_path / "tilted") in tilt and f"{TILT_DEG:.3g}\N{DEGREE SIGN}" in tilt


# -- multi-frame -------------------------------------------------------------------------------

RESCALE = np.array([[1.0, -1024.0], [2.0, 10.0], [1.0, 0.0], [0.5, -5.0], [3.0, 7.0]])


def test_enhanced_multiframe_reads_like_the_same_single_frame_series(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    positions, orientation, spacing = plane_of(OBLIQUE, 5)
    write_series(tmp_path / "series", STORED, positions, orientation, spacing, rescale=RESCALE)
    # Frames out of anatomical order, each with its own rescale: sorting must carry the rescale.
    enhanced = write_enhanced(tmp_path / "enhanced" / "volume.dcm", STORED, positions, orientation,
                              spacing, RESCALE, frame_order=[3, 0, 4, 1, 2])
    with caplog.at_level(logging.WARNING, logger="medprompt.io.dicom"):
        series = load_volume(tmp_path / "series")
        for source in (enhanced, enhanced.parent):  # the file, or its folder
            volume = load_volume(source)
            np.testing.assert_array_equal(volume.data, series.data)
            np.testing.assert_allclose(volume.affine, series.affine, atol=1e-9)
            assert volume.modality == "CT"
    np.testing.assert_array_equal(series.data, STORED * RESCALE[:, 0] + RESCALE[:, 1])
    np.testing.assert_allclose(series.affine, OBLIQUE, atol=1e-4)
    assert dicom_warnings(caplog) == []


@pytest.mark.parametrize("step_tag", ["SpacingBetweenSlices", "SliceThickness"])
def test_legacy_multiframe_steps_along_the_normal(tmp_path: Path, step_tag: str) -> None:
    positions, orientation, spacing = plane_of(OBLIQUE, 5)
    write_series(tmp_path / "series", STORED, positions, orientation, spacing,
                 rescale=np.tile([1.0, -1024.0], (5, 1)))
    path = tmp_path / "legacy" / "volume.dcm"
    path.parent.mkdir()
    ds = new_file(path, CT_IMAGE, np.stack([STORED[:, :, k].T for k in range(5)]))
    ds.NumberOfFrames = 5
    ds.ImagePositionPatient = ds_numbers(positions[0])
    ds.ImageOrientationPatient = ds_numbers(orientation)
    ds.PixelSpacing = ds_numbers([spacing[1], spacing[0]])
    setattr(ds, step_tag, f"{SPACING[2]:.6g}")
    ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
    ds.save_as(str(path), write_like_original=False)
    series = load_volume(tmp_path / "series")
    for source in (path, path.parent):
        volume = load_volume(source)
        np.testing.assert_array_equal(volume.data, series.data)
        np.testing.assert_allclose(volume.affine, series.affine, atol=1e-6)
    np.testing.assert_allclose(series.affine, OBLIQUE, atol=1e-4)


def test_multiframe_above_the_voxel_limit_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    positions, orientation, spacing = plane_of(OBLIQUE, 5)
    path = write_enhanced(tmp_path / "mf" / "volume.dcm", STORED, positions, orientation, spacing,
                          RESCALE, frame_order=range(5))
    monkeypatch.setenv("MEDPROMPT_MAX_VOXELS", str(STORED.size - 1))  # the frames count too
    with pytest.raises(InputError, match=f"7x6x5 = {STORED.size} voxels, above the limit"):
        load_volume(path)


def test_multiframe_with_frames_in_different_orientations_is_refused(tmp_path: Path) -> None:
    positions, orientation, spacing = plane_of(OBLIQUE, 5)
    path = write_enhanced(tmp_path / "mf" / "volume.dcm", STORED, positions, orientation, spacing,
                          RESCALE, frame_order=range(5))
    import pydicom

    ds = pydicom.dcmread(str(path))
    turned = Dataset()
    turned.ImageOrientationPatient = ds_numbers([0, 1, 0, 0, 0, -1])
    ds.PerFrameFunctionalGroupsSequence[2].PlaneOrientationSequence = Sequence([turned])
    ds.save_as(str(path))
    with pytest.raises(InputError) as excinfo:
        load_volume(path)
    message = str(excinfo.value)
    assert "\n" not in message and str(path) in message and "different orientations" in message
