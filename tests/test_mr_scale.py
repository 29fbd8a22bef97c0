"""An MR's intensities have no unit: the same scan stored as uint16 or as float64 at 1e6 scale drafts the same.

Scanners and converters store MR as uint16, int16, float32 or float64 with arbitrary scaling; every
model normalises robustly (percentiles), so the draft must not depend on the storage. Checked through
the files (NIfTI), with every draft model, with and without LiteMedSAM, and with a click.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import write_tiny_checkpoint
from medprompt.drafts import draft
from medprompt.io.volume import load_volume
from medprompt.phantoms import make_phantom

PROMPTS = ["liver", "spleen", "kidney_left"]


def _mr_like(ct: np.ndarray) -> np.ndarray:
    """A T1-like contrast from the CT phantom: air dark, fat bright, organs in between; 12-bit values."""
    hu = np.clip(ct, -1000, 1000)
    signal = np.where(hu < -500, 20.0, np.where(hu < -50, 3000.0, 1200.0 + hu * 4.0))
    noise = np.random.default_rng(0).normal(0, 40, ct.shape)
    return np.clip(signal + noise, 0, 4095).astype(np.uint16)


@pytest.fixture(scope="module")
def mr_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    volume, _, _ = make_phantom(3, shape=(64, 64, 40))
    mr = _mr_like(np.asarray(volume.data))
    root = tmp_path_factory.mktemp("mr")
    as_uint16, as_float64 = root / "mr_uint16.nii.gz", root / "mr_float64.nii.gz"
    nib.save(nib.Nifti1Image(mr, volume.affine), as_uint16)
    nib.save(nib.Nifti1Image(mr.astype(np.float64) * 250.0, volume.affine), as_float64)  # up to ~1e6
    return as_uint16, as_float64


@pytest.mark.parametrize("model, refine", [("prior", "none"), ("prior", "sam"), ("medprompt", "none"),
                                           ("medprompt", "sam")])
def test_uint16_and_float64_at_1e6_scale_draft_the_same(mr_pair: tuple[Path, Path], model: str, refine: str,
                                                         tmp_path: Path, sam_cache: Path) -> None:
    small, large = (load_volume(p) for p in mr_pair)
    assert small.data.max() < 5000 and large.data.max() > 5e5  # the storage really differs
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt") if model == "medprompt" else None
    drafts = [draft(v, PROMPTS, model=model, refine=refine, checkpoint=checkpoint) for v in (small, large)]
    assert drafts[0].names == drafts[1].names
    a, b = drafts[0].labels, drafts[1].labels
    drawn = 0
    for name, value in drafts[0].names.items():
        pa, pb = a == value, b == value
        drawn += int(pa.any())
        if pa.any() or pb.any():
            dice = 2 * np.sum(pa & pb) / (pa.sum() + pb.sum())
            assert dice >= 0.99, f"{model}+{refine} {name}: Dice {dice:.4f} between uint16 and float64 storage"
    if model == "prior":
        assert drawn >= 2  # the prior finds organs on this contrast: the comparison is not of empty masks


def test_a_click_draws_the_same_on_uint16_and_float64_storage(mr_pair: tuple[Path, Path], sam_cache: Path) -> None:
    """The click models (medprompt_click, medprompt_click_3d) read intensities through the same percentiles."""
    from medprompt.sam import segmenter_factory
    from medprompt.sam.interactive import ClickRequest, click_segment
    from medprompt.sam.preprocess import modality_of

    small, large = (load_volume(p) for p in mr_pair)
    _, labels, names = make_phantom(3, shape=(64, 64, 40))
    liver = labels == names["liver"]
    k = int(np.argmax(liver.sum(axis=(0, 1))))
    i, j = (int(v) for v in np.argwhere(liver[:, :, k]).mean(axis=0))
    request = ClickRequest.parse({"foreground": [[i, j, k]], "propagate": 2}, small.data.shape)
    make = segmenter_factory()
    masks = [click_segment(v.data, v.affine, modality_of(v.data, v.modality), request, make) for v in (small, large)]
    assert modality_of(small.data, None) == modality_of(large.data, None) == "MR"
    assert masks[0].any()
    dice = 2 * np.sum(masks[0] & masks[1]) / (masks[0].sum() + masks[1].sum())
    assert dice >= 0.99, dice
