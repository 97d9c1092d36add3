"""The batch protocol ingest and predict share: locks, done-markers, failure records, folders."""

from __future__ import annotations

import multiprocessing
import os
import stat
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipeline.io import batchdir
from pipeline.io.batchdir import BatchDir, case_key, read_done_marker, write_done_marker


def _hold_lock(root: str, case_id: str, held, release) -> None:
    """In another process: take the case lock, say so, wait to be told to let go."""
    with BatchDir(root).case_lock(case_id):
        held.set()
        release.wait(30)


@contextmanager
def _held_elsewhere(root: Path, case_id: str):
    """Yield (the process holding the case's lock, the event that tells it to let go)."""
    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(root), case_id, held, release))
    holder.start()
    try:
        assert held.wait(60), "the other process never took the lock"
        yield holder, release
    finally:
        # Never set the event for a holder that was killed while waiting on it: a multiprocessing
        # Condition's notify waits for each sleeper to acknowledge, and a dead one never does.
        if holder.is_alive():
            release.set()
            holder.join(30)


def test_a_case_lock_excludes_a_second_process_until_released(tmp_path):
    with _held_elsewhere(tmp_path, "case_a") as (_, release):
        got = threading.Event()

        def second() -> None:
            with BatchDir(tmp_path).case_lock("case_a"):
                got.set()

        waiter = threading.Thread(target=second, daemon=True)
        waiter.start()
        assert not got.wait(0.5), "a second holder entered while the first held the lock"
        with BatchDir(tmp_path).case_lock("case_b"):  # another case is not blocked
            pass
        release.set()
        assert got.wait(30), "the lock was not handed over once released"
        waiter.join(5)


def test_a_lock_held_by_a_process_that_dies_is_released(tmp_path):
    with _held_elsewhere(tmp_path, "case_a") as (holder, _):
        holder.kill()
        holder.join(30)
    done = threading.Event()

    def take() -> None:
        with BatchDir(tmp_path).case_lock("case_a"):
            done.set()

    threading.Thread(target=take, daemon=True).start()
    assert done.wait(10), "a killed holder's lock was never released"


def test_two_threads_of_one_process_exclude_each_other(tmp_path):
    inside, overlaps = [], []

    def work() -> None:
        for _ in range(20):
            with BatchDir(tmp_path).case_lock("case_a"):
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(len(inside))
                time.sleep(0.001)
                inside.pop()

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert overlaps == []


def test_locks_live_in_the_work_folder(tmp_path):
    batch = BatchDir(tmp_path)
    with batch.case_lock("case_a"), batch.prepare_lock():
        pass
    locks = sorted(p.name for p in (tmp_path / ".batch" / "locks").iterdir())
    assert locks == ["case_a.lock", "prepare.lock"]


def _marker(case_dir: Path, settings: dict) -> str:
    case_dir.mkdir(parents=True, exist_ok=True)
    (case_dir / "seg.nii.gz").write_bytes(b"mask bytes")
    key = case_key("inputs-sha", settings)
    write_done_marker(case_dir, key, ["seg.nii.gz"], {"status": "ok"}, model_version="3")
    return key


def test_done_markers_are_keyed_on_the_inputs_and_the_settings(tmp_path):
    settings = {"model": {"sha256": "m1"}, "write_qc": True}
    key = _marker(tmp_path / "case_a", settings)
    marker = read_done_marker(tmp_path / "case_a", key)
    assert marker is not None and marker["result"] == {"status": "ok"} and marker["model_version"] == "3"
    # The key is order-independent in the settings, and changes with any setting or the inputs.
    assert case_key("inputs-sha", dict(reversed(settings.items()))) == key
    for other in (
        case_key("inputs-sha", {**settings, "write_qc": False}),
        case_key("inputs-sha", {**settings, "model": {"sha256": "m2"}}),
        case_key("other-inputs", settings),
    ):
        assert other != key
        assert read_done_marker(tmp_path / "case_a", other) is None


@pytest.mark.parametrize("damage", ["missing", "changed", "no_marker", "garbage"])
def test_a_done_marker_stands_only_while_its_outputs_do(tmp_path, damage):
    case_dir = tmp_path / "case_a"
    key = _marker(case_dir, {"x": 1})
    if damage == "missing":
        (case_dir / "seg.nii.gz").unlink()
    elif damage == "changed":
        (case_dir / "seg.nii.gz").write_bytes(b"other bytes")
    elif damage == "no_marker":
        batchdir.clear_case(case_dir, ["seg.nii.gz"])
        assert not (case_dir / "seg.nii.gz").exists()
    else:
        (case_dir / "done.json").write_text("{not json")
    assert read_done_marker(case_dir, key) is None


