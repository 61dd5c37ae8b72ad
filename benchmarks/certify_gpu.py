"""CERTIFY on a GPU: the reference loop vs ddrs's engine vs the bare forward pass.

For each model (random weights: throughput does not depend on them) and precision (fp32, and
bf16 autocast), on one CUDA device:

(a) reference: Cohen et al.'s `core.py` loop (benchmarks/certify_throughput.py's CohenSmooth)
    with the tensors on the GPU, at their default batch 400 and at ddrs's batch;
(b) ddrs: `Smooth(model, amp=...).certify_batch` at its automatic batch (the largest power
    of two that fits, halved);
(c) the bare forward pass + argmax over pre-generated noisy inputs at the same batch.

Every timing is preceded by a warm-up and ends with a device synchronisation. Reported:
samples/s of each, the ratios (a)/(b) and (b)/(c), and the seconds per image at
N0 = 100, N = 100,000 that (b)'s rate implies. Not run by CI (no GPU there).

    python benchmarks/certify_gpu.py --json runs/bench/certify_gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from certify_throughput import CohenSmooth
from common import print_machine, save_json, table

from ddrs.core.sampling import auto_batch_size
from ddrs.core.smooth import Smooth
from ddrs.data.cifar import INFO as CIFAR
from ddrs.models import build_model

SIGMA, ALPHA, N0 = 0.25, 0.001, 100
MODELS = {  # arch: (input shape, N used for the timing, inputs)
    "cnn": ((3, 32, 32), 100_000, 4),
    "cifar_resnet110": ((3, 32, 32), 20_000, 2),
    "resnet50": ((3, 224, 224), 4_000, 1),
}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    fn()  # warm-up: kernels chosen, memory allocated
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def autocast(amp: str | None):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)


def measure(arch: str, amp: str | None, device: torch.device, scale: float) -> dict:
    shape, n, inputs = MODELS[arch]
    n = max(1, int(n * scale))
    classes = 1000 if arch == "resnet50" else 10
    torch.manual_seed(0)
    mean, std = (
        (CIFAR.mean, CIFAR.std) if classes == 10 else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    )
    model = build_model(arch, classes, shape, mean, std).to(device).eval()
    xs = torch.rand(inputs, *shape, device=device)
    with autocast(amp):
        batch = auto_batch_size(model, shape)
    total = inputs * (N0 + n)

    smooth = Smooth(model, classes, seed=0, amp=amp)  # converts the model to channels_last
    keys = list(range(inputs))
    b = timed(lambda: smooth.certify_batch(xs, SIGMA, N0, n, ALPHA, batch, keys=keys))

    noisy = (xs[:1] + SIGMA * torch.randn(batch, *shape, device=device)).contiguous(
        memory_format=torch.channels_last
    )
    steps = -(-total // batch)

    def bare():
        with torch.inference_mode(), autocast(amp):
            for _ in range(steps):
                model(noisy).argmax(1)

    c = timed(bare)
    reference = build_model(arch, classes, shape, mean, std).to(device).eval()  # contiguous
    cohen = CohenSmooth(reference, classes, SIGMA)
    a = {}
    for ref_batch in (400, batch):

        def run_a(bs=ref_batch):
            with autocast(amp):
                for x in xs:
                    cohen.certify(x, N0, n, ALPHA, bs)

        a[ref_batch] = timed(run_a)
    return {
        "arch": arch,
        "amp": amp or "fp32",
        "inputs": inputs,
        "n": n,
        "batch": batch,
        "rate_a400": total / a[400],
        "rate_a": total / a[batch],
        "rate_b": total / b,
        "rate_c": total / c,
        "a400_over_b": a[400] / b,
        "a_over_b": a[batch] / b,
        "b_over_c": b / c,
        "seconds_per_image_100k": (N0 + 100_000) * b / total,
        "seconds": {"a400": a[400], "a": a[batch], "b": b, "c": c},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=",".join(MODELS))
    parser.add_argument("--amps", default="fp32,bf16")
    parser.add_argument("--json", metavar="OUT")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every N by this")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("certify_gpu: no CUDA device (--device cpu for a dry run)")
    device = torch.device(args.device)
    machine = print_machine("CERTIFY on a GPU: reference (a) vs ddrs (b) vs bare forward (c)", args)
    machine["gpu"] = torch.cuda.get_device_name(0) if device.type == "cuda" else "none (CPU)"
    print(f"GPU: {machine['gpu']}", flush=True)
    rows = []
    for arch in args.archs.split(","):
        for amp in args.amps.split(","):
            row = measure(arch, None if amp == "fp32" else amp, device, args.scale)
            rows.append(row)
            print(row, flush=True)
    print("\n## CERTIFY on " + machine["gpu"])
    print(
        table(
            [
                "model",
                "precision",
                "inputs x (N0+N)",
                "batch",
                "(a) batch 400 samples/s",
                "(a) same batch",
                "(b) ddrs",
                "(c) bare forward",
                "(a400)/(b) time",
                "(a)/(b) time",
                "(b)/(c) time",
                "s / image at N=100,000",
            ],
            [
                [
                    r["arch"],
                    r["amp"],
                    f"{r['inputs']} x {N0 + r['n']:,}",
                    r["batch"],
                    f"{r['rate_a400']:,.0f}",
                    f"{r['rate_a']:,.0f}",
                    f"{r['rate_b']:,.0f}",
                    f"{r['rate_c']:,.0f}",
                    f"{r['a400_over_b']:.2f}",
                    f"{r['a_over_b']:.2f}",
                    f"{r['b_over_c']:.2f}",
                    f"{r['seconds_per_image_100k']:.3f}",
                ]
                for r in rows
            ],
        )
    )
    save_json(args.json, {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
