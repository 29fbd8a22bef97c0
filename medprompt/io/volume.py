"""Read CT/MR volumes (NIfTI, NRRD, DICOM series) into one representation; write label maps.

Every reader keeps the voxel grid exactly as stored and returns a voxel -> RAS+ millimetre affine
(nibabel's convention: +x patient right, +y anterior, +z superior). Orientation therefore lives
in the affine only, so a mask saved with the volume's affine overlays the original study in
Slicer or OHIF without any resampling, whatever format the study came in.
"""

from __future__ import annotations

import bz2
import gzip
import io
import functools
import hashlib
import json
import logging
import numbers
import os
import secrets
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from medprompt.errors import InputError, one_line, shown
from medprompt.io import dicom

logger = logging.getLogger(__name__)

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

# Inputs declaring more voxels than this are refused before anything is allocated (a header can
# claim any size over a tiny payload). 2**30 voxels is a 4 GiB float32 volume, ten times a
# 512x512x1000 CT; raise it with MEDPROMPT_MAX_VOXELS.
ENV_MAX_VOXELS = "MEDPROMPT_MAX_VOXELS"
DEFAULT_MAX_VOXELS = 2**30
# DICOM slice positions may differ from a regular grid by floating-point and decimal-string
# rounding (GE: 7e-15 mm; 3-decimal positions: 2e-3 of a 0.5 mm slice); a deviation above this share
# of the slice spacing is a real gap (a missing slice is a whole spacing).
UNEVEN_SLICE_TOLERANCE = 1e-2
# Voxel sides outside this range (mm) are a broken header, not a CT or MR (micro-CT reaches 0.005).
VOXEL_MM_RANGE = (1e-3, 1e3)


def looks_like_hu(data: np.ndarray) -> bool:
    """Whether values read as Hounsfield units, for a study that does not say it is a CT (a NIfTI
    has no modality field): air near -1000 (1st percentile below -500) and nothing far above dense
    bone (99th percentile below 4000). An MR's, an X-ray's or a windowed picture's values are never
    that far below zero, which their minimum tells without sorting anything (every 2D picture is read
    through here)."""
    if float(np.min(data)) >= -500:
        return False
    lo, hi = np.percentile(data, [1, 99])
    return float(lo) < -500 and float(hi) < 4000


