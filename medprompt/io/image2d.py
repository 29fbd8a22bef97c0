"""2D images in (PNG, JPEG, TIFF, BMP, 2D DICOM, 2D NIfTI, 2D NRRD) and 2D label maps out (PNG or NIfTI).

Chest X-rays, ultrasound and single MR/CT slices arrive as pictures or single DICOM files, not as
volumes. Every reader here returns an :class:`Image2D`: the pixels as a person looks at them
(row 0 at the top), grey (H, W) or colour (H, W, 3), the physical pixel size where the file knows
it, and the modality where it declares one. Label maps are written on the same pixel grid, as a
uint8 PNG with a JSON sidecar or, when the output name ends in .nii/.nii.gz, as a NIfTI on the
input's own grid (a 2D NIfTI's affine is kept, so the mask overlays the slice in any viewer). A label
map comes back in from a PNG, or from the NIfTI/NRRD 3D Slicer saves on the grid ITK reads the image on.

Colour is kept only where it carries information: an RGB file whose three channels are equal
(most ultrasound and X-ray exports) is read as grey; palette images become RGB, alpha is dropped.
Problems are one-line :class:`InputError` s naming the file, as for volumes.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from medprompt.errors import InputError, one_line, shown
from medprompt.io import dicom
from medprompt.io.volume import (NIFTI_SUFFIXES, NRRD_SUFFIXES, atomic_write, looks_like_hu, max_voxels,
                                 nrrd_space_flips, ras_affine, write_json, _validated_names)

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
LABEL_SUFFIXES = (".png",) + NIFTI_SUFFIXES
# Modality families the 2D attribute prior knows (prompts/*.yaml, ``image2d.modalities``).
MODALITY_FAMILY = {"CR": "XR", "DX": "XR", "RF": "XR", "XA": "XR", "MG": "MG", "US": "US", "MR": "MR", "CT": "CT"}
GREY_TOLERANCE = 0.02  # of the value range: channel differences below this on 99 % of pixels are noise, not colour
MIN_SIDE = 8  # pixels: anything narrower is a strip or a thumbnail, not an image to segment
# 16-bit pictures cannot hold negative values: CT slices saved as 16-bit PNG/TIFF store HU + 32768
# (DeepLesion's convention). The lowest value a CT stores is its padding, -3024 HU at most.
HU_PICTURE_OFFSET = 32768
LOWEST_HU = -3100
# HU + 1024 (another habit) cannot be told from a 12-bit MR's or X-ray's values, so a set stored that way
# says so: MEDPROMPT_PICTURE_HU_OFFSET=1024 reads its 16-bit grey pictures as HU = value - 1024.
ENV_PICTURE_HU_OFFSET = "MEDPROMPT_PICTURE_HU_OFFSET"
ITK_FLIPS = np.array([-1.0, -1.0, 1.0])  # ITK's world (LPS) -> RAS: how ITK places a picture or a 2D grid


@dataclass
class Image2D:
    """One 2D image as displayed: ``pixels`` (H, W) grey or (H, W, 3) RGB, float32.

    ``pixel_mm`` is (row, column) spacing in mm, (1, 1) when the file does not say
    (``spacing_known`` False). ``nifti`` keeps a NIfTI input's affine and stored layout, so a label
    map can be written back onto the stored grid.
    """

    pixels: np.ndarray
    source: str
    modality: str | None = None
    pixel_mm: tuple[float, float] = (1.0, 1.0)
    spacing_known: bool = False
    affine: np.ndarray | None = None  # voxel (i, j, k) -> RAS mm of the stored grid, where known
    stored: "_Stored | None" = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])

    @property
    def is_rgb(self) -> bool:
        return self.pixels.ndim == 3

    @property
    def family(self) -> str | None:
        """XR, US, MR, CT, MG, or None when the file declares no modality."""
        return MODALITY_FAMILY.get((self.modality or "").upper(), (self.modality or "").upper() or None)

    def grey(self) -> np.ndarray:
        """Luminance (ITU-R BT.601) of an RGB image; the pixels of a grey one."""
        if not self.is_rgb:
            return self.pixels
        return self.pixels @ np.array([0.299, 0.587, 0.114], np.float32)


@dataclass(frozen=True)
class _Stored:
    """How the displayed (rows, cols) grid maps back to a NIfTI's stored array."""

    shape: tuple[int, ...]
    transpose: bool
    flip_rows: bool
    flip_cols: bool


