"""End-to-end batch prediction throughput over the model-only bound, measured in one process.

    python bench/predict.py                         # demo DICOM tree, default model config, CPU
    python bench/predict.py --cases 12 --size 160 --device cuda

End to end: `pipeline.inference.batch.predict` on the demo's DICOM tree (validation, decoding,
preprocessing, forward, argmax, restore to the native grid, NIfTI + DICOM SEG + QC + tables +
report), with the model already loaded (it is loaded once per process). Model-only bound: the
network's forward + argmax on the same preprocessed slices, already in memory, run two ways: one
case at a time with every intra-op thread, and in predict's model streams (several cases at once,
the threads shared out: `pipeline.inference.streams`); the faster of the two is the bound. Ratio =
end-to-end volumes per minute / bound volumes per minute. The model is an untrained U-Net of the
default config (speed does not depend on the weights).

On a shared CPU, read the figure with the load average it prints. Under load from other
processes libgomp's default waiting (worker threads spin between parallel regions) slows the
bound's two-thread forward severalfold, the pipelined predict much less (its own threads' OpenMP
teams throttle the spinning), which flatters the ratio; `OMP_WAIT_POLICY=PASSIVE` (read when torch
loads, so set it on the command line) makes both wait passively and gives the stricter bound.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import sync
from pipeline.config import PipelineConfig
from pipeline.inference.batch import BatchSettings, predict
from pipeline.inference.cases import load_image, plan_cases
from pipeline.inference.model import load_model
from pipeline.inference.predictor import segment_slices
from pipeline.inference.streams import ModelStreams, stream_layout
from pipeline.ingest import IngestLimits, ingest
from pipeline.io.model_dir import save_model_dir
from pipeline.logs import setup_logging
from pipeline.planning.network import plan_network, unet_config
from pipeline.planning.plan import plan_dataset
from pipeline.planning.transforms import preprocess_volume
from pipeline.runtime import configure_threads, prepare_model, resolve_device, resolve_precision
from pipeline.synthetic.dataset import make_demo_dataset
from unet_model import UNet


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=6)
    p.add_argument("--size", type=int, default=112, help="demo in-plane matrix size")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each (the best counts)")
    args = p.parse_args(argv)

    configure_threads()
    setup_logging(verbose=False)  # as `unet-pipeline predict` runs: library notices off the terminal
    load_at_start = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    try:
        demo = make_demo_dataset(tmp / "demo", n_cases=args.cases, size=args.size)
        secret = tmp / "secret"
        ingest(demo.msd_root, tmp / "staging", secret_file=secret, workers=1)
        cfg = PipelineConfig()
        # the width the default config trains for the prediction device
        plan = plan_network(plan_dataset(tmp / "staging"), cfg, resolve_device(args.device))
        net = UNet(unet_config(plan, cfg.model))
        save_model_dir(
            net, tmp / "model", plan=plan.to_dict(), config=cfg.to_dict(), label_names=plan.label_names
        )
        handle = load_model(tmp / "model", args.device)
        device = next(handle.loaded.model.parameters()).device

        predict(
            demo.dicom_root, handle, tmp / "warmup", BatchSettings(secret_file=secret)
        )  # imports, kernel warm-up

        # The bound: forward + argmax only (with the model's test-time mirroring, as predict does),
        # on the same cases' slices already in memory.
        cases, _ = plan_cases(demo.dicom_root, _secret(secret), IngestLimits())
        prepared = [preprocess_volume(load_image(c, demo.dicom_root, IngestLimits()), plan)[0] for c in cases]
        model = prepare_model(handle.loaded.model, device)
        amp = resolve_precision("auto", device)
        bs = cfg.infer.batch_size

        def forward(slices: torch.Tensor) -> None:
            segment_slices(
                model,
                slices,
                device=device,
                batch_size=bs,
                amp_dtype=amp,
                mirror_axes=cfg.infer.mirror_axes,
                context=plan.context_slices,
            )

        def one_stream() -> None:
            for slices in prepared:
                forward(slices)

        layout = stream_layout(None, device, torch.get_num_threads())

        def in_streams() -> None:
            with ModelStreams(layout) as streams:
                for slices in prepared:
                    streams.submit(forward, slices)
                streams.drain()
                list(streams.results())  # raises what a stream raised

        one_stream()
        in_streams()
        # Interleaved, best of each: on a shared machine all three see the same background load.
        times: dict[str, list[float]] = {"e2e": [], "one": [], "streams": []}
        for r in range(args.repeats):
            start = time.perf_counter()
            summary = predict(demo.dicom_root, handle, tmp / f"out{r}", BatchSettings(secret_file=secret))
            sync(device)
            times["e2e"].append(time.perf_counter() - start)
            for name, run in (("one", one_stream), ("streams", in_streams)):
                start = time.perf_counter()
                run()
                sync(device)
                times[name].append(time.perf_counter() - start)
        n_ok = summary.count("ok")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    n_slices = sum(int(s.shape[0]) for s in prepared)
    best, one, streamed = (min(times[k]) for k in ("e2e", "one", "streams"))
    bound = min(one, streamed)
    e2e_vpm = n_ok / best * 60
    bound_vpm = len(prepared) / bound * 60
    ratio = e2e_vpm / bound_vpm
    print(
        f"device {device} ({torch.get_num_threads()} threads, OMP_WAIT_POLICY "
        f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}, load average {load_at_start:.1f} at start); "
        f"model: untrained UNet, default config (base {plan.base_channels}, depth {cfg.model.depth}); "
        f"demo {args.cases} cases, size {args.size}"
    )
    med = {k: median(v) for k, v in times.items()}
    print(f"  cases ok {n_ok} ({n_slices} slices); end-to-end {best:.2f} s (median {med['e2e']:.2f})")
    print(
        f"  model-only: one case at a time {one:.2f} s (median {med['one']:.2f}); in {len(layout)} "
        f"stream(s) of {'+'.join(map(str, layout))} thread(s) {streamed:.2f} s (median {med['streams']:.2f})"
    )
    print(f"  end-to-end {e2e_vpm:.1f} volumes/min, model-only bound {bound_vpm:.1f} volumes/min")
    print(f"  ratio end-to-end / model-only = {ratio:.3f} (target >= 0.75)")
    return {"ratio": ratio, "e2e_vpm": e2e_vpm, "bound_vpm": bound_vpm, "one_s": one, "streams_s": streamed}


def _secret(path: Path) -> bytes:
    from pipeline.io.batchdir import load_or_create_secret

    return load_or_create_secret(path)


if __name__ == "__main__":
    main()