# Exceptions the readers raise for damaged or unexpected files (truncated gzip, bad headers,
# undecodable pixel data); all become one-line InputErrors naming the file.
_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError, EOFError, ValueError, TypeError, KeyError, IndexError, zlib.error, RuntimeError,
    nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError,
    OverflowError, StopIteration,  # a NIfTI vox_offset of inf; pynrrd on an empty file
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

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 of the voxels as laid out in memory, shape, affine and modality: the key of work kept
        per study (medprompt.memo). About 0.13 s for a 512x512x200 float32 CT, no copy. The same
        voxels in another memory layout get another digest (a miss, never a wrong hit). A Volume is not
        changed after it is made; one that is must be a new Volume."""
        data = np.asarray(self.data)
        layout = "F" if data.flags.f_contiguous and not data.flags.c_contiguous else "C"
        flat = data.ravel(order="K") if layout == "F" else np.ascontiguousarray(data).ravel()
        h = hashlib.sha256(f"{data.dtype.str}|{data.shape}|{layout}|{self.modality}".encode())
        h.update(np.ascontiguousarray(self.affine, dtype=np.float64).tobytes())
        h.update(memoryview(flat).cast("B"))
        return h.hexdigest()


def load_volume(path: str | os.PathLike) -> Volume:
    """Read a NIfTI/NRRD file, a DICOM series folder, or the series of one DICOM file in it."""
    path = Path(path)
    data, affine, modality = _read_any(path)
    return Volume(data=_finite_float32(data, path), affine=affine, source=str(path), modality=modality)


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
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def read_label_names(path: str | os.PathLike) -> dict[str, int]:
    """Class name -> label value from a JSON file: ``{"labels": {...}}`` or a plain mapping."""
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such label-names file") from None
    except (OSError, ValueError, RecursionError) as error:  # ValueError: also bad UTF-8, a 5000-digit int
        raise InputError(f"{path}: not a readable JSON file ({one_line(error)})") from None
    if isinstance(content, dict) and isinstance(content.get("labels"), dict):
        content = content["labels"]
    try:
        return _validated_names(content, where=str(path))
    except ValueError as error:
        raise InputError(str(error)) from None


def stored_shape(path: str | os.PathLike) -> tuple[int, ...] | None:
    """The voxel grid a NIfTI/NRRD file declares, from its header alone (None for anything else or unreadable).

    For checks that must not read a whole CT, such as whether an uploaded label fits its image.
    """
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith(NIFTI_SUFFIXES):
            shape = tuple(int(n) for n in nib.load(str(path)).shape)
        elif name.endswith(NRRD_SUFFIXES):
            import nrrd

            shape = tuple(int(n) for n in nrrd.read_header(str(path)).get("sizes", ()))
        else:
            return None
    except Exception:  # the full read names the problem; this is only a cheap pre-check
        return None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


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
    try:
        exists = path.exists()
    except OSError as error:  # a name too long for the file system, a permission denied
        raise InputError(f"{shown(str(path))}: cannot access it ({error.strerror or one_line(error)})") from None
    if not exists:
        raise InputError(f"{path}: no such file or folder")
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        reader, kind = _read_nifti, "NIfTI"
    elif name.endswith(NRRD_SUFFIXES):
        reader, kind = _read_nrrd, "NRRD"
    elif path.is_dir() or dicom.is_dicom_file(path):
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
        raise InputError(f"{path}: cannot read {kind} file ({one_line(error)})") from None
    data = _as_3d(data, path)
    if data.dtype.fields is not None or not (np.issubdtype(data.dtype, np.number)
                                             or data.dtype == np.bool_):
        raise InputError(f"{path}: voxel data is not numeric (dtype {data.dtype})")
    if np.issubdtype(data.dtype, np.complexfloating):
        raise InputError(f"{path}: voxel data is complex; a real-valued image is needed")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputError(f"{path}: voxel-to-world transform is missing or not finite")
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.all((sizes >= VOXEL_MM_RANGE[0]) & (sizes <= VOXEL_MM_RANGE[1])):
        raise InputError(f"{path}: voxel size {' x '.join(f'{v:.3g}' for v in sizes)} mm is not that of a "
                         f"CT or MR (each side must lie in {VOXEL_MM_RANGE[0]:g}..{VOXEL_MM_RANGE[1]:g} mm)")
    if abs(np.linalg.det(affine[:3, :3] / sizes)) < 1e-3:
        raise InputError(f"{path}: voxel-to-world transform is degenerate (its axes are parallel)")
    return data, affine, modality


def _finite_float32(data: np.ndarray, path: Path) -> np.ndarray:
    """float32 voxels with NaN/Inf replaced by the finite minimum (as outside a resampled MR's field of view).

    Every model works in float32; values beyond its range would become Inf and break windows and
    percentiles, so they are refused rather than clipped.
    """
    if np.issubdtype(data.dtype, np.floating) and data.dtype.itemsize > 4:
        top = float(np.max(np.abs(data), initial=0.0, where=np.isfinite(data)))
        if top > np.finfo(np.float32).max:
            raise InputError(f"{path}: voxel values up to {top:.3g} are beyond float32's range")
    data = data.astype(np.float32, copy=False)
    bad = ~np.isfinite(data)
    if bad.any():
        if bad.all():
            raise InputError(f"{path}: no voxel has a finite value (all NaN or Inf)")
        data = np.where(bad, data[~bad].min(), data).astype(np.float32, copy=False)
        logger.warning(f"{path}: {int(bad.sum()):,} NaN/Inf voxels set to the image minimum")
    return data


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
        with open(path, "rb") as handle:
            header = nrrd.read_header(handle)
            _check_size(path, tuple(header.get("sizes", ())))
            data = nrrd.read_data(*_nrrd_payload(path, header, handle), str(path))  # i, j, k order, like NIfTI
    except nrrd.NRRDError as error:
        raise InputError(f"{path}: cannot read NRRD file ({one_line(error)})") from None
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
        flips = nrrd_space_flips(header, path)
    return data, ras_affine(flips, matrix, origin), None


def nrrd_space_flips(header: dict, path: Path) -> np.ndarray:
    """Per world axis, +1 or -1 from an NRRD's 3D patient space to RAS (RAS when the header names none);
    InputError for a space that is not a patient space. The 2D reader (io.image2d) takes the same rule."""
    space = str(header.get("space", "right-anterior-superior")).lower()
    if space not in _NRRD_SPACES:
        raise InputError(f"{path}: NRRD space {shown(space)} is not a patient (anatomical) space")
    return np.asarray(_NRRD_SPACES[space])


def ras_affine(flips: np.ndarray, matrix: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Voxel -> RAS affine from world steps (columns of ``matrix``) and origin given in a space whose axes
    are RAS's times ``flips``."""
    affine = np.eye(4)
    affine[:3, :3] = flips[:, None] * matrix
    affine[:3, 3] = flips * origin
    return affine


def _nrrd_payload(path: Path, header: dict, handle: io.BufferedIOBase) -> tuple[dict, io.IOBase]:
    """The header and file ``nrrd.read_data`` reads; compressed data is inflated here, at most as far as declared.

    pynrrd inflates a whole gzip/bzip2 payload whatever the header declares (a few kB can inflate to
    GBs), and reads a detached data file to its end (``data file: /dev/zero`` never ends).
    """
    import nrrd

    name = header.get("data file", header.get("datafile"))
    if name is not None:
        data_path = path.parent / str(name)  # an absolute name stays absolute
        if not data_path.resolve().is_relative_to(path.parent.resolve()):
            # An uploaded .nhdr naming /etc/... or ../.. would make the server read its own files as voxels.
            raise InputError(f"{path}: its data file {shown(name)} lies outside the header's folder")
        if not data_path.is_file():
            raise InputError(f"{path}: its data file {shown(name)} is missing or not a regular file")
    encoding = header.get("encoding")
    if encoding not in ("gzip", "gz", "bzip2", "bz2") or "sizes" not in header or "type" not in header:
        return header, handle  # raw and text data are read no further than the file's size
    count = int(np.prod([int(n) for n in header["sizes"]], dtype=object))
    size = count * nrrd.reader._determine_datatype(header).itemsize
    line_skip = int(header.get("lineskip", header.get("line skip", 0)))
    byte_skip = int(header.get("byteskip", header.get("byte skip", 0)))
    if count < 0 or line_skip < 0 or byte_skip < -1:
        raise InputError(f"{path}: cannot read NRRD file (negative sizes or skips in the header)")
    with (open(data_path, "rb") if name is not None else handle) as source:
        for _ in range(line_skip):
            source.readline()
        opener = gzip.GzipFile if encoding.startswith("gz") else bz2.BZ2File
        with opener(fileobj=source, mode="rb") as stream:
            if byte_skip == -1:  # the data are the last bytes of the inflated stream
                payload = b""
                while chunk := stream.read(2**20):
                    payload = (payload + chunk)[-size:] if size else b""
            else:
                stream.seek(byte_skip)
                payload = stream.read(size + 1)
    if len(payload) != size:
        raise InputError(f"{path}: its {encoding} data {'exceed' if len(payload) > size else 'fall short of'} "
                         f"the {size:,} bytes its header declares")
    raw = {k: v for k, v in header.items() if k not in ("data file", "datafile", "lineskip", "line skip",
                                                         "byteskip", "byte skip")}
    raw["encoding"] = "raw"
    return raw, io.BytesIO(payload)


def _read_dicom(path: Path) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Read one DICOM series, or one multi-frame file, with ITK/GDCM onto a regular orthogonal grid.

    ITK/GDCM decodes the pixels (JPEG2000 and all) and applies rescale slope/intercept; the slice
    geometry comes from each slice's (or frame's) own position tags, so uneven slices and gantry
    tilt are resampled with a warning instead of being stacked as a regular grid
    (medprompt.io.dicom). A single file with NumberOfFrames > 1, or a folder whose one series is
    such a file, is read as one volume of its frames.
    """
    import itk

    folder, wanted = (path, None) if path.is_dir() else (path.parent, path.resolve())
    if wanted is not None and dicom.frame_count(dicom.read_header(path, ["NumberOfFrames"])) > 1:
        files = [str(path)]  # a multi-frame file is a whole volume: no need to scan its folder
    else:
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
        files = series[0]
        dicom.check_left_out(folder, files)
    for file in files:
        dicom.check_pixel_bytes(file)
    probe = itk.GDCMImageIO.New()
    probe.SetFileName(files[0])
    probe.ReadImageInformation()
    frames = probe.GetDimensions(2) if probe.GetNumberOfDimensions() > 2 else 1
    _check_size(path, (probe.GetDimensions(0), probe.GetDimensions(1), frames * len(files)))
    rescale = None
    if len(files) == 1 and frames > 1:
        stack, rescale = dicom.multiframe_stack(files[0])
        if stack is not None and len(stack.positions) != frames:
            raise InputError(f"{path}: DICOM header declares {len(stack.positions)} frames, "
                             f"the pixel data {frames}")
    else:
        stack = dicom.series_stack(files, path)
    grid = None
    if stack is not None:
        grid = dicom.plan_grid(stack, (probe.GetDimensions(0), probe.GetDimensions(1)), path,
                               UNEVEN_SLICE_TOLERANCE)
        _check_size(path, grid.shape)  # tilt correction widens the grid
    dicom_io = itk.GDCMImageIO.New()
    reader = itk.ImageSeriesReader[itk.Image[itk.F, 3]].New(FileNames=files, ImageIO=dicom_io)
    warnings_shown = itk.Object.GetGlobalWarningDisplay()
    itk.Object.SetGlobalWarningDisplay(False)  # uneven spacing is handled below, in one line
    try:
        reader.Update()
    finally:
        itk.Object.SetGlobalWarningDisplay(warnings_shown)
    image = reader.GetOutput()
    data = itk.array_from_image(image).transpose(2, 1, 0)  # ITK arrays are (k, j, i)
    if rescale is not None:
        data = dicom.rescale_frames(data, (dicom_io.GetRescaleSlope(), dicom_io.GetRescaleIntercept()),
                                    rescale)
    if grid is not None:
        data, affine = dicom.regularize(data, grid), grid.affine
    else:  # no per-slice geometry in the headers: ITK's, as it stacked them
        step = np.asarray(image.GetDirection(), dtype=np.float64) @ np.diag(image.GetSpacing())
        affine = np.eye(4)
        affine[:3, :3] = dicom.LPS_TO_RAS @ step
        affine[:3, 3] = dicom.LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=np.float64)
    tags = dicom_io.GetMetaDataDictionary()
    modality = str(tags["0008|0060"]).strip() if tags.HasKey("0008|0060") else ""
    return data, affine, modality or None


def _holds_dicom(folder: Path) -> bool:
    """Whether ``folder`` holds a DICOM volume: a DICOM file that is not a picture (io.dicom.is_2d_file),
    so a folder of X-ray files or of one-slice CT series is a folder of 2D images, not a series."""
    return any(not dicom.is_2d_file(p) for p in dicom.folder_files(folder))


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
    atomic_write(path, lambda tmp: nib.save(image, tmp))


def _write_nrrd(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nrrd

    lps = dicom.LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)[:3]  # RAS -> LPS is its own inverse
    header = {
        "space": "left-posterior-superior",
        "space directions": lps[:, :3].T,  # row a = world step of axis a
        "space origin": lps[:, 3],
        "kinds": ["domain"] * 3,
        "encoding": "gzip",
    }
    atomic_write(path, lambda tmp: nrrd.write(str(tmp), data, header, index_order="F"))


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], suffix: str | None = None,
                 durable: bool = False) -> None:
    """Write via a temporary file in the same folder, then rename over ``path`` (atomic on POSIX).

    ``suffix`` ends the temporary name (default: the file's own, as writers that pick a format by
    name, nibabel's gzip, need). ``durable`` flushes it to disk before the rename, so a power cut
    leaves the old file or the new one, never an empty one.
    """
    path = Path(path)
    if suffix is None:
        suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}")
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
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
            raise ValueError(f"{where}: bad class entry {shown(name)}: {shown(value)} "
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

