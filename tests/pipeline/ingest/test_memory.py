"""Memory: an ingest at the voxel limit stays within PEAK_FACTOR x its volume + a fixed overhead;
the limits follow from the budget, and conversions run together only while they fit it."""

import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.ingest import ingest
from pipeline.io.batchdir import BatchDir
from pipeline.io.manifest import read_manifest
from tests.pipeline.ingest import situations

REPO = Path(__file__).resolve().parents[3]


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (psutil, else /proc)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is in the lock; /proc keeps the test honest
        psutil = None
    if psutil is not None:
        try:
            proc = psutil.Process(pid)
            return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
        except psutil.Error:
            return 0
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1]) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total


def _ingest_peak(source: Path, staging: Path, config: Path, secret: Path) -> int:
    """Peak resident bytes of `unet-pipeline ingest` (the whole process tree), asserting exit 0."""
    # The process's own high-water mark (VmHWM) catches a spike between samples. Not ru_maxrss:
    # after fork + exec Linux reports the parent's (pytest's) peak there.
    code = (
        "import sys\nfrom pipeline.cli import app\ntry:\n    app()\nfinally:\n"
        "    hwm = [x for x in open('/proc/self/status') if x.startswith('VmHWM')][0].split()[1]\n"
        "    print('maxrss', int(hwm) * 1024, file=sys.stderr)\n"
    )
    args = ["ingest", str(source), "--out", str(staging), "--secret-file", str(secret)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args, "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.005)
    out, err = proc.communicate()
    assert proc.returncode == 0, out + err
    return max(peak, int(err.split("maxrss")[-1].split()[0]))


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc (Linux)")
def test_peak_memory_of_an_ingest_at_the_voxel_limit(tmp_path):
    """A float32 volume exactly at the limit the budget sets, with its label: the whole process
    tree's peak resident memory stays within PEAK_FACTOR x the volume + FIXED_OVERHEAD_BYTES."""
    from pipeline.ingest import FIXED_OVERHEAD_BYTES, PEAK_FACTOR

    voxels = 2**26  # 256 MiB of float32: the budget below makes this exactly the voxel limit
    shape = (512, 256, voxels // (512 * 256))
    source = tmp_path / "source"
    z = np.arange(shape[2], dtype=np.float32)
    ramp = np.sin(np.arange(shape[0], dtype=np.float32))[:, None, None] * 100 + z
    situations.nifti(source / "big.nii", np.broadcast_to(ramp, shape).astype(np.float32))
    lab = np.zeros(shape, np.uint8)
    lab[100:200, 50:150, 10:50] = 1
    situations.nifti(source / "big_seg.nii.gz", lab)
    del ramp, lab
    volume_bytes = voxels * 4
    budget = FIXED_OVERHEAD_BYTES + int(PEAK_FACTOR * 4) * voxels
    config = tmp_path / "config.yaml"
    config.write_text(f"ingest:\n  memory_budget_gb: {budget / 2**30!r}\n")
    staging = tmp_path / "staging"
    peak = _ingest_peak(source, staging, config, tmp_path / "k")
    limits = BatchDir(staging).read_batch()["limits"]
    assert limits["max_voxels"] == voxels  # the default limit follows from the budget
    (record,) = read_manifest(staging)
    assert record["dtype"] == "float32" and record["labels_present"] == [0, 1]
    bound = PEAK_FACTOR * volume_bytes + FIXED_OVERHEAD_BYTES
    ratio = (peak - FIXED_OVERHEAD_BYTES) / volume_bytes
    assert peak <= bound, f"peak {peak / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB ({ratio:.2f}x + overhead)"


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc (Linux)")
def test_peak_memory_of_a_dicom_series_at_the_voxel_limit(tmp_path):
    """A CT series (12-bit stored, intercept -1024: an int16 volume) exactly at the voxel limit the
    budget sets: the process tree's peak stays within PEAK_FACTOR x the volume + the fixed
    overhead, and what the conversion adds to an ingest of a tiny series stays within
    PEAK_FACTOR x the volume (decoding into one output array; it was 2x: every slice kept)."""
    from pipeline.ingest import FIXED_OVERHEAD_BYTES, PEAK_FACTOR
    from pipeline.synthetic.dicom import SeriesSpec, write_dicom_series

    rows, cols, n = 512, 512, 256
    voxels = rows * cols * n  # 2**26: 128 MiB as int16
    spec = SeriesSpec(signed=False, bits_stored=12, rescale_intercept=-1024.0, slice_spacing=1.0, seed=5)
    stored = (np.arange(n, dtype=np.uint16)[:, None, None] * 13 + np.arange(cols, dtype=np.uint16)) % 4096
    write_dicom_series(np.broadcast_to(stored, (n, rows, cols)), tmp_path / "big" / "series", spec)
    write_dicom_series(stored[:4, :16, :16], tmp_path / "tiny" / "series", spec)
    volume_bytes = 2 * voxels
    config = tmp_path / "config.yaml"
    budget = FIXED_OVERHEAD_BYTES + int(PEAK_FACTOR * 4) * voxels  # makes `voxels` the limit
    config.write_text(f"ingest:\n  memory_budget_gb: {budget / 2**30!r}\n")
    base = _ingest_peak(tmp_path / "tiny", tmp_path / "staging_tiny", config, tmp_path / "k")
    peak = _ingest_peak(tmp_path / "big", tmp_path / "staging", config, tmp_path / "k")
    staging = tmp_path / "staging"
    assert BatchDir(staging).read_batch()["limits"]["max_voxels"] == voxels
    (record,) = read_manifest(staging)
    assert record["dtype"] == "int16" and record["shape"] == [cols, rows, n]
    staged = nib.load(staging / record["image"])
    expected = np.broadcast_to(stored.astype(np.int16) - 1024, (n, rows, cols))
    np.testing.assert_array_equal(np.asarray(staged.dataobj[:, :, ::85]).transpose(2, 1, 0), expected[::85])
    bound = PEAK_FACTOR * volume_bytes + FIXED_OVERHEAD_BYTES
    assert peak <= bound, f"peak {peak / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB"
    ratio = (peak - base) / volume_bytes
    assert ratio <= PEAK_FACTOR, (
        f"peak {peak / 2**20:.0f} MiB, tiny series {base / 2**20:.0f} MiB: {ratio:.2f}x"
    )


def test_limits_follow_from_the_budget():
    from pipeline.ingest import FIXED_OVERHEAD_BYTES, IngestLimits

    small = IngestLimits.for_budget(FIXED_OVERHEAD_BYTES + 6 * 2**24)
    assert (small.max_voxels, small.max_bytes, small.memory_budget) == (
        2**24,
        8 * 2**24,
        FIXED_OVERHEAD_BYTES + 6 * 2**24,
    )
    assert IngestLimits.for_budget(256 * 2**30).max_voxels == 2**30  # never above the historical cap
    with pytest.raises(ValueError, match="memory budget"):
        IngestLimits.for_budget(FIXED_OVERHEAD_BYTES)


def test_parallel_conversions_fit_the_budget():
    from pipeline.ingest.queue import _admit

    peaks = {"a": 6, "b": 5, "c": 3, "d": 20}
    pending = ["a", "b", "c", "d"]
    assert _admit(pending, peaks, {}, workers=4, budget=10) == ["a", "c"]  # 6 + 3 <= 10; b waits
    assert pending == ["b", "d"]
    assert _admit(pending, peaks, {"running a": 6}, workers=4, budget=10) == []  # b (5) would exceed
    assert _admit(pending, peaks, {}, workers=4, budget=10) == ["b"]
    assert _admit(pending, peaks, {}, workers=4, budget=10) == ["d"]  # larger than the budget: alone
    assert _admit(["a", "b", "c"], peaks, {}, workers=2, budget=None) == ["a", "b"]  # workers bound it


def test_the_conversion_queue_admits_by_planned_memory(tmp_path):
    """The queue `ingest` and the ingest flow share: planned peaks from the batch's case records."""
    from pipeline.ingest import FIXED_OVERHEAD_BYTES, ConversionQueue, IngestLimits, planned_peak_bytes

    batch = BatchDir(tmp_path)
    sizes = {"big": 600 * 2**20, "small1": 100 * 2**20, "small2": 100 * 2**20, "old": 900 * 2**20}
    for case_id, size in sizes.items():
        batch.write_case(case_id, {"volume_bytes": size})
    peak = {c: planned_peak_bytes(v) for c, v in sizes.items()}
    limits = IngestLimits(memory_budget=peak["big"] + peak["small1"])
    queue = ConversionQueue(tmp_path, list(sizes), limits, slots=4, todo=["big", "small1", "small2"])
    assert queue.peaks["old"] == 0  # unchanged since the last run: no conversion to plan for
    assert queue.slots == 3 and queue.busy  # the budget holds three of the smallest case
    assert queue.ready() == ["big", "small1", "old"]  # small2 would exceed the budget
    assert queue.ready() == []
    queue.finished("small1")
    assert queue.ready() == ["small2"]
    for case_id in ("big", "old", "small2"):
        queue.finished(case_id)
    assert not queue.busy
    # Slots: no more than the budget holds of the smallest case, never fewer than one.
    tight = IngestLimits(memory_budget=FIXED_OVERHEAD_BYTES)
    assert ConversionQueue(tmp_path, ["small1", "small2"], tight, slots=4).slots == 1
    assert ConversionQueue(tmp_path, ["small1"], IngestLimits(), slots=3).slots == 3  # no budget


def test_ingest_limits_read_the_config_as_the_cli_does(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.ingest import FIXED_OVERHEAD_BYTES, ingest_limits

    config = tmp_path / "config.yaml"
    budget = (FIXED_OVERHEAD_BYTES + 6 * 2**24) / 2**30
    config.write_text(
        f"ingest:\n  memory_budget_gb: {budget!r}\n  allow_no_orientation: true\n"
        "data:\n  accept_partial_series: true\n"
    )
    limits = ingest_limits(config)
    assert (limits.max_voxels, limits.memory_budget) == (2**24, FIXED_OVERHEAD_BYTES + 6 * 2**24)
    assert limits.allow_no_orientation and limits.accept_partial_series
    assert not ingest_limits(config, accept_partial_series=False).accept_partial_series  # overrides win
    default = ingest_limits(None)
    assert not (default.allow_no_orientation or default.accept_partial_series)
    assert default.memory_budget is not None  # 75 % of this machine's memory
    config.write_text("ingest:\n  memory_budgt_gb: 4\n")
    with pytest.raises(ConfigError, match="memory_budgt_gb"):
        ingest_limits(config)


def test_ingest_under_a_tight_budget_converts_everything(tmp_path):
    from pipeline.ingest import FIXED_OVERHEAD_BYTES, IngestLimits

    source = tmp_path / "source"
    for i in range(3):
        situations.good_nifti(source, f"n/ct_{i}.nii.gz")
    limits = IngestLimits.for_budget(FIXED_OVERHEAD_BYTES + 6 * 2**20 + 1)  # one case at a time
    report = ingest(source, tmp_path / "staging", secret_file=tmp_path / "k", workers=2, limits=limits)
    assert report.cases == 3 and report.clean
