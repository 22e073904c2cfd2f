"""Real PACS peers for the PACS tests: Debian's Orthanc (+ DICOMweb plugin; its DIMSE port answers
C-GET from any calling AE) and dcmtk's storescp, each on loopback with free ports and temporary
storage."""

from __future__ import annotations

import json
import pathlib
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
STORESCP = shutil.which("storescp")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dicomweb_plugin() -> str:
    """The DICOMweb plugin's .so, as the orthanc-dicomweb package installs it."""
    try:
        files = subprocess.run(
            ["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return ""
    libs = [f for f in files if "libOrthancDicomWeb.so" in f and pathlib.Path(f).is_file()]
    return sorted(libs, key=len)[0] if libs else ""


def require_peers() -> str:
    plugin = dicomweb_plugin()
    if not pathlib.Path(ORTHANC).exists() or not plugin or STORESCP is None:
        pytest.skip("orthanc / orthanc-dicomweb / dcmtk missing: make system-deps installs them")
    return plugin


def _wait(check: Any, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} did not come up within {timeout_s:.0f} s")


class OrthancPeer:
    """Orthanc with its DICOMweb plugin; stop() and start() again keep the stored instances."""

    def __init__(self, root: pathlib.Path, plugin: str) -> None:
        self.root = root
        self.http_port = free_port()
        self.dicom_port = free_port()
        (root / "db").mkdir(parents=True, exist_ok=True)
        self.config = root / "orthanc.json"
        self.config.write_text(
            json.dumps(
                {
                    "Name": "clinisynth-test",
                    "StorageDirectory": str(root / "db"),
                    "IndexDirectory": str(root / "db"),
                    "HttpPort": self.http_port,
                    "DicomPort": self.dicom_port,
                    "DicomAet": "ORTHANC",
                    "DicomAlwaysAllowGet": True,
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": False,
                    "Plugins": [plugin],
                    "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
                    "ConcurrentJobs": 1,
                    "HttpThreadsCount": 4,
                }
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return self.url + "/dicom-web"

    def _up(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/system", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            assert self.proc is not None and self.proc.poll() is None, "Orthanc exited"
            return False

    def start(self) -> None:
        log = open(self.root / "orthanc.log", "ab")  # noqa: SIM115 - handed to the process
        self.proc = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=log)
        _wait(self._up, "Orthanc")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.proc = None

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:
            return json.loads(resp.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:
            return bytes(resp.read())

    def upload(self, data: bytes) -> str:
        """Store one DICOM Part 10 object through the REST API; Orthanc's instance id."""
        req = urllib.request.Request(
            self.url + "/instances",
            data=data,
            method="POST",
            headers={"Content-Type": "application/dicom"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return str(json.loads(resp.read())["ID"])


class StoreScp:
    """dcmtk's storescp writing every received instance into ``folder``."""

    def __init__(self, folder: pathlib.Path, ae_title: str = "STORESCP") -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        assert STORESCP is not None
        log = open(folder.parent / "storescp.log", "ab")  # noqa: SIM115 - handed to the process
        self.proc = subprocess.Popen(
            [STORESCP, "-aet", ae_title, "-od", str(folder), "-uf", str(self.port)],
            stdout=log,
            stderr=log,
        )
        _wait(self._listening, "storescp")

    def _listening(self) -> bool:
        assert self.proc.poll() is None, "storescp exited"
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
