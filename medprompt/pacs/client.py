"""The DICOMweb calls the app makes (QIDO-RS search, WADO-RS retrieve and metadata, STOW-RS store).

Series are retrieved as stored (``transfer-syntax=*``) and decoded here: a PACS that cannot
transcode (Orthanc 1.10 with JPEG 2000) answers a request for uncompressed data with HTTP 500,
which is what MONAI Label's own client asks for. Every failure is a PacsError (HTTP 502 from the
server) or a NotFoundError (404), one line naming the server and the series.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterable

import requests

from medprompt.errors import NotFoundError, PacsError, one_line

CACHE_ENV = "MEDPROMPT_DICOMWEB_CACHE"  # where fetched series are cached (medprompt.pacs.datastore.default_cache)
TIMEOUT_S = (10.0, 300.0)  # connect, read: a whole series can take a while
PROBE_TIMEOUT_S = 10.0
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
DICOM_JSON = "application/dicom+json"
# Tags by keyword, as QIDO-RS and WADO-RS metadata answer them (DICOM JSON model).
TAGS = {"StudyInstanceUID": "0020000D", "SeriesInstanceUID": "0020000E", "SOPInstanceUID": "00080018",
        "Modality": "00080060", "SeriesDescription": "0008103E", "PatientID": "00100020", "StudyDate": "00080020",
        "SeriesDate": "00080021", "SeriesTime": "00080031", "ContentDate": "00080023", "ContentTime": "00080033",
        "NumberOfSeriesRelatedInstances": "00201209", "ReferencedSeriesSequence": "00081115",
        "FailedSOPSequence": "00081198", "FailureReason": "00081197"}


def value(item: dict[str, Any], keyword: str) -> Any:
    """The first value of ``keyword`` in a DICOM JSON dataset, or None."""
    values = item.get(TAGS[keyword], {}).get("Value") or [None]
    return values[0]


def _reason(error: requests.RequestException) -> str:
    """The operating system's reason (``Connection refused``, ``Name or service not known``) when there is one."""
    match = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(error))
    return match.group(1).strip() if match else one_line(error)


class DicomWebClient:
    """One DICOMweb server (its base URL, e.g. ``http://127.0.0.1:8042/dicom-web``)."""

    def __init__(self, url: str, auth: tuple[str, str] | None = None) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.auth = auth

    def _request(self, method: str, path: str, what: str, timeout: Any = TIMEOUT_S, **kwargs: Any) -> requests.Response:
        try:
            response = self.session.request(method, f"{self.url}/{path}", timeout=timeout, **kwargs)
        except requests.Timeout:
            raise PacsError(f"the DICOMweb server {self.url} did not answer {what} in time") from None
        except requests.RequestException as error:
            raise PacsError(f"cannot reach the DICOMweb server {self.url} ({_reason(error)})") from None
        if response.status_code == 404:
            raise NotFoundError(f"{what}: not found on the DICOMweb server {self.url}")
        if response.status_code >= 400:
            detail = " ".join(response.text[:200].split())
            raise PacsError(f"the DICOMweb server {self.url} failed {what} (HTTP {response.status_code}"
                            f"{': ' + detail if detail else ''})")
        return response

    def _json(self, path: str, what: str, **params: Any) -> list[dict[str, Any]]:
        response = self._request("GET", path, what, params=params or None, headers={"Accept": DICOM_JSON})
        if not response.content.strip():
            return []  # 204 No Content: nothing matched
        try:
            answer = response.json()
        except ValueError:
            raise PacsError(f"the DICOMweb server {self.url} answered {what} with something that is not "
                            "DICOM JSON") from None
        return answer if isinstance(answer, list) else []

    def check(self) -> None:
        """Raise PacsError (one line) unless the server answers a QIDO-RS query: called at server start."""
        try:
            response = self.session.get(f"{self.url}/studies", params={"limit": 1}, headers={"Accept": DICOM_JSON},
                                        timeout=PROBE_TIMEOUT_S)
        except requests.Timeout:
            raise PacsError(f"the DICOMweb server {self.url} did not answer within {PROBE_TIMEOUT_S:.0f} s") from None
        except requests.RequestException as error:
            raise PacsError(f"cannot reach the DICOMweb server {self.url} ({_reason(error)})") from None
        if response.status_code in (401, 403):
            raise PacsError(f"the DICOMweb server {self.url} refused us (HTTP {response.status_code}); set "
                            "MONAI_LABEL_DATASTORE_USERNAME and MONAI_LABEL_DATASTORE_PASSWORD")
        try:
            answer = response.json() if response.content.strip() else []
        except ValueError:
            answer = None
        if response.status_code >= 400 or not isinstance(answer, list):
            raise PacsError(f"{self.url} is not a DICOMweb server (a study search there answered HTTP "
                            f"{response.status_code}{'' if isinstance(answer, list) else ', not DICOM JSON'}); "
                            "Orthanc's URL ends in /dicom-web")

    def search_series(self, **filters: str) -> list[dict[str, Any]]:
        """QIDO-RS ``/series``: every series matching ``filters`` (keyword -> value), as DICOM JSON."""
        fields = ["SeriesDescription", "SeriesDate", "SeriesTime", "PatientID", "StudyDate",
                  "NumberOfSeriesRelatedInstances"]
        return self._json("series", "a series search", includefield=",".join(TAGS[f] for f in fields), **filters)

    def series_metadata(self, study: str, series: str) -> list[dict[str, Any]]:
        """WADO-RS metadata of every instance of a series."""
        return self._json(f"studies/{study}/series/{series}/metadata", f"the metadata of series {series}")

    def retrieve_series(self, study: str, series: str, folder: Path) -> list[Path]:
        """WADO-RS: the series' instances as stored, written to ``folder`` (one file per instance)."""
        from requests_toolbelt.multipart.decoder import MultipartDecoder

        what = f"series {series}"
        response = self._request("GET", f"studies/{study}/series/{series}", what, headers={"Accept": AS_STORED})
        content_type = response.headers.get("Content-Type", "")
        if not content_type.lower().startswith("multipart/related"):
            raise PacsError(f"the DICOMweb server {self.url} sent {what} as {content_type or 'no content type'}, "
                            "not multipart/related")
        try:
            parts = MultipartDecoder(response.content, content_type).parts
        except Exception as error:  # requests_toolbelt raises several types for a malformed body
            raise PacsError(f"the DICOMweb server {self.url} sent {what} malformed: {one_line(error)}") from None
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for index, part in enumerate(parts):
            path = folder / f"{index:05d}.dcm"
            path.write_bytes(part.content)
            files.append(path)
        if not files:
            raise NotFoundError(f"{what}: the DICOMweb server {self.url} holds no instances of it")
        return files

    def store(self, files: Iterable[os.PathLike | str], what: str) -> None:
        """STOW-RS: store DICOM files; PacsError naming the failure when the server refuses any."""
        boundary = uuid.uuid4().hex
        body = bytearray()
        for file in files:
            body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            body += Path(file).read_bytes() + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                   "Accept": DICOM_JSON}
        response = self._request("POST", "studies", what, data=bytes(body), headers=headers)
        try:
            answer = json.loads(response.content or b"{}")
        except ValueError:
            return  # some servers answer XML; the status already said it worked
        failed = answer.get(TAGS["FailedSOPSequence"], {}).get("Value") if isinstance(answer, dict) else None
        if failed:
            reason = value(failed[0], "FailureReason")
            raise PacsError(f"the DICOMweb server {self.url} refused {what} (failure reason {reason})")
