"""Read CT/MR volumes (NIfTI, NRRD, DICOM series) into one representation; write label maps.

Every reader keeps the voxel grid exactly as stored and returns a voxel -> RAS+ millimetre affine
(nibabel's convention: +x patient right, +y anterior, +z superior). Orientation therefore lives
in the affine only, so a mask saved with the volume's affine overlays the original study in
Slicer or OHIF without any resampling, whatever format the study came in.
"""

from __future__ import annotations

import json
import numbers
import os
import secrets
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from medprompt.errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + NRRD_SUFFIXES

# NRRD anatomical spaces -> sign flips taking that space's axes to RAS+.
_NRRD_SPACES = {
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

# Inputs declaring more voxels than this are refused before anything is allocated (a header can
# claim any size over a tiny payload). 2**30 voxels is a 4 GiB float32 volume, ten times a
# 512x512x1000 CT; raise it with MEDPROMPT_MAX_VOXELS.
ENV_MAX_VOXELS = "MEDPROMPT_MAX_VOXELS"
DEFAULT_MAX_VOXELS = 2**30
# DICOM slice positions may differ from a regular grid by floating-point and decimal-string
# rounding (GE: 7e-15 mm); a deviation above this share of the slice spacing is a real gap.
UNEVEN_SLICE_TOLERANCE = 1e-3

# Exceptions the readers raise for damaged or unexpected files (truncated gzip, bad headers,
# undecodable pixel data); all become one-line InputErrors naming the file.
_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError, EOFError, ValueError, TypeError, KeyError, IndexError, zlib.error, RuntimeError,
    nib.filebasedimages.ImageFileError,
)


@dataclass
class Volume:
    """A 3D image on its stored voxel grid with its voxel -> RAS+ mm affine."""

    data: np.ndarray
    affine: np.ndarray
    source: str
    modality: str | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the stored axes i, j, k (norms of the affine's columns)."""
        norms = np.linalg.norm(np.asarray(self.affine)[:3, :3], axis=0)
        return float(norms[0]), float(norms[1]), float(norms[2])


def load_volume(path: str | os.PathLike) -> Volume:
    """Read a NIfTI/NRRD file, a DICOM series folder, or the series of one DICOM file in it."""
    path = Path(path)
    data, affine, modality = _read_any(path)
    return Volume(data=data.astype(np.float32, copy=False), affine=affine, source=str(path),
                  modality=modality)


def load_labelmap(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, int] | None]:
    """Read a label map (any format load_volume reads) and the class names of its JSON sidecar.

    Returns (integer labels on the stored grid, voxel -> RAS+ affine, names or None when the
    file has no sidecar).
    """
    path = Path(path)
    data, affine, _ = _read_any(path)
    if not np.issubdtype(data.dtype, np.integer) and data.dtype != np.bool_:
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise InputError(f"{path}: not a label map (voxel values are not whole numbers)")
    if data.size and data.min() < 0:
        raise InputError(f"{path}: not a label map (negative voxel values)")
    sidecar = sidecar_path(path)
    names = read_label_names(sidecar) if sidecar.is_file() else None
    return data.astype(np.int32, copy=False), affine, names


def save_labelmap(path: str | os.PathLike, labels: np.ndarray, affine: np.ndarray,
                  names: dict[str, int], extra: dict | None = None) -> Path:
    """Write ``labels`` as NIfTI or NRRD (by suffix) plus a ``{"labels": names}`` JSON sidecar.

    ``extra`` adds keys to the sidecar (e.g. which stages made each class). Returns the sidecar path. NRRD is what 3D Slicer's MONAI Label module asks drafts in
    (``result_extension: .nrrd``); it is written in LPS space, as Slicer writes it. Both files
    are written to a temporary name in the target folder and renamed into place, so a reader
    (MONAI Label's datastore watcher, a viewer) never sees a half-written mask.
    """
    path = _output_path(path, NIFTI_SUFFIXES + (".nrrd",))
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"label map must be 3D, got shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise ValueError(f"label map must have an integer dtype, got {labels.dtype}")
    top = int(labels.max()) if labels.size else 0
    if (labels.size and int(labels.min()) < 0) or top > np.iinfo(np.uint16).max:
        raise ValueError("label values must lie in 0..65535")
    names = _validated_names(names, where="names")
    labels = labels.astype(np.uint8 if top < 256 else np.uint16, copy=False)
    if path.name.lower().endswith(".nrrd"):
        _write_nrrd(path, labels, affine)
    else:
        _write_nifti(path, labels, affine)
    return write_json(sidecar_path(path), {"labels": names, **(extra or {})})


