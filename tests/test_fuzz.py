"""Fuzzing (hypothesis) of what users hand in: volume files, prompt files, prompt texts and request params.

Every property is the same promise: bad input ends in the project's own error (a MedPromptError
subclass) with one short line naming the problem, or in a well-formed result; never another
exception, a hang or an allocation beyond the voxel limit. Each test has a fixed example budget
and derandomized inputs, so the file runs in seconds and CI sees the same cases on every run.
A failure found here stays as an explicit ``@example``.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import math
import struct
import tempfile
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import nrrd
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from medprompt.catalog import PromptCatalog, default_catalog, normalise, parse_prompt_file, words
from medprompt.errors import InputError, MedPromptError, PromptError, RequestError
from medprompt.io.image2d import is_image2d, load_image2d
from medprompt.io.volume import load_labelmap, load_volume, read_label_names

# One voxel limit for every reader test; the valid files below hold 120 voxels.
MAX_VOXELS = 10**6
# Peak Python/NumPy allocation allowed while reading one fuzzed file: the limit in float64, twice.
MAX_READ_BYTES = 16 * MAX_VOXELS
MAX_MESSAGE = 500  # characters in a user-facing error message

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def fuzz(examples: int) -> settings:
    return settings(FUZZ, max_examples=examples)


def assert_one_line(error: BaseException, *names: object) -> str:
    """The message is one short line and names one of ``names`` (a path, a field), when given."""
    message = str(error)
    assert message.strip(), f"empty message from {type(error).__name__}"
    assert len(message.splitlines()) == 1, f"multi-line message: {message[:300]!r}"
    assert len(message) < MAX_MESSAGE, f"message of {len(message)} characters: {message[:300]!r}"
    if names:
        assert any(str(n) in message for n in names), f"{message!r} names none of {names}"
    return message


@pytest.fixture
def voxel_limit(monkeypatch: pytest.MonkeyPatch, warm_readers: None) -> int:
    monkeypatch.setenv("MEDPROMPT_MAX_VOXELS", str(MAX_VOXELS))
    return MAX_VOXELS


class Folder:
    """A fresh subfolder of the test's tmp_path per example: DICOM readers scan the whole folder."""

    def __init__(self, root: Path) -> None:
        self.root, self.count = root, 0

    def new(self) -> Path:
        self.count += 1
        folder = self.root / f"ex{self.count:04d}"
        folder.mkdir()
        return folder


@pytest.fixture
def folders(tmp_path: Path) -> Folder:
    return Folder(tmp_path)


# -- valid files to mutate -----------------------------------------------------------------------

VOLUME = (np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 60)
AFFINE = np.array([[0.8, 0, 0, -10], [0, 0.9, 0, 20], [0, 0, 2.5, -30], [0, 0, 0, 1]], float)


def nifti_bytes() -> bytes:
    image = nib.Nifti1Image(VOLUME, AFFINE)
    image.set_qform(AFFINE, code=1)
    image.set_sform(AFFINE, code=1)
    return image.to_bytes()


def nrrd_bytes(encoding: str, volume: np.ndarray = VOLUME) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "v.nrrd"
        lps = np.diag([-1.0, -1.0, 1.0]) @ AFFINE[:3]
        nrrd.write(str(path), volume, {"space": "left-posterior-superior", "space directions": lps[:, :3].T,
                                       "space origin": lps[:, 3], "kinds": ["domain"] * 3, "encoding": encoding},
                   index_order="F")
        return path.read_bytes()


NIFTI = nifti_bytes()
NRRD = {encoding: nrrd_bytes(encoding) for encoding in ("raw", "gzip", "ascii")}
# 3D Slicer's save of a 2D study (X x Y x 1), at least 8 pixels a side so that the 2D reader reads it
NRRD["slice"] = nrrd_bytes("raw", (np.arange(8 * 9, dtype=np.int16).reshape(8, 9, 1) - 30))


@pytest.fixture(scope="module")
def warm_readers(tmp_path_factory) -> None:
    """Read one valid file of each kind first: ITK loads its modules (~180 MB) on first use, which
    tracemalloc would otherwise count as the allocation of whichever fuzzed file came first."""
    folder = tmp_path_factory.mktemp("warm")
    (folder / "v.nii.gz").write_bytes(gzip.compress(NIFTI))
    (folder / "v.nrrd").write_bytes(NRRD["gzip"])
    files = write_dicom_series(folder / "dicom")
    for path in (folder / "v.nii.gz", folder / "v.nrrd", folder / "dicom", files[0]):
        load_volume(path)


