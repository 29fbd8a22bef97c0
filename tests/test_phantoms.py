"""Synthetic CT phantoms: reproducible, varied, anatomically laid out, and a clean sample datastore."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from medprompt.io import load_labelmap, load_volume
from medprompt.phantoms import LABELS, make_phantom, write_sample_data

SMALL = (64, 64, 40)


@pytest.fixture(scope="module")
def phantoms() -> list[tuple]:
    return [make_phantom(seed) for seed in range(4)]


def centroid(volume, labels: np.ndarray, value: int) -> np.ndarray:
    """World (RAS mm) centre of one class."""
    ijk = np.argwhere(labels == value).mean(axis=0)
    return volume.affine[:3, :3] @ ijk + volume.affine[:3, 3]


def test_same_seed_same_phantom() -> None:
    a, b = make_phantom(7, SMALL), make_phantom(7, SMALL)
    np.testing.assert_array_equal(a[0].data, b[0].data)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0].affine, b[0].affine)
    assert a[2] == b[2]


def test_seeds_vary_grid_size_and_anatomy(phantoms) -> None:
    spacings = {tuple(np.round(v.spacing, 3)) for v, _, _ in phantoms}
    assert len(spacings) == len(phantoms)
    for volume, _, _ in phantoms:
        sx, sy, sz = volume.spacing
        assert sx == pytest.approx(sy) and abs(sz - sx) > 0.1  # square pixels, anisotropic slices
        assert volume.data.shape == (96, 96, 64) and volume.modality == "CT"
    livers = [np.count_nonzero(l == LABELS["liver"]) * np.prod(v.spacing) / 1000 for v, l, _ in phantoms]
    assert max(livers) / min(livers) > 1.15
    assert all(700 < ml < 2800 for ml in livers)  # adult liver volumes
    # About half the phantoms reach the pelvis and show the bladder.
    bladders = [("urinary_bladder" in names) for _, _, names in [make_phantom(s) for s in range(4, 8)]
                + phantoms]
    assert 0 < sum(bladders) < len(bladders)


def test_names_list_exactly_the_drawn_classes(phantoms) -> None:
    for _, labels, names in phantoms:
        assert set(np.unique(labels)) - {0} == set(names.values())
        assert all(LABELS[name] == value for name, value in names.items())
        assert set(LABELS) - set(names) <= {"urinary_bladder"}


def test_layout_in_patient_coordinates(phantoms) -> None:
    """RAS+: +x patient right, +y anterior, +z superior, as on the real references."""
    for volume, labels, names in phantoms:
        c = {name: centroid(volume, labels, value) for name, value in names.items()}
        assert c["liver"][0] > c["spleen"][0] + 100  # liver right, spleen left
        assert c["kidney_right"][0] > c["aorta"][0] > c["kidney_left"][0]
        assert c["inferior_vena_cava"][0] > c["aorta"][0]  # IVC right of the aorta
        assert c["stomach"][0] < c["liver"][0] and c["gallbladder"][0] > c["pancreas"][0]
        assert c["pancreas"][1] > c["aorta"][1] > c["kidney_left"][1] - 10  # pancreas in front
        assert c["gallbladder"][1] > c["kidney_right"][1]
        assert c["lungs"][2] > c["liver"][2] > c["kidney_right"][2] - 10  # lungs on top
        if "urinary_bladder" in names:
            assert c["urinary_bladder"][2] < c["kidney_left"][2] - 150


def test_hounsfield_units(phantoms) -> None:
    for volume, labels, names in phantoms:
        # Organ cores (one voxel in from the border) are free of partial-volume blur.
        hu = {name: np.median(volume.data[ndimage.binary_erosion(labels == value)])
              for name, value in names.items()}
        assert 45 <= hu["liver"] <= 75 and 35 <= hu["spleen"] <= 65
        assert hu["gallbladder"] < hu["spleen"] < hu["liver"]
        assert 15 <= hu["kidney_left"] <= 50 and 25 <= hu["aorta"] <= 60
        assert hu["lungs"] < -700
        assert np.percentile(volume.data[labels == names["bone"]], 90) > 400
        assert np.median(volume.data[0:3, 0:3, :]) < -950  # air in the corners
        background = volume.data[labels == 0]
        assert np.count_nonzero(np.abs(background + 95) < 25) > 0.05 * background.size  # fat
        noise = np.std(np.diff(volume.data[0:10, 0:10, :], axis=2))
        assert 5 < noise < 40


def test_sample_data_is_an_unlabelled_datastore(tmp_path: Path) -> None:
    images = write_sample_data(tmp_path, n=2, seed=3, shape=SMALL)
    assert [p.name for p in images] == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    volume = load_volume(images[1])
    expected, truth, names = make_phantom(4, SMALL)
    np.testing.assert_array_equal(volume.data, expected.data)
    np.testing.assert_allclose(volume.affine, expected.affine, atol=1e-4)
    labels, affine, ref_names = load_labelmap(tmp_path / "reference" / "phantom_001.nii.gz")
    np.testing.assert_array_equal(labels, truth)
    assert ref_names == names

    from monailabel.datastore.local import LocalDatastore

    datastore = LocalDatastore(str(tmp_path), extensions=("*.nii.gz", "*.nii"), auto_reload=False)
    assert sorted(datastore.list_images()) == ["phantom_000", "phantom_001"]
    assert datastore.get_labeled_images() == []
    assert sorted(datastore.get_unlabeled_images()) == ["phantom_000", "phantom_001"]
