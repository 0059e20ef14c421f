"""Training throughput of the product's loop (`train_model`) next to the device's bf16 peak bound.

    OMP_NUM_THREADS=1 .venv/bin/python bench/epoch.py                 # CPU, and CUDA when there is one
    .venv/bin/python bench/epoch.py --device cuda --batches 50 --compile
    .venv/bin/python bench/epoch.py --peak-tflops 989                 # a device missing from the table

For each model (small_cnn, resnet18, vgg16_bn at 32x32x3, like CIFAR-10; lenet_bn at 28x28x1) and each
fast-path setting (CPU: fp32 only; CUDA: fp32 NCHW, and bf16 autocast + channels_last, the CUDA defaults,
and optionally + torch.compile) it times one epoch of `train_model` over `--batches` synthetic batches of
random images held on the device (after a warm-up epoch of 3 batches) and prints images per second.

The bound, and its assumptions:
- forward MACs per image are counted by hooks on every Conv2d and Linear (ResNet-18 with the CIFAR stem
  at 32x32: about 0.56 GMAC); batch norm, ReLU, pooling and the optimizer step are not counted;
- forward + backward = 3 x forward (the backward computes the input and the weight gradients, one forward
  each), and 1 MAC = 2 FLOP, so one training image costs 6 x MACs FLOP;
- the peak is the device's dense bf16 tensor-core figure from the table below (or --peak-tflops); on a CPU
  no bound is printed unless --peak-tflops is given.
bound = peak / (6 x MACs) images/s; ratio = measured / bound (the fraction of peak the loop reaches).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch
from torch import nn

from rumflow.data import Split
from rumflow.models import ModelSpec, create_model
from rumflow.training import FastPath, Recipe, sync, train_model

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), from the vendors' data sheets.
BF16_PEAK_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0,
    "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "A800": 312.0, "A10G": 70.0, "A10": 125.0,
    "L40S": 362.0, "L40": 181.0, "L4": 121.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "A6000": 155.0,
}

SHAPES = {"small_cnn": (3, 32), "resnet18": (3, 32), "vgg16_bn": (3, 32), "lenet_bn": (1, 28)}
ASSUMED = "fwd+bwd = 3 x fwd MACs, 1 MAC = 2 FLOP, dense bf16 peak"


@dataclass
class Row:
    """One measured configuration."""

    model: str
    device: str
    setting: str
    batch_size: int
    images_per_s: float
    gmac: float
    bound: float | None


def forward_macs(model: nn.Module, shape: tuple[int, int, int]) -> float:
    """Multiply-accumulates of one image's forward pass through every Conv2d and Linear."""
    total = 0

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            total += out[0].numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            total += mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *shape))
    model.train(was_training)
    for h in handles:
        h.remove()
    return float(total)


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    """--peak-tflops, else the table's entry for the CUDA device's name (longest match), else None."""
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    hits = [k for k in BF16_PEAK_TFLOPS if k.lower() in name.lower()]
    return BF16_PEAK_TFLOPS[max(hits, key=len)] if hits else None


def synthetic(n: int, shape: tuple[int, int, int], device: torch.device) -> Split:
    """n random images and labels on the device (the loop slices them by index, as it slices real data)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, *shape, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return Split(x, y, torch.arange(n)).to(device)


def measure(name: str, device: torch.device, fast: FastPath, batch_size: int, batches: int) -> float:
    """Images per second of one `train_model` epoch over `batches` batches, after a warm-up epoch (3 batches
    on CUDA, for cuDNN's algorithm search and the allocator; 1 on CPU)."""
    c, side = SHAPES[name]
    model = create_model(ModelSpec(name, 10, c, (0.5,) * c, (0.25,) * c), seed=0).to(device)
    # lr 0: the weights stay finite whatever the random data does to the loss; the work per step is the same.
    recipe = Recipe(1, 1e-12, batch_size, fast=fast)
    warm = 3 if device.type == "cuda" else 1
    train_model(model, synthetic(max(warm * batch_size, 2), (c, side, side), device), recipe, seed=0)
    split = synthetic(batches * batch_size, (c, side, side), device)
    sync(device)
    seconds = train_model(model, split, recipe, seed=1).seconds
    return batches * batch_size / seconds


def settings(device: torch.device, compile_too: bool) -> list[tuple[str, FastPath]]:
    """fp32 everywhere; on CUDA also the defaults (bf16 + channels_last) and, if asked, + compile."""
    out = [("fp32", FastPath("fp32", False, False))]
    if device.type == "cuda":
        out.append(("bf16+cl (default)", FastPath()))
        if compile_too:
            out.append(("bf16+cl+compile", FastPath(compile=True)))
    return out


def main() -> None:
    """Measure every model on every device and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--device", nargs="+", default=None, help="cpu and/or cuda (default: cpu, plus cuda if present)")
    ap.add_argument("--batches", type=int, default=None, help="timed batches (default: 3 on CPU, 30 on CUDA)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="default: 256 on CUDA; on CPU 128 for the small models and 16 for resnet18 / vgg16_bn")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak, overriding the table")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile on CUDA")
    args = ap.parse_args()
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows: list[Row] = []
    for dev_name in devices:
        device = torch.device(dev_name)
        cuda = device.type == "cuda"
        batches = args.batches or (30 if cuda else 3)
        peak = peak_tflops(device, args.peak_tflops)
        label = torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} threads"
        print(f"# {label}: {batches} timed batches; bf16 peak "
              f"{'%.0f TFLOP/s' % peak if peak else 'unknown (use --peak-tflops)'}; load {os.getloadavg()[0]:.2f}",
              flush=True)
        for name in args.models:
            c, side = SHAPES[name]
            gmac = forward_macs(create_model(ModelSpec(name, 10, c, (0.5,) * c, (0.25,) * c)), (c, side, side)) / 1e9
            bound = peak * 1e12 / (6 * gmac * 1e9) if peak else None
            bs = args.batch_size or (256 if cuda else 128 if gmac < 0.05 else 16)
            for setting, fast in settings(device, args.compile):
                ips = measure(name, device, fast, bs, batches)
                rows.append(Row(name, dev_name, setting, bs, ips, gmac, bound))
                print(f"  {name:10s} {setting:18s} {ips:10.1f} img/s", flush=True)
    print(f"\n{'model':10s} {'device':6s} {'setting':18s} {'batch':>5s} {'GMAC/img':>9s} {'img/s':>10s} "
          f"{'TFLOP/s':>8s} {'bound img/s':>12s} {'ratio':>8s}")
    for r in rows:
        bound = f"{r.bound:12.0f}" if r.bound else f"{'-':>12s}"
        ratio = f"{r.images_per_s / r.bound:8.2%}" if r.bound else f"{'-':>8s}"
        print(f"{r.model:10s} {r.device:6s} {r.setting:18s} {r.batch_size:5d} {r.gmac:9.3f} "
              f"{r.images_per_s:10.1f} {r.images_per_s * 6 * r.gmac / 1e3:8.3f} {bound} {ratio}")
    by_key = {(r.model, r.device, r.setting): r.images_per_s for r in rows}
    for name in args.models:
        cpu, fp32, fast = (by_key.get((name, "cpu", "fp32")), by_key.get((name, "cuda", "fp32")),
                           by_key.get((name, "cuda", "bf16+cl (default)")))
        if fp32 and fast:
            print(f"{name}: CUDA bf16+channels_last / fp32 = {fast / fp32:.2f}x"
                  + (f"; CUDA default / CPU = {fast / cpu:.0f}x" if cpu else ""))
    print(f"(bound: {ASSUMED})")


if __name__ == "__main__":
    main()