def save_volume(path: str | os.PathLike, volume: Volume) -> Path:
    """Write an image volume as NIfTI atomically; int16 when it holds whole numbers (CT HU)."""
    path = _output_path(path, NIFTI_SUFFIXES)
    data = np.asarray(volume.data)
    info = np.iinfo(np.int16)
    whole = bool(data.size) and np.array_equal(data, np.round(data)) \
        and data.min() >= info.min and data.max() <= info.max
    _write_nifti(path, data.astype(np.int16 if whole else np.float32, copy=False), volume.affine)
    return path


def write_json(path: str | os.PathLike, content: object) -> Path:
    """Write JSON atomically (sidecars, score reports); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(content, indent=1) + "\n"
    _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def read_label_names(path: str | os.PathLike) -> dict[str, int]:
    """Class name -> label value from a JSON file: ``{"labels": {...}}`` or a plain mapping."""
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such label-names file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not a readable JSON file ({_one_line(error)})") from None
    if isinstance(content, dict) and isinstance(content.get("labels"), dict):
        content = content["labels"]
    try:
        return _validated_names(content, where=str(path))
    except ValueError as error:
        raise InputError(str(error)) from None


def sidecar_path(path: str | os.PathLike) -> Path:
    """``case.nii.gz`` -> ``case.json``: where a label map's class names live."""
    path = Path(path)
    return path.with_name(_strip_suffix(path.name) + ".json")


def volume_stem(path: str | os.PathLike) -> str:
    """File name without its volume suffix (``ct.nii.gz`` -> ``ct``); a DICOM folder's own name."""
    return _strip_suffix(Path(path).name)


def find_volumes(folder: str | os.PathLike) -> list[Path]:
    """Volumes in ``folder``: its NIfTI/NRRD files, and each DICOM series folder (itself or a child).

    One level only, so a study folder of DICOM slices counts as one volume, not as many files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    entries = sorted(folder.iterdir())
    found = [p for p in entries if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES)]
    found += [p for p in entries if p.is_dir() and _holds_dicom(p)]
    if not found and _holds_dicom(folder):
        found = [folder]
    return found


# -- readers -----------------------------------------------------------------------------------

def _read_any(path: Path) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Dispatch on the path's kind and check the result is a numeric 3D grid with a usable affine."""
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        reader, kind = _read_nifti, "NIfTI"
    elif name.endswith(NRRD_SUFFIXES):
        reader, kind = _read_nrrd, "NRRD"
    elif path.is_dir() or name.endswith(".dcm") or _is_dicom_file(path):
        reader, kind = _read_dicom, "DICOM"
    else:
        raise InputError(f"{path}: unknown file type (expected .nii, .nii.gz, .nrrd, .nhdr, "
                         "a DICOM file or a DICOM series folder)")
    try:
        data, affine, modality = reader(path)
    except InputError:
        raise
    except MemoryError:
        raise InputError(f"{path}: too large to read into memory") from None
    except _READ_ERRORS as error:
        raise InputError(f"{path}: cannot read {kind} file ({_one_line(error)})") from None
    data = _as_3d(data, path)
    if data.dtype.fields is not None or not (np.issubdtype(data.dtype, np.number)
                                             or data.dtype == np.bool_):
        raise InputError(f"{path}: voxel data is not numeric (dtype {data.dtype})")
    if np.issubdtype(data.dtype, np.complexfloating):
        raise InputError(f"{path}: voxel data is complex; a real-valued image is needed")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) \
            or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(f"{path}: voxel-to-world transform is missing or degenerate")
    return data, affine, modality