def check_read(path: Path) -> None:
    """load_volume and load_labelmap: InputError naming ``path``, or a float32 3D grid with a finite affine."""
    tracemalloc.start()
    try:
        try:
            volume = load_volume(path)
        except InputError as error:
            assert_one_line(error, path)
        else:
            assert volume.data.dtype == np.float32 and volume.data.ndim == 3
            assert volume.data.size <= MAX_VOXELS
            assert volume.affine.shape == (4, 4) and np.all(np.isfinite(volume.affine))
        try:
            labels, affine, _ = load_labelmap(path)
        except InputError as error:
            assert_one_line(error, path)
        else:
            assert labels.dtype == np.int32 and labels.ndim == 3 and labels.size <= MAX_VOXELS
            assert affine.shape == (4, 4) and np.all(np.isfinite(affine))
        if path.name.endswith((".nrrd", ".nhdr")):  # a one-slice NRRD is a 2D image: its reader too
            is_image2d(path)  # never raises
            try:
                image = load_image2d(path)
            except InputError as error:
                assert_one_line(error, path)
            else:
                assert image.pixels.dtype == np.float32 and image.pixels.ndim in (2, 3)
                assert np.all(np.isfinite(image.pixels)) and image.pixels.size <= MAX_VOXELS
                assert np.all(np.isfinite(image.affine))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_READ_BYTES, f"reading {path.name} allocated {peak:,} bytes"


# -- byte-level mutations -------------------------------------------------------------------------

MUTATION = st.tuples(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]),
                     st.integers(0, 2**16), st.binary(min_size=1, max_size=16))


def mutate(data: bytes, ops: list[tuple[str, int, bytes]]) -> bytes:
    out = bytearray(data)
    for op, position, chunk in ops:
        at = position % (len(out) + 1)
        if op == "flip" and at < len(out):
            out[at] ^= chunk[0] or 0xFF
        elif op == "truncate":
            del out[at:]
        elif op == "insert":
            out[at:at] = chunk
        elif op == "delete":
            del out[at:at + len(chunk)]
        elif op == "overwrite":
            out[at:at + len(chunk)] = chunk
    return bytes(out)


# NIfTI-1 header fields: offset, struct format.
NIFTI_FIELDS = {
    "sizeof_hdr": (0, "<i"), "dim_info": (39, "<b"), "dim": (40, "<8h"), "intent_code": (68, "<h"),
    "datatype": (70, "<h"), "bitpix": (72, "<h"), "pixdim": (76, "<8f"), "vox_offset": (108, "<f"),
    "scl_slope": (112, "<f"), "scl_inter": (116, "<f"), "xyzt_units": (123, "<b"), "qform_code": (252, "<h"),
    "sform_code": (254, "<h"), "quatern_offset": (256, "<6f"), "srow": (280, "<12f"), "magic": (344, "4s"),
}
INTS = st.one_of(st.sampled_from([0, 1, -1, 2, 3, 4, 5, 7, 8, 16, 64, 127, 128, 256, 511, 1024, 1536, 2304,
                                  32767, -32768, 348, 540]), st.integers(-(2**31), 2**31 - 1))
FLOATS = st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 352.0, 1e-30, 1e30, 3.4e38, math.nan, math.inf, -math.inf]),
                   st.floats(width=32))
NIFTI_EDIT = st.tuples(st.sampled_from(sorted(NIFTI_FIELDS)), st.integers(0, 11), INTS, FLOATS,
                       st.sampled_from([b"n+1\0", b"ni1\0", b"n+2\0", b"\0\0\0\0", b"nope"]))


def edit_nifti(data: bytes, edits: list[tuple[str, int, int, float, bytes]]) -> bytes:
    out = bytearray(data)
    for name, index, integer, real, magic in edits:
        offset, fmt = NIFTI_FIELDS[name]
        count = struct.calcsize(fmt[0] + fmt[-1])
        n = int(fmt[1:-1] or 1)
        at = offset + (index % n) * count
        kind = fmt[-1]
        if kind == "s":
            out[offset:offset + 4] = magic
        elif kind == "f":
            out[at:at + 4] = struct.pack("<f", real)
        else:
            bits = {"b": 8, "h": 16, "i": 32}[kind]
            value = (integer + 2 ** (bits - 1)) % 2**bits - 2 ** (bits - 1)
            out[at:at + count] = struct.pack("<" + kind, value)
    return bytes(out)


# -- 1. readers --------------------------------------------------------------------------------------

@fuzz(100)
@given(suffix=st.sampled_from([".nii", ".nii.gz", ".nrrd", ".nhdr", ".dcm", ""]), data=st.binary(max_size=600),
       magic=st.sampled_from([b"", b"\x5c\x01\x00\x00", b"NRRD0004\n", b"NRRD0005\ntype: short\n", b"\0" * 128 + b"DICM"]))
@example(suffix=".nrrd", data=b"", magic=b"")  # pynrrd: StopIteration from an empty file
@example(suffix=".nrrd", data=b"sizes: 99999999999999999999 1 1\n", magic=b"NRRD0004\n")
def test_readers_turn_arbitrary_bytes_into_input_errors(voxel_limit, folders, suffix, data, magic):
    path = folders.new() / f"volume{suffix}"
    path.write_bytes(magic + data)
    check_read(path)