# -- what is 2D ------------------------------------------------------------------------------------

def is_image2d(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file the 2D readers take: a picture, a 2D DICOM file, a 2D NIfTI or a 2D NRRD
    (3D Slicer saves a 2D study as an NRRD of X x Y x 1).

    A DICOM file counts as 2D when its modality is a projection/2D one (CR, DX, US, MG, ...), when it
    is colour, or when it is the only file of its series in its folder (``io.dicom.is_2d_file``); a
    CT/MR file among others of its series is a slice of a volume and stays with the volume readers.
    """
    path = Path(path)
    try:
        if not path.is_file():
            return False
    except (OSError, ValueError):  # a name too long or holding NUL: no file; the caller's reader says so
        return False
    name = path.name.lower()
    if name.endswith(PICTURE_SUFFIXES):
        return True
    if name.endswith(NIFTI_SUFFIXES):
        try:
            shape = nib.load(str(path)).shape
        except Exception:  # unreadable: the volume reader names the problem
            return False
        return _nifti_is_2d(shape)
    if name.endswith(NRRD_SUFFIXES):
        import nrrd

        try:
            return _nrrd2d_layout(nrrd.read_header(str(path))) is not None
        except Exception:  # unreadable: the volume reader names the problem
            return False
    return dicom.is_dicom_file(path) and dicom.is_2d_file(path)


def find_images2d(folder: str | os.PathLike) -> list[Path]:
    """The 2D image files directly in ``folder`` (pictures, 2D DICOM files, 2D NIfTI and NRRD), sorted."""
    folder = Path(folder)
    return [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".") and is_image2d(p)]


def image_stem(path: str | os.PathLike) -> str:
    """File name without its image (or label) suffix (``cxr.nii.gz`` -> ``cxr``, ``us.png`` -> ``us``,
    ``cxr.nrrd``, 3D Slicer's correction of ``cxr.png`` -> ``cxr``)."""
    name = Path(path).name
    for suffix in sorted(PICTURE_SUFFIXES + NIFTI_SUFFIXES + NRRD_SUFFIXES + (".dcm",), key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _nifti_is_2d(shape: tuple[int, ...]) -> bool:
    return len(squeezed_shape(shape)) == 2


# -- readers ---------------------------------------------------------------------------------------

def load_image2d(path: str | os.PathLike, *, stored_values: bool = False) -> Image2D:
    """Read one 2D image; InputError naming the file and the problem otherwise. ``stored_values``: a 16-bit
    picture's values as stored, never read as HU (a label map's class values)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file (a 2D image is one file)")
    name = path.name.lower()
    try:
        if name.endswith(PICTURE_SUFFIXES):
            image = _read_picture(path, stored_values)
        elif name.endswith(NIFTI_SUFFIXES):
            image = _read_nifti2d(path)
        elif name.endswith(NRRD_SUFFIXES):
            image = _read_nrrd2d(path)
        elif dicom.is_dicom_file(path):
            image = _read_dicom2d(path)
        else:
            raise InputError(f"{path}: unknown 2D image type (expected .png, .jpg, .tif, .bmp, a 2D DICOM "
                             "file, a 2D NIfTI or a 2D NRRD)")
    except InputError:
        raise
    except MemoryError:
        raise InputError(f"{path}: too large to read into memory") from None
    except Exception as error:  # decoders raise anything from OSError to struct.error on damaged files
        raise InputError(f"{path}: cannot read the image ({one_line(error)})") from None
    return _checked(image, path)


def _checked(image: Image2D, path: Path) -> Image2D:
    h, w = image.shape
    if min(h, w) < MIN_SIDE:
        raise InputError(f"{path}: is {h}x{w} pixels; a 2D image needs at least {MIN_SIDE} pixels per side")
    pixels = np.asarray(image.pixels)
    if not (np.issubdtype(pixels.dtype, np.number) or pixels.dtype == np.bool_) or np.iscomplexobj(pixels):
        raise InputError(f"{path}: pixel data is not real numbers (dtype {pixels.dtype})")
    if pixels.dtype.itemsize > 4 and np.issubdtype(pixels.dtype, np.floating):
        top = float(np.max(np.abs(pixels), initial=0.0, where=np.isfinite(pixels)))
        if top > np.finfo(np.float32).max:
            raise InputError(f"{path}: pixel values up to {top:.3g} are beyond float32's range")
    pixels = pixels.astype(np.float32)
    bad = ~np.isfinite(pixels)
    if bad.all():
        raise InputError(f"{path}: no pixel has a finite value")
    if bad.any():
        pixels[bad] = pixels[~bad].min()
    if pixels.ndim == 3:
        if pixels.shape[2] not in (3, 4):
            raise InputError(f"{path}: has {pixels.shape[2]} channels; grey or RGB is needed")
        pixels = pixels[:, :, :3]
        # R = G = B up to rounding and JPEG's chroma noise: grey stored as RGB (a grey FLAIR must not be
        # read as an RGB composite of three sequences).
        spread = np.ptp(pixels, axis=2)
        span = float(np.ptp(pixels)) or 1.0
        if float(np.percentile(spread, 99)) <= max(1.0, GREY_TOLERANCE * span):
            pixels = pixels.mean(axis=2)
    if not all(np.isfinite(v) and 1e-4 <= v <= 1e3 for v in image.pixel_mm):
        raise InputError(f"{path}: pixel spacing {shown(image.pixel_mm)} mm is not that of an image")
    if image.modality is None and pixels.ndim == 2 and looks_like_hu(pixels):
        # A CT slice in Hounsfield units that does not say so (a NIfTI has no modality field): read as
        # CT, as a volume is (medprompt.prior.landmarks.guess_modality), so LiteMedSAM sees it through
        # a CT window, not stretched from air to bone by percentiles.
        image.modality = "CT"
    image.pixels = np.ascontiguousarray(pixels)
    return image


def _check_pixels(path: Path, count: int) -> None:
    limit = max_voxels()
    if count > limit:
        raise InputError(f"{path}: declares {count:,} pixels, above the limit of {limit:,} (MEDPROMPT_MAX_VOXELS)")


def _read_picture(path: Path, stored_values: bool = False) -> Image2D:
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            _check_pixels(path, im.size[0] * im.size[1])
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                raise InputError(f"{path}: holds {frames} frames; one 2D image is needed")
            mode = im.mode
            if mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBA", "RGBX", "LA", "La", "RGBa"):
                im = im.convert("RGB" if mode not in ("LA", "La") else "L")
            elif mode == "1":
                im = im.convert("L")
            pixels = np.asarray(im)
    if pixels.ndim == 2 and pixels.dtype.byteorder == ">":  # I;16B
        pixels = pixels.astype(pixels.dtype.newbyteorder("="))
    hu = None if stored_values else hu_of_picture(pixels)
    if hu is not None:
        return Image2D(pixels=hu, source=str(path), modality="CT")
    return Image2D(pixels=pixels, source=str(path))


def hu_of_picture(pixels: np.ndarray) -> np.ndarray | None:
    """A 16-bit grey picture's Hounsfield units when it stores a CT slice as HU + 32768 (or HU + the offset
    ``MEDPROMPT_PICTURE_HU_OFFSET`` names), else None.

    Such a slice read as it is would be stretched by percentiles from air to bone, as a picture of
    anything; shifted back it is a CT in HU and gets LiteMedSAM's CT window. HU + 32768 is unambiguous:
    an MR's, an X-ray's or a windowed picture's background lies near 0, never all values within about
    3000 of 32768 with air at 32768 - 1000. HU + 1024, the other habit, is not: an unsigned 12-bit MR or
    X-ray holds the same values, so it is read only when the setting names it, for every 16-bit grey picture
    whose values read as HU once shifted (a set of CT slices, not a folder mixing them with 12-bit MR)."""
    if pixels.ndim != 2 or pixels.dtype != np.uint16:
        return None
    for offset in dict.fromkeys((HU_PICTURE_OFFSET, picture_hu_offset())):
        if offset is not None and int(pixels.min()) >= offset + LOWEST_HU:
            hu = pixels.astype(np.int32) - offset
            if looks_like_hu(hu):
                return hu
    return None


def picture_hu_offset() -> int | None:
    """The offset ``MEDPROMPT_PICTURE_HU_OFFSET`` says a set's 16-bit CT pictures store HU with (None: unset);
    InputError when it is not a whole number from 0 to 65535."""
    raw = os.environ.get(ENV_PICTURE_HU_OFFSET, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) > 65535:
        raise InputError(f"{ENV_PICTURE_HU_OFFSET}={shown(raw)}: expected a whole number from 0 to 65535 "
                         "(the value a 16-bit picture stores for 0 HU, e.g. 1024)")
    return int(raw)


def _read_nifti2d(path: Path) -> Image2D:
    image = nib.load(str(path))
    shape = tuple(int(n) for n in image.shape)
    if not _nifti_is_2d(shape):
        raise InputError(f"{path}: is {'x'.join(map(str, shape))}; a 2D image (X x Y, or X x Y x 1) is needed")
    _check_pixels(path, int(np.prod(shape)))
    dtype = image.get_data_dtype()
    data = np.asanyarray(image.dataobj)
    if dtype.fields is not None:  # RGB24 / RGBA32: structured voxels -> channels
        data = np.stack([data[name] for name in list(dtype.names)[:3]], axis=-1)
        data = data.reshape(shape[0], shape[1], 3)
    else:
        data = data.reshape(shape[0], shape[1])
    return _on_plane(data, np.asarray(image.affine, np.float64), shape, path, _modality_from_intent(image))


def _on_plane(data: np.ndarray, affine: np.ndarray, stored: tuple[int, ...], path: Path,
              modality: str | None) -> Image2D:
    """A stored (i, j[, colour]) plane with its voxel -> RAS affine, shown as a person looks at it: an axial
    plane in radiological view, any other as stored (``PlaneMap``); ``stored`` is the file's grid."""
    from medprompt.sam.interactive import PlaneMap

    plane = PlaneMap.for_affine(affine)
    view = plane.to_view(data) if data.ndim == 2 else np.stack([plane.to_view(data[..., c]) for c in range(3)], -1)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    pixel_mm = (float(spacing[0]), float(spacing[1])) if plane.transpose else (float(spacing[1]), float(spacing[0]))
    return Image2D(pixels=np.ascontiguousarray(view), source=str(path), modality=modality, pixel_mm=pixel_mm,
                   spacing_known=True, affine=affine,
                   stored=_Stored(shape=tuple(stored), transpose=plane.transpose, flip_rows=plane.flip_rows,
                                  flip_cols=plane.flip_cols))


def _nrrd2d_layout(header: dict) -> tuple[list[int], int | None] | None:
    """(the two spatial axes of size > 1, the colour axis or None) of a 2D NRRD's header, else None.

    Spatial axes are those with a space direction, or without directions those of kind ``domain`` / ``space``
    (or no kind); a non-spatial axis of 3 or 4 values is colour (``kinds: RGB-color``); any other axis must
    hold one value."""
    sizes = [int(n) for n in header.get("sizes", ())]
    directions = header.get("space directions")
    if directions is None:
        kinds = [str(k).lower() for k in header.get("kinds", ["domain"] * len(sizes))]
        spatial = [i for i in range(len(sizes)) if i >= len(kinds) or kinds[i] in ("domain", "space", "???", "none")]
    else:
        spatial = [i for i, row in enumerate(np.asarray(directions, dtype=np.float64)) if np.all(np.isfinite(row))]
    planar = [i for i in spatial if sizes[i] > 1]
    others = [i for i in range(len(sizes)) if i not in spatial and sizes[i] > 1]
    if len(planar) != 2 or len(others) > 1 or (others and sizes[others[0]] not in (3, 4)):
        return None
    return planar, (others[0] if others else None)


def _read_nrrd2d(path: Path) -> Image2D:
    """A 2D NRRD as 3D Slicer (X x Y x 1 in LPS) or ITK (a 2D space) writes one, shown as a 2D NIfTI is:
    axial planes in radiological view, others as stored; a grid without directions, or with directions in a
    2D space, as ITK reads it (LPS), a 3D space as the volume reader takes it (``io.volume.nrrd_space_flips``)."""
    import nrrd

    from medprompt.io.volume import _nrrd_payload

    with open(path, "rb") as handle:
        header = nrrd.read_header(handle)
        _check_pixels(path, int(np.prod([int(n) for n in header.get("sizes", ())])))
        layout = _nrrd2d_layout(header)
        if layout is None:
            raise InputError(f"{path}: is {'x'.join(str(n) for n in header.get('sizes', ()))}; a 2D image "
                             "(X x Y, or X x Y x 1) is needed")
        data = nrrd.read_data(*_nrrd_payload(path, header, handle), str(path))
    (ax_i, ax_j), colour = layout
    directions = header.get("space directions")
    matrix = np.eye(3)
    if directions is None:
        spacings = np.asarray(header.get("spacings", [1.0] * data.ndim), dtype=np.float64)
        matrix[0, 0], matrix[1, 1] = spacings[ax_i], spacings[ax_j]
        origin, flips = np.zeros(3), ITK_FLIPS
    else:
        rows = np.asarray(directions, dtype=np.float64)
        space_dim = rows.shape[1]
        matrix[:space_dim, 0], matrix[:space_dim, 1] = rows[ax_i], rows[ax_j]
        depth = [i for i, row in enumerate(rows) if i not in (ax_i, ax_j) and np.all(np.isfinite(row))]
        if space_dim == 3 and depth:  # Slicer's X x Y x 1: the slice's own step
            matrix[:, 2] = rows[depth[0]]
        elif space_dim == 3:  # no third axis: the plane's normal, one pixel deep
            normal = np.cross(matrix[:, 0], matrix[:, 1])
            matrix[:, 2] = normal / (np.linalg.norm(normal) or 1.0) * min(np.linalg.norm(matrix[:, :2], axis=0))
        origin = np.zeros(3)
        origin[:space_dim] = np.asarray(header.get("space origin", np.zeros(space_dim)), dtype=np.float64)
        flips = nrrd_space_flips(header, path) if space_dim == 3 else ITK_FLIPS
    affine = ras_affine(flips, matrix, origin)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{path}: its space directions and origin are not a pixel grid (not finite, or degenerate)")
    # The plane as (i, j[, colour]); the stored grid a label is written back on is the spatial axes' (X x Y x 1).
    plane = data[tuple(slice(None) if i in (ax_i, ax_j, colour) else 0 for i in range(data.ndim))]
    kept = [i for i in range(data.ndim) if i in (ax_i, ax_j, colour)]
    order = [kept.index(ax_i), kept.index(ax_j)] + ([kept.index(colour)] if colour is not None else [])
    plane = np.transpose(plane, order)
    if colour is not None:
        plane = plane[..., :3]  # RGBA: alpha dropped, as for pictures
    return _on_plane(plane, affine, (plane.shape[0], plane.shape[1], 1), path, None)


def _modality_from_intent(image: nib.Nifti1Image) -> str | None:
    """A NIfTI says nothing of modality; a description naming one (as some converters write) is used."""
    try:
        # The field is 80 bytes padded with NULs, which str.split would keep in the last word.
        text = image.header["descrip"].tobytes().split(b"\0")[0].decode("ascii", "ignore").upper()
    except Exception:
        return None
    for token in text.replace("_", " ").split():
        if token in MODALITY_FAMILY:
            return token
    return None


def _read_dicom2d(path: Path) -> Image2D:
    import pydicom
    from pydicom.pixel_data_handlers.util import apply_modality_lut, convert_color_space

    with dicom.header_errors(path):
        ds = pydicom.dcmread(str(path), force=True)
    if "PixelData" not in ds:
        raise InputError(f"{path}: DICOM file holds no pixel data")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    _check_pixels(path, rows * cols * max(1, dicom.frame_count(ds)))
    frames = dicom.frame_count(ds)
    if frames > 1:
        raise InputError(f"{path}: is a multi-frame DICOM ({frames} frames, e.g. a cine loop); one 2D image is needed")
    dicom.check_pixel_bytes(path)
    pixels = ds.pixel_array
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples == 3:
        compressed = ds.file_meta.TransferSyntaxUID.is_compressed if "TransferSyntaxUID" in ds.file_meta else False
        if photometric.startswith("YBR") and not compressed:
            pixels = convert_color_space(pixels, photometric, "RGB")
        pixels = pixels.astype(np.float32)
    else:
        pixels = apply_modality_lut(pixels, ds).astype(np.float32)
        if photometric == "MONOCHROME1":  # low values are white: invert so that dense/bright is high
            pixels = pixels.max() + pixels.min() - pixels
    spacing, known = _dicom_spacing(ds, path)
    modality = str(ds.get("Modality", "") or "").strip().upper() or None
    return Image2D(pixels=pixels, source=str(path), modality=modality, pixel_mm=spacing, spacing_known=known,
                   affine=_dicom_affine(ds, spacing))


def _dicom_spacing(ds, path: Path) -> tuple[tuple[float, float], bool]:
    """(row, column) mm: PixelSpacing, else ImagerPixelSpacing (projection images), else the
    ultrasound region's physical deltas (cm per pixel); (1, 1) and unknown otherwise."""
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(tag)
        if value is not None:
            try:
                row, col = (float(v) for v in list(value)[:2])
            except (TypeError, ValueError):
                raise InputError(f"{path}: DICOM {tag} {shown(str(value))} is not two numbers") from None
            return (row, col), True
    regions = ds.get("SequenceOfUltrasoundRegions")
    if regions:
        region = regions[0]
        units_x, units_y = region.get("PhysicalUnitsXDirection"), region.get("PhysicalUnitsYDirection")
        dx, dy = region.get("PhysicalDeltaX"), region.get("PhysicalDeltaY")
        if units_x == 3 and units_y == 3 and dx and dy:  # 3 = cm
            return (abs(float(dy)) * 10.0, abs(float(dx)) * 10.0), True
    return (1.0, 1.0), False


def _dicom_affine(ds, spacing: tuple[float, float]) -> np.ndarray | None:
    """Voxel (column i, row j, 0) -> RAS mm from ImageOrientation/PositionPatient, where the file has them."""
    iop, ipp = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
    if iop is None or ipp is None:
        return None
    try:
        iop = np.asarray([float(v) for v in iop], np.float64)
        ipp = np.asarray([float(v) for v in ipp], np.float64)
    except (TypeError, ValueError):
        return None
    if iop.shape != (6,) or ipp.shape != (3,):
        return None
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    affine = np.eye(4)
    affine[:3, 0] = dicom.LPS_TO_RAS @ row_dir * spacing[1]
    affine[:3, 1] = dicom.LPS_TO_RAS @ col_dir * spacing[0]
    affine[:3, 2] = dicom.LPS_TO_RAS @ normal
    affine[:3, 3] = dicom.LPS_TO_RAS @ ipp
    return affine


# -- writers ---------------------------------------------------------------------------------------

def save_label2d(path: str | os.PathLike, labels: np.ndarray, image: Image2D, names: dict[str, int],
                 extra: dict | None = None) -> Path:
    """Write a 2D label map on ``image``'s grid plus its JSON sidecar; returns the sidecar path.

    ``.png``: uint8 class indices, as displayed. ``.nii``/``.nii.gz``: on the input's stored grid and
    affine for a NIfTI input, else (columns, rows, 1) with the DICOM's affine or the pixel spacing.
    Both files are written to a temporary name and renamed into place.
    """
    path = Path(path)
    lower = path.name.lower()
    if not lower.endswith(LABEL_SUFFIXES):
        raise InputError(f"{path}: a 2D label map is written as .png, .nii or .nii.gz")
    labels = np.asarray(labels)
    if labels.shape != image.shape:
        raise ValueError(f"label map {labels.shape} does not match the image {image.shape}")
    names = _validated_names(names, where="names")
    path.parent.mkdir(parents=True, exist_ok=True)
    if lower.endswith(".png"):
        if labels.size and int(labels.max()) > 255:
            raise InputError(f"{path}: {int(labels.max())} classes do not fit a PNG label map (255 at most); "
                             "write .nii.gz")
        from PIL import Image

        data = labels.astype(np.uint8)
        atomic_write(path, lambda tmp: Image.fromarray(data, mode="L").save(tmp, format="PNG"))
    else:
        data, affine = to_stored(labels, image)
        top = int(data.max()) if data.size else 0
        nifti = nib.Nifti1Image(data.astype(np.uint8 if top < 256 else np.uint16), affine)
        nifti.set_qform(affine, code=1)
        nifti.set_sform(affine, code=1)
        atomic_write(path, lambda tmp: nib.save(nifti, tmp))
    meta = {"shape": list(image.shape), "pixel_mm": list(image.pixel_mm) if image.spacing_known else None}
    return write_json(label2d_sidecar(path), {"labels": names, **(extra or {}), "image": meta})


def label2d_sidecar(path: str | os.PathLike) -> Path:
    """``lungs.png`` / ``lungs.nii.gz`` -> ``lungs.json``: where a 2D label map's class names live."""
    path = Path(path)
    return path.with_name(image_stem(path) + ".json")


def to_stored(labels: np.ndarray, image: Image2D) -> tuple[np.ndarray, np.ndarray]:
    """A displayed (rows, cols) label map as an (X, Y[, 1]) array and its voxel -> RAS affine on the grid ITK
    (so 3D Slicer) reads ``image`` on: a NIfTI's stored grid and affine, a DICOM's own geometry, and for a
    picture (or a DICOM without position) origin 0, the pixel spacing and identity LPS directions, which
    in RAS flip the first two axes. A label written so overlays the image it was drawn on in Slicer."""
    if image.stored is not None and image.affine is not None:
        s = image.stored
        view = labels[::-1 if s.flip_rows else 1, ::-1 if s.flip_cols else 1]
        return np.ascontiguousarray(view if s.transpose else view.T).reshape(s.shape), image.affine
    affine = image.affine if image.affine is not None else np.diag([-image.pixel_mm[1], -image.pixel_mm[0], 1.0, 1.0])
    return np.ascontiguousarray(labels.T)[:, :, None], affine


def load_label2d(path: str | os.PathLike, image: Image2D | None = None) -> tuple[np.ndarray, dict[str, int] | None]:
    """A 2D label map as displayed (rows, cols) and the names of its sidecar (None without one).

    A PNG is read as displayed. A NIfTI or NRRD label, as 3D Slicer saves a correction of a 2D study, lies
    on the grid ITK reads ``image`` on (:func:`to_stored`) and is turned back to the image's rows and
    columns from it. With ``image``, a label of any format that does not fit it is an InputError naming
    both sizes. Without ``image`` a NIfTI or NRRD label is displayed by its own geometry, as the image it was
    drawn on is (an NRRD without directions as ITK lays out a picture: columns x rows)."""
    path = Path(path)
    name = path.name.lower()
    if image is not None and name.endswith(NRRD_SUFFIXES + NIFTI_SUFFIXES):
        labels = from_stored(read_label_grid(path), image, path)
    else:
        label_image = load_image2d(path, stored_values=True)
        if label_image.is_rgb:
            raise InputError(f"{path}: a label map is one channel of class values, not a colour image")
        labels = class_values(label_image.pixels, path)
        if image is not None and labels.shape != image.shape:
            raise InputError(f"{path}: the label is {labels.shape[0]}x{labels.shape[1]} pixels but its image is "
                             f"{image.shape[0]}x{image.shape[1]} (rows x columns): save it on the image's own grid")
    return labels.astype(np.int32), label2d_names(path)


def label2d_names(path: str | os.PathLike) -> dict[str, int] | None:
    """The class names of a 2D label map's sidecar (:func:`label2d_sidecar`), None without one."""
    from medprompt.io.volume import read_label_names

    sidecar = label2d_sidecar(path)
    return read_label_names(sidecar) if sidecar.is_file() else None


def from_stored(data: np.ndarray, image: Image2D, path: Path) -> np.ndarray:
    """Inverse of :func:`to_stored`: a label array on ``image``'s ITK grid -> displayed (rows, cols).
    InputError naming both sizes when the grid is another."""
    grid = squeezed_shape(data.shape)
    data = data.reshape(grid)
    if image.stored is not None:
        s = image.stored
        expected = squeezed_shape(s.shape)
        if grid != expected:
            raise InputError(f"{path}: the label's grid {'x'.join(map(str, grid))} is not its image's "
                             f"{'x'.join(map(str, expected))}: save it on the image's own grid")
        view = data if s.transpose else data.T
        return np.ascontiguousarray(view[::-1 if s.flip_rows else 1, ::-1 if s.flip_cols else 1])
    if len(grid) != 2:
        raise InputError(f"{path}: is {'x'.join(map(str, grid))}; a 2D label map (X x Y, or X x Y x 1) is needed")
    if grid != (image.shape[1], image.shape[0]):
        rows, cols = image.shape
        raise InputError(f"{path}: the label's grid {'x'.join(map(str, grid))} is not its image's {cols}x{rows} "
                         f"(columns x rows of a {rows}x{cols} image): save it on the image's own grid")
    return np.ascontiguousarray(data.T)


def read_label_grid(path: str | os.PathLike) -> np.ndarray:
    """The stored array of a NIfTI/NRRD label of a 2D study (the volume reader wants 3D), checked to be
    class values: whole numbers >= 0 in one channel. InputError naming the file and the problem otherwise."""
    path = Path(path)
    try:
        if path.name.lower().endswith(".nrrd"):
            import nrrd

            from medprompt.io.volume import _nrrd_payload

            with open(path, "rb") as handle:  # an uploaded label: its data file and inflated size are bounded
                header = nrrd.read_header(handle)
                _check_pixels(path, int(np.prod([int(n) for n in header.get("sizes", ())])))
                data = nrrd.read_data(*_nrrd_payload(path, header, handle), str(path))
        else:
            nifti = nib.load(str(path))
            _check_pixels(path, int(np.prod([int(n) for n in nifti.shape])))
            data = np.asanyarray(nifti.dataobj)
    except InputError:
        raise
    except Exception as error:  # readers raise anything from OSError to struct.error on damaged files
        raise InputError(f"{path}: cannot read the label file ({one_line(error)})") from None
    return class_values(data, path)


def class_values(data: np.ndarray, path: Path) -> np.ndarray:
    """``data`` when it is a map of class values (real whole numbers >= 0), else InputError naming the file."""
    if data.dtype.fields is not None or not (np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_) \
            or np.iscomplexobj(data):
        raise InputError(f"{path}: the label is not a map of class values (dtype {data.dtype})")
    if data.size and (not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)) or data.min() < 0):
        raise InputError(f"{path}: not a label map (values are not whole numbers >= 0)")
    return data


def squeezed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape without its trailing axes of one (a 2D map stored as X x Y x 1)."""
    shape = tuple(int(n) for n in shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape
