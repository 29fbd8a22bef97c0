"""DICOM series for a PACS: a volume written as one CT/MR file per slice, and anonymised files made storable.

A PACS stores instances by their Study/Series/SOP Instance UIDs and refuses files without them;
exports that blank every UID (like the shared real CT) are given stable ones here, derived from the
folder and file, with the pixel data copied untouched (still JPEG 2000 or whatever it was).
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Iterable

import numpy as np

from medprompt.io.dicom import LPS_TO_RAS
from medprompt.io.volume import Volume

# DICOM storage classes of what we write.
SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root for generated UIDs


def uid(*parts: str) -> str:
    """A UID that is the same for the same ``parts`` (a re-upload stores the same instances)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=UID_ROOT, entropy_srcs=[str(p) for p in parts]))


def write_series(volume: Volume, folder: str | os.PathLike, *, study_uid: str, series_uid: str,
                 description: str, patient: str, modality: str | None = None) -> list[Path]:
    """Write ``volume`` as a DICOM series, one uncompressed 16-bit file per k-slice; returns the files.

    Voxel values are rounded to whole numbers (HU for CT) and stored with a rescale slope when they
    do not fit int16. The grid (spacing, orientation, slice positions) is the volume's own, so the
    series reads back (``load_volume``) onto the same voxels and affine.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    modality = (modality or volume.modality or "CT").upper()
    data = np.asarray(volume.data, dtype=np.float64)
    if data.ndim != 3:
        raise ValueError(f"a series needs a 3D volume, got shape {data.shape}")
    top = float(np.abs(data).max()) if data.size else 0.0
    slope = 1.0 if top <= 32767 else top / 32767
    stored = np.round(data / slope).astype(np.int16)
    lps = LPS_TO_RAS @ np.asarray(volume.affine, dtype=np.float64)[:3]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    directions = lps[:, :3] / spacing
    now = datetime.now()
    frame_of_reference = uid(study_uid, "frame")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SOP_CLASS.get(modality, SOP_CLASS["CT"])
        meta.MediaStorageSOPInstanceUID = uid(series_uid, str(k))
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_of_reference
        ds.Modality, ds.SeriesDescription, ds.StudyDescription = modality, description, description
        ds.PatientName, ds.PatientID = patient, patient
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber, ds.AccessionNumber = "1", 1, k + 1, ""
        ds.ImagePositionPatient = [f"{v:.6f}" for v in lps[:, 3] + lps[:, 2] * k]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in np.r_[directions[:, 0], directions[:, 1]]]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # row spacing (along j), column spacing (i)
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = "0", f"{slope:.8g}"
        if modality == "CT":
            ds.RescaleType, ds.WindowCenter, ds.WindowWidth = "HU", "40", "400"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = folder / f"slice{k:04d}.dcm"
        ds.save_as(str(path), write_like_original=False)
        files.append(path)
    return files


def storable(files: Iterable[str | os.PathLike], out: str | os.PathLike) -> list[Path]:
    """``files`` with blank Study/Series/SOP UIDs given stable ones (copies in ``out``); others as they are.

    Files of one folder without a SeriesInstanceUID become one series (and one study) of that folder.
    """
    import pydicom

    out = Path(out)
    result = []
    for file in map(Path, files):
        ds = pydicom.dcmread(str(file))
        meta = getattr(ds, "file_meta", None)
        folder = str(file.resolve().parent)
        fixes = {}
        if not str(ds.get("StudyInstanceUID", "") or ""):
            fixes["StudyInstanceUID"] = uid(folder, "study")
        if not str(ds.get("SeriesInstanceUID", "") or ""):
            fixes["SeriesInstanceUID"] = uid(folder, "series")
        if not str(ds.get("SOPInstanceUID", "") or ""):
            stored = str(getattr(meta, "MediaStorageSOPInstanceUID", "") or "")
            fixes["SOPInstanceUID"] = stored or uid(str(file.resolve()))
        if not str(ds.get("SOPClassUID", "") or "") and getattr(meta, "MediaStorageSOPClassUID", None):
            fixes["SOPClassUID"] = str(meta.MediaStorageSOPClassUID)
        if not fixes:
            result.append(file)
            continue
        for keyword, value in fixes.items():
            setattr(ds, keyword, value)
        if meta is not None:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        target = out / fixes.get("SeriesInstanceUID", str(ds.SeriesInstanceUID)) / f"{ds.SOPInstanceUID}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(str(target))  # pixel data as it was (still compressed)
        result.append(target)
    return result