@fuzz(150)
@given(compressed=st.booleans(), edits=st.lists(NIFTI_EDIT, max_size=3), ops=st.lists(MUTATION, max_size=2),
       mutate_compressed=st.booleans())
@example(compressed=False, edits=[("dim", 1, 1000, 0.0, b"")], ops=[], mutate_compressed=False)
@example(compressed=False, edits=[("datatype", 0, 0, 0.0, b"")], ops=[], mutate_compressed=False)  # HeaderDataError
@example(compressed=False, edits=[("datatype", 0, 128, 0.0, b"")], ops=[], mutate_compressed=False)  # RGB
@example(compressed=False, edits=[("datatype", 0, 32, 0.0, b"")], ops=[], mutate_compressed=False)  # complex
@example(compressed=True, edits=[("vox_offset", 0, 0, 3.4e38, b"")], ops=[], mutate_compressed=False)
@example(compressed=False, edits=[("vox_offset", 0, 0, math.inf, b"")], ops=[], mutate_compressed=False)  # OverflowError
@example(compressed=True, edits=[("vox_offset", 0, 0, math.nan, b"")], ops=[], mutate_compressed=False)
@example(compressed=False, edits=[("dim", 0, 7, 0.0, b"")], ops=[], mutate_compressed=False)
def test_mutated_nifti_is_read_or_refused(voxel_limit, folders, compressed, edits, ops, mutate_compressed):
    data = edit_nifti(NIFTI, edits)
    if compressed:
        data = gzip.compress(data, mtime=0) if mutate_compressed else gzip.compress(mutate(data, ops), mtime=0)
        data = mutate(data, ops) if mutate_compressed else data
    else:
        data = mutate(data, ops)
    path = folders.new() / ("volume.nii.gz" if compressed else "volume.nii")
    path.write_bytes(data)
    check_read(path)


NRRD_VALUES = {
    "type": ["int16", "short", "uint8", "float", "double", "int64", "block", "complex", "", "int17"],
    "dimension": ["3", "2", "4", "0", "-1", "1e9", "x"],
    "sizes": ["4 5 6", "1000 1000 1000", "100 100 100", "4 5", "4 5 6 1", "4 5 6 2", "0 5 6", "-4 5 6",
              "99999999999999999999 1 1", "4.5 5 6", "a b c", ""],
    "encoding": ["raw", "gzip", "gz", "bzip2", "ascii", "hex", "zip", ""],
    "endian": ["little", "big", "middle", ""],
    "space": ["left-posterior-superior", "RAS", "scanner-xyz", "3D-right-handed", "lps", ""],
    "space directions": ["(-0.8,0,0) (0,-0.9,0) (0,0,2.5)", "none (1,0,0) (0,1,0)", "(0,0,0) (0,0,0) (0,0,0)",
                         "(nan,0,0) (0,1,0) (0,0,1)", "(1,0,0) (0,1,0)", "(1,0) (0,1) (1,1)", "(1e308,1e308,0) (0,1,0) (0,0,1)",
                         "(1,0,0) (0,1,0) (0,0,1) (1,1,1)", "none none none"],
    "space origin": ["(0,0,0)", "(inf,0,0)", "(1,2)", "(1,2,3,4)", "nan"],
    "spacings": ["1 1 1", "nan 1 1", "0 0 0", "1 1"],
    "kinds": ["domain domain domain", "RGB-color domain domain", "list"],
    "byte skip": ["0", "-1", "-2", "10", "100000000000"],
    "line skip": ["0", "1", "-1", "1000"],
    "data file": ["missing.raw", "/dev/zero", "/dev/null", "/dev/urandom", ".", "LIST", "../volume.nrrd"],
    "space dimension": ["3", "2", "4"],
    "measurement frame": ["(1,0,0) (0,1,0) (0,0,1)", "(1,0) (0,1)"],
}
NRRD_EDIT = st.tuples(st.sampled_from(sorted(NRRD_VALUES)), st.integers(0, 20),
                      st.one_of(st.none(), st.text(alphabet="0123456789 -.,()eanoi", max_size=24)),
                      st.sampled_from(["replace", "add", "remove"]))


def edit_nrrd(data: bytes, edits: list[tuple[str, int, str | None, str]]) -> bytes:
    head, _, payload = data.partition(b"\n\n")
    lines = head.decode("ascii").split("\n")
    for field, pick, text, how in edits:
        value = NRRD_VALUES[field][pick % len(NRRD_VALUES[field])] if text is None else text
        lines = [line for line in lines if not (how != "add" and line.startswith(field + ":"))]
        if how != "remove":
            lines.insert(1 + pick % len(lines), f"{field}: {value}")
    return "\n".join(lines).encode("ascii") + b"\n\n" + payload


