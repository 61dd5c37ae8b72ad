"""Input-specific sample size: samples and time saved against certified accuracy and ACR.

On the same inputs, seed and keys: CERTIFY at a fixed N (`Smooth.certify_batch`) against
`Smooth.certify_batch_adaptive` (a pilot of `--pilot` samples on its own stream picks each
input's N on the ladder N, N/2, ... within `--tolerance` of the radius predicted at N, and
abstains at once where the pilot predicts an abstention). Samples count N0 + pilot + N_i per
input; time is wall time of each whole run, measured in turn after a warm-up.

    .venv/bin/python benchmarks/adaptive_n.py                   # digits cnn, N 1,000-100,000
    .venv/bin/python benchmarks/adaptive_n.py --checkpoint C --dataset cifar10 \
        --data-root DIR --inputs 100 --ns 10000,100000 --device cuda
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import print_machine, save_json, table

from ddrs.core.smooth import Smooth
from ddrs.data import get_dataset
from ddrs.models import load_checkpoint
from ddrs.report import average_certified_radius, certified_accuracy

RADII = (0.25, 0.5, 0.75)


def summary(certs, labels) -> dict:
    predict = np.array([c.predict for c in certs])
    tab = {
        "idx": np.arange(len(certs)),
        "radius": np.array([c.radius for c in certs]),
        "predict": predict,
        "correct": (predict == labels).astype(int),
    }
    return {
        "clean": certified_accuracy(tab, 0.0),
        **{f"r={r}": certified_accuracy(tab, r) for r in RADII},
        "ACR": average_certified_radius(tab),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="default: the digits cnn of sigma_search.py")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-root")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--inputs", type=int, default=200, help="evenly spaced test inputs")
    parser.add_argument("--ns", default="1000,10000,100000")
    parser.add_argument("--pilot", type=int, default=1000)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    machine = print_machine("input-specific sample size vs fixed N", args)
    device = torch.device(args.device)
    if args.checkpoint:
        model = load_checkpoint(args.checkpoint, device=device).model
    else:
        from sigma_search import trained_model

        model = trained_model(
            argparse.Namespace(
                checkpoint=None,
                dataset="digits",
                arch="cnn",
                epochs=30,
                train_subset=None,
                data_root=None,
            )
        ).to(device)
    test = get_dataset(args.dataset, "test", args.data_root, augment=False)
    count = min(len(test), args.inputs)
    keys = np.linspace(0, len(test) - 1, count).round().astype(int).tolist()
    x = torch.stack([test[i][0] for i in keys])
    labels = np.array([test[i][1] for i in keys])
    smooth = Smooth(model, test.info.num_classes, seed=0)
    smooth.certify_batch(x[:2], args.sigma, 10, 100, args.alpha, args.batch, keys=keys[:2])
    rows, results = [], {"machine": machine, "args": vars(args), "runs": []}
    for n in (int(v) for v in args.ns.split(",")):
        for kind in ("fixed N", "input-specific"):
            sync(device)
            start = time.perf_counter()
            if kind == "fixed N":
                certs = smooth.certify_batch(
                    x, args.sigma, 100, n, args.alpha, args.batch, keys=keys
                )
                samples = count * (100 + n)
            else:
                certs = smooth.certify_batch_adaptive(
                    x,
                    args.sigma,
                    100,
                    n,
                    args.alpha,
                    args.pilot,
                    args.tolerance,
                    args.batch,
                    keys=keys,
                )
                samples = sum(100 + args.pilot + c.n for c in certs)
            sync(device)
            seconds = time.perf_counter() - start
            entry = {
                "n": n,
                "kind": kind,
                "samples": samples,
                "seconds": seconds,
                "early_abstain": sum(c.n == 0 for c in certs) if kind != "fixed N" else 0,
                **summary(certs, labels),
            }
            results["runs"].append(entry)
            print(entry, flush=True)
            rows.append(
                [
                    f"{n:,}",
                    kind,
                    f"{samples / count:,.0f}",
                    f"{seconds:.1f}",
                    entry["early_abstain"],
                    f"{entry['clean']:.3f}",
                    *(f"{entry[f'r={r}']:.3f}" for r in RADII),
                    f"{entry['ACR']:.4f}",
                ]
            )
    print(
        f"\n## {count} {args.dataset} test inputs, sigma {args.sigma}, alpha {args.alpha}, "
        f"pilot {args.pilot}, tolerance {args.tolerance}"
    )
    print(
        table(
            [
                "N",
                "method",
                "samples / input",
                "wall s",
                "abstained on pilot",
                "clean",
                *(f"r={r}" for r in RADII),
                "ACR",
            ],
            rows,
        )
    )
    save_json(args.json, results)


if __name__ == "__main__":
    main()
