"""Data-dependent sigma: the paper's gradient ascent vs cheaper searches, cost and outcome.

On the same test inputs of a model trained with Gaussian augmentation (sigma0 = 0.25):

* the paper's ascent (Alfarra et al.: K = 100 steps, lr 1e-4, n = 1 noise sample per step),
* the ascent with larger steps (lr 1e-3, 1e-2), and a short one (K = 20, lr 5e-4: the
  paper's K * lr in a fifth of the steps),
* ddrs's forward-only grid search (12 log-spaced candidates in sigma0 * [0.5, 2] plus sigma0,
  scored on the same 8 noise draws), and a cheaper grid (6 candidates, 4 draws),
* the certified selector (9 log-spaced candidates in sigma0 * [0.5, 2], each scored by the
  radius CERTIFY would give at the certification's N and alpha from hard votes on 64 common
  noise draws; also with 16 draws, and over sigma0 * [0.5, 4]),
* the fixed-sigma baseline (sigma0 everywhere).

Cost: forward / backward passes per input (one pass = one noisy sample through the model),
wall time (methods run in turn, repeated, medians; ratios to the paper's ascent). The ascent
is timed with measure=False (what training uses; `ddrs sigma` adds 2n forward passes).
Quality: the surrogate radius R(sigma) of the chosen sigmas on one common held-out noise set
(64 draws per input, the same for every method), then the real outcome: each method's sigmas
certified with the same N0, N, alpha, seed and keys (`Smooth.certify_batch`; the keys are
the dataset indices, so every method sees the same certification noise). Each certificate
is a fixed-sigma Cohen certificate for that input; the memory that makes the data-dependent
classifier as a whole certifiable is not needed to compare the searches and is not used.

    .venv/bin/python benchmarks/sigma_search.py --quick
    .venv/bin/python benchmarks/sigma_search.py --json runs/bench/sigma_search.json
    .venv/bin/python benchmarks/sigma_search.py --dataset cifar10 --data-root DIR \
        --train-subset 10000 --epochs 30
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from common import (
    REPO,
    LoadMonitor,
    add_common_args,
    apply_threads,
    interleaved,
    median,
    paired_ratio,
    print_machine,
    save_json,
    table,
)

from ddrs.core.sigma import (
    certified_sigma_search,
    grid_sigma_search,
    sigma_search,
    surrogate_radius,
)
from ddrs.core.smooth import Smooth
from ddrs.core.torchutil import frozen_eval
from ddrs.data import get_dataset
from ddrs.models import load_checkpoint
from ddrs.report import average_certified_radius, certified_accuracy
from ddrs.train.loop import TrainConfig, train

SIGMA0 = 0.25
RADII = (0.25, 0.5, 0.75)


def trained_model(args: argparse.Namespace):
    """The cached checkpoint under runs/bench/, trained with ddrs.train.loop.train if absent."""
    if args.checkpoint:
        return load_checkpoint(args.checkpoint).model
    subset = f"_sub{args.train_subset}" if args.train_subset else ""
    out = (
        REPO
        / "runs"
        / "bench"
        / (f"{args.dataset}_{args.arch}_gaussian_s{SIGMA0}_e{args.epochs}{subset}")
    )
    last = out / "last.pt"
    if last.exists():
        loaded = load_checkpoint(last)
        if loaded.meta.get("epoch") == args.epochs - 1:
            print(f"model: cached checkpoint {last}")
            return loaded.model
    print(
        f"model: training {args.arch} on {args.dataset} ({args.epochs} epochs, gaussian, "
        f"sigma {SIGMA0}, lr 0.05, batch 64, lr_step 15) -> {out}",
        flush=True,
    )
    config = TrainConfig(
        dataset=args.dataset,
        arch=args.arch,
        out=str(out),
        sigma=SIGMA0,
        epochs=args.epochs,
        batch=64,
        lr=0.05,
        lr_step=15,
        data_root=args.data_root,
        train_subset=args.train_subset,
        device="cpu",
        progress=False,
        resume=last.exists(),
    )
    return load_checkpoint(train(config)).model


def holdout_radius(model, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> float:
    """Mean surrogate radius R(sigma) over inputs, on the common held-out noise."""
    values = []
    step = max(1, 1024 // noise.shape[1])
    with frozen_eval(model), torch.no_grad():
        for lo in range(0, len(x), step):
            values.append(
                surrogate_radius(
                    model, x[lo : lo + step], sigma[lo : lo + step], noise[lo : lo + step]
                )
            )
    return float(torch.cat(values).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--dataset", default="digits", choices=("digits", "cifar10"))
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--arch", default="cnn")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--checkpoint", default=None, help="use this model instead of training")
    parser.add_argument(
        "--inputs",
        type=int,
        default=None,
        help="test inputs (evenly spaced indices; default 200, quick 50)",
    )
    parser.add_argument("--n", type=int, default=None, help="certification N (1,000; quick 500)")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--holdout", type=int, default=64, help="held-out noise draws per input")
    parser.add_argument("--repeats", type=int, default=None, help="timing rounds (3)")
    args = parser.parse_args()
    apply_threads(args)
    machine = print_machine("sigma search: paper's ascent vs cheaper searches", args)
    monitor = LoadMonitor()
    q = args.quick
    model = trained_model(args)
    test = get_dataset(args.dataset, "test", args.data_root, augment=False)
    count = min(len(test), args.inputs or (50 if q else 200))
    indices = np.linspace(0, len(test) - 1, count).round().astype(int).tolist()
    x = torch.stack([test[i][0] for i in indices])
    labels = np.array([test[i][1] for i in indices])
    n = args.n or (500 if q else 1_000)
    repeats = args.repeats or 3
    num_classes = test.info.num_classes
    print(
        f"{len(indices)} test inputs of {args.dataset}, sigma0 {SIGMA0}; certification "
        f"N0={args.n0}, N={n}, alpha={args.alpha}\n",
        flush=True,
    )

    def ascent(lr: float, k: int = 100):
        return lambda: (
            sigma_search(
                model, x, SIGMA0, iterations=k, lr=lr, samples=1, keys=indices, measure=False
            ).sigma
        )

    def grid(points: int, samples: int):
        return lambda: (
            grid_sigma_search(
                model, x, SIGMA0, grid=points, spread=(0.5, 2.0), samples=samples, keys=indices
            ).sigma
        )

    def certified(samples: int, spread=(0.5, 2.0), points: int = 9):
        return lambda: (
            certified_sigma_search(
                model,
                x,
                SIGMA0,
                grid=points,
                spread=spread,
                samples=samples,
                n=n,
                alpha=args.alpha,
                keys=indices,
                batch=2048,
            ).sigma
        )

    methods = {
        "ascent K100 lr1e-4 n1 (paper)": (ascent(1e-4), 100, 100),
        "ascent K100 lr1e-3 n1": (ascent(1e-3), 100, 100),
        "ascent K100 lr1e-2 n1": (ascent(1e-2), 100, 100),
        "ascent K20 lr5e-4 n1": (ascent(5e-4, 20), 20, 20),
        "grid 12 x 8 draws": (grid(12, 8), 13 * 8, 0),
        "grid 6 x 4 draws": (grid(6, 4), 7 * 4, 0),
        "certified 9 x 64 votes": (certified(64), 9 * 64, 0),
        "certified 9 x 16 votes": (certified(16), 9 * 16, 0),
        "certified 9 x 64, x[0.5, 4]": (certified(64, (0.5, 4.0)), 9 * 64, 0),
    }
    paper = "ascent K100 lr1e-4 n1 (paper)"
    chosen = {}

    def keep(name, fn):
        def run():
            chosen[name] = fn()

        return run

    # warm-up (first calls allocate and pick kernels), on a few inputs
    sigma_search(model, x[:8], SIGMA0, iterations=3, keys=indices[:8], measure=False)
    grid_sigma_search(model, x[:8], SIGMA0, keys=indices[:8])
    certified_sigma_search(model, x[:8], SIGMA0, keys=indices[:8], n=n, alpha=args.alpha)
    print("timing the searches (in turn, repeated):")
    times = interleaved({name: keep(name, fn) for name, (fn, _, _) in methods.items()}, repeats)
    chosen["fixed sigma0 (baseline)"] = torch.full((len(indices),), SIGMA0)

    noise = torch.randn(
        len(indices), args.holdout, *x.shape[1:], generator=torch.Generator().manual_seed(2024)
    )
    smooth = Smooth(model, num_classes, seed=0)
    rows, results = [], {"machine": machine, "args": vars(args), "methods": {}}
    paper_acr = None
    for name, sigmas in chosen.items():
        fwd, bwd = methods[name][1:] if name in methods else (0, 0)
        print(f"certifying with the sigmas of {name} ...", flush=True)
        certs = smooth.certify_batch(x, sigmas, args.n0, n, args.alpha, batch=2048, keys=indices)
        radius = np.array([c.radius for c in certs])
        predict = np.array([c.predict for c in certs])
        tab = {
            "idx": np.array(indices),
            "radius": radius,
            "predict": predict,
            "correct": (predict == labels).astype(int),
        }
        entry = {
            "forward_per_input": fwd,
            "backward_per_input": bwd,
            "seconds": median(times[name]) if name in times else 0.0,
            "time_vs_paper": paired_ratio(times[name], times[paper]) if name in times else 0.0,
            "sigma_mean": float(sigmas.mean()),
            "sigma_min": float(sigmas.min()),
            "sigma_max": float(sigmas.max()),
            "holdout_surrogate": holdout_radius(model, x, sigmas, noise),
            "clean": certified_accuracy(tab, 0.0),
            **{f"r={r}": certified_accuracy(tab, r) for r in RADII},
            "ACR": average_certified_radius(tab),
        }
        if name == paper:
            paper_acr = entry["ACR"]
        results["methods"][name] = entry | {"times": times.get(name), "sigmas": sigmas}
        rows.append(
            [
                name,
                fwd,
                bwd,
                f"{entry['seconds']:.2f}",
                f"{entry['time_vs_paper']:.3f}" if name in times else "-",
                f"{entry['sigma_mean']:.3f} [{entry['sigma_min']:.2f}, {entry['sigma_max']:.2f}]",
                f"{entry['holdout_surrogate']:.4f}",
                f"{entry['clean']:.3f}",
                *(f"{entry[f'r={r}']:.3f}" for r in RADII),
                f"{entry['ACR']:.4f}",
            ]
        )

    print(
        f"\n## sigma searches on {len(indices)} {args.dataset} test inputs "
        f"(certified with N0={args.n0}, N={n}, alpha={args.alpha})"
    )
    print(
        table(
            [
                "method",
                "fwd/input",
                "bwd/input",
                "wall s",
                "time / paper",
                "sigma mean [min, max]",
                "held-out R(sigma)",
                "clean",
                *(f"cert r={r}" for r in RADII),
                "ACR",
            ],
            rows,
        )
    )
    print("\n## target: at least the paper's ACR in at most 1/4 of its wall time")
    met = []
    for name, entry in results["methods"].items():
        if name in methods and name != paper:
            ok = entry["ACR"] >= paper_acr and entry["time_vs_paper"] <= 0.25
            met += [name] if ok else []
            print(
                f"{name:<32s} ACR {entry['ACR']:.4f} vs {paper_acr:.4f} "
                f"({entry['ACR'] - paper_acr:+.4f}), time {entry['time_vs_paper']:.3f}x "
                f"-> {'met' if ok else 'not met'}"
            )
    print(f"target met by: {', '.join(met) if met else 'none'}")
    results["load"] = monitor.report()
    save_json(args.json, results)


if __name__ == "__main__":
    main()