@fuzz(150)
@given(encoding=st.sampled_from(sorted(NRRD)), edits=st.lists(NRRD_EDIT, max_size=3), ops=st.lists(MUTATION, max_size=2),
       suffix=st.sampled_from([".nrrd", ".nhdr"]))
@example(encoding="raw", edits=[("data file", 1, None, "replace")], ops=[], suffix=".nhdr")  # /dev/zero
@example(encoding="gzip", edits=[("data file", 3, None, "replace")], ops=[], suffix=".nhdr")  # /dev/urandom
@example(encoding="raw", edits=[("sizes", 1, None, "replace")], ops=[], suffix=".nrrd")  # above the limit
@example(encoding="raw", edits=[("sizes", 8, None, "replace")], ops=[], suffix=".nrrd")  # too big for int64
@example(encoding="gzip", edits=[("byte skip", 4, None, "replace")], ops=[], suffix=".nrrd")
@example(encoding="raw", edits=[("space directions", 5, None, "replace")], ops=[], suffix=".nrrd")
@example(encoding="raw", edits=[("space", 3, None, "replace")], ops=[], suffix=".nrrd")
@example(encoding="raw", edits=[("space", 0, "l\x0beft", "replace")], ops=[], suffix=".nrrd")  # a vertical tab
@example(encoding="slice", edits=[("space origin", 1, None, "replace")], ops=[], suffix=".nrrd")  # a 2D image at inf
def test_mutated_nrrd_is_read_or_refused(voxel_limit, folders, encoding, edits, ops, suffix):
    path = folders.new() / f"volume{suffix}"
    path.write_bytes(mutate(edit_nrrd(NRRD[encoding], edits), ops))
    check_read(path)


def declared_only(fmt: str, shape: tuple[int, ...]) -> bytes:
    """A header declaring ``shape`` over a few bytes of payload."""
    if fmt.startswith(".nii"):
        header = nib.Nifti1Header()
        header.set_data_dtype(np.uint8)
        header.set_data_shape(shape)
        header.set_sform(AFFINE, code=1)
        data = header.binaryblock + b"\0" * 4 + b"\1" * 64
        return gzip.compress(data, mtime=0) if fmt == ".nii.gz" else data
    head = (f"NRRD0004\ntype: uint8\ndimension: {len(shape)}\nsizes: {' '.join(map(str, shape))}\n"
            f"encoding: {'gzip' if fmt == '.nrrd' else 'raw'}\n\n").encode()
    return head + (gzip.compress(b"\1" * 64, mtime=0) if fmt == ".nrrd" else b"\1" * 64)


@fuzz(40)
@given(fmt=st.sampled_from([".nii", ".nii.gz", ".nrrd", ".raw.nrrd"]),
       shape=st.lists(st.integers(1, 32767), min_size=3, max_size=4).map(tuple))
@example(fmt=".nii", shape=(1000, 1000, 2))
@example(fmt=".nrrd", shape=(32767, 32767, 32767, 32767))
def test_a_header_declaring_more_voxels_than_the_limit_is_refused_before_reading(voxel_limit, folders, fmt, shape):
    """Whatever the format, more declared voxels than MEDPROMPT_MAX_VOXELS is refused, naming the limit."""
    path = folders.new() / f"big{fmt}"
    path.write_bytes(declared_only(fmt, shape))
    count = math.prod(shape)
    if count > MAX_VOXELS:
        with pytest.raises(InputError) as excinfo:
            load_volume(path)
        assert "above the limit" in assert_one_line(excinfo.value, path)
    check_read(path)


def test_a_gzip_bomb_in_an_nrrd_is_refused_without_inflating_it(voxel_limit, tmp_path):
    """64 MB of zeros compress to 64 kB; a header declaring 120 voxels must not read them all."""
    chunk = b"\0" * 2**20
    stream = io.BytesIO()
    with gzip.GzipFile(fileobj=stream, mode="wb", mtime=0) as out:
        for _ in range(64):
            out.write(chunk)
    for encoding, payload in (("gzip", stream.getvalue()), ("bzip2", bz2.compress(chunk * 16))):
        path = tmp_path / f"bomb_{encoding}.nrrd"
        path.write_bytes(f"NRRD0004\ntype: int16\ndimension: 3\nsizes: 4 5 6\nencoding: {encoding}\n\n".encode() + payload)
        with pytest.raises(InputError) as excinfo:
            load_volume(path)
        assert_one_line(excinfo.value, path)
        check_read(path)


def test_a_detached_nrrd_header_cannot_read_a_device(voxel_limit, tmp_path):
    """``data file: /dev/zero`` would read forever: a detached data file must be a regular file."""
    for device in ("/dev/zero", "/dev/urandom"):
        path = tmp_path / "volume.nhdr"
        path.write_bytes(f"NRRD0004\ntype: int16\ndimension: 3\nsizes: 4 5 6\nencoding: raw\n"
                         f"data file: {device}\n\n".encode())
        with pytest.raises(InputError) as excinfo:
            load_volume(path)
        assert_one_line(excinfo.value, path)


