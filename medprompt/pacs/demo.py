"""``medprompt pacs-demo``: a private Orthanc holding phantoms (or a folder of DICOM), served by the app for OHIF.

Two commands from a fresh clone reach OHIF: ``scripts/setup.sh`` and this. Orthanc's database
lives in a folder it names (``./pacs_demo`` by default), so a second run finds the studies and the
corrections (DICOM SEGs) of the first; Ctrl-C stops the server and then Orthanc.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from medprompt.errors import InputError
from medprompt.pacs.client import CACHE_ENV
from medprompt.pacs.export import storable, uid, write_series
from medprompt.pacs.orthanc import Orthanc

DEMO_DIR = Path("pacs_demo")
PHANTOMS = 4


def phantom_series(folder: Path, n: int = PHANTOMS, seed: int = 0) -> list[Path]:
    """``n`` phantoms (as ``medprompt sample-data`` makes them) written as DICOM CT series, one study each."""
    from medprompt.phantoms import make_phantom

    files: list[Path] = []
    for index in range(n):
        volume, _, _ = make_phantom(seed + index)
        study = uid("medprompt-phantom", str(seed + index))
        files += write_series(volume, folder / f"phantom_{index:03d}", study_uid=study,
                              series_uid=uid(study, "series"), description=f"MedPrompt phantom {index}",
                              patient=f"PHANTOM_{index:03d}", modality="CT")
    return files


def dicom_files(folder: Path) -> list[Path]:
    """Every DICOM file under ``folder`` (any name; recognised by the DICM preamble or a readable header)."""
    import pydicom

    if not folder.is_dir():
        raise InputError(f"--dicom {folder}: not a folder")
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SOPClassUID"])
        except Exception:  # not DICOM (a README, a NIfTI): skipped
            continue
        found.append(path)
    if not found:
        raise InputError(f"--dicom {folder}: no DICOM files in it")
    return found


def run_demo(dicom: Path | None = None, storage: Path = DEMO_DIR, host: str = "127.0.0.1", port: int = 8000,
             orthanc_port: int | None = None, conf: dict[str, str] | None = None,
             serve: Callable[..., int] | None = None, say: Callable[[str], None] = print) -> int:
    """Start Orthanc in ``storage``, upload, serve it with the app until Ctrl-C, stop Orthanc."""
    from medprompt.cpu_sharing import share_cpu

    share_cpu()  # before the phantoms' writing loads torch (serve() would be too late for this process)
    if serve is None:
        from medprompt.server import serve
    storage = Path(storage).resolve()
    files = dicom_files(Path(dicom)) if dicom is not None else None  # a bad folder fails before Orthanc starts
    with Orthanc(storage / "orthanc", http_port=orthanc_port) as orthanc:
        say(f"Orthanc (DICOMweb {orthanc.dicomweb}) stores in {storage / 'orthanc'}; its log: {orthanc.log_path}")
        if files is None:
            say(f"writing {PHANTOMS} phantoms as DICOM series to {storage / 'phantoms'}")
            files = phantom_series(storage / "phantoms")
        else:
            files = storable(files, storage / "with_uids")
        orthanc.upload(files)
        say(f"uploaded {len(files)} DICOM files")
        say(f"OHIF: http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/ohif/  (Ctrl-C stops both)")
        # Decoded series are cached beside the demo (Orthanc's port, hence the URL, changes between runs).
        previous = os.environ.get(CACHE_ENV)
        os.environ[CACHE_ENV] = previous or str(storage / "cache")
        try:
            return serve(studies=orthanc.dicomweb, host=host, port=port, conf=conf)
        finally:
            if previous is None:
                os.environ.pop(CACHE_ENV, None)
