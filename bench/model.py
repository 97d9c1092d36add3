"""Achieved FLOP/s of the U-Net (inference forward and a full training step) over the matmul peak.

Both are measured in this one process, so the ratio holds on a shared, noisy machine:

    python bench/model.py                      # fp32, base 32, 256 x 256, this machine's CPU
    python bench/model.py --dtype bf16 --device cuda --base 64 --batch 32 --compile
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import best_time, matmul_peak
from pipeline.runtime import (
    autocast,
    configure_threads,
    prepare_model,
    resolve_device,
    to_input,
    training_channels_last,
)
from unet_model import UNet, UNetConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="slice height and width")
    p.add_argument("--base", type=int, default=32, help="U-Net base width")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 4 on CPU, 32 on CUDA)")
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="compute precision (autocast)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--layout",
        choices=["auto", "channels_last", "nchw"],
        default="auto",
        help="auto: what the pipeline uses (channels_last inference; training channels_last on "
        "CUDA and AVX-512 CPUs, NCHW on AVX2 CPUs)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    configure_threads()
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = DTYPES[args.dtype]
    amp = None if dtype is torch.float32 else dtype
    infer_cl = args.layout != "nchw"
    train_cl = {"channels_last": True, "nchw": False}.get(args.layout, training_channels_last("auto", device))
    batch = args.batch or (32 if device.type == "cuda" else 4)

    torch.manual_seed(0)
    config = UNetConfig(in_channels=1, num_classes=args.classes, base_channels=args.base)
    model = prepare_model(UNet(config), device, channels_last=infer_cl)
    step_model = torch.compile(model) if args.compile else model
    image = torch.randn(batch, 1, args.size, args.size)
    x = to_input(image, device, channels_last=infer_cl)
    y = torch.randint(0, args.classes, (batch, args.size, args.size), device=device)
    fused = device.type == "cuda" or hasattr(torch._C, "_fused_adamw_")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)

    def forward() -> None:
        with torch.inference_mode(), autocast(device, amp):
            step_model(x)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = F.cross_entropy(step_model(x), y)
        loss.backward()
        opt.step()

    def counted_train() -> None:  # FLOPs of forward + loss + backward (the optimizer is elementwise)
        with autocast(device, amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        model.zero_grad(set_to_none=True)

    model.eval()
    fwd_flops = count_flops(lambda: model(x))
    model.train()
    train_flops = count_flops(counted_train)

    peak = matmul_peak(device, dtype, args.repeats)
    model.eval()
    fwd_s = best_time(forward, device, args.repeats, warmup=3 if args.compile else 2)
    if train_cl != infer_cl:  # the training layout (the same weights, another memory format)
        model.to(memory_format=torch.channels_last if train_cl else torch.contiguous_format)
        x = to_input(image, device, channels_last=train_cl)
        if args.compile:
            step_model = torch.compile(model)
    model.train()
    train_s = best_time(train_step, device, args.repeats, warmup=3 if args.compile else 2)
    peak_after = matmul_peak(device, dtype, args.repeats)
    peak = max(peak, peak_after)  # the better of two peak readings bracketing the model runs

    fwd_rate, train_rate = fwd_flops / fwd_s, train_flops / train_s
    names = {True: "channels_last", False: "NCHW"}
    layout = f"inference {names[infer_cl]}, training {names[train_cl]}"
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{torch.get_num_threads()}"
    print(
        f"U-Net base {args.base}, {args.size}x{args.size}, batch {batch}, {args.dtype}, {layout}"
        f"{', compiled' if args.compile else ''} on {name}"
    )
    print(f"  matmul peak ({args.dtype})   {peak / 1e9:10.1f} GFLOP/s")
    print(
        f"  inference forward      {fwd_rate / 1e9:10.1f} GFLOP/s  ratio {fwd_rate / peak:.2f}  "
        f"({fwd_flops / batch / 1e9:.1f} GFLOP/slice, {batch / fwd_s:.1f} slices/s)"
    )
    print(
        f"  training step          {train_rate / 1e9:10.1f} GFLOP/s  ratio {train_rate / peak:.2f}  "
        f"({train_flops / batch / 1e9:.1f} GFLOP/slice, {batch / train_s:.1f} slices/s)"
    )
    return {"peak": peak, "forward_ratio": fwd_rate / peak, "train_ratio": train_rate / peak}


if __name__ == "__main__":
    main()