def test_the_valid_files_read(voxel_limit, tmp_path):
    """The mutations start from files that read: the properties above test damage, not a broken base."""
    for name, data in (("v.nii", NIFTI), ("v.nii.gz", gzip.compress(NIFTI)),
                       *((f"v_{e}.nrrd", b) for e, b in NRRD.items() if e != "slice")):
        (tmp_path / name).write_bytes(data)
        volume = load_volume(tmp_path / name)
        np.testing.assert_array_equal(volume.data, VOLUME)
        np.testing.assert_allclose(volume.affine, AFFINE, atol=1e-6)
    (tmp_path / "slice.nrrd").write_bytes(NRRD["slice"])  # a 2D image, on the volumes' world grid
    image = load_image2d(tmp_path / "slice.nrrd")
    assert image.shape == (9, 8) and image.pixels.min() == -30 and image.pixel_mm == pytest.approx((0.9, 0.8))
    np.testing.assert_allclose(image.affine, AFFINE, atol=1e-6)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                    max_leaves=12)


@fuzz(60)
@given(content=st.one_of(JSON, st.dictionaries(st.text(max_size=20), JSON, max_size=4).map(lambda d: {"labels": d}),
                         st.dictionaries(st.text(max_size=20), st.integers(-5, 70000), max_size=4)),
       raw=st.one_of(st.none(), st.binary(max_size=200)))
@example(content=None, raw=b"[" * 100_000)  # RecursionError from json
@example(content=None, raw=b'{"a": ' + b"1" * 5000 + b"}")  # ValueError: too many digits for an int
@example(content=None, raw=b"\xff\xfe{")
@example(content={"labels": {"liver": "x" * 100_000}}, raw=None)
@example(content={"labels": {"x" * 100_000: 1}}, raw=None)
def test_label_names_are_read_or_refused(tmp_path, content, raw):
    path = tmp_path / "labels.json"
    path.write_bytes(raw if raw is not None else json.dumps(content).encode())
    try:
        names = read_label_names(path)
    except InputError as error:
        assert_one_line(error, path)
    else:
        assert all(isinstance(k, str) and k.strip() and type(v) is int and 1 <= v <= 65535 for k, v in names.items())
        assert len(set(names.values())) == len(names)


