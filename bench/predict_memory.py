"""Peak memory of predict on one large volume, per voxel and as a multiple of the volume's size.

    python bench/predict_memory.py                          # 512 x 512 x 300 CT as NIfTI
    python bench/predict_memory.py --dicom --slices 120     # the same as a DICOM series (+ SEG)

One process: a warm-up predict on a small case loads every lazily imported module; then the
kernel's peak-RSS counter of this process is reset (/proc/self/clear_refs "5", Linux >= 4.0), the
resident size noted, predict run on the large case, and the peak read back (VmHWM). The figure is
(peak - resident before) per voxel of the volume, and that over the volume's float32 and stored
(int16) sizes. The model is an untrained U-Net (base --base): its weights do not change memory;
its activations (one batch of slices) are the part that does not grow with the volume.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(
    work: Path, *, slices: int, size: int, dicom: bool = False, base: int = 4, batch_size: int = 16
) -> dict[str, float]:
    """Write the volume and a model into `work`, predict with the voxel limit set to exactly the
    volume's size (a volume at the limit), and return the measured figures."""
    import torch

    from pipeline.inference.batch import BatchSettings, predict
    from pipeline.inference.memory import planned_case_bytes
    from pipeline.ingest import IngestLimits
    from pipeline.io.model_dir import save_model_dir
    from pipeline.io.volume import Volume, save_nifti
    from pipeline.planning.plan import Plan
    from pipeline.synthetic.phantom import make_phantom
    from unet_model import UNet, UNetConfig

    plan = Plan(
        slice_axis=2,
        target_spacing=0.8,
        patch_size=96,
        normalization={"CT": {"scheme": "ct", "clip": [-1000.0, 1000.0], "mean": 0.0, "std": 300.0}},
        labels={"background": 0, "organ": 1, "lesion": 2},
        class_weights=[1.0, 1.0, 1.0],
    )
    torch.manual_seed(0)
    model = UNet(UNetConfig(in_channels=1, num_classes=3, base_channels=base))
    model_dir = save_model_dir(
        model,
        work / "model",
        plan=plan.to_dict(),
        config={"infer": {"batch_size": batch_size}},
        label_names=plan.label_names,
    )
    secret = work / "secret"

    def write_case(root: Path, n: int, side: int) -> int:
        image, _ = make_phantom((n, side, side), (2.5, 0.8, 0.8), seed=1, modality="CT")
        stored = np.clip(image, -1024, 3000).astype(np.int16)  # (slice, row, column)
        if dicom:
            from pipeline.synthetic.dicom import SeriesSpec, write_dicom_series

            write_dicom_series(
                stored, root / "series", SeriesSpec(pixel_spacing=(0.8, 0.8), slice_spacing=2.5)
            )
        else:
            affine = np.diag([0.8, 0.8, 2.5, 1.0])
            save_nifti(Volume(stored.transpose(2, 1, 0).copy(), affine, "CT"), root / "case.nii.gz")
        return stored.size

    write_case(work / "small", 8, 64)
    voxels = write_case(work / "large", slices, size)
    predict(work / "small", model_dir, work / "out_small", BatchSettings(device="cpu", secret_file=secret))

    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    at_limit = IngestLimits(max_voxels=voxels, max_pixels_per_file=max(voxels, size * size))
    summary = predict(
        work / "large",
        model_dir,
        work / "out_large",
        BatchSettings(device="cpu", secret_file=secret, limits=at_limit),
    )
    peak = _status_kib("VmHWM")
    if summary.count("ok") != 1:
        raise RuntimeError(f"the large case did not predict: {[r.reason for r in summary.results]}")
    grew = (peak - before) * 1024
    return {
        "voxels": voxels,
        "peak_over_start_mib": round(grew / 2**20, 1),
        "bytes_per_voxel": round(grew / voxels, 2),
        "x_float32_volume": round(grew / (4 * voxels), 2),
        "x_int16_volume": round(grew / (2 * voxels), 2),
        "rss_before_mib": round(before / 1024, 1),
        "planned_mib": round(planned_case_bytes(voxels, (0.8, 0.8, 2.5), target_spacing=0.8) / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--dicom", action="store_true", help="a DICOM series (writes a DICOM SEG too)")
    p.add_argument("--base", type=int, default=4, help="U-Net base width")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-predict-memory-"))
    try:
        figures = measure(
            work,
            slices=args.slices,
            size=args.size,
            dicom=args.dicom,
            base=args.base,
            batch_size=args.batch_size,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
