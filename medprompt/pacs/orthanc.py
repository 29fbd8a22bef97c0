"""A private Orthanc (a real DICOMweb PACS) on a loopback port: for the tests and ``medprompt pacs-demo``.

Orthanc is the Debian package ``orthanc`` with the plugin ``orthanc-dicomweb``; nothing here downloads
it. The configuration is ours, written beside the storage: DICOMweb on, the DICOM (DIMSE) server off,
no remote access, no authentication (loopback only), jobs not saved, so one folder holds everything
and deleting it forgets the PACS.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Iterable

from medprompt.errors import PacsError, one_line

ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/bin/Orthanc")
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins", "/usr/local/share/orthanc/plugins")
DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"
INSTALL_HINT = "install it with: apt-get install -y orthanc orthanc-dicomweb"
STOP_TIMEOUT_S = 20.0


class OrthancError(PacsError):
    """Orthanc is missing, did not start, or refused a request."""


def find_orthanc() -> str | None:
    """The Orthanc executable (on PATH, else where Debian puts it), or None when it is not installed."""
    found = shutil.which("Orthanc")
    if found:
        return found
    return next((path for path in ORTHANC_CANDIDATES if os.access(path, os.X_OK)), None)


def find_dicomweb_plugin() -> Path | None:
    """Orthanc's DICOMweb plugin library (Debian ``orthanc-dicomweb``), or None when it is not installed."""
    for folder in PLUGIN_DIRS:
        path = Path(folder) / DICOMWEB_PLUGIN
        if path.is_file():
            return path
    return None


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class Orthanc:
    """A private Orthanc on a free loopback port serving DICOMweb at ``dicomweb``, storing in ``storage``.

    ``storage`` holds the database, our configuration (``orthanc.json``) and the log (``orthanc.log``).
    Use as a context manager, or ``start()`` / ``stop()``.
    """

    def __init__(self, storage: Path, http_port: int | None = None, executable: str | None = None) -> None:
        self.storage = Path(storage)
        self.http_port = http_port if http_port is not None else free_port()
        self.executable = executable or find_orthanc()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.config_path = self.storage / "orthanc.json"
        self.log_path = self.storage / "orthanc.log"
        self.process: subprocess.Popen | None = None
        self.name = f"MedPrompt-{uuid.uuid4().hex[:8]}"  # tells our Orthanc from another on the same port

    def config(self, plugin: Path) -> dict:
        """Orthanc's configuration: this folder, this port, DICOMweb on, nothing reachable from outside."""
        return {
            "Name": self.name,
            "StorageDirectory": str(self.storage / "db"),
            "IndexDirectory": str(self.storage / "db"),
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "HttpDescribeErrors": True,
            "SaveJobs": False,
            "StorageCompression": False,
            "ExecuteLuaEnabled": False,
            "RestApiWriteToFileSystemEnabled": False,
            "Plugins": [str(plugin)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        }

    def start(self, timeout: float = 30) -> "Orthanc":
        """Start Orthanc and wait until it answers with the DICOMweb plugin loaded."""
        if self.process is not None and self.process.poll() is None:
            return self
        if self.executable is None:
            raise OrthancError(f"Orthanc is not installed; {INSTALL_HINT}")
        plugin = find_dicomweb_plugin()
        if plugin is None:
            raise OrthancError(f"Orthanc's DICOMweb plugin ({DICOMWEB_PLUGIN}) is not installed; {INSTALL_HINT}")
        if not _port_free(self.http_port):
            raise OrthancError(f"port {self.http_port} on 127.0.0.1 is in use; choose another for Orthanc")
        self.storage.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(plugin), indent=2))
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [self.executable, str(self.config_path)], cwd=self.storage, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C in a terminal reaches it only through stop()
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise OrthancError(f"Orthanc exited with code {code} while starting on port {self.http_port}; "
                                   f"see its log {self.log_path}")
            if self._answers():
                return self
            time.sleep(0.2)
        self.stop()
        raise OrthancError(f"Orthanc did not answer on {self.url} within {timeout:.0f} s; see its log {self.log_path}")

    def _answers(self) -> bool:
        """True once this Orthanc (by its name) and its DICOMweb plugin both answer."""
        try:
            with urllib.request.urlopen(f"{self.url}/system", timeout=2) as response:
                if json.loads(response.read()).get("Name") != self.name:
                    return False
            with urllib.request.urlopen(f"{self.dicomweb}/studies?limit=1", timeout=2) as response:
                return response.status in (200, 204)
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after a grace period); safe to call twice."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def upload(self, files: Iterable[Path]) -> list[str]:
        """Store DICOM files in Orthanc (REST ``POST /instances``); returns their Orthanc instance ids."""
        ids = []
        for path in files:
            request = urllib.request.Request(f"{self.url}/instances", data=Path(path).read_bytes(), method="POST",
                                             headers={"Content-Type": "application/dicom"})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    answer = json.loads(response.read())
            except urllib.error.HTTPError as error:
                raise OrthancError(f"Orthanc refused {path} (HTTP {error.code}): "
                                   f"{one_line(Exception(error.read()[:300].decode(errors='replace')))}") from None
            except (urllib.error.URLError, OSError) as error:
                raise OrthancError(f"cannot upload {path} to {self.url}: {one_line(error)}") from None
            ids.append(str(answer["ID"]))
        return ids