def _as_3d(data: np.ndarray, path: Path) -> np.ndarray:
    """Drop trailing singleton axes (a 4D file with one frame) and refuse anything not truly 3D."""
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    shape = "x".join(str(n) for n in data.shape)
    if data.ndim > 3:
        raise InputError(f"{path}: is {data.ndim}D ({shape}); one 3D volume is needed")
    if data.ndim < 3 or min(data.shape) < 2:
        raise InputError(f"{path}: is 2D ({shape}); a 3D volume is needed")
    return data


def max_voxels() -> int:
    raw = os.environ.get(ENV_MAX_VOXELS, "").strip()
    try:
        return int(float(raw)) if raw else DEFAULT_MAX_VOXELS
    except ValueError:
        raise InputError(f"{ENV_MAX_VOXELS}={raw!r} is not a number of voxels") from None


def _check_size(path: Path, shape: tuple[int, ...]) -> None:
    """Refuse a declared size above the voxel limit before reading (or allocating) anything."""
    count, limit = int(np.prod([max(1, int(n)) for n in shape], dtype=object)), max_voxels()
    if count > limit:
        raise InputError(f"{path}: declares {'x'.join(str(int(n)) for n in shape)} = {count:,} voxels, "
                         f"above the limit of {limit:,} ({ENV_MAX_VOXELS})")


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, None]:
    image = nib.load(str(path))
    if image.get_data_dtype().fields is not None:  # RGB and other structured voxel types
        raise InputError(f"{path}: voxel data is not numeric (dtype {image.get_data_dtype()})")
    _check_size(path, image.shape)
    if path.name.lower().endswith(".nii"):  # uncompressed: the payload's size is known up front
        needed = int(image.dataobj.offset) + int(np.prod(image.shape)) * image.get_data_dtype().itemsize
        if path.stat().st_size < needed:
            raise InputError(f"{path}: is truncated (the header declares {needed:,} bytes, "
                             f"the file holds {path.stat().st_size:,})")
    return np.asanyarray(image.dataobj), image.affine, None


def _read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray, None]:
    import nrrd

    try:
        _check_size(path, tuple(nrrd.read_header(str(path)).get("sizes", ())))
        data, header = nrrd.read(str(path))  # index order i, j, k (Fortran), like NIfTI
    except nrrd.NRRDError as error:
        raise InputError(f"{path}: cannot read NRRD file ({_one_line(error)})") from None
    directions = header.get("space directions")
    if directions is None:
        spacings = header.get("spacings", [1.0] * data.ndim)
        matrix = np.diag(np.asarray(spacings, dtype=np.float64)[:3])
        origin = np.zeros(3)
        flips = np.ones(3)
    else:
        directions = np.asarray(directions, dtype=np.float64)
        spatial = [i for i, row in enumerate(directions) if np.all(np.isfinite(row))]
        if len(spatial) != 3:
            raise InputError(f"{path}: has {len(spatial)} spatial axes; a 3D volume is needed")
        extra = [i for i in range(data.ndim) if i not in spatial]
        if any(data.shape[i] != 1 for i in extra):
            raise InputError(f"{path}: is {data.ndim}D ({'x'.join(map(str, data.shape))}); "
                             "one 3D volume is needed")
        data = data.reshape([data.shape[i] for i in spatial])
        matrix = directions[spatial].T  # column a = world step of axis a
        origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
        space = str(header.get("space", "right-anterior-superior")).lower()
        if space not in _NRRD_SPACES:
            raise InputError(f"{path}: NRRD space '{space}' is not a patient (anatomical) space")
        flips = np.asarray(_NRRD_SPACES[space])
    affine = np.eye(4)
    affine[:3, :3] = flips[:, None] * matrix
    affine[:3, 3] = flips * origin
    return data, affine, None


