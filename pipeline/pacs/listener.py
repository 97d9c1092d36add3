"""DIMSE intake: a C-STORE SCP that files what modalities or a PACS send, study by study.

    OUT/receiving/<study_key>/<instance_key>.dcm   a study still arriving
    OUT/studies/<study_key>/<instance_key>.dcm      a study complete (no instance for `quiet_s`)

Keys are HMACs of the UIDs keyed by the site secret (no UID in a path). Each instance is
written atomically; a study is moved to studies/ once nothing arrived for it for `quiet_s`
seconds, and `on_complete(folder)` is then called (the CLI starts a batch inference deployment
run on it). Instances that arrive for a study already complete go to receiving/ again and the
study is completed (and announced) again with them. Only the storage SOP classes the pipeline
reads are accepted (single- and multi-frame CT, MR, PET, and SEG for labels), in any transfer
syntax; with `allowed_aets` only those calling AE titles may associate.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.io.atomic import atomic_path
from pipeline.io.dicom_header import SEGMENTATION_STORAGE, SUPPORTED_CLASSES

log = logging.getLogger(__name__)
logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # it logs datasets at DEBUG

RECEIVING, STUDIES = "receiving", "studies"
_OUT_OF_RESOURCES = 0xA700
_SUCCESS = 0x0000


class StudyListener:
    """A storage SCP filing instances by study; `start()` returns at once, `stop()` shuts it down."""

    def __init__(
        self,
        out: str | Path,
        *,
        aet: str,
        port: int,
        secret: bytes,
        quiet_s: float = 30.0,
        on_complete: Callable[[Path], None] | None = None,
        allowed_aets: Sequence[str] = (),
        bind: str = "",
    ) -> None:
        if not 0 < len(aet) <= 16:
            raise ValueError(f"--aet {aet!r}: an AE title has 1 to 16 characters")
        if quiet_s <= 0:
            raise ValueError(f"quiet_s={quiet_s}: the quiet period must be positive (seconds)")
        self.out = Path(out).resolve()
        self.aet, self.port, self.bind = aet, port, bind
        self.quiet_s = quiet_s
        self.on_complete = on_complete
        self.allowed_aets = list(allowed_aets)
        self._secret = secret
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}  # study key -> monotonic time of its last instance
        self._stop = threading.Event()
        self._server = None
        self._monitor: threading.Thread | None = None
        self.received = 0
        self.completed: list[Path] = []

    def _key(self, prefix: str, uid: str, n: int) -> str:
        return prefix + hmac.new(self._secret, uid.encode("utf-8"), hashlib.sha256).hexdigest()[:n]

    # -- the SCP ---------------------------------------------------------------------------

    def start(self) -> StudyListener:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

        ae = AE(ae_title=self.aet)
        for sop_class in [*SUPPORTED_CLASSES, SEGMENTATION_STORAGE]:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context("1.2.840.10008.1.1")  # Verification (C-ECHO)
        if self.allowed_aets:
            ae.require_calling_aet = self.allowed_aets
        ae.maximum_pdu_size = 0  # no limit: large frames in few PDUs
        # Studies left receiving by an earlier run complete after a quiet period from now.
        for folder in sorted((self.out / RECEIVING).glob("study_*")):
            self._last[folder.name] = time.monotonic()
        self._server = ae.start_server(
            (self.bind, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        self._monitor = threading.Thread(target=self._watch, name="study-quiet-period", daemon=True)
        self._monitor.start()
        log.info(
            "listening as %s on port %d; studies complete after %.0f s quiet",
            self.aet,
            self.port,
            self.quiet_s,
        )
        return self

    def stop(self) -> None:
        """Stop accepting; studies still receiving stay in receiving/ for the next start."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._monitor is not None:
            self._monitor.join(timeout=10)

    def _on_store(self, event) -> int:
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            study = self._key("study_", str(ds.StudyInstanceUID), 16)
            name = self._key("", str(ds.SOPInstanceUID), 24) + ".dcm"
            with atomic_path(self.out / RECEIVING / study / name) as tmp:
                ds.save_as(tmp, enforce_file_format=True)
        except (OSError, AttributeError, ValueError) as exc:
            log.error(
                "could not file a received instance (%s): answered out of resources", type(exc).__name__
            )
            return _OUT_OF_RESOURCES
        with self._lock:
            self._last[study] = time.monotonic()
            self.received += 1
        return _SUCCESS

    # -- the quiet period ------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.quiet_s / 4)):
            now = time.monotonic()
            with self._lock:
                due = [s for s, t in self._last.items() if now - t >= self.quiet_s]
                for s in due:
                    del self._last[s]
            for study in due:
                self._complete(study)

    def _complete(self, study: str) -> None:
        src, dst = self.out / RECEIVING / study, self.out / STUDIES / study
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.glob("*.dcm"):
            os.replace(f, dst / f.name)
        for leftover in src.glob(".*"):
            leftover.unlink(missing_ok=True)
        # An instance that arrived meanwhile keeps the folder: it completes after the next quiet period.
        with contextlib.suppress(OSError):
            src.rmdir()
        self.completed.append(dst)
        log.info("study %s complete: %d instances", study, sum(1 for _ in dst.glob("*.dcm")))
        if self.on_complete is not None:
            try:
                self.on_complete(dst)
            except Exception:  # one study's trigger failure (API down...) must not stop the listener
                log.exception("study %s: the on-complete action failed; the study stays in %s", study, dst)
