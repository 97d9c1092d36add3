"""A real PACS for the tests: Orthanc with its DICOMweb plugin, on loopback, free ports, a temp store.

Authentication is on (one registered user), HTTP is loopback only (RemoteAccessAllowed false),
and DIMSE only accepts the AE titles listed in DicomModalities from their registered host.
Started as a subprocess by `start_orthanc` and stopped by its PID with `Orthanc.stop`.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
# None (tests skipped) unless both the server and its DICOMweb plugin are installed.
ORTHANC_BIN = (shutil.which("Orthanc") or "/usr/sbin/Orthanc") if Path(DICOMWEB_PLUGIN).is_file() else None
if ORTHANC_BIN and not Path(ORTHANC_BIN).is_file():
    ORTHANC_BIN = None
USER, PASSWORD = "pipeline", "orthanc-test-password"
ORTHANC_AET = "ORTHANC"
SKIP_REASON = "Orthanc is not installed (Debian packages orthanc and orthanc-dicomweb; .ci/run installs them)"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Orthanc:
    process: subprocess.Popen
    http_port: int
    dicom_port: int
    root: Path
    log: Path
    modalities: dict[str, list] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The pipeline's SOURCE / destination URL for this server (no credentials in it)."""
        return f"dicomweb+http://127.0.0.1:{self.http_port}/dicom-web"

    @property
    def dimse_url(self) -> str:
        return f"dimse://{ORTHANC_AET}@127.0.0.1:{self.dicom_port}"

    def get(self, path: str, **kw):
        r = requests.get(self.base + path, auth=(USER, PASSWORD), timeout=30, **kw)
        r.raise_for_status()
        return r

    def upload(self, files) -> int:
        """POST each file to /instances; returns how many Orthanc stored."""
        n = 0
        for f in files:
            r = requests.post(
                self.base + "/instances", data=Path(f).read_bytes(), auth=(USER, PASSWORD), timeout=30
            )
            r.raise_for_status()
            n += 1
        return n

    def instances(self, modality: str | None = None) -> list[dict]:
        """Every stored instance's main tags (+ its series' modality), optionally of one modality."""
        out = []
        for series_id in self.get("/series").json():
            series = self.get(f"/series/{series_id}").json()
            mod = series["MainDicomTags"].get("Modality", "")
            if modality and mod != modality:
                continue
            for inst in series["Instances"]:
                out.append({"id": inst, "series": series_id, "modality": mod})
        return out

    def file(self, instance_id: str) -> bytes:
        return self.get(f"/instances/{instance_id}/file").content

    def storage_file(self, instance_id: str) -> Path:
        """The file behind an instance in Orthanc's storage (to simulate a PACS losing one)."""
        uuid = self.get(f"/instances/{instance_id}/attachments/dicom/info").json()["Uuid"]
        return self.root / "storage" / uuid[:2] / uuid[2:4] / uuid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


def start_orthanc(root: Path, modalities: dict[str, list] | None = None) -> Orthanc:
    """Start Orthanc in `root` (config, storage, index, log); returns once its API answers."""
    if ORTHANC_BIN is None:
        raise RuntimeError(SKIP_REASON)
    root.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "unet-pipeline-test",
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ORTHANC_AET,
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "RemoteAccessAllowed": False,  # HTTP from loopback only
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        # DIMSE: only the AE titles below, from their host; called AE title checked.
        "DicomModalities": modalities or {},
        "DicomCheckCalledAet": True,
        "DicomCheckModalityHost": True,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowMove": False,
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full"},
        "StorageCompression": False,
        "StorageAccessOnFind": "Never",  # searches answer from the index, as large PACSes do
        "MaximumStorageCacheSize": 0,  # read from disk every time: a test may remove a stored file
        "HttpCompressionEnabled": False,
    }
    (root / "orthanc.json").write_text(json.dumps(config, indent=2))
    log = root / "orthanc.log"
    process = subprocess.Popen(
        [ORTHANC_BIN, str(root / "orthanc.json")],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        cwd=root,
    )
    server = Orthanc(process, http_port, dicom_port, root, log, modalities or {})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            requests.get(server.base + "/system", auth=(USER, PASSWORD), timeout=2).raise_for_status()
            return server
        except requests.RequestException:
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"Orthanc did not answer within 60 s: {log.read_text()[-2000:]}")