def write_dicom_series(folder: Path, n: int = 3) -> list[Path]:
    """A tiny MR series (8x6 pixels, n slices) written with pydicom: one file per slice."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series = "1.2.826.0.1.3680043.2.1125.7.1", "1.2.826.0.1.3680043.2.1125.7.2"
    paths = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        meta.MediaStorageSOPInstanceUID = uid = generate_uid(entropy_srcs=[series, str(k)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "MR"
        ds.PatientName, ds.PatientID, ds.InstanceNumber = "Fuzz^Test", "fuzz", k + 1
        ds.ImagePositionPatient = [-10.0, 20.0, -30.0 + 2.5 * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [0.9, 0.8], 2.5
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 6, 8, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = (np.arange(48, dtype=np.int16) + 100 * k).tobytes()
        path = folder / f"slice{k}.dcm"
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(str(path), write_like_original=False)
        paths.append(path)
    return paths


@fuzz(25)
@given(target=st.integers(0, 2), ops=st.lists(MUTATION, min_size=1, max_size=3),
       by_folder=st.booleans())
def test_mutated_dicom_series_is_read_or_refused(voxel_limit, folders, target, ops, by_folder):
    folder = folders.new()
    files = write_dicom_series(folder)
    files[target].write_bytes(mutate(files[target].read_bytes(), ops))
    path = folder if by_folder else files[(target + 1) % len(files)]
    try:
        volume = load_volume(path)
    except InputError as error:
        assert_one_line(error, path, folder)
    else:
        assert volume.data.dtype == np.float32 and volume.data.ndim == 3
        assert np.all(np.isfinite(volume.affine))


# -- 2. prompt files and prompt texts ----------------------------------------------------------------

NASTY_TEXT = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", " ", "\n", "\x00", "liver\x00", "a\nb", "\u202eright kidney", "🫁 lungs", "name: x",
                     "Liver", "kidney_left", "\t\r\x0b\x0c\x1c\x85\u2028", "&a", "*a", "!!python/name:os.system"]),
    st.integers(1000, 5000).map(lambda n: "x" * n),
)
ANY_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | NASTY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.one_of(NASTY_TEXT, st.integers()), inner, max_size=3),
    max_leaves=8,
)
PRIOR_VALUE = st.fixed_dictionaries({}, optional={
    "supported": st.one_of(st.booleans(), ANY_VALUE), "method": ANY_VALUE, "note": ANY_VALUE,
    "ct": st.one_of(st.dictionaries(st.sampled_from(["hu", "x"]), ANY_VALUE, max_size=2), ANY_VALUE),
    "mr": ANY_VALUE, "location": st.one_of(st.dictionaries(st.sampled_from(["x", "y", "z"]), ANY_VALUE, max_size=2), ANY_VALUE),
    "volume_ml": st.one_of(st.lists(st.floats(), min_size=2, max_size=2), ANY_VALUE),
    "components": ANY_VALUE, "parts": ANY_VALUE, "exclude": ANY_VALUE, "erode_mm": ANY_VALUE,
    "near": ANY_VALUE, "radius_mm": ANY_VALUE, "bogus": ANY_VALUE, 3: ANY_VALUE,
})
ENTRY = st.fixed_dictionaries(
    {"name": st.one_of(st.just("fuzz_class"), ANY_VALUE)},
    optional={"aliases": st.one_of(st.lists(NASTY_TEXT, max_size=3), ANY_VALUE),
              "descriptions": st.one_of(st.lists(NASTY_TEXT, min_size=1, max_size=3), ANY_VALUE),
              "keywords": ANY_VALUE, "prior": st.one_of(PRIOR_VALUE, ANY_VALUE),
              "sam": st.one_of(st.fixed_dictionaries({}, optional={"refine": ANY_VALUE, "window": ANY_VALUE}), ANY_VALUE),
              "extra": ANY_VALUE, 7: ANY_VALUE, None: ANY_VALUE},
)
# A billion laughs: nine anchors, each nine references to the one before (9**9 leaves when expanded).
BOMB = ("prior: {note: [&l0 [x, x, x, x, x, x, x, x, x], "
        + ", ".join(f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)) + "]}\n")


@fuzz(120)
@given(doc=st.one_of(ENTRY, st.lists(ENTRY, max_size=3), ANY_VALUE),
       raw=st.one_of(st.none(), st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
@example(doc=None, raw=b"name: a\x00")  # YAML's reader error spans two lines
@example(doc=None, raw=b"name: \xff\xfe")  # not UTF-8
@example(doc=None, raw=b"[" * 10_000)  # RecursionError in the YAML composer
@example(doc={"name": "fuzz_class", 1: 2, "foo": 3}, raw=None)  # unknown fields of mixed types
@example(doc={"name": "fuzz_class", "descriptions": ["a"], "prior": {1: 2, "foo": 3}}, raw=None)
@example(doc={"name": "fuzz_class", "x\ny" * 50_000: 1}, raw=None)
@example(doc={"name": ["x" * 100_000]}, raw=None)
@example(doc={"name": "fuzz_class", "descriptions": ["a"], "prior": {"ct": {"h\nu" * 10_000: [1]}}}, raw=None)
@example(doc=None, raw=BOMB.encode() + b"name: *l8\n")  # a billion laughs in the repr of a bad name
@example(doc=None, raw=BOMB.encode() + b"name: a\ndescriptions: [a]\naliases: *l8\n")
def test_prompt_files_are_parsed_or_refused_naming_the_file(tmp_path, doc, raw):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(raw if raw is not None else yaml.safe_dump(doc, allow_unicode=True, sort_keys=False).encode("utf-8"))
    try:
        entries = parse_prompt_file(path)
    except PromptError as error:
        assert_one_line(error, path)
        with pytest.raises(PromptError):
            PromptCatalog.load([tmp_path])
        return
    for entry in entries:
        assert isinstance(entry.name, str) and entry.name
        assert all(isinstance(text, str) and text for text in (*entry.aliases, *entry.descriptions, *entry.keywords))
    try:
        catalog = PromptCatalog.load([tmp_path])
    except PromptError as error:  # two entries of one name, or none at all ("[]")
        assert_one_line(error, path, tmp_path)
        return
    for text in ("liver", *catalog.names, "left kidney\n", "zzz"):
        try:
            catalog.resolve(text)
        except PromptError as error:
            assert_one_line(error)


def test_a_prompt_file_that_is_a_folder_is_refused(tmp_path):
    (tmp_path / "odd.yaml").mkdir()
    with pytest.raises(PromptError) as excinfo:
        PromptCatalog.load([tmp_path])
    assert_one_line(excinfo.value, tmp_path / "odd.yaml")


@pytest.fixture(scope="module")
def keywords() -> PromptCatalog:
    """The shipped classes, resolved by keywords unless a test passes an encoder (MiniLM's loading costs seconds)."""
    return PromptCatalog(entries=dict(default_catalog().entries))


HUGE = "liver " * 20_000  # 120k characters: ambiguous or not, never echoed back in full
PROMPT = st.one_of(
    NASTY_TEXT,
    st.text(alphabet=st.characters(codec="utf-8"), max_size=60),
    st.sampled_from(["liver", "the left kidney", "kidneys", "LIVER ", "spleen, liver", "\u05db\u05d1\u05d3 liver",
                     "lungs 🫁", "adrenal", "kidney", "right", ","]),
    st.tuples(st.sampled_from(["x", "liver ", "a\n", "kidney, ", "\u202e\u05db", "\x00"]), st.integers(10_000, 100_000))
    .map(lambda piece_count: piece_count[0] * (piece_count[1] // len(piece_count[0]))),
)


@fuzz(120)
@given(prompts=st.one_of(st.none(), st.lists(st.one_of(PROMPT, ANY_VALUE), max_size=4), PROMPT, ANY_VALUE))
@example(prompts=["x" * 100_000])
@example(prompts=[HUGE])
@example(prompts=["zz\n" + "q" * 100_000])
@example(prompts=["liver", ["x" * 100_000]])  # a non-string prompt is named, briefly
@example(prompts=5)
@example(prompts=["kidney " * 20_000 + "\n left right"])
def test_prompt_texts_resolve_or_fail_in_one_short_line(keywords, prompts):
    try:
        resolved = keywords.resolve_all(prompts)
    except PromptError as error:
        assert_one_line(error)
    else:
        assert resolved and all(entry.name in keywords for _, entry in resolved)


class HashEncoder:
    """A stand-in for MiniLM: a unit vector per text from its hash. The similarity path's error
    messages are under test, not its matching; it claims MiniLM's key so its similarity floor applies."""

    dim = 16

    def __init__(self) -> None:
        from medprompt.text.encoders import MINILM_KEY

        self.key = MINILM_KEY

    def encode(self, texts):
        vectors = np.stack([np.random.default_rng(zlib.crc32(t.encode("utf-8", "surrogatepass"))).normal(size=self.dim)
                            for t in texts])
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@fuzz(60)
@given(prompts=st.lists(PROMPT, min_size=1, max_size=2))
@example(prompts=["x" * 100_000])  # the similarity path quoted the whole prompt back
@example(prompts=["a\n" * 50_000])  # ... on 50,001 lines
@example(prompts=["zz\nqq"])
def test_prompt_texts_resolved_by_similarity_fail_in_one_short_line(keywords, prompts):
    """The server's path: default_catalog() resolves free text by sentence similarity when MiniLM is installed."""
    try:
        resolved = keywords.resolve_all(prompts, encoder=HashEncoder())
    except PromptError as error:
        assert_one_line(error)
    else:
        assert resolved and all(entry.name in keywords for _, entry in resolved)


@fuzz(100)
@given(text=PROMPT)
def test_prompt_normalisation_is_total_and_canonical(text):
    key = normalise(text)
    assert normalise(key) == key and all(c.isascii() and (c.isalnum() or c == "_") for c in key)
    assert all(w and w == w.lower() for w in words(text))


# -- 3. request params -----------------------------------------------------------------------------

SHAPE = (8, 7, 5)
NUMBER = st.one_of(st.integers(-10, 12), st.integers(-(2**80), 2**80), st.floats(),
                   st.sampled_from([math.nan, math.inf, -math.inf, 1e308, 2.5, True, None, "3", " 2 ", "1e3", "x", ""]))
POINT = st.one_of(st.lists(NUMBER, min_size=3, max_size=3), st.lists(NUMBER, max_size=5), ANY_VALUE)
POINTS = st.one_of(st.none(), st.lists(POINT, max_size=3), ANY_VALUE, POINT)
REQUEST = st.fixed_dictionaries({}, optional={
    "foreground": POINTS, "background": POINTS,
    "roi": st.one_of(st.lists(NUMBER, min_size=6, max_size=6), st.lists(NUMBER, max_size=7), ANY_VALUE),
    "slice": st.one_of(NUMBER, ANY_VALUE), "propagate": st.one_of(NUMBER, ANY_VALUE), "label": ANY_VALUE,
})


@fuzz(250)
@given(request=REQUEST, propagate_default=st.integers(0, 20))
@example(request={"foreground": [[math.inf, 1, 1]]}, propagate_default=0)
@example(request={"foreground": [[10**400, 1, 1]]}, propagate_default=0)
@example(request={"foreground": [[1, 1, 1]], "slice": math.inf}, propagate_default=0)
@example(request={"foreground": [[1, 1, 1]], "slice": -math.inf}, propagate_default=0)
@example(request={"foreground": [[1, 1, 1]], "propagate": math.inf}, propagate_default=0)
@example(request={"roi": [0, 1e999, 0, 3, 0, 1]}, propagate_default=0)
@example(request={"roi": [0, 4, 0, 3, 0, 10**400]}, propagate_default=0)
@example(request={"foreground": [[1, 1, 1]], "slice": "9" * 4000}, propagate_default=0)
@example(request={"foreground": [["x" * 10_000, 1, 1]]}, propagate_default=0)
@example(request={"foreground": [[1, 1, 1]], "propagate": "x\n" * 10_000}, propagate_default=0)
@example(request={"foreground": [[1, 1, 1]], "slice": [[["k"] * 10_000]]}, propagate_default=0)
@example(request={"foreground": [["9" * 300, 1, 1]]}, propagate_default=0)
def test_click_requests_parse_or_fail_with_a_request_error(request, propagate_default):
    from medprompt.sam.interactive import ClickRequest

    try:
        parsed = ClickRequest.parse(request, SHAPE, propagate_default)
    except RequestError as error:
        assert_one_line(error)
        return
    assert 0 <= parsed.k < SHAPE[2] and 0 <= parsed.propagate <= SHAPE[2]
    for i, j, k in parsed.foreground + parsed.background:
        assert 0 <= i < SHAPE[0] and 0 <= j < SHAPE[1] and k == parsed.k
    assert parsed.foreground or parsed.roi is not None
    if parsed.roi is not None:
        i0, i1, j0, j1 = parsed.roi
        assert 0 <= i0 < i1 < SHAPE[0] and 0 <= j0 < j1 < SHAPE[1]


@fuzz(60)
@given(label=st.one_of(st.just(None), ANY_VALUE, st.sampled_from(["", " ", "liver", "\n"]), NASTY_TEXT))
@example(label=" ")  # a blank segment name broke save_labelmap after the segmentation ran
def test_click_label_is_a_name_or_a_request_error(label):
    from medprompt.infers.click import segment_label

    request = {} if label is None else {"label": label}
    try:
        name = segment_label(request)
    except RequestError as error:
        assert_one_line(error)
    else:
        assert isinstance(name, str) and name.strip()


@pytest.fixture(scope="module")
def draft_task(tmp_path_factory) -> tuple[Any, Path]:
    """A DraftInfer whose drafting step resolves the prompts by keywords and draws nothing (no LiteMedSAM)."""
    from medprompt.drafts import Segmentation
    from medprompt.infers.draft import DraftInfer

    catalog = PromptCatalog(entries=dict(default_catalog().entries))

    class KeywordDraft(DraftInfer):
        def is_valid(self) -> bool:
            return True

        def segment(self, volume, prompts, refine):
            pairs = catalog.resolve_all(prompts)
            names = {entry.name: n for n, (_, entry) in enumerate(pairs, 1)}
            labels = np.zeros(volume.data.shape, np.uint8)
            return Segmentation(labels, names, {p: e.name for p, e in pairs}), {}

    image = tmp_path_factory.mktemp("draft") / "ct.nii.gz"
    image.write_bytes(gzip.compress(NIFTI))
    return KeywordDraft({"liver": 1}, ["liver", "spleen"], "fuzzed", refine="none"), image


@fuzz(60)
@given(request=st.fixed_dictionaries({}, optional={
    "prompts": st.one_of(PROMPT, st.lists(st.one_of(PROMPT, ANY_VALUE), max_size=3), ANY_VALUE),
    "refine": st.one_of(st.sampled_from(["none", "NONE ", "sam", "", "x\n" * 1000]), ANY_VALUE),
    "result_extension": st.one_of(st.sampled_from([".nii.gz", ".nrrd", ".nii", ".png", "a\n" * 1000, None, ""]), ANY_VALUE),
    "image": st.one_of(st.just(True), ANY_VALUE),
}))
@example(request={"result_extension": "a\n" * 1000})
@example(request={"refine": "x\n" * 1000})
@example(request={"refine": ["x" * 100_000]})
@example(request={"prompts": "liver," * 50_000})
@example(request={"prompts": None})
@example(request={"image": "x" * 1000})  # OSError (name too long) from Path.exists
@example(request={"image": "\r"})  # a line break in every message naming the file
def test_draft_requests_draft_or_fail_with_a_medprompt_error(draft_task, request):
    task, image = draft_task
    request = dict(request)
    if request.get("image") is True or "image" not in request:
        request["image"] = str(image)
    try:
        label_path, info = task(request)
    except MedPromptError as error:
        assert_one_line(error)
        return
    try:
        assert set(info["label_names"]) <= set(default_catalog().names)
        assert Path(label_path).name.endswith((".nii.gz", ".nii", ".nrrd"))
    finally:
        Path(label_path).unlink(missing_ok=True)


def test_a_draft_whose_result_cannot_be_written_leaves_no_file_behind(draft_task, tmp_path, monkeypatch):
    """The server removes only the result files it sends: a request failing after its file was made removes it."""
    import medprompt.infers.draft as module

    task, image = draft_task
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def full_disk(path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise InputError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(module, "save_labelmap", full_disk)
    with pytest.raises(InputError, match="No space left"):
        task({"image": str(image)})
    assert list(tmp_path.iterdir()) == []
