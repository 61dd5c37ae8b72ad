"""Cost of data-dependent training (--data-dependent), and what the cheaper settings give.

Part 1, cost: for each training method, epoch time with a fixed sigma and with data-dependent
sigma at the authors' settings (K 10 ascent steps, n 64 noise draws per step, every epoch)
and at cheaper ones (K 1 n 1; K 2 n 8; K 10 n 64 every 2nd epoch), on the same model and data.
All variants train side by side (one epoch of each in turn, order rotated); the ratio is the
mean epoch time over the same epochs divided by the fixed-sigma one (with dd_every 2, over
whole 2-epoch cycles). Epochs use a fixed random subset of the training set (the cost ratio
is a per-batch ratio, so the subset only shortens the run).

Part 2, effect: Gaussian augmentation trained for 15 epochs on digits with each affordable
setting, then test noisy accuracy (one draw at sigma 0.25) and a short certification (N0 100,
N 1,000, alpha 0.001, 100 test inputs) at sigma0 and at per-input sigmas from a quick grid
search (6 candidates x 4 draws). The authors' K 10 n 64 costs hundreds of fixed-sigma epochs
per epoch on this machine (see part 1), so it is left out of part 2 unless --part2-authors.

    .venv/bin/python benchmarks/train_overhead.py --quick
    .venv/bin/python benchmarks/train_overhead.py --json runs/bench/train_overhead.json
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    LoadMonitor,
    add_common_args,
    apply_threads,
    print_machine,
    save_json,
    table,
)

import ddrs.train.loop as loop
from ddrs.core.sigma import grid_sigma_search
from ddrs.core.smooth import Smooth
from ddrs.report import average_certified_radius, certified_accuracy
from ddrs.train.loop import TrainConfig, Trainer
from ddrs.train.methods import method_names

SIGMA = 0.25
FIXED = "fixed sigma"
SETTINGS = {  # name -> (iterations K, samples n, every)
    "dd K10 n64 (authors')": (10, 64, 1),
    "dd K1 n1": (1, 1, 1),
    "dd K2 n8": (2, 8, 1),
    "dd K10 n64 every 2": (10, 64, 2),
}


@functools.cache
def _cached_dataset(name, split, root, augment):
    return _get_dataset(name, split, root, augment)


_get_dataset = loop.get_dataset


def _dataset(name, split="test", root=None, augment=None):
    return _cached_dataset(name, split, root, augment)


def config(args, out: str, method: str, setting: str, epochs: int, subset) -> TrainConfig:
    dd = SETTINGS.get(setting)
    extra = {}
    if dd is not None:
        extra = {
            "data_dependent": True,
            "dd_iterations": dd[0],
            "dd_samples": dd[1],
            "dd_every": dd[2],
        }
    return TrainConfig(
        dataset=args.dataset,
        arch=args.arch,
        out=out,
        method=method,
        sigma=SIGMA,
        epochs=epochs,
        batch=64,
        lr=0.05,
        lr_step=15,
        data_root=args.data_root,
        train_subset=subset,
        device="cpu",
        progress=False,
        **extra,
    )


def part1(
    args, methods, settings, epochs: int, cheap_epochs: int, subset: int, workdir: Path
) -> dict:
    """Epoch times of every (method, setting), side by side: round r runs epoch r of every
    variant that still has epochs to run (the authors' settings `epochs`, the others
    `cheap_epochs`). One untimed warm-up epoch of the fixed-sigma run comes first."""
    trainers, budget = {}, {}
    for method in methods:
        for setting in [FIXED, *settings]:
            out = workdir / f"p1_{method}_{len(trainers)}"
            trainers[(method, setting)] = Trainer(
                config(args, str(out), method, setting, cheap_epochs, subset)
            )
            expensive = setting in SETTINGS and SETTINGS[setting][0] * SETTINGS[setting][1] > 16
            budget[(method, setting)] = epochs if expensive else cheap_epochs
        trainers[(method, FIXED)].train_epoch(0)  # warm-up, untimed
    times = {key: [] for key in trainers}
    keys = list(trainers)
    for epoch in range(max(budget.values())):
        shift = epoch % len(keys)
        for key in keys[shift:] + keys[:shift]:
            if epoch >= budget[key]:
                continue
            seconds = trainers[key].train_epoch(epoch)["epoch_time"]
            times[key].append(seconds)
            print(f"  epoch {epoch + 1}  {key[0]:<12s} {key[1]:<24s} {seconds:8.2f} s", flush=True)
    return times


def certify(model, test, indices, sigmas, n, alpha=0.001) -> dict:
    x = torch.stack([test[i][0] for i in indices])
    labels = np.array([test[i][1] for i in indices])
    certs = Smooth(model, test.info.num_classes, seed=0).certify_batch(
        x, sigmas, 100, n, alpha, batch=2048, keys=indices
    )
    predict = np.array([c.predict for c in certs])
    tab = {
        "idx": np.array(indices),
        "radius": np.array([c.radius for c in certs]),
        "predict": predict,
        "correct": (predict == labels).astype(int),
    }
    return {
        "r=0.25": certified_accuracy(tab, 0.25),
        "r=0.5": certified_accuracy(tab, 0.5),
        "ACR": average_certified_radius(tab),
    }


def part2(args, settings, epochs: int, inputs: int, n: int, workdir: Path) -> list[dict]:
    test = _dataset(args.dataset, "test", args.data_root, False)
    indices = np.linspace(0, len(test) - 1, inputs).round().astype(int).tolist()
    x = torch.stack([test[i][0] for i in indices])
    rows = []
    for setting in [FIXED, *settings]:
        print(f"  training gaussian, {setting}, {epochs} epochs ...", flush=True)
        trainer = Trainer(
            config(
                args,
                str(workdir / f"p2_{len(rows)}"),
                "gaussian",
                setting,
                epochs,
                args.train_subset,
            )
        )
        t0 = time.perf_counter()
        trainer.run()
        train_s = time.perf_counter() - t0
        model = trainer.model
        accuracy = trainer.evaluate()
        found = grid_sigma_search(model, x, SIGMA, grid=6, samples=4, keys=indices).sigma
        rows.append(
            {
                "setting": setting,
                "train_s": train_s,
                **accuracy,
                "sigma_buffer_min": float(trainer.sigma_buffer.min()),
                "sigma_buffer_median": float(trainer.sigma_buffer.median()),
                "sigma_buffer_max": float(trainer.sigma_buffer.max()),
                "fixed": certify(model, test, indices, SIGMA, n),
                "grid": certify(model, test, indices, found, n),
                "grid_sigma_mean": float(found.mean()),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--dataset", default="digits", choices=("digits", "cifar10"))
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--arch", default="cnn")
    parser.add_argument(
        "--methods", default=None, help="comma list (default: every method; quick: gaussian)"
    )
    parser.add_argument(
        "--subset",
        type=int,
        default=None,
        help="training samples per part-1 epoch (default 128; quick 64)",
    )
    parser.add_argument(
        "--epochs", type=int, default=2, help="part-1 epochs of the authors' settings (even)"
    )
    parser.add_argument(
        "--cheap-epochs",
        type=int,
        default=None,
        help="part-1 epochs of the other variants (8; quick 4)",
    )
    parser.add_argument("--part2-epochs", type=int, default=None, help="(15; quick 3)")
    parser.add_argument(
        "--train-subset", type=int, default=None, help="part 2: train on a subset (CIFAR-10)"
    )
    parser.add_argument(
        "--part2-authors",
        action="store_true",
        help="also train the authors' K 10 n 64 in part 2 (slow)",
    )
    parser.add_argument("--skip-part2", action="store_true")
    args = parser.parse_args()
    apply_threads(args)
    machine = print_machine("training overhead of data-dependent sigma", args)
    monitor = LoadMonitor()
    loop.get_dataset = _dataset  # load each dataset once, not once per Trainer
    q = args.quick
    methods = (
        args.methods.split(",") if args.methods else (["gaussian"] if q else list(method_names()))
    )
    subset = args.subset or (64 if q else 128)
    results = {"machine": machine, "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="ddrs-bench-train-") as tmp:
        workdir = Path(tmp)
        print(
            f"part 1: {len(methods)} method(s) x {1 + len(SETTINGS)} settings, "
            f"{args.epochs} epochs of {subset} samples (batch 64), {args.arch} on "
            f"{args.dataset}",
            flush=True,
        )
        cheap_epochs = args.cheap_epochs or (4 if q else 8)
        times = part1(args, methods, list(SETTINGS), args.epochs, cheap_epochs, subset, workdir)
        rows = []
        for method in methods:
            fixed = times[(method, FIXED)]
            for setting in [FIXED, *SETTINGS]:
                t = times[(method, setting)]
                base = np.mean(fixed[: len(t)])  # the fixed-sigma epochs of the same rounds
                rows.append(
                    [method, setting, len(t), f"{np.mean(t):.2f}", f"{np.mean(t) / base:.2f}"]
                )
        results["part1"] = {f"{m}|{s}": v for (m, s), v in times.items()}
        print(
            f"\n## part 1: epoch time ({subset} samples per epoch, batch 64); ratio to the "
            "fixed-sigma epochs of the same rounds"
        )
        print(table(["method", "sigma", "epochs", "mean epoch s", "x fixed-sigma epoch"], rows))

        if not args.skip_part2:
            settings = [s for s in SETTINGS if args.part2_authors or not s.startswith("dd K10")]
            if q:
                settings = ["dd K1 n1", "dd K2 n8"]
            epochs = args.part2_epochs or (3 if q else 15)
            inputs, n = (50, 500) if q else (100, 1_000)
            print(
                f"\npart 2: gaussian, {epochs} epochs per setting; certification of {inputs} "
                f"test inputs, N0 100, N {n}, alpha 0.001",
                flush=True,
            )
            p2 = part2(args, settings, epochs, inputs, n, workdir)
            results["part2"] = p2
            base = p2[0]["train_s"]
            print(
                f"\n## part 2: gaussian, {epochs} epochs; certified accuracy on {inputs} test "
                f"inputs (N {n}) at sigma0 = {SIGMA} and at grid-searched sigmas"
            )
            print(
                table(
                    [
                        "setting",
                        "train s (x fixed)",
                        "sigma buffer median [min, max]",
                        "test noisy acc",
                        "sigma0: r=0.25",
                        "r=0.5",
                        "ACR",
                        "grid sigmas (mean)",
                        "grid: r=0.25",
                        "r=0.5",
                        "ACR",
                    ],
                    [
                        [
                            r["setting"],
                            f"{r['train_s']:.0f} ({r['train_s'] / base:.1f})",
                            f"{r['sigma_buffer_median']:.4f} [{r['sigma_buffer_min']:.4f}, "
                            f"{r['sigma_buffer_max']:.4f}]",
                            f"{r['test_noisy_acc']:.3f}",
                            f"{r['fixed']['r=0.25']:.2f}",
                            f"{r['fixed']['r=0.5']:.2f}",
                            f"{r['fixed']['ACR']:.3f}",
                            f"{r['grid_sigma_mean']:.3f}",
                            f"{r['grid']['r=0.25']:.2f}",
                            f"{r['grid']['r=0.5']:.2f}",
                            f"{r['grid']['ACR']:.3f}",
                        ]
                        for r in p2
                    ],
                )
            )
    results["load"] = monitor.report()
    save_json(args.json, results)


if __name__ == "__main__":
    main()
