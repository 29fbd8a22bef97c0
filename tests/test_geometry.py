"""Working grid -> input grid: the box-limited upsampling must equal whole-grid trilinear upsampling.

Both the prior and the learned model paint their masks through ``geometry.paint_input_labels``;
it upsamples only each organ's bounding box, which is only correct if it samples exactly like
``F.interpolate(..., mode="trilinear", align_corners=False)`` and misses no voxel the organ reaches.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from medprompt.prior import geometry


def frame_for(canonical: tuple[int, int, int], work: tuple[int, int, int], ornt: np.ndarray | None = None):
    ornt = np.array([[0, 1], [1, 1], [2, 1]]) if ornt is None else ornt
    return geometry.WorkFrame(ornt, canonical, work, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0))


def trilinear(mask: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.interpolate(t, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()


def whole_grid(mask: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    return trilinear(mask, shape) > 0.5


def box_upsampled(mask: np.ndarray, frame: geometry.WorkFrame) -> np.ndarray:
    out = np.zeros(frame.canonical_shape, bool)
    placed = geometry.upsample_crop(mask, frame)
    if placed is not None:
        out[placed[0]] = placed[1]
    return out


def blob(shape: tuple[int, int, int], seed: int, at_edge: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = ndi.gaussian_filter(rng.standard_normal(shape), 1.5) > 0.15
    mask[: shape[0] // 3] = False  # an organ somewhere, not everywhere
    if at_edge:
        mask[-1, :, -1] = True  # touches the last voxel of two axes
        mask[0, 0, :] = True
    return mask


@pytest.mark.parametrize(("canonical", "work"), [
    ((97, 83, 41), (27, 23, 17)),  # non-integer upsampling on every axis (0.72 mm -> 2.5 mm)
    ((64, 64, 20), (32, 32, 20)),  # exactly 2x in-plane, slices kept
    ((30, 40, 50), (36, 40, 25)),  # one axis downsampled
])
@pytest.mark.parametrize("at_edge", [False, True])
def test_box_upsampling_equals_whole_grid_trilinear(canonical, work, at_edge) -> None:
    for seed in range(3):
        mask = blob(work, seed, at_edge)
        value = trilinear(mask, canonical)
        got = box_upsampled(mask, frame_for(canonical, work))
        assert got.sum() > 100
        # Identical except where the interpolated value is 0.5 up to float rounding (a tie).
        differ = got != (value > 0.5)
        assert np.all(np.abs(value[differ] - 0.5) < 1e-5), (canonical, work, seed)


def test_empty_and_full_size_masks() -> None:
    frame = frame_for((20, 20, 10), (10, 10, 5))
    assert geometry.upsample_crop(np.zeros((10, 10, 5), bool), frame) is None
    same = frame_for((10, 10, 5), (10, 10, 5))
    mask = blob((10, 10, 5), 0)
    np.testing.assert_array_equal(box_upsampled(mask, same), mask)


def test_painting_order_and_orientation() -> None:
    """Larger masks first (a small organ inside a large one keeps its voxels); back to storage order."""
    work, canonical = (12, 12, 8), (24, 24, 16)
    big = np.zeros(work, bool)
    big[2:10, 2:10, 2:6] = True
    small = np.zeros(work, bool)
    small[5:7, 5:7, 3:5] = True
    flipped = np.array([[0, -1], [1, 1], [2, 1]])  # input x runs right-to-left
    labels = geometry.paint_input_labels([(2, small), (1, big)], frame_for(canonical, work, flipped))
    canon = labels[::-1]  # undo the flip
    np.testing.assert_array_equal(canon > 0, whole_grid(big, canonical) | whole_grid(small, canonical))
    np.testing.assert_array_equal(canon == 2, whole_grid(small, canonical))


@pytest.mark.parametrize(("ornt_flip", "dtype"), [(False, np.int16), (True, np.int16), (False, np.uint16)])
def test_gpu_resampling_path_equals_scipy(monkeypatch: pytest.MonkeyPatch, ornt_flip: bool, dtype: type) -> None:
    """On a GPU ``to_work`` resamples in torch; run that path on the CPU and compare with scipy's."""
    rng = np.random.default_rng(1)
    data = (np.abs(rng.standard_normal((90, 70, 24))) * 300).astype(dtype)  # noise: borders and kernel matter
    affine = np.diag([0.7, 0.8, 3.0, 1.0])  # fine in-plane (prefiltered), thick slices (kept)
    if ornt_flip:
        affine = affine @ np.array([[0, 1, 0, 0], [-1, 0, 0, 69], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    expected, frame = geometry.to_work(data, affine, 2.5, exact_inplane=True)
    monkeypatch.setattr(geometry, "_on_gpu", lambda device: True)
    got, same_frame = geometry.to_work(data, affine, 2.5, exact_inplane=True, device="cpu")
    assert same_frame.work_shape == frame.work_shape and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=0.05)  # HU; float32 rounding only