def _read_dicom(path: Path) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Read one DICOM series with ITK/GDCM (decodes JPEG2000 and applies rescale slope/intercept)."""
    import itk

    folder, wanted = (path, None) if path.is_dir() else (path.parent, path.resolve())
    finder = itk.GDCMSeriesFileNames.New()
    finder.SetUseSeriesDetails(True)  # split series that mix orientations or sizes
    finder.SetDirectory(str(folder))
    series = [list(finder.GetFileNames(uid)) for uid in finder.GetSeriesUIDs()]
    if wanted is not None:
        series = [files for files in series if any(Path(f).resolve() == wanted for f in files)]
    if not series:
        raise InputError(f"{path}: no readable DICOM series found")
    if len(series) > 1:
        raise InputError(f"{folder}: holds {len(series)} DICOM series; pass one file of the "
                         "series you want")
    probe = itk.GDCMImageIO.New()
    probe.SetFileName(series[0][0])
    probe.ReadImageInformation()
    _check_size(path, (probe.GetDimensions(0), probe.GetDimensions(1), len(series[0])))
    dicom_io = itk.GDCMImageIO.New()
    reader = itk.ImageSeriesReader[itk.Image[itk.F, 3]].New(FileNames=series[0], ImageIO=dicom_io)
    warnings_shown = itk.Object.GetGlobalWarningDisplay()
    itk.Object.SetGlobalWarningDisplay(False)  # uneven spacing is reported below, in one line
    try:
        reader.Update()
    finally:
        itk.Object.SetGlobalWarningDisplay(warnings_shown)
    image = reader.GetOutput()
    dictionary = image.GetMetaDataDictionary()
    if dictionary.HasKey("ITK_non_uniform_sampling_deviation"):
        deviation = float(dictionary["ITK_non_uniform_sampling_deviation"])  # mm, worst slice
        if deviation > UNEVEN_SLICE_TOLERANCE * float(image.GetSpacing()[2]):
            raise InputError(f"{path}: DICOM slices are unevenly spaced (a slice is {deviation:.3g} mm "
                             "off a regular grid: missing slices?)")
    data = itk.array_from_image(image).transpose(2, 1, 0)  # ITK arrays are (k, j, i)
    step = np.asarray(image.GetDirection(), dtype=np.float64) @ np.diag(image.GetSpacing())
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ step
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=np.float64)
    tags = dicom_io.GetMetaDataDictionary()
    modality = str(tags["0008|0060"]).strip() if tags.HasKey("0008|0060") else ""
    return data, affine, modality or None


def _is_dicom_file(path: Path) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble, whatever their name."""
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def _holds_dicom(folder: Path) -> bool:
    return any(p.is_file() and (p.suffix.lower() == ".dcm" or _is_dicom_file(p))
               for p in folder.iterdir())


# -- writing helpers ---------------------------------------------------------------------------

def _output_path(path: str | os.PathLike, suffixes: tuple[str, ...]) -> Path:
    path = Path(path)
    if not path.name.lower().endswith(suffixes):
        raise InputError(f"{path}: output must be a {' or '.join(suffixes)} file")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    affine = np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)  # both codes set: some viewers read only one of the two
    image.set_sform(affine, code=1)
    _atomic_write(path, lambda tmp: nib.save(image, tmp))


def _write_nrrd(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nrrd

    lps = _LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)[:3]  # RAS -> LPS is its own inverse
    header = {
        "space": "left-posterior-superior",
        "space directions": lps[:, :3].T,  # row a = world step of axis a
        "space origin": lps[:, 3],
        "kinds": ["domain"] * 3,
        "encoding": "gzip",
    }
    _atomic_write(path, lambda tmp: nrrd.write(str(tmp), data, header, index_order="F"))


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write via a temporary file in the same folder, then rename over ``path`` (atomic on POSIX)."""
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix  # nibabel picks gzip by name
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _validated_names(names: object, where: str) -> dict[str, int]:
    if not isinstance(names, dict):
        raise ValueError(f"{where}: class names must map name -> label value")
    clean: dict[str, int] = {}
    for name, value in names.items():
        if not isinstance(name, str) or not name.strip() or isinstance(value, bool) \
                or not isinstance(value, numbers.Integral) or not 1 <= value <= 65535:
            raise ValueError(f"{where}: bad class entry {name!r}: {value!r} "
                             "(need a name and a label value 1..65535)")
        clean[name] = int(value)  # numpy integers are fine here, but not in JSON
    if len(set(clean.values())) != len(clean):
        raise ValueError(f"{where}: two classes share one label value")
    return clean


def _strip_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in sorted(VOLUME_SUFFIXES + (".dcm",), key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."
