"""DICOM slice geometry that ITK's series reader gets wrong or refuses, and multi-frame files.

ITK stacks a series' slices as one regular grid: one slice spacing for the whole stack and a
slice direction taken from the line through the slice positions. Real scanners break that in
two ways, and both are handled here the way 3D Slicer's "acquisition geometry regularization"
does, so every voxel lands where the scanner put it and the returned affine stays orthogonal:

- uneven slices (a missing slice, a change of spacing mid-series): resampled linearly along the
  slice normal onto a regular grid;
- gantry tilt (CT slices stacked along a line that is not perpendicular to their planes): each
  slice shifted in its own plane onto an orthogonal grid.

Multi-frame files (one file holding the whole volume) get their frame positions and per-frame
rescale from the file's own geometry tags, then go through the same regularization.

Geometry here is DICOM patient space (LPS, mm) until the affine, which is RAS+ like the rest of
``medprompt.io``. Nothing here reads pixel data: the caller decodes with ITK/GDCM (every transfer
syntax) after checking the planned grid's size.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from medprompt.errors import InputError, one_line

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # DICOM patient space (LPS) <-> RAS+, its own inverse
# Two slices whose orientations (direction cosines) differ by more than this are not one stack.
_ORIENTATION_TOLERANCE = 1e-4
# In-plane drift of the slices up to this share of a pixel is not a gantry tilt. Looser than the
# tolerance along the normal because it sums the rounding of all three position decimals and of
# the orientation cosines over the whole stack (positions written with 3 decimals put two slices
# up to 1.7e-3 mm apart in-plane, over 1e-3 of any pixel); a drift this small moves no voxel
# noticeably, while a real tilt of even 0.5 degrees drifts a tenth of a pixel within ten 1 mm slices.
IN_PLANE_TOLERANCE = 1e-2
# Header tags the geometry needs; reading only these keeps a 1000-file series fast.
_SERIES_TAGS = ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "NumberOfFrames"]


@dataclass(frozen=True)
class Stack:
    """Where each acquired slice (a file, or a frame of a multi-frame file) lies, in LPS mm."""

    positions: np.ndarray  # (n, 3) ImagePositionPatient of each slice, in data order
    row: np.ndarray  # unit step of column index i (the first triplet of ImageOrientationPatient)
    column: np.ndarray  # unit step of row index j (orthogonalised against ``row``)
    spacing: tuple[float, float]  # mm per step of i and of j (PixelSpacing is given as j, i)

    @property
    def normal(self) -> np.ndarray:
        """The planes' normal, row x column: the one direction an orthogonal grid may stack along."""
        return np.cross(self.row, self.column)


@dataclass(frozen=True)
class Grid:
    """The regular orthogonal grid a stack is read onto, and which slices make each of its planes."""

    shape: tuple[int, int, int]
    affine: np.ndarray  # voxel -> RAS+ mm
    order: np.ndarray  # data slice indices sorted along the normal
    lower: np.ndarray  # (shape[2],) sorted slice below each output plane
    weight: np.ndarray  # (shape[2],) share of the sorted slice above it (0: a copy of ``lower``)
    shifts: np.ndarray  # (n, 2) where each sorted slice's pixel (0, 0) lands, in output voxels i, j
    warnings: tuple[str, ...] = ()

    @property
    def resamples(self) -> bool:
        """False when the data only needs sorting: the acquisition already was a regular grid."""
        planes = len(self.lower)
        return bool(planes != len(self.order) or np.any(self.lower != np.arange(planes))
                    or np.any(self.weight) or np.any(self.shifts))


# -- geometry from headers ---------------------------------------------------------------------

def read_header(path: str | Path, tags: Sequence[str] | None = None):
    """A DICOM header without pixel data; an unreadable one is a one-line InputError naming it."""
    import pydicom

    with header_errors(path):
        return pydicom.dcmread(str(path), stop_before_pixels=True, force=True,
                               specific_tags=list(tags) if tags else None)


@contextmanager
def header_errors(path: str | Path) -> Iterator[None]:
    """Damaged header values become a one-line InputError naming the file.

    pydicom parses sequences and converts values lazily, on first access, so a broken header
    can fail anywhere its tags are read, not only in dcmread.
    """
    import pydicom

    try:
        yield
    except (pydicom.errors.InvalidDicomError, pydicom.errors.BytesLengthException, OSError,
            ValueError, TypeError, KeyError, AttributeError, IndexError, EOFError, ArithmeticError,
            NotImplementedError, struct.error) as error:
        raise InputError(f"{path}: cannot read DICOM header ({one_line(error)})") from None


