"""Ingest speed on one large DICOM series, as ratios to dicom2nifti and dcm2niix on the same files.

    python bench/ingest.py                    # 512 x 512 x 200 CT series, all three gzip their output
    python bench/ingest.py --size 256 --slices 100 --repeats 3

Every tool reads the same files and writes a .nii.gz; each is timed best-of-N in this process
(dcm2niix as a subprocess, dicom2nifti and ours as calls), so the ratios hold on a noisy machine.
Ours runs the whole ingest: discovery, header pass, geometry checks, decoding, gzip, sha256 of
inputs and outputs, the manifest.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.ingest import ingest
from pipeline.synthetic.dicom import SeriesSpec, write_dicom_series


def make_series(out: Path, size: int, slices: int, seed: int = 0) -> None:
    """A CT-like series: body ellipse with organs, smooth shading and noise (realistic to compress)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    body = (xx / 0.42) ** 2 + (yy / 0.33) ** 2 < 1
    organ = ((xx - 0.1) / 0.15) ** 2 + ((yy + 0.05) / 0.1) ** 2 < 1
    vol = np.empty((slices, size, size), np.int16)
    for k in range(slices):
        shade = 30 * np.sin(6 * xx + k / 20) * np.cos(4 * yy)
        img = np.where(body, 40 + shade, -1000) + np.where(organ, 60, 0)
        img = img + rng.normal(0, 12, img.shape) * body
        vol[k] = np.clip(img + 1024, 0, 4095).astype(np.int16)  # stored values, intercept -1024
    spec = SeriesSpec(modality="CT", slice_spacing=1.25, rescale_intercept=-1024.0, seed=seed)
    write_dicom_series(vol, out, spec)


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--slices", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("dicom2nifti").setLevel(logging.ERROR)

    dcm2niix = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    import dicom2nifti
    import dicom2nifti.settings

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "series"
        make_series(src, args.size, args.slices)
        secret = tmp / "secret"

        def ours() -> None:
            out = tmp / "ours"
            shutil.rmtree(out, ignore_errors=True)
            ingest(src, out, secret_file=secret, workers=1)

        def d2n() -> None:
            out = tmp / "d2n"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            dicom2nifti.settings.disable_validate_slice_increment()  # like dcm2niix: no resampling
            dicom2nifti.dicom_series_to_nifti(str(src), str(out / "vol.nii.gz"), reorient_nifti=False)

        def niix(level: int):
            def run() -> None:
                out = tmp / f"niix{level}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                subprocess.run(
                    [dcm2niix, "-z", "y", f"-{level}", "-b", "n", "-o", str(out), "-f", "%s", str(src)],
                    check=True,
                    capture_output=True,
                )

            return run

        t_ours = best(ours, args.repeats)
        t_d2n = best(d2n, args.repeats)
        t_niix6 = best(niix(6), args.repeats)
        t_niix1 = best(niix(1), args.repeats)
        sizes = {
            "ours": next((tmp / "ours" / "images").glob("*.nii.gz")).stat().st_size,
            "dcm2niix -6": next((tmp / "niix6").glob("*.nii.gz")).stat().st_size,
        }

    mb = args.size * args.size * args.slices * 2 / 2**20
    shape = f"{args.size}x{args.size}x{args.slices}"
    print(f"ingest of one {shape} CT series ({mb:.0f} MiB of pixels), best of {args.repeats}")
    rows = [
        ("ours (ISA-L gzip -1)", t_ours, "", sizes["ours"]),
        ("dicom2nifti", t_d2n, f"ours/dicom2nifti {t_ours / t_d2n:.2f} (target <= 0.25)", None),
        (
            "dcm2niix (default -6)",
            t_niix6,
            f"ours/dcm2niix {t_ours / t_niix6:.2f} (target <= 1.0)",
            sizes["dcm2niix -6"],
        ),
        ("dcm2niix -1", t_niix1, f"ours/dcm2niix -1 {t_ours / t_niix1:.2f}", None),
    ]
    for name, seconds, ratio, size in rows:
        out = f"  output {size / 2**20:5.1f} MiB" if size else ""
        print(f"  {name:<22} {seconds:6.2f} s  {ratio:<40}{out}")
    return {
        "vs_dicom2nifti": t_ours / t_d2n,
        "vs_dcm2niix": t_ours / t_niix6,
        "vs_dcm2niix_1": t_ours / t_niix1,
    }


if __name__ == "__main__":
    main()
