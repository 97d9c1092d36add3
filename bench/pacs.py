"""Pull, segment and push the demo studies through a local Orthanc: time of each and the transfer share.

    python bench/pacs.py                  # 12 demo cases, the default model config, CPU
    python bench/pacs.py --cases 4 --base 16

Orthanc (Debian packages orthanc, orthanc-dicomweb) runs on loopback with authentication, as in
the tests. Timed in one process: the pull (QIDO-RS search + WADO-RS into the spool), predict on
the spool (the model is an untrained U-Net of the given width: speed does not depend on the
weights) and the push of every SEG over STOW-RS. Transfer share = (pull + push) / total. On
loopback the network costs nothing, so the share is the protocol and (de)serialisation overhead
the pipeline adds, a floor for a real PACS on a hospital network.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import PipelineConfig
from pipeline.inference.batch import BatchSettings, predict
from pipeline.ingest import ingest
from pipeline.io.batchdir import load_or_create_secret
from pipeline.io.model_dir import save_model_dir
from pipeline.pacs.pull import pull
from pipeline.pacs.push import push_batch
from pipeline.planning.network import CPU_BASE_CHANNELS
from pipeline.planning.plan import plan_dataset
from pipeline.runtime import configure_threads
from pipeline.synthetic.dataset import make_demo_dataset
from tests.pipeline.pacs.orthanc import ORTHANC_BIN, PASSWORD, SKIP_REASON, USER, start_orthanc
from unet_model import UNet, UNetConfig


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=12)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--base", type=int, default=CPU_BASE_CHANNELS, help="U-Net width (the CPU plan's)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if ORTHANC_BIN is None:
        raise SystemExit(SKIP_REASON)
    configure_threads()
    os.environ["UNET_PACS_USERNAME"], os.environ["UNET_PACS_PASSWORD"] = USER, PASSWORD
    with tempfile.TemporaryDirectory(prefix="bench-pacs-") as tmp:
        root = Path(tmp)
        demo = make_demo_dataset(root / "demo", n_cases=args.cases, size=args.size)
        secret_file = root / "site-secret"
        ingest(demo.msd_root, root / "staging", secret_file=secret_file, workers=1)
        plan = plan_dataset(root / "staging")
        model = UNet(
            UNetConfig(in_channels=plan.context_slices, num_classes=plan.num_classes, base_channels=args.base)
        )
        config = PipelineConfig().replace(model={"base_channels": args.base}).to_dict()
        model_dir = save_model_dir(
            model, root / "model", plan=plan.to_dict(), config=config, label_names=plan.label_names
        )
        orthanc = start_orthanc(root / "orthanc")
        try:
            files = [demo.dicom_root / f for c in demo.cases for f in c.dicom_files]
            orthanc.upload(files)
            out = root / "out"
            secret = load_or_create_secret(secret_file)
            t0 = time.perf_counter()
            report = pull(orthanc.dicomweb_url, out, secret=secret)
            t1 = time.perf_counter()
            summary = predict(
                report.folder, model_dir, out, BatchSettings(device=args.device, secret_file=secret_file)
            )
            t2 = time.perf_counter()
            ok = [r.case_id for r in summary.results if r.status == "ok"]
            pushed = push_batch(out, orthanc.dicomweb_url, ok)
            t3 = time.perf_counter()
        finally:
            orthanc.stop()
    pull_s, predict_s, push_s = t1 - t0, t2 - t1, t3 - t2
    total = t3 - t0
    slices = sum(c.shape[0] for c in demo.cases)
    result = {
        "cases": len(ok),
        "slices": slices,
        "instances": len(files),
        "pull_mb": report.bytes / 1e6,
        "push_mb": pushed.bytes / 1e6,
        "pull_s": pull_s,
        "predict_s": predict_s,
        "push_s": push_s,
        "total_s": total,
        "transfer_share": (pull_s + push_s) / total,
    }
    print(
        f"{len(ok)} cases ({len(files)} instances, {slices} slices, base {args.base}, {args.size} px, "
        f"{args.device}): pull {pull_s:.2f} s ({result['pull_mb']:.1f} MB), predict {predict_s:.2f} s, "
        f"push {push_s:.2f} s ({result['push_mb']:.1f} MB); total {total:.2f} s, "
        f"transfer share {result['transfer_share']:.3f}"
    )
    return result


if __name__ == "__main__":
    main()