def test_failure_records_are_written_atomically_read_and_cleared(tmp_path, monkeypatch):
    batch = BatchDir(tmp_path)
    assert batch.failure("case_a") is None and batch.failures() == {}
    batch.record_failure("case_b", {"reason": "TRUNCATED", "path": "x.dcm"})
    batch.record_failure("case_a", {"reason": "TIMEOUT", "message": "ran past 5 s"})
    assert list(batch.failures()) == ["case_a", "case_b"]
    assert batch.failure("case_b") == {"reason": "TRUNCATED", "path": "x.dcm"}

    # A writer that dies mid-record leaves the earlier record whole, and nothing at a final path.
    def dying_dump(obj, fh, **kwargs):
        fh.write('{"reason": "HALF')
        raise OSError("disk full")

    monkeypatch.setattr(batchdir.json, "dump", dying_dump)
    with pytest.raises(OSError, match="disk full"):
        batch.record_failure("case_b", {"reason": "NEW"})
    monkeypatch.undo()
    assert batch.failure("case_b") == {"reason": "TRUNCATED", "path": "x.dcm"}
    assert not [p for p in (tmp_path / ".batch" / "failed").iterdir() if ".tmp" in p.name]

    batch.record_failure("case_b", None)  # the case succeeded on a rerun
    assert list(batch.failures()) == ["case_a"]
    batch.clear_failures()
    assert batch.failures() == {}


def test_batch_and_case_files_round_trip(tmp_path):
    batch = BatchDir(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="run prepare_ingest for"):
        batch.read_batch("prepare_ingest")
    batch.write_batch({"cases": ["case_a"], "todo": []})
    batch.write_case("case_a", {"inputs_sha256": "abc", "sources": ["a/b.dcm"]})
    assert batch.read_batch() == {"cases": ["case_a"], "todo": []}
    assert batch.read_case("case_a")["sources"] == ["a/b.dcm"]
    assert batch.batch_file == tmp_path / "out" / ".batch" / "batch.json"


def test_temporaries_of_a_killed_writer_are_removed(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / ".case_a.nii.gz.x1.tmp.nii.gz").write_bytes(b"half")
    (tmp_path / "images" / "case_b.nii.gz").write_bytes(b"whole")
    BatchDir(tmp_path).remove_temporaries()
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["case_b.nii.gz"]


def test_folder_checks(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "one.nii.gz").write_bytes(b"")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert batchdir.resolve_folders(source, tmp_path / "out", stage="ingest") == (
        source.resolve(),
        (tmp_path / "out").resolve(),
    )
    with pytest.raises(ValueError, match="must not be inside the source"):
        batchdir.resolve_folders(source, source / "staging", stage="ingest", out_name="staging folder")
    with pytest.raises(ValueError, match="must not be inside the source"):
        batchdir.resolve_folders(source, source, stage="ingest")
    with pytest.raises(FileNotFoundError, match=r"ingest source .* is not a folder"):
        batchdir.resolve_folders(source / "one.nii.gz", tmp_path / "out", stage="ingest")
    # predict takes one file as its source, but never one that is absent
    one = batchdir.resolve_folders(source / "one.nii.gz", tmp_path / "out", stage="predict", files=True)
    assert one[0] == (source / "one.nii.gz").resolve()
    with pytest.raises(FileNotFoundError, match=r"predict source .* does not exist"):
        batchdir.resolve_folders(tmp_path / "absent", tmp_path / "out", stage="predict", files=True)
    with pytest.raises(ValueError, match="is an existing file"):
        batchdir.check_out_folder(a_file)
    with pytest.raises(ValueError, match="cannot be made"):
        batchdir.check_out_folder(a_file / "out")


def test_the_site_secret_is_made_once_private_and_reused(tmp_path, monkeypatch):
    path = tmp_path / "keys" / "site-secret"
    secret = batchdir.resolve_secret(path)
    assert len(secret) == 32 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert batchdir.resolve_secret(str(path)) == secret
    monkeypatch.setenv("UNET_PIPELINE_WORKDIR", str(tmp_path / "work"))
    assert batchdir.secret_path(None).is_relative_to(tmp_path / "work")
    path.write_text("00ff\n")
    with pytest.raises(ValueError, match="shorter than 16 bytes"):
        batchdir.load_or_create_secret(path)
