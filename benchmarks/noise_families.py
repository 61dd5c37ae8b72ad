"""What the noise families cost and certify on a real model: the studies' Gaussian-trained
CIFAR-10 model on the studies' 500 test images (every 20th), certified by `ddrs certify` once
per variant, one after the other, on one engine (eager, so that the noise is what differs).

Variants: L2 with float Gaussian noise (the field's practice), L2 with the discrete Gaussian
(sound in floating point), L1 with uniform noise at a fixed lambda (0.433: the same standard
deviation as sigma 0.25; and 0.25), and L1 with a lambda per input (the certified search, then
a memory of L1 balls). Also the noise alone: samples per second of each family's noise for
a 3 x 32 x 32 input (no model), measured in the same run.

    .venv/bin/python benchmarks/noise_families.py \\
        --checkpoint runs/cifar10_routing/gaussian-fixed-0.25/last.pt --data-root data/cifar10 \\
        --out runs/bench/noise_families
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from common import LoadMonitor, print_machine, save_json, table

from ddrs.cli import main as ddrs
from ddrs.core.families import FAMILIES
from ddrs.core.sampling import sample_counts
from ddrs.results import read_table

RADII = (0.25, 0.5, 0.75, 1.0)
VARIANTS = {
    "L2 gaussian float, sigma 0.25": ["--sigma", "0.25"],
    "L2 gaussian discrete, sigma 0.25": ["--sigma", "0.25", "--noise", "discrete"],
    "L1 uniform, lambda 0.433": ["--norm", "l1", "--sigma", "0.433"],
    "L1 uniform, lambda 0.25": ["--norm", "l1", "--sigma", "0.25"],
    "L1 uniform, lambda per input": ["--norm", "l1"],  # --sigmas and --memory added below
    # a model trained under uniform noise (`ddrs train --norm l1 --sigma LAMBDA`): --lambda
    "L1 uniform, lambda LAMBDA": ["--norm", "l1", "--sigma", "LAMBDA"],
    "L1 uniform, lambda per input around LAMBDA": ["--norm", "l1"],
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint")
    p.add_argument("--data-root")
    p.add_argument("--out", help="a folder for the results files")
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--skip", type=int, default=20)
    p.add_argument("--lambda", dest="lam", default="0.433", help="LAMBDA in variant names")
    p.add_argument("--variants", default=";".join(list(VARIANTS)[:5]), help="names, with ;")
    p.add_argument("--json", metavar="OUT")
    p.add_argument(
        "--resnet110", type=int, metavar="SAMPLES", default=0,
        help="only this: the cost of each noise end to end through ResNet-110",
    )  # fmt: skip
    return p.parse_args()


def certified(table_: dict, r: float) -> float:
    return float(np.mean((table_["correct"] == 1) & (table_["radius"] >= r)))


def noise_rates(samples: int = 20_000) -> dict[str, float]:
    """Noisy samples per second of each family alone (a model that only counts its input)."""

    class Nothing(torch.nn.Module):
        def forward(self, z):
            return torch.zeros(z.shape[0], 2)

    x = torch.randint(0, 256, (4, 3, 32, 32)).float() / 255
    rates = {}
    for name, family in FAMILIES.items():
        sample_counts(Nothing(), x, 0.25, 512, 2, family=family)  # warm-up (the tables)
        start = time.perf_counter()
        sample_counts(Nothing(), x, 0.25, samples // 4, 2, batch=256, family=family)
        rates[name] = samples / (time.perf_counter() - start)
    return rates


def resnet110_seconds(samples: int) -> dict[str, float]:
    """End-to-end seconds of `samples` noisy samples of one 8-bit image through ResNet-110
    (random weights: the cost, not the answer), float then discrete."""
    from ddrs.models import build_model

    model = build_model("cifar_resnet110", 10, (3, 32, 32), (0.5,) * 3, (0.25,) * 3).eval()
    x = torch.randint(0, 256, (1, 3, 32, 32)).float() / 255
    seconds = {}
    for name in ("gaussian", "discrete"):
        sample_counts(model, x, 0.25, 256, 10, family=FAMILIES[name])  # warm-up
        start = time.perf_counter()
        sample_counts(model, x, 0.25, samples, 10, batch=256, family=FAMILIES[name])
        seconds[name] = time.perf_counter() - start
    return seconds


def main() -> None:
    args = parse_args()
    if args.resnet110:
        seconds = resnet110_seconds(args.resnet110)
        print(f"ResNet-110, {args.resnet110} samples: " + ", ".join(
            f"{k} {v:.1f} s" for k, v in seconds.items()
        ) + f"; discrete / float {seconds['discrete'] / seconds['gaussian']:.3f}")  # fmt: skip
        return
    machine = print_machine("noise families (L2 float, L2 discrete, L1) on CIFAR-10", args)
    monitor = LoadMonitor()
    rates = noise_rates()
    print("noise alone, samples/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in rates.items()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--checkpoint", args.checkpoint, "--dataset", "cifar10", "--data-root",
              args.data_root, "--skip", str(args.skip), "--no-progress",
              "--engine", "eager"]  # fmt: skip
    rows, tables = [], {}
    for name in args.variants.split(";"):
        extra = [a.replace("LAMBDA", args.lam) for a in VARIANTS[name]]
        sigma0 = args.lam if "LAMBDA" in name else "0.433"
        name = name.replace("LAMBDA", args.lam)
        path = out / (name.replace(", ", "-").replace(" ", "-") + ".tsv")
        start = time.perf_counter()
        if "per input" in name:
            sigmas = out / "lambda.tsv"
            code = ddrs(["sigma", *common, "--norm", "l1", "--sigma0", sigma0, "--spread",
                         "0.5,2", "--n", str(args.n), "--out", str(sigmas)])  # fmt: skip
            if code not in (0, None):
                raise SystemExit(f"{name}: ddrs sigma failed ({code})")
            extra += ["--sigmas", str(sigmas), "--memory", str(out / "l1-memory.sqlite")]
        code = ddrs(["certify", *common, "--n", str(args.n), "--out", str(path), *extra])
        seconds = time.perf_counter() - start
        if code not in (0, None):
            raise SystemExit(f"{name}: ddrs certify failed ({code})")
        tables[name] = read_table(path)
        rows.append({"variant": name, "seconds": seconds})
        print(f"{name}: {seconds:.0f} s", flush=True)
    float_time = rows[0]["seconds"] if rows and "float" in rows[0]["variant"] else None
    for row in rows:
        t = tables[row["variant"]]
        for r in RADII:
            row[f"r={r:g}"] = certified(t, r)
        row["abstain"] = float(np.mean(t["predict"] < 0))
        row["median sigma"] = float(np.median(t["sigma"]))
    print(
        table(
            ["variant", *[f"r={r:g}" for r in RADII], "abstain", "median scale", "seconds",
             "time / L2 float"],
            [[r["variant"], *[f"{100 * r[f'r={x:g}']:.1f}" for x in RADII],
              f"{100 * r['abstain']:.1f}", f"{r['median sigma']:.3f}", f"{r['seconds']:.0f}",
              f"{r['seconds'] / float_time:.2f}" if float_time else ""]
             for r in rows],
        )
    )  # fmt: skip
    report = {"machine": machine, "noise_rates": rates, "rows": rows, "load": monitor.report()}
    save_json(args.json, report)


if __name__ == "__main__":
    main()
