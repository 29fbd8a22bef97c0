"""Label maps as DICOM SEG, written offline, read back voxel for voxel with their segment labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from medprompt.errors import InputError
from medprompt.io.dicom_seg import read_seg, write_seg
from medprompt.io.volume import load_volume
from test_io import make_affine, rotation, write_dicom_series


def _labels(shape: tuple[int, int, int]) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    labels[2:6, 1:4, 1:3] = 1
    labels[5:8, 4:7, 3:5] = 3  # values need not be consecutive
    return labels


def test_an_oblique_series_round_trips_through_a_seg(tmp_path: Path) -> None:
    affine = make_affine(rotation(25, 0), (0.8, 0.9, 2.5), (-5.0, 3.0, 7.0))
    image = np.random.default_rng(0).normal(0, 100, (10, 9, 6)).astype(np.int16)
    files = write_dicom_series(tmp_path / "series", image, affine, modality="CT")
    volume = load_volume(tmp_path / "series")
    labels = _labels(volume.data.shape)
    out = write_seg(labels, volume.affine, {"liver": 1, "spleen": 3, "absent": 2}, files, tmp_path / "seg.dcm")
    back, back_affine, names = read_seg(out, grid=(volume.data.shape, volume.affine))
    np.testing.assert_array_equal(back, labels)
    np.testing.assert_allclose(back_affine, volume.affine, atol=1e-4)
    assert names == {"liver": 1, "spleen": 3}  # a class with no voxel is no segment
    seg = pydicom.dcmread(str(out))
    source = pydicom.dcmread(str(files[0]))
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert seg.StudyInstanceUID == source.StudyInstanceUID


def test_an_empty_label_map_is_refused_and_a_non_seg_is_one_line(tmp_path: Path) -> None:
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    files = write_dicom_series(tmp_path / "series", np.zeros((6, 6, 4), np.int16), affine, modality="CT")
    with pytest.raises(InputError, match="empty"):
        write_seg(np.zeros((6, 6, 4), np.uint8), affine, {"liver": 1}, files, tmp_path / "seg.dcm")
    with pytest.raises(InputError, match="not a readable DICOM SEG") as caught:
        read_seg(files[0])
    assert len(str(caught.value).splitlines()) == 1


def test_a_draft_of_a_real_jpeg2000_series_reads_back_exactly(real_data: Path, tmp_path: Path) -> None:
    from medprompt.drafts import draft

    folder = real_data / "ct_abdomen_b_dicom" / "dicom"
    volume = load_volume(folder)
    result = draft(volume, ["liver", "spleen", "aorta"], refine="none")
    out = write_seg(result.labels, volume.affine, result.names, sorted(folder.iterdir()), tmp_path / "seg.dcm")
    back, affine, names = read_seg(out, grid=(volume.data.shape, volume.affine))
    assert names == result.names and back.shape == (512, 512, 20)
    np.testing.assert_array_equal(back, result.labels)
    np.testing.assert_allclose(affine, volume.affine, atol=1e-3)