# Transfer syntaxes whose pixel data has a known size: implicit/explicit VR little endian, big endian.
_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


def check_pixel_bytes(path: str | Path) -> None:
    """Refuse a file whose uncompressed pixel data is shorter than its header declares.

    ITK/GDCM reads such a slice without complaint (a copy cut short, a full disk), and the draft
    would be made on whatever fills the missing bytes.
    """
    import pydicom

    with header_errors(path), open(path, "rb") as handle:
        header = pydicom.dcmread(handle, stop_before_pixels=True, force=True)
        start = handle.tell()
        syntax = str(getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", "1.2.840.10008.1.2"))
        if syntax not in _UNCOMPRESSED or "Rows" not in header or "Columns" not in header:
            return
        bits = int(header.get("BitsAllocated", 16) or 16)
        declared = (int(header.Rows) * int(header.Columns) * int(header.get("SamplesPerPixel", 1) or 1)
                    * frame_count(header) * bits + 7) // 8
        held = os.fstat(handle.fileno()).st_size - start
    if held < declared:  # ``held`` still counts the pixel element's own 8-12 byte header: lenient
        raise InputError(f"{path}: DICOM pixel data is cut short ({max(held, 0):,} of {declared:,} bytes)")


def check_left_out(folder: str | Path, files: Sequence[str]) -> None:
    """Refuse a series when a file of it in ``folder`` is one GDCM could not read and left out.

    GDCM's series finder skips such a file silently; the gap it leaves would then be interpolated as
    if a slice were missing. Other objects in the folder (DICOMDIR, reports) are not of the series
    and stay ignored.
    """
    import pydicom

    chosen = {Path(f).resolve() for f in files}
    uid = str(read_header(files[0], ["SeriesInstanceUID"]).get("SeriesInstanceUID", ""))
    for other in sorted(Path(folder).iterdir()):
        if not other.is_file() or other.resolve() in chosen:
            continue
        try:
            header = pydicom.dcmread(str(other), stop_before_pixels=True, force=True,
                                     specific_tags=["SeriesInstanceUID"])
        except Exception:  # not DICOM at all: not ours to judge
            continue
        if uid and str(header.get("SeriesInstanceUID", "")) == uid:
            raise InputError(f"{other}: a slice of this series that cannot be read (damaged or cut short?); "
                             "remove it to read the others with the gap interpolated")


# Modalities whose DICOM files are pictures, never slices of a volume.
MODALITIES_2D = frozenset("CR DX MG US XA RF IO PX XC ES GM SM OT SC".split())


def is_dicom_file(path: str | Path) -> bool:
    """A DICOM file: a ``.dcm`` name, or DICOM Part 10's 'DICM' after a 128-byte preamble, whatever its name."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".dcm":
        return True
    stat = path.stat()
    return _has_magic(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=65536)
def _has_magic(path: str, mtime_ns: int, size: int) -> bool:
    with open(path, "rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def is_2d_file(path: str | Path) -> bool:
    """Whether a DICOM file is one picture rather than a slice of a volume: a 2D modality (CR, DX, US,
    MG, ...), colour, or a single-frame CT/MR file that is the only file of its series in its folder.

    The last: 2D CT sets come as one slice per patient, all in one folder, each its own series, while
    the slices of a volume share their series with the other files of their folder. A file without a
    SeriesInstanceUID (or beside one without) cannot be told apart, and is a slice unless it is alone.
    """
    path = Path(path)
    try:
        header = read_header(path, ["Modality", "SamplesPerPixel", "NumberOfFrames", "SeriesInstanceUID"])
    except Exception:
        return False
    modality = str(getattr(header, "Modality", "") or "").upper()
    try:
        colour = int(getattr(header, "SamplesPerPixel", 1) or 1) == 3
    except (TypeError, ValueError):
        colour = False
    if modality in MODALITIES_2D or colour:
        return True
    if frame_count(header) > 1:
        return False
    uid = str(getattr(header, "SeriesInstanceUID", "") or "")
    for other in folder_files(path.parent):
        if other != path and (not uid or _series_uid(other) in (uid, "")):  # no UID: cannot tell them apart
            return False
    return True


def folder_files(folder: Path) -> Iterator[Path]:
    """The DICOM image files directly in ``folder``: not hidden files, not a DICOMDIR (an index, no image)."""
    return (p for p in folder.iterdir()
            if not p.name.startswith(".") and p.name.upper() != "DICOMDIR" and is_dicom_file(p))


def _series_uid(path: Path) -> str:
    stat = path.stat()
    return _series_uid_of(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=65536)
def _series_uid_of(path: str, mtime_ns: int, size: int) -> str:
    """A file's SeriesInstanceUID, read once per version of the file ("" if it has none or is unreadable):
    listing a folder of n single-slice series asks each file about every other."""
    try:
        return str(getattr(read_header(path, ["SeriesInstanceUID"]), "SeriesInstanceUID", "") or "")
    except Exception:
        return ""


def frame_count(header) -> int:
    """NumberOfFrames, 1 when absent or unparsable (single-frame files often omit it)."""
    try:
        return max(1, int(header.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def series_stack(files: Sequence[str], where: str | Path) -> Stack | None:
    """Slice geometry of a single-frame series, in ``files`` order; None when a slice lacks it.

    A series without positions or orientations (some secondary captures) keeps ITK's geometry,
    as before: there is nothing better to place it by.
    """
    planes = []
    for file in files:
        header = read_header(file, _SERIES_TAGS)
        with header_errors(file):
            if len(files) > 1 and frame_count(header) > 1:
                raise InputError(f"{where}: the series mixes multi-frame files with other files; "
                                 "pass the multi-frame file itself")
            planes.append(_plane(header, file))
    if any(p is None for p in planes):
        return None
    return _stack_from_planes(planes, where)


def multiframe_stack(path: str | Path) -> tuple[Stack | None, np.ndarray]:
    """Frame geometry and per-frame (slope, intercept) of one multi-frame file, in frame order.

    Enhanced CT/MR/PET files carry position, orientation, pixel spacing and rescale per frame in
    PerFrameFunctionalGroupsSequence (or once for all frames in SharedFunctionalGroupsSequence);
    legacy multi-frame files carry one position and orientation and step along the normal by
    SpacingBetweenSlices (else SliceThickness). The stack is None when the file has no usable
    geometry (ITK's is kept, as before).
    """
    header = read_header(path)
    with header_errors(path):
        return _multiframe_stack(header, path)


def _multiframe_stack(header, path: str | Path) -> tuple[Stack | None, np.ndarray]:
    frames = frame_count(header)
    if "PerFrameFunctionalGroupsSequence" in header or "SharedFunctionalGroupsSequence" in header:
        return _enhanced_stack(header, frames, path)
    rescale = np.tile(_rescale(header, path), (frames, 1))
    plane = _plane(header, path)
    if plane is None:
        return None, rescale
    step = _number(header, "SpacingBetweenSlices", path) or _number(header, "SliceThickness", path)
    if not step:
        raise InputError(f"{path}: multi-frame DICOM without SpacingBetweenSlices or "
                         "SliceThickness; its frames cannot be placed")
    position, orientation, spacing = plane
    normal = np.cross(orientation[:3], orientation[3:])
    if np.linalg.norm(normal) < 1e-6:
        raise InputError(f"{path}: DICOM ImageOrientationPatient is degenerate ({list(orientation)})")
    normal /= np.linalg.norm(normal)
    positions = position + np.outer(np.arange(frames) * step, normal)  # a negative step stacks along -normal
    return _stack_from_planes([(p, orientation, spacing) for p in positions], path), rescale


def _enhanced_stack(header, frames: int, path: str | Path) -> tuple[Stack | None, np.ndarray]:
    """Per-frame functional groups (DICOM PS3.3 C.7.6.16): each frame's own item, else the shared one."""
    per_frame = list(header.get("PerFrameFunctionalGroupsSequence", []) or [])
    shared = list(header.get("SharedFunctionalGroupsSequence", []) or [])
    if per_frame and len(per_frame) != frames:
        raise InputError(f"{path}: declares {frames} frames but describes {len(per_frame)}")

    def group(index: int, name: str):
        for groups in ([per_frame[index]] if per_frame else []) + shared[:1]:
            items = groups.get(name)
            if items:
                return items[0]
        return None

    planes, rescale = [], []
    for index in range(frames):
        position = group(index, "PlanePositionSequence")
        orientation = group(index, "PlaneOrientationSequence")
        measures = group(index, "PixelMeasuresSequence")
        values = group(index, "PixelValueTransformationSequence")
        rescale.append(_rescale(values if values is not None else header, path))
        if position is None or orientation is None or measures is None:
            planes.append(None)
            continue
        merged = {"ImagePositionPatient": position.get("ImagePositionPatient"),
                  "ImageOrientationPatient": orientation.get("ImageOrientationPatient"),
                  "PixelSpacing": measures.get("PixelSpacing")}
        planes.append(_plane(merged, path))
    rescale_array = np.asarray(rescale, dtype=np.float64)
    if any(p is None for p in planes):
        return None, rescale_array
    return _stack_from_planes(planes, path), rescale_array


def _plane(header, where: str | Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float]] | None:
    """(position, orientation, (spacing i, spacing j)) of one slice, or None if a tag is missing."""
    values = []
    for name, size in (("ImagePositionPatient", 3), ("ImageOrientationPatient", 6), ("PixelSpacing", 2)):
        raw = header.get(name)
        if raw is None or len(raw) != size:
            return None
        try:
            numbers = np.array([float(v) for v in raw], dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"{where}: DICOM {name} is not numeric ({raw!r})") from None
        if not np.all(np.isfinite(numbers)):
            raise InputError(f"{where}: DICOM {name} is not finite ({raw!r})")
        values.append(numbers)
    position, orientation, pixel_spacing = values
    if np.any(pixel_spacing <= 0):
        raise InputError(f"{where}: DICOM PixelSpacing must be positive ({list(pixel_spacing)})")
    return position, orientation, (float(pixel_spacing[1]), float(pixel_spacing[0]))


def _stack_from_planes(planes: list, where: str | Path) -> Stack:
    """One orientation and pixel spacing for all slices, or the slices are not one volume."""
    positions = np.array([p[0] for p in planes])
    orientation, spacing = planes[0][1], planes[0][2]
    for _, other_orientation, other_spacing in planes[1:]:
        if np.max(np.abs(other_orientation - orientation)) > _ORIENTATION_TOLERANCE:
            raise InputError(f"{where}: DICOM slices have different orientations; not one 3D volume")
        if not np.allclose(other_spacing, spacing, rtol=1e-4, atol=0):
            raise InputError(f"{where}: DICOM slices have different pixel spacings; not one 3D volume")
    row, column = orientation[:3], orientation[3:]
    if np.linalg.norm(row) < 1e-6 or np.linalg.norm(column) < 1e-6:
        raise InputError(f"{where}: DICOM ImageOrientationPatient is degenerate ({list(orientation)})")
    row = row / np.linalg.norm(row)
    column = column - (column @ row) * row  # cosines stored with few decimals are not quite orthogonal
    if np.linalg.norm(column) < 1e-6:
        raise InputError(f"{where}: DICOM ImageOrientationPatient rows and columns are parallel")
    return Stack(positions=positions, row=row, column=column / np.linalg.norm(column), spacing=spacing)


def _rescale(header, where: str | Path) -> tuple[float, float]:
    slope = _number(header, "RescaleSlope", where)
    intercept = _number(header, "RescaleIntercept", where)
    return (1.0 if slope is None or slope == 0 else slope), (intercept or 0.0)


def _number(header, name: str, where: str | Path) -> float | None:
    raw = header.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise InputError(f"{where}: DICOM {name} is not a number ({raw!r})") from None
    if not math.isfinite(value):
        raise InputError(f"{where}: DICOM {name} is not finite ({raw!r})")
    return value


# -- the regular grid --------------------------------------------------------------------------

def plan_grid(stack: Stack, size: tuple[int, int], where: str | Path, tolerance: float) -> Grid:
    """The orthogonal regular grid covering the stack first..last slice, and how to fill it.

    ``size`` is the slices' pixel count along i and j. Deviations up to ``tolerance`` times the
    slice spacing along the normal, or IN_PLANE_TOLERANCE of a pixel in-plane, are floating-point
    and decimal-string noise: the slices are then only sorted, never interpolated.

    Uneven slices are resampled at the *median* gap between neighbouring slices, adjusted so a
    whole number of steps spans first..last slice. The median is what the scanner meant: a
    missing slice doubles one gap and leaves the median, so every acquired slice lands exactly on
    a grid plane and is copied, not interpolated; the smallest gap would instead let one
    near-duplicate slice blow the volume up many times over. The price: where a series has a
    denser part, that part is sampled at the coarser, typical spacing.
    """
    normal = stack.normal
    along = (stack.positions - stack.positions[0]) @ normal
    order = np.argsort(along, kind="stable")
    positions, along = stack.positions[order], along[order] - along[order[0]]
    count = len(order)
    gaps = np.diff(along)
    warnings: list[str] = []
    if count < 2:
        step, lower, weight = 1.0, np.zeros(1, dtype=np.int64), np.zeros(1)
    else:
        typical = float(np.median(gaps))
        if typical <= 0 or gaps.min() <= tolerance * typical:
            duplicate = float(along[int(np.argmin(gaps))])
            raise InputError(f"{where}: two DICOM slices lie at the same position ({duplicate:.4g} mm "
                             "along the slice normal); several echoes, phases or stacks in one "
                             "series are not one 3D volume")
        step, lower, weight, message = _slice_planes(along, typical, where, tolerance)
        if message:
            warnings.append(message)
    shifts, (lo_i, lo_j), (size_i, size_j), message = _in_plane_shifts(
        stack, positions, along, size, where, tolerance)
    if message:
        warnings.append(message)
    origin = positions[0] + lo_i * stack.spacing[0] * stack.row + lo_j * stack.spacing[1] * stack.column
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ np.column_stack(
        [stack.row * stack.spacing[0], stack.column * stack.spacing[1], normal * step])
    affine[:3, 3] = LPS_TO_RAS @ origin
    return Grid(shape=(size_i, size_j, len(lower)), affine=affine, order=order, lower=lower,
                weight=weight, shifts=shifts, warnings=tuple(warnings))


def _slice_planes(along: np.ndarray, typical: float, where: str | Path, tolerance: float
                  ) -> tuple[float, np.ndarray, np.ndarray, str | None]:
    """(spacing, lower slice, upper weight) of each output plane, and the warning if uneven.

    ``along``: sorted slice positions on the normal, from 0. The deviation measured is ITK's: how
    far a slice is from the regular grid through the first and last slice.
    """
    count, span = len(along), float(along[-1])
    even_step = span / (count - 1)
    deviation = float(np.max(np.abs(along - np.arange(count) * even_step)))
    if deviation <= tolerance * even_step:
        return even_step, np.arange(count), np.zeros(count), None
    planes = max(2, int(round(span / typical)) + 1)
    step = span / (planes - 1)
    targets = np.arange(planes) * step
    lower = np.clip(np.searchsorted(along, targets, side="right") - 1, 0, count - 2)
    gap = along[lower + 1] - along[lower]
    below, above = targets - along[lower], along[lower + 1] - targets
    weight = np.clip(below / gap, 0.0, 1.0)
    weight[below <= tolerance * step] = 0.0  # on an acquired slice: copy it exactly
    on_upper = above <= tolerance * step
    lower, weight = np.where(on_upper, lower + 1, lower), np.where(on_upper, 0.0, weight)
    gaps = np.diff(along)
    message = (f"{where}: DICOM slices are unevenly spaced (gaps {gaps.min():.4g} to {gaps.max():.4g} mm; "
               f"the worst slice is {deviation:.3g} mm off a regular grid: missing slices?); resampled "
               f"to {planes} slices {step:.4g} mm apart by linear interpolation along the slice normal")
    return step, lower, weight, message


def _in_plane_shifts(stack: Stack, positions: np.ndarray, along: np.ndarray, size: tuple[int, int],
                     where: str | Path, tolerance: float):
    """Where each sorted slice lands in an output grid covering all of them, and the tilt warning.

    Returns (shifts (n, 2) in output voxels, grid origin offset in voxels of slice 0, output
    size i, j, warning or None). A gantry-tilted stack drifts in-plane as it advances; the output
    grows to hold every slice whole, so no acquired pixel is cut off.
    """
    drift = positions - positions[0] - np.outer(along, stack.normal)  # in-plane part, mm
    pixels = np.column_stack([drift @ stack.row / stack.spacing[0], drift @ stack.column / stack.spacing[1]])
    if len(along) < 2 or np.max(np.abs(pixels)) <= max(tolerance, IN_PLANE_TOLERANCE):
        return np.zeros_like(pixels), (0, 0), (int(size[0]), int(size[1])), None
    low = np.floor(pixels.min(axis=0) + tolerance).astype(int)
    high = np.ceil(pixels.max(axis=0) - tolerance).astype(int)
    shifts = pixels - low
    whole = np.rint(shifts)
    shifts = np.where(np.abs(shifts - whole) <= tolerance, whole, shifts)  # exact copies where possible
    out_size = (int(size[0] + high[0] - low[0]), int(size[1] + high[1] - low[1]))
    centred = along - along.mean()
    slope = centred @ (drift - drift.mean(axis=0)) / (centred @ centred)  # mm in-plane per mm along normal
    angle = math.degrees(math.atan(float(np.linalg.norm(slope))))
    furthest = float(np.linalg.norm(drift, axis=1).max())
    message = (f"{where}: DICOM slices are stacked {angle:.3g}\N{DEGREE SIGN} off their planes' normal "
               f"(gantry tilt); each slice shifted in its plane (up to {furthest:.3g} mm) onto an "
               f"orthogonal {out_size[0]}x{out_size[1]} grid, outside filled with the image minimum")
    return shifts, (int(low[0]), int(low[1])), out_size, message


# -- pixel data --------------------------------------------------------------------------------

def rescale_frames(data: np.ndarray, applied: tuple[float, float], wanted: np.ndarray) -> np.ndarray:
    """Give each frame (axis 2) its own rescale, where the decoder applied one to all frames.

    GDCM rescales a multi-frame file with a single (slope, intercept), the first frame's; an
    Enhanced file may carry one per frame. The stored integers are recovered exactly (rounding
    undoes float32 error) and rescaled again frame by frame.
    """
    slope, intercept = applied
    if np.all(wanted == np.array([slope, intercept])):
        return data
    out = np.empty(data.shape, dtype=np.float32)
    for k in range(data.shape[2]):
        stored = data[:, :, k].astype(np.float64)
        if (slope, intercept) != (1.0, 0.0):  # rescale applies to integer stored values only
            stored = np.rint((stored - intercept) / slope)
        out[:, :, k] = stored * wanted[k, 0] + wanted[k, 1]
    return out


def regularize(data: np.ndarray, grid: Grid) -> np.ndarray:
    """The data (slices in acquisition order along axis 2) on ``grid``; logs what was resampled.

    Where a tilted slice does not reach, the output holds the image minimum: air on CT, the
    background on MR, so the padding reads as "nothing there" to windows and thresholds alike.
    """
    for message in grid.warnings:
        log.warning(message)
    if not np.array_equal(grid.order, np.arange(len(grid.order))):
        data = data[:, :, grid.order]
    if not grid.resamples:
        return data
    fill = float(data.min()) if data.size else 0.0
    out = np.empty(grid.shape, dtype=np.float32)
    placed: dict[int, np.ndarray] = {}

    def plane(k: int) -> np.ndarray:
        if k not in placed:
            if len(placed) > 2:  # output planes walk up the stack: keep the last few only
                placed.pop(min(placed))
            placed[k] = _place(data[:, :, k], grid.shifts[k], grid.shape[:2], fill)
        return placed[k]

    for m, (k, w) in enumerate(zip(grid.lower, grid.weight)):
        out[:, :, m] = plane(int(k)) if w == 0 else (1.0 - w) * plane(int(k)) + w * plane(int(k) + 1)
    return out


def _place(slice_: np.ndarray, shift: np.ndarray, shape: tuple[int, ...], fill: float) -> np.ndarray:
    """One slice moved by ``shift`` voxels into a ``shape`` plane (bilinear, ``fill`` outside)."""
    if shape == slice_.shape and not np.any(shift):
        return slice_
    from scipy import ndimage

    return ndimage.affine_transform(slice_, np.ones(2), offset=-np.asarray(shift, dtype=np.float64),
                                    output_shape=tuple(shape), order=1, mode="constant", cval=fill,
                                    output=np.float32)

