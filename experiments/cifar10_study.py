"""Reproduction study of Data Dependent Randomized Smoothing on CIFAR-10, at a chosen scale.

For each training method (gaussian, smoothadv, macer) train a model with a fixed sigma and
one with data-dependent sigma (same architecture, epochs, data and seed), optimise a sigma
per test input for the data-dependent model, certify the same test subset with the same
N0, N and alpha (data-dependent: through the certification memory), and report.

Every step writes its outputs under --out and is skipped or resumed when re-run, so the
study can be run piece by piece (--steps, --methods) and survives interruptions. The
defaults are the run in docs/results/cifar10.md (2 CPU cores, about 2 hours); the
paper's scale is a matter of flags, e.g.

  python experiments/cifar10_study.py --data-root DIR --arch cifar_resnet18 --epochs 200 \
      --train-subset 0 --batch 256 --lr 0.1 --lr-step 60 --dd-iterations 10 \
      --dd-samples 64 --macer-k 16 --macer-warmup 0 --smoothadv-warmup 10 \
      --n 100000 --skip 1
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from ddrs.classifier import memory_fingerprint
from ddrs.data import get_dataset
from ddrs.memory import CertificationMemory
from ddrs.models import load_checkpoint
from ddrs.report import (
    format_table,
    load_runs,
    plot_certified_accuracy,
    plot_sigma_histogram,
    run_summary,
)
from ddrs.results import read_sigmas
from ddrs.runs import Selection, certify_dataset, sigma_dataset
from ddrs.train.loop import TrainConfig, train

STEPS = ("train", "sigma", "certify", "report")
VARIANTS = ("fixed", "dd")
RADII = [0.0, 0.25, 0.5, 0.75, 1.0]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-root", required=True, help="CIFAR-10 (ImageFolder or python batches)")
    p.add_argument("--out", default="runs/cifar10_study")
    p.add_argument("--steps", default=",".join(STEPS), help="comma list of " + ",".join(STEPS))
    p.add_argument("--methods", default="gaussian,smoothadv,macer")
    p.add_argument("--variants", default="fixed,dd")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    # training (same for every row)
    p.add_argument("--arch", default="cnn_small")
    p.add_argument("--sigma", type=float, default=0.25, help="training sigma = sigma0")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-subset", type=int, default=20000, help="0: all 50,000")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--lr-step", type=int, default=4)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    # data-dependent training: the authors' ImageNet settings (K 1, n 1) by default
    p.add_argument("--dd-iterations", type=int, default=1)
    p.add_argument("--dd-samples", type=int, default=1)
    p.add_argument("--dd-lr", type=float, default=1e-4)
    # methods
    p.add_argument("--smoothadv-eps", type=float, default=0.25)
    p.add_argument("--smoothadv-steps", type=int, default=2)
    p.add_argument("--smoothadv-m", type=int, default=1)
    p.add_argument("--smoothadv-warmup", type=int, default=3)
    p.add_argument("--macer-k", type=int, default=4)
    p.add_argument("--macer-lbd", type=float, default=12.0)
    p.add_argument(
        "--macer-warmup",
        type=int,
        default=4,
        help="epochs of classification loss only before MACER's robustness term",
    )
    # test-time sigma search: the paper's ascent (K 100, lr 1e-4, n 1) by default
    p.add_argument("--search", default="ascent", choices=["ascent", "grid"])
    p.add_argument("--sigma-iterations", type=int, default=100)
    p.add_argument("--sigma-lr", type=float, default=1e-4)
    p.add_argument("--sigma-samples", type=int, default=1)
    # certification (same for every row)
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--skip", type=int, default=20, help="every SKIP-th test image (20: 500)")
    p.add_argument("--max", type=int, default=-1)
    p.add_argument("--cert-batch", type=int, default=400)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def method_settings(args, method: str) -> dict:
    if method == "smoothadv":
        return {
            "eps": args.smoothadv_eps,
            "steps": args.smoothadv_steps,
            "m": args.smoothadv_m,
            "warmup": args.smoothadv_warmup,
        }
    if method == "macer":
        return {"k": args.macer_k, "lbd": args.macer_lbd, "warmup": args.macer_warmup}
    return {}


def run_dir(args, method: str, variant: str) -> Path:
    return Path(args.out) / f"{method}-{variant}"


def log_time(args, step: str, method: str, variant: str, seconds: float) -> None:
    path = Path(args.out) / "timings.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["step", "method", "variant", "seconds", "finished"])
        writer.writerow([step, method, variant, f"{seconds:.1f}", time.strftime("%F %T")])


def step_train(args, method: str, variant: str) -> None:
    out = run_dir(args, method, variant)
    if (out / "last.pt").exists() and load_checkpoint(out / "last.pt").meta[
        "epoch"
    ] + 1 >= args.epochs:
        return
    train(
        TrainConfig(
            dataset="cifar10",
            arch=args.arch,
            out=str(out),
            method=method,
            method_settings=method_settings(args, method),
            sigma=args.sigma,
            epochs=args.epochs,
            batch=args.batch,
            lr=args.lr,
            lr_step=args.lr_step,
            weight_decay=args.weight_decay,
            seed=args.seed,
            data_root=args.data_root,
            train_subset=args.train_subset or None,
            eval_max=1000,
            device=args.device,
            data_dependent=variant == "dd",
            dd_iterations=args.dd_iterations,
            dd_samples=args.dd_samples,
            dd_lr=args.dd_lr,
            resume=(out / "last.pt").exists(),
            progress=not args.no_progress,
        )
    )


def _settings(args, method: str, variant: str, step: str) -> dict:
    keys = (
        "sigma",
        "n0",
        "n",
        "alpha",
        "seed",
        "search",
        "sigma_iterations",
        "sigma_lr",
        "sigma_samples",
    )
    return {
        "study": "cifar10",
        "step": step,
        "method": method,
        "variant": variant,
        **{k: getattr(args, k) for k in keys},
    }


def step_sigma(args, method: str, variant: str, test_set) -> None:
    if variant != "dd":
        return
    out = run_dir(args, method, variant)
    model = load_checkpoint(out / "last.pt").model
    options = {"samples": args.sigma_samples}
    if args.search == "ascent":
        options.update(iterations=args.sigma_iterations, lr=args.sigma_lr)
    sigma_dataset(
        model,
        test_set,
        str(out / "sigmas.tsv"),
        sigma0=args.sigma,
        search=args.search,
        options=options,
        selection=selection(args),
        seed=args.seed,
        settings=_settings(args, method, variant, "sigma"),
        progress=not args.no_progress,
    )


def step_certify(args, method: str, variant: str, test_set) -> None:
    out = run_dir(args, method, variant)
    model = load_checkpoint(out / "last.pt").model
    common = dict(
        n0=args.n0,
        n=args.n,
        alpha=args.alpha,
        batch=args.cert_batch,
        selection=selection(args),
        seed=args.seed,
        progress=not args.no_progress,
        settings=_settings(args, method, variant, "certify"),
    )
    if variant == "fixed":
        certify_dataset(model, test_set, str(out / "certify.tsv"), sigma=args.sigma, **common)
        return
    shape = test_set.info.input_shape
    fingerprint = memory_fingerprint(model, "cifar10", shape)
    with CertificationMemory(out / "memory.sqlite", fingerprint, shape) as memory:
        certify_dataset(
            model,
            test_set,
            str(out / "certify.tsv"),
            sigmas=read_sigmas(out / "sigmas.tsv"),
            memory=memory,
            **common,
        )


def step_report(args, methods, variants) -> None:
    paths, labels = [], []
    for method in methods:
        for variant in variants:
            path = run_dir(args, method, variant) / "certify.tsv"
            if path.exists():
                paths.append(str(path))
                labels.append(f"{method} {'fixed sigma' if variant == 'fixed' else 'data-dep.'}")
    if not paths:
        print("report: no certify results yet")
        return
    runs = load_runs(paths, labels)
    table = format_table([run_summary(r, RADII) for r in runs], RADII, "markdown", True)
    out = Path(args.out)
    (out / "table.md").write_text(table + "\n")
    plot_certified_accuracy(
        runs, out / "certified_accuracy.png", title="CIFAR-10 (JPEG copy): certified accuracy"
    )
    plot_sigma_histogram(runs, out / "sigma_histogram.png")
    print(table)
    print(
        f"written: {out / 'table.md'}, {out / 'certified_accuracy.png'}, "
        f"{out / 'sigma_histogram.png'}"
    )


def selection(args) -> Selection:
    return Selection(skip=args.skip, max=args.max)


def main(argv=None) -> None:
    args = parse_args(argv)
    steps = args.steps.split(",")
    methods, variants = args.methods.split(","), args.variants.split(",")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    test_set = get_dataset("cifar10", "test", args.data_root, augment=False)
    for step in ("train", "sigma", "certify"):
        if step not in steps:
            continue
        for method in methods:
            for variant in variants:
                started = time.perf_counter()
                print(f"== {step} {method} {variant}", flush=True)
                if step == "train":
                    step_train(args, method, variant)
                elif step == "sigma":
                    step_sigma(args, method, variant, test_set)
                else:
                    step_certify(args, method, variant, test_set)
                log_time(args, step, method, variant, time.perf_counter() - started)
    if "report" in steps:
        step_report(args, methods, variants)


if __name__ == "__main__":
    main()
