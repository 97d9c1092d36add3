"""Medical Segmentation Decathlon and nnU-Net raw datasets: dataset.json plus imagesTr/labelsTr/imagesTs.

Three dialects are read:

- MSD: ``"modality": {"0": "CT"}``, ``"labels": {"0": "background", "1": "liver"}``, a
  ``"training"`` list of ``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}`` and a
  ``"test"`` list of paths. Files carry no channel suffix.
- nnU-Net v1: as MSD, but the files on disk carry the channel suffix the list omits
  (``./imagesTr/x.nii.gz`` listed, ``imagesTr/x_0000.nii.gz`` present).
- nnU-Net v2: ``"channel_names": {"0": "CT"}``, ``"labels": {"background": 0, "liver": 1}``
  (a list value is a region, e.g. ``"whole tumour": [1, 2, 3]``), ``"file_ending"``, no lists:
  cases are ``imagesTr/CASE_XXXX<ending>`` with ``labelsTr/CASE<ending>``, test cases
  ``imagesTs/CASE_XXXX<ending>``.

When dataset.json has a ``training`` (or ``test``) list, the list is authoritative and files it
does not name are rejected; otherwise the folders are. Problems of one case reject that case only
(INVALID_DATASET for its files, MISSING_LABEL_SOURCE for a label whose image is absent), so one
bad case never stops the dataset; only a dataset.json that cannot be understood at all raises.
Multi-channel cases list their channel files in channel order. Only NIfTI datasets are read.

Accounting: every file under imagesTr/, labelsTr/ and imagesTs/ ends up in exactly one case or
in ``rejected`` (macOS ``._*`` resource forks and non-NIfTI files as NOT_DICOM, i.e. ignored);
dataset.json entries that name absent files, or paths outside the dataset folder (absolute or
climbing with '..': OUTSIDE_ROOT, never followed), are in ``missing`` (they are not files of the
dataset). Files elsewhere in the dataset folder are the caller's.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.errors import InputRejected, Reason
from pipeline.io.nifti import NIFTI_SUFFIXES, NiftiCase

log = logging.getLogger(__name__)

DATASET_JSON = "dataset.json"
FOLDERS = ("imagesTr", "labelsTr", "imagesTs")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class MsdDataset:
    """A parsed dataset: label names, channels and cases, with per-file rejections.

    All paths are POSIX strings relative to the ``source_root`` given to ``read_msd_dataset``.
    """

    root: Path
    dataset_json: str  # path of dataset.json
    name: str
    labels: dict[str, int]  # label name -> value, background included
    regions: dict[str, tuple[int, ...]]  # nnU-Net v2 region labels (name -> values), else empty
    channels: dict[int, str]  # channel index -> modality / channel name ("CT", "T2", ...)
    file_ending: str  # ".nii.gz" or ".nii"
    cases: list[NiftiCase]  # training cases (with label) then test cases, each sorted by key
    rejected: list[InputRejected] = field(default_factory=list)  # one per existing file not in a case
    # dataset.json entries naming absent files or paths outside the dataset (OUTSIDE_ROOT)
    missing: list[InputRejected] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # disagreements that affect no single case

    @property
    def allowed_labels(self) -> set[int]:
        """Label values a label map may hold (the ``allowed_labels`` of ``load_label``)."""
        return set(self.labels.values()).union(*self.regions.values())


def is_msd_dataset(root: Path) -> bool:
    """True when ``root`` holds a dataset.json beside an imagesTr/ or imagesTs/ folder."""
    root = Path(root)
    return (root / DATASET_JSON).is_file() and any((root / d).is_dir() for d in ("imagesTr", "imagesTs"))


def _dataset_error(rel: str, message: str, **details: Any) -> InputRejected:
    return InputRejected(Reason.INVALID_DATASET, rel, message, details)


def _parse_labels(raw: Any, rel: str) -> tuple[dict[str, int], dict[str, tuple[int, ...]]]:
    """MSD ``{"0": "background"}`` or nnU-Net v2 ``{"background": 0}`` (lists are regions)."""
    if not isinstance(raw, dict) or not raw:
        raise _dataset_error(rel, "dataset.json needs a non-empty 'labels' object", labels=repr(raw)[:200])
    labels: dict[str, int] = {}
    regions: dict[str, tuple[int, ...]] = {}
    if all(isinstance(v, str) for v in raw.values()):  # MSD / nnU-Net v1: value -> name
        for key, name in raw.items():
            if not str(key).lstrip("-").isdigit():
                raise _dataset_error(
                    rel,
                    f"label value {key!r} is not an integer; write labels as "
                    '{"0": "background", ...} (MSD) or {"background": 0, ...} (nnU-Net v2)',
                    labels=raw,
                )
            if name in labels:
                raise _dataset_error(rel, f"label name {name!r} is used twice", labels=raw)
            labels[name] = int(key)
    else:  # nnU-Net v2: name -> value or region list
        for name, value in raw.items():
            if isinstance(value, int) and not isinstance(value, bool):
                labels[name] = value
            elif isinstance(value, list) and value and all(isinstance(v, int) for v in value):
                regions[name] = tuple(value)
            else:
                raise _dataset_error(
                    rel,
                    f"label {name!r} has value {value!r}; expected an integer or a list of integers",
                    labels=raw,
                )
    values = list(labels.values())
    if len(set(values)) != len(values):
        raise _dataset_error(rel, f"label values repeat: {sorted(values)}", labels=raw)
    bad = sorted(v for v in set(values).union(*regions.values()) if not 0 <= v <= 65535)
    if bad:
        raise _dataset_error(rel, f"label values {bad} outside 0..65535", labels=raw)
    return labels, regions


def _parse_channels(meta: dict, rel: str) -> dict[int, str]:
    raw = meta.get("channel_names", meta.get("modality"))
    if not isinstance(raw, dict) or not raw:
        raise _dataset_error(
            rel,
            "dataset.json needs 'channel_names' (nnU-Net v2) or 'modality' (MSD), e.g. {\"0\": \"CT\"}",
        )
    try:
        channels = {int(k): str(v) for k, v in raw.items()}
    except ValueError as exc:
        raise _dataset_error(rel, f"channel indices must be integers, found {list(raw)}") from exc
    if sorted(channels) != list(range(len(channels))):
        raise _dataset_error(rel, f"channel indices must be 0..{len(channels) - 1}, found {sorted(channels)}")
    return dict(sorted(channels.items()))


def _strip_ending(name: str, ending: str) -> str | None:
    return name[: -len(ending)] if name.endswith(ending) and len(name) > len(ending) else None


class _Outside(Exception):
    """A dataset.json path that leaves the dataset folder (absolute, or climbing with '..')."""


_DRIVE = re.compile(r"^[A-Za-z]:")


def _listed_path(entry: Any, rel_json: str) -> PurePosixPath | None:
    """A dataset.json path ("./imagesTr/x.nii.gz") as a clean relative path; None if unusable.

    Raises _Outside for an absolute path (POSIX, Windows drive or UNC) or one whose '..' climbs
    out of the dataset folder: never followed. A '..' that stays inside ("a/../imagesTr/x") is
    resolved by name, without touching the file system.
    """
    if not isinstance(entry, str) or not entry or "\x00" in entry:
        return None
    text = entry.replace("\\", "/")
    if text.startswith("/") or _DRIVE.match(text):
        raise _Outside(entry)
    parts: list[str] = []
    for part in PurePosixPath(text).parts:
        if part == "..":
            if not parts:
                raise _Outside(entry)
            parts.pop()
        elif part != ".":
            parts.append(part)
    return PurePosixPath(*parts) if parts else None


class _Reader:
    """Working state of one read: the files present and which of them are claimed."""

    def __init__(
        self,
        root: Path,
        source_root: Path,
        ending: str,
        n_channels: int,
        rel_json: str,
        files: Iterable[Path] | None,
    ):
        self.root, self.ending, self.n_channels, self.rel_json = root, ending, n_channels, rel_json
        self.prefix = PurePosixPath(root.relative_to(source_root).as_posix()) if root != source_root else None
        if files is None:
            files = [p for folder in FOLDERS if (root / folder).is_dir() for p in (root / folder).rglob("*")]
            files = [p for p in files if p.is_file()]
        self.present: set[PurePosixPath] = set()
        for p in files:
            rel = PurePosixPath(Path(p).relative_to(root).as_posix())
            if rel.parts[0] in FOLDERS and len(rel.parts) > 1:
                self.present.add(rel)
        self.claimed: set[PurePosixPath] = set()
        self.cases: list[NiftiCase] = []
        self.rejected: list[InputRejected] = []
        self.missing: list[InputRejected] = []

    def out(self, p: PurePosixPath) -> str:
        """Path relative to the source root."""
        return str(self.prefix / p) if self.prefix else str(p)

    def reject(self, reason: Reason, files: Iterable[PurePosixPath], message: str, **details: Any) -> None:
        for f in files:
            if f in self.present and f not in self.claimed:
                self.claimed.add(f)
                self.rejected.append(InputRejected(reason, self.out(f), message, details))

    def note_missing(self, p: PurePosixPath, message: str) -> None:
        self.missing.append(
            InputRejected(Reason.INVALID_DATASET, self.out(p), message, {"missing_file": True})
        )

    def accept(self, channels: tuple[PurePosixPath, ...], label: PurePosixPath | None, split: str) -> None:
        self.claimed.update(channels)
        if label is not None:
            self.claimed.add(label)
        names = tuple(self.out(c) for c in channels)
        self.cases.append(
            NiftiCase(
                key=names[0],
                image=names[0],
                label=self.out(label) if label else None,
                channels=names,
                split=split,
            )
        )

    def channel_files(self, listed: PurePosixPath) -> tuple[PurePosixPath, ...] | None:
        """The files a listed image stands for: itself (one channel) or its _0000.. files."""
        if self.n_channels == 1 and listed in self.present:
            return (listed,)
        stem = _strip_ending(listed.name, self.ending)
        if stem is None:
            return None
        files = tuple(listed.parent / f"{stem}_{c:04d}{self.ending}" for c in range(self.n_channels))
        return files if all(f in self.present for f in files) else None

    def expected_channels(self, listed: PurePosixPath) -> list[PurePosixPath]:
        stem = _strip_ending(listed.name, self.ending) or listed.name
        if self.n_channels == 1:
            return [listed, listed.parent / f"{stem}_0000{self.ending}"]
        return [listed.parent / f"{stem}_{c:04d}{self.ending}" for c in range(self.n_channels)]

    def outside(
        self, what: str, entries: list[str], image: PurePosixPath | None, label: PurePosixPath | None
    ) -> None:
        """A list entry naming a path outside the dataset: listed (OUTSIDE_ROOT), its case refused."""
        for entry in entries:
            message = (
                f"{what} names {entry!r}, a path outside the dataset folder (absolute, or climbing "
                "with '..'); not followed. List files as ./imagesTr/NAME inside the dataset"
            )
            details = {"entry": entry, "listed_in": self.rel_json}
            self.missing.append(InputRejected(Reason.OUTSIDE_ROOT, self.rel_json, message, details))
        why = f"{what}: its other file is listed outside the dataset folder; the case is refused"
        if label is not None:
            self.reject(Reason.MISSING_LABEL_SOURCE, [label], why)
        if image is not None:
            self.reject(Reason.INVALID_DATASET, self.channel_files(image) or [image], why)

    # -- cases from dataset.json lists (MSD, nnU-Net v1) --

    def from_list(self, entries: list, split: str) -> None:
        for n, entry in enumerate(entries):
            image_entry = entry.get("image") if isinstance(entry, dict) else entry
            label_entry = entry.get("label") if isinstance(entry, dict) else None
            what = f"dataset.json {split}[{n}]"
            image, label, outside = None, None, []
            try:
                image = _listed_path(image_entry, self.rel_json)
            except _Outside as exc:
                outside.append(str(exc))
            try:
                label = _listed_path(label_entry, self.rel_json) if split == "training" else None
            except _Outside as exc:
                outside.append(str(exc))
            if outside:
                self.outside(what, outside, image, label)
                continue
            if image is None or (split == "training" and label is None):
                message = f"{what} is not a usable entry ({entry!r:.200}); expected paths inside the dataset"
                self.missing.append(InputRejected(Reason.INVALID_DATASET, self.rel_json, message, {}))
                if label is not None:
                    self.reject(
                        Reason.MISSING_LABEL_SOURCE, [label], f"{what}: label listed without a usable image"
                    )
                continue
            channels = self.channel_files(image)
            if channels is not None and self.claimed.intersection(channels):
                message = f"{what} names {self.out(image)} again; each case is read once"
                self.missing.append(InputRejected(Reason.INVALID_DATASET, self.rel_json, message, {}))
                continue
            label_ok = label is None or label in self.present
            if channels is not None and label_ok:
                self.accept(channels, label, split)
                continue
            case_files = [*self.expected_channels(image), *([label] if label else [])]
            if channels is None:
                expected = " or ".join(self.out(p) for p in self.expected_channels(image))
                self.note_missing(image, f"{what}: image {expected} not found")
                message = f"{what}: its image {expected} is missing ({self.n_channels} channel(s) expected)"
                self.reject(Reason.MISSING_LABEL_SOURCE, [label] if label else [], message)
                self.reject(Reason.INVALID_DATASET, case_files, message)
            else:
                self.note_missing(label, f"{what}: label {self.out(label)} not found")
                self.reject(
                    Reason.INVALID_DATASET, case_files, f"{what}: its label {self.out(label)} is missing"
                )

    # -- cases from folders (nnU-Net v2, or MSD folders without lists) --

    def group(self, folder: str) -> dict[str, dict[int | None, PurePosixPath]]:
        """{case id: {channel or None: file}} for the unclaimed NIfTI files directly in ``folder``."""
        groups: dict[str, dict[int | None, PurePosixPath]] = {}
        for f in sorted(self.present - self.claimed):
            if f.parts[0] != folder or len(f.parts) != 2 or f.name.startswith("._"):
                continue
            stem = _strip_ending(f.name, self.ending)
            if stem is None:
                continue
            m = _CHANNEL.match(stem)
            case, channel = (m["case"], int(m["channel"])) if m else (stem, None)
            groups.setdefault(case, {})[channel] = f
        return groups

    def from_folder(self, images_dir: str, labels_dir: str | None, split: str) -> None:
        labels = self.group(labels_dir) if labels_dir else {}
        for case, files in self.group(images_dir).items():
            label_files = labels.pop(case, {})
            label = label_files.get(None)
            expected = list(range(self.n_channels))
            if sorted(files) == expected:
                channels = tuple(files[c] for c in expected)
            elif self.n_channels == 1 and list(files) == [None]:
                channels = (files[None],)  # MSD layout: no channel suffix
            else:
                found = sorted(("none" if c is None else f"{c:04d}") for c in files)
                self.reject(
                    Reason.INVALID_DATASET,
                    [*files.values(), *label_files.values()],
                    f"case {case}: expected channel files _0000.._{self.n_channels - 1:04d} "
                    f"({self.n_channels} per dataset.json), found {found}",
                    expected_channels=self.n_channels,
                    found_channels=found,
                )
                continue
            if labels_dir and label is None:
                lab = PurePosixPath(labels_dir, case + self.ending)
                self.reject(
                    Reason.INVALID_DATASET,
                    [*files.values(), *label_files.values()],
                    f"training case {case} has no label: expected {self.out(lab)}",
                )
                continue
            self.accept(channels, label, split)
        for case, files in labels.items():
            self.reject(
                Reason.MISSING_LABEL_SOURCE,
                files.values(),
                f"label of case {case} has no image: expected {self.out(PurePosixPath(images_dir))}/"
                f"{case}_0000{self.ending}" + ("" if self.n_channels > 1 else f" or {case}{self.ending}"),
            )

    def leftovers(self, has_lists: dict[str, bool]) -> None:
        for f in sorted(self.present - self.claimed):
            if f.name.startswith("._"):
                self.reject(Reason.NOT_DICOM, [f], "macOS resource fork (._ file), not an image")
            elif not f.name.lower().endswith(NIFTI_SUFFIXES):
                self.reject(Reason.NOT_DICOM, [f], "not a NIfTI file; dataset folders hold images only")
            elif not f.name.endswith(self.ending):
                self.reject(
                    Reason.INVALID_DATASET,
                    [f],
                    f"file ending differs from the dataset's {self.ending!r}",
                )
            elif len(f.parts) != 2:
                self.reject(
                    Reason.INVALID_DATASET,
                    [f],
                    f"nested folder inside {f.parts[0]}/ is not part of the layout",
                )
            elif f.parts[0] == "labelsTr":
                self.reject(
                    Reason.MISSING_LABEL_SOURCE, [f], "label not named by any training case in dataset.json"
                )
            else:
                split = "training" if f.parts[0] == "imagesTr" else "test"
                why = (
                    f"not listed in dataset.json '{split}'" if has_lists[split] else "does not fit the layout"
                )
                self.reject(Reason.INVALID_DATASET, [f], f"{why}; list it or remove it")


def read_msd_dataset(
    root: Path, *, source_root: Path | None = None, files: Iterable[Path] | None = None
) -> MsdDataset:
    """Read an MSD / nnU-Net raw dataset at ``root`` (see the module docstring for dialects).

    Paths in the result are relative to ``source_root`` (default ``root``). ``files``: the
    dataset's readable files as the caller screened them (absolute, under ``root``; links that
    leave the source, FIFOs and the like already taken out); default: the regular files found
    under imagesTr/, labelsTr/ and imagesTs/. dataset.json is read as UTF-8 with or without a
    byte-order mark (UTF-16 and UTF-32 with a BOM too, as Windows editors write them). Raises
    InputRejected(INVALID_DATASET) on dataset.json itself when it cannot be understood (not
    JSON, no labels or channels, a non-NIfTI file ending); per-case problems are in ``rejected``.
    """
    root = Path(root)
    source_root = Path(source_root) if source_root is not None else root
    rel_json = (PurePosixPath(root.relative_to(source_root).as_posix()) / DATASET_JSON).as_posix()
    rel_json = rel_json.removeprefix("./")
    try:
        # From bytes, json detects UTF-8/16/32 and skips a byte-order mark (a str would not).
        meta = json.loads((root / DATASET_JSON).read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _dataset_error(rel_json, f"dataset.json cannot be read as JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise _dataset_error(rel_json, "dataset.json must hold a JSON object")
    labels, regions = _parse_labels(meta.get("labels"), rel_json)
    channels = _parse_channels(meta, rel_json)
    ending = meta.get("file_ending")
    if ending is None:  # MSD and nnU-Net v1 have no file_ending: they ship .nii.gz
        ending = ".nii.gz"
    if ending not in NIFTI_SUFFIXES:
        raise _dataset_error(
            rel_json,
            f"file_ending {ending!r} is not supported; only {list(NIFTI_SUFFIXES)} datasets are read",
        )
    if "dataset" in meta:
        raise _dataset_error(
            rel_json,
            "nnU-Net v2 'dataset' file lists are not supported; use the imagesTr/labelsTr layout",
        )

    reader = _Reader(root, source_root, ending, len(channels), rel_json, files)
    has_lists = {}
    for split, images_dir, labels_dir in (("training", "imagesTr", "labelsTr"), ("test", "imagesTs", None)):
        entries = meta.get(split)
        has_lists[split] = isinstance(entries, list) and bool(entries)
        if has_lists[split]:
            reader.from_list(entries, split)
        else:
            reader.from_folder(images_dir, labels_dir, split)
    reader.leftovers(has_lists)

    notes = []
    training = [c for c in reader.cases if c.split == "training"]
    for key, split, found in (
        ("numTraining", "training", len(training)),
        ("numTest", "test", len(reader.cases) - len(training)),
    ):
        declared = meta.get(key)
        if isinstance(declared, int) and declared != found:
            notes.append(f"dataset.json {key} is {declared} but {found} valid {split} cases were found")
            log.warning("%s: %s", rel_json, notes[-1])
    cases = sorted(training, key=lambda c: c.key) + sorted(
        (c for c in reader.cases if c.split == "test"), key=lambda c: c.key
    )
    return MsdDataset(
        root=root,
        dataset_json=rel_json,
        name=str(meta.get("name", root.name)),
        labels=labels,
        regions=regions,
        channels=channels,
        file_ending=ending,
        cases=cases,
        rejected=reader.rejected,
        missing=reader.missing,
        notes=notes,
    )
