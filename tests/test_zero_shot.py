"""Zero-shot training: learns from images and the teacher only, lowers its loss, resumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import medprompt.io.volume as volume_io
from medprompt.errors import InputError
from medprompt.model.checkpoint import load_model
from medprompt.phantoms import write_sample_data
from medprompt.trainers.zero_shot import ZeroShotConfig, list_studies, train_zero_shot

CLASSES = ("liver", "spleen", "kidney_left")


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    """Two small phantoms, plus label files where a careless trainer might look for them."""
    root = tmp_path_factory.mktemp("studies")
    write_sample_data(root, n=2, seed=5, shape=(48, 48, 32))
    final = root / "labels" / "final"
    final.mkdir(parents=True)
    for ref in (root / "reference").glob("*.nii.gz"):
        (final / ref.name).write_bytes(ref.read_bytes())
    return root


def _cfg(studies: Path, out: Path, **kw) -> ZeroShotConfig:
    base = dict(studies=[studies], out=out, steps=6, batch_size=2, model_config="tiny", classes=CLASSES,
                device="cpu", save_every=2)
    base.update(kw)
    return ZeroShotConfig(**base)


def test_studies_are_images_only(studies: Path):
    found = list_studies([studies])
    assert sorted(p.name for p in found) == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    with pytest.raises(InputError, match="no such"):
        list_studies([studies / "nope"])


def test_training_never_reads_a_label(studies: Path, tmp_path: Path, monkeypatch):
    """Every file the trainer loads is an image; label maps and the reference folder are never opened."""
    opened: list[Path] = []
    real_load = volume_io.load_volume

    def spy(path, *a, **k):
        opened.append(Path(path))
        return real_load(path, *a, **k)

    def forbidden(*a, **k):
        raise AssertionError("the zero-shot trainer read a label map")

    monkeypatch.setattr(volume_io, "load_volume", spy)
    monkeypatch.setattr(volume_io, "load_labelmap", forbidden)
    out = train_zero_shot(_cfg(studies, tmp_path / "m.pt", steps=2), progress=False).out
    assert out.is_file()
    assert opened and all(p.parent == studies and p.name.startswith("phantom_") for p in opened)
    _, meta = load_model(out)
    assert meta["trained_on"] == ["phantom_000.nii.gz", "phantom_001.nii.gz"] and meta["teacher"] == "prior"


def test_short_cpu_run_lowers_the_loss(studies: Path, tmp_path: Path):
    losses: list[float] = []
    train_zero_shot(_cfg(studies, tmp_path / "m.pt", steps=40, lr=2e-3, save_every=40), progress=False,
                    on_step=lambda step, stats: losses.append(stats["mask"]))
    assert len(losses) == 40
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8])


def test_interrupted_run_resumes_where_it_stopped(studies: Path, tmp_path: Path):
    out = tmp_path / "m.pt"
    first: list[int] = []
    train_zero_shot(_cfg(studies, out, time_limit_s=0.0), progress=False, on_step=lambda s, _: first.append(s))
    assert first == [1] and out.is_file()  # stopped at once, but saved
    rest: list[int] = []
    train_zero_shot(_cfg(studies, out), progress=False, on_step=lambda s, _: rest.append(s))
    assert rest == [2, 3, 4, 5, 6]
    _, meta = load_model(out)
    assert meta["step"] == 6
    again = train_zero_shot(_cfg(studies, out), progress=False, on_step=lambda s, _: rest.append(s))
    assert again.complete and again.trained == 0 and rest == [2, 3, 4, 5, 6]  # finished: nothing trained
    other: list[int] = []  # the same --out with other classes: a new run, not the finished one
    train_zero_shot(_cfg(studies, out, classes=CLASSES[:2]), progress=False, on_step=lambda s, _: other.append(s))
    assert other == [1, 2, 3, 4, 5, 6]


def test_init_continues_from_a_model_file(studies: Path, tmp_path: Path):
    base = train_zero_shot(_cfg(studies, tmp_path / "base.pt", steps=2), progress=False).out
    net_base, _ = load_model(base)
    out = train_zero_shot(_cfg(studies, tmp_path / "next.pt", steps=1, lr=1e-9, init=base, model_config="small"),
                          progress=False).out
    net_next, _ = load_model(out)
    assert net_next.cfg == net_base.cfg  # the init file's architecture, not model_config
    a = net_base.state_dict()["head.2.weight"]
    b = net_next.state_dict()["head.2.weight"]
    assert (a - b).abs().max() < 1e-3  # a near-zero learning rate leaves the init weights in place


def test_teacher_box_erosion_and_dilation_equal_scipy_binary_morphology():
    """The teacher's separable box filters must give exactly ndi.binary_erosion/dilation's voxels."""
    from scipy import ndimage as ndi

    from medprompt.teachers import _dilate, _erode

    rng = np.random.default_rng(0)
    mask = ndi.gaussian_filter(rng.standard_normal((30, 25, 20)), 1.5) > 0.1
    mask[0, :, :5] = True  # touches the array border
    for radius in ((1, 1, 1), (3, 3, 2), (0, 2, 1)):
        box = np.ones(tuple(2 * r + 1 for r in radius), bool)
        np.testing.assert_array_equal(_erode(mask, radius), ndi.binary_erosion(mask, structure=box))
        np.testing.assert_array_equal(_dilate(mask, radius), ndi.binary_dilation(mask, structure=box))


def test_prior_teacher_is_confident_deep_inside_and_well_outside_only(tmp_path: Path):
    from medprompt.catalog import default_catalog
    from medprompt.model.grid import to_net_grid
    from medprompt.prior.engine import AnatomyPrior
    from medprompt.teachers import PriorTeacher

    write_sample_data(tmp_path, n=1, seed=3)
    grid = to_net_grid(volume_io.load_volume(tmp_path / "phantom_000.nii.gz"))
    catalog = default_catalog()
    t = PriorTeacher(catalog).targets(grid, [catalog["liver"]])
    volume = volume_io.Volume(data=grid.raw, affine=grid.affine, source="t", modality=grid.modality)
    liver = AnatomyPrior(catalog).segment_work(volume, [catalog["liver"]]).masks["liver"]
    target, weight = t.target[0] > 0.5, t.weight[0] > 0.5
    assert liver.sum() > 1000 and target.any()
    assert np.all(liver[target]) and target.sum() < liver.sum()  # the core: inside, border left out
    assert np.all(weight[target])  # the core is taught as liver ...
    band = liver & ~target
    assert not weight[band].any()  # ... its rim not at all ...
    far = ~ndi_dilate(liver, 4)
    assert np.all(weight[far]) and not target[far].any()  # ... and far outside is taught as not liver


def ndi_dilate(mask: np.ndarray, r: int) -> np.ndarray:
    from scipy import ndimage as ndi

    return ndi.binary_dilation(mask, structure=np.ones((2 * r + 1,) * 3, bool))


@pytest.mark.parametrize("classes", [3, 8, 12])
def test_training_volumes_pack_targets_and_weights_without_losing_a_bit(classes: int):
    from medprompt.trainers.zero_shot import TrainingVolume

    rng = np.random.default_rng(classes)
    image = rng.standard_normal((20, 18, 7)).astype(np.float32)
    target = rng.random((classes, 20, 18, 7)) > 0.7
    weight = rng.random((classes, 20, 18, 7)) > 0.4
    tv = TrainingVolume.from_grid("v", image, target, weight)
    assert tv.target.nbytes == 7 * -(-classes // 8) * 20 * 18  # a bit per class and voxel
    for k in range(7):
        t, w = tv.slice_targets(k, slice(3, 15), slice(0, 18))
        np.testing.assert_array_equal(t, target[:, 3:15, :, k])
        np.testing.assert_array_equal(w, weight[:, 3:15, :, k])
