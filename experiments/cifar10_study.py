"""CIFAR-10 study: data-dependent sigma against the strongest fixed-sigma baseline.

Rows, all the same architecture, epochs, data and seed, certified on the same test images
with the same N0, N and alpha:

* fixed: one model per training sigma in --fixed-sigmas (0.12, 0.25, 0.5), certified at its
  own sigma; their envelope (the best of them at each radius) is the baseline the paper's
  claim is about;
* data-dependent training (per-sample sigmas from sigma0, warm-started, Alfarra et al.) with
  each dd-lr in --dd-lrs; the one kept is chosen on validation images (below), then
  certified with per-input test sigmas from each selector (the paper's ascent, the surrogate
  grid, the certified selector) through the certification memory;
* test-time only: the fixed sigma0 model certified with per-input sigmas from the certified
  selector, through a memory (what a user holding a published checkpoint would do).

Settings are chosen on validation images held out from training (--val-images images spread
over the training images that are not in the --train-subset), never on the test images:
the dd-lr, and the certified selector's candidate range (--spreads) for each model, by
certified accuracy at --select-radius (ties: ACR) at --val-n. Every choice is written to
`choices.json` with the validation numbers behind it.

Every step writes under --out and is skipped or resumed when re-run (--steps picks steps):

    python experiments/cifar10_study.py --data-root data/cifar10 --out runs/cifar10_study

The paper's scale is a matter of flags (--arch cifar_resnet18 --epochs 200 --train-subset 45000
--dd-lrs 1e-4 --dd-iterations 10 --dd-samples 64 --n 100000 --skip 1).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
from study_common import HelpFormatter

from ddrs.core.sampling import sample_counts
from ddrs.data import get_dataset
from ddrs.models import load_checkpoint
from ddrs.report import (
    envelope_summary,
    format_table,
    load_runs,
    plot_certified_accuracy,
    plot_sigma_histogram,
    plot_training_sigmas,
    run_summary,
)
from ddrs.results import read_table
from ddrs.runs import CertifyRun, SigmaRun, certify_dataset, sigma_dataset
from ddrs.train.loop import TrainConfig, train, training_subset

STEPS = ("train", "select", "certify", "noise", "report")
NOISE_SIGMAS = (0.06, 0.09, 0.12, 0.18, 0.25, 0.35, 0.5, 0.71, 1.0)
RADII = [0.0, 0.25, 0.5, 0.75, 1.0]
SELECTORS = ("certified", "ascent", "grid")  # in the order they are certified


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data-root", required=True, help="CIFAR-10 (ImageFolder or python batches)")
    p.add_argument("--out", default="runs/cifar10_study", help="folder of every file (resumed)")
    p.add_argument("--steps", default=",".join(STEPS), help="comma list of " + ",".join(STEPS))
    p.add_argument("--method", default="gaussian", help="training method of every model")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--seed", type=int, default=0, help="seed of training and noise")
    # training (the same for every model)
    p.add_argument("--arch", default="cnn_small", help="architecture of every model")
    p.add_argument("--sigma0", type=float, default=0.25, help="dd models' initial sigma")
    p.add_argument("--fixed-sigmas", default="0.12,0.25,0.5", help="the fixed-sigma models")
    p.add_argument("--epochs", type=int, default=10, help="training epochs")
    p.add_argument("--train-subset", type=int, default=20000, help="0: all 50,000")
    p.add_argument("--batch", type=int, default=128, help="training batch")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    p.add_argument("--lr-step", type=int, default=4, help="lr x0.1 every this many epochs")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    # data-dependent training: K 1, n 1; dd-lr candidates: the authors' 1e-4, and the step
    # that gives their drift (440 epochs x K 10 x 1e-4) in 10 epochs x K 1, and a tenth of it
    p.add_argument(
        "--dd-lrs", default="0.044,0.0044,0.0001", help="data-dependent models' dd-lr candidates"
    )
    p.add_argument("--dd-iterations", type=int, default=1, help="training-time ascent steps K")
    p.add_argument("--dd-samples", type=int, default=1, help="training-time noise samples n")
    # selection on validation images
    p.add_argument(
        "--val-images", type=int, default=200, help="validation images (held out from training)"
    )
    p.add_argument("--val-n", type=int, default=1000, help="N of the validation certificates")
    p.add_argument(
        "--select-radius",
        type=float,
        default=0.5,
        help="choices by certified accuracy at this radius",
    )
    p.add_argument(
        "--spreads",
        default="0.5:2,0.5:4,0.71:1.41",
        help="certified selector's candidate ranges (factors of the model's sigma) to choose from",
    )
    # test-time selectors
    p.add_argument("--certified-grid", type=int, default=9, help="certified selector: candidates")
    p.add_argument(
        "--certified-samples", type=int, default=64, help="certified selector: votes each"
    )
    p.add_argument("--grid-samples", type=int, default=8, help="surrogate grid: samples each")
    p.add_argument("--ascent-iterations", type=int, default=100, help="paper's ascent: K")
    p.add_argument("--ascent-lr", type=float, default=1e-4, help="paper's ascent: step")
    # certification (the same for every row)
    p.add_argument("--n0", type=int, default=100, help="selection samples")
    p.add_argument("--n", type=int, default=4000, help="estimation samples (the tables: 4,000)")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    p.add_argument("--skip", type=int, default=20, help="every SKIP-th test image (20: 500)")
    p.add_argument("--max", type=int, default=-1, help="stop before this test index (-1: all)")
    p.add_argument("--cert-batch", type=int, default=400, help="noisy samples per forward pass")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p.parse_args(argv)


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def spreads(args) -> list[tuple[float, float]]:
    return [tuple(float(v) for v in item.split(":")) for item in args.spreads.split(",")]


def fixed_name(args, sigma: float) -> str:
    return f"{args.method}-fixed-{sigma:g}"


def dd_name(args, lr: float) -> str:
    return f"{args.method}-dd-lr{lr:g}"


def log_time(args, step: str, name: str, seconds: float) -> None:
    path = Path(args.out) / "timings.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["step", "run", "seconds", "device", "finished"])
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        writer.writerow([step, name, f"{seconds:.1f}", device, time.strftime("%F %T")])


def timed(args, step: str, name: str, fn, *a) -> None:
    started = time.perf_counter()
    print(f"== {step} {name}", flush=True)
    fn(*a)
    log_time(args, step, name, time.perf_counter() - started)


# -- data -------------------------------------------------------------------------------


class Picked:
    """Some images of a dataset, renumbered 0..k-1 (results files index this list)."""

    def __init__(self, base, indices: list[int]):
        self.base, self.indices, self.info = base, indices, base.info
        self.split = f"{base.split}: {len(indices)} picked"

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        x, label, _ = self.base[self.indices[i]]
        return x, label, i


def validation_set(args) -> Picked:
    """--val-images training images spread over those not in the training subset."""
    train_set = get_dataset("cifar10", "train", args.data_root, augment=False)
    used = set(training_subset(len(train_set), args.train_subset or None, args.seed))
    unused = [i for i in range(len(train_set)) if i not in used]
    count = min(args.val_images, len(unused))
    if count < 1:
        raise SystemExit("no validation images: --train-subset uses every training image")
    return Picked(train_set, [unused[k * len(unused) // count] for k in range(count)])


# -- steps ------------------------------------------------------------------------------


def step_train(args, name: str, sigma: float, dd_lr: float | None) -> None:
    out = Path(args.out) / name
    last = out / "last.pt"
    if last.exists() and load_checkpoint(last).meta["epoch"] + 1 >= args.epochs:
        return
    train(
        TrainConfig(
            dataset="cifar10",
            arch=args.arch,
            out=str(out),
            method=args.method,
            sigma=sigma,
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
            data_dependent=dd_lr is not None,
            dd_iterations=args.dd_iterations,
            dd_samples=args.dd_samples,
            dd_lr=dd_lr or 0.0,
            resume=last.exists(),
            progress=not args.no_progress,
        )
    )


def load_model(args, name: str):
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_checkpoint(Path(args.out) / name / "last.pt", device=torch.device(device)).model


def search_options(args, selector: str, spread=(0.5, 2.0)) -> dict:
    if selector == "certified":
        return {
            "grid": args.certified_grid,
            "spread": tuple(spread),
            "samples": args.certified_samples,
            "n": args.n,
            "alpha": args.alpha,
        }
    if selector == "grid":
        return {"grid": 12, "spread": (0.5, 2.0), "samples": args.grid_samples}
    return {"iterations": args.ascent_iterations, "lr": args.ascent_lr, "samples": 1}


def certify_with_sigmas(
    args,
    model,
    dataset,
    folder: Path,
    stem: str,
    selector,
    options,
    sigma0: float,
    selection: dict,
    n: int,
    seed: int,
) -> str:
    """Sigmas from `selector`, then CERTIFY through a fresh memory; returns the results path.
    `selection`: skip and max of the inputs."""
    sigmas = folder / f"{stem}.sigmas.tsv"
    common = {"batch": args.cert_batch, "seed": seed, "progress": not args.no_progress, **selection}
    options = {"n": n, "alpha": args.alpha} | options
    sigma_dataset(
        model,
        dataset,
        SigmaRun(out=str(sigmas), sigma0=sigma0, search=selector, **options, **common),
    )
    out = folder / f"{stem}.certify.tsv"
    certify_dataset(
        model,
        dataset,
        CertifyRun(
            out=str(out),
            n0=args.n0,
            n=n,
            alpha=args.alpha,
            sigmas=str(sigmas),
            memory=str(folder / f"{stem}.memory.sqlite"),
            **common,
        ),
    )
    return str(out)


def score(path: str, radius: float) -> tuple[float, float]:
    """(certified accuracy at `radius`, ACR): what a choice maximises, in that order."""
    t = read_table(path, required=("correct", "radius"))
    ok = t["correct"] == 1
    return float(np.mean(ok & (t["radius"] >= radius))), float(np.mean(t["radius"] * ok))


def step_select(args) -> dict:
    """Choose the dd-lr and each model's selector range on validation images; choices.json."""
    path = Path(args.out) / "choices.json"
    if path.exists():
        return json.loads(path.read_text())
    val = validation_set(args)
    folder = Path(args.out) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    everything: dict = {}
    seed = args.seed + 1  # validation noise: its own streams

    def evaluate(name: str, sigma0: float, spread) -> tuple[float, float]:
        model = load_model(args, name)
        stem = f"{name}.certified-{spread[0]:g}-{spread[1]:g}"
        out = certify_with_sigmas(
            args,
            model,
            val,
            folder,
            stem,
            "certified",
            search_options(args, "certified", spread) | {"n": args.val_n},
            sigma0,
            everything,
            args.val_n,
            seed,
        )
        return score(out, args.select_radius)

    results: dict = {
        "validation_images": val.indices,
        "radius": args.select_radius,
        "n": args.val_n,
        "dd_lr": {},
        "spread": {},
    }
    first = spreads(args)[0]
    for lr in floats(args.dd_lrs):
        results["dd_lr"][f"{lr:g}"] = evaluate(dd_name(args, lr), args.sigma0, first)
    best_lr = max(results["dd_lr"], key=lambda k: results["dd_lr"][k])
    chosen = {"dd_lr": float(best_lr)}
    for name in (dd_name(args, float(best_lr)), fixed_name(args, args.sigma0)):
        tried = {f"{a:g}:{b:g}": evaluate(name, args.sigma0, (a, b)) for a, b in spreads(args)}
        results["spread"][name] = tried
        best = max(tried, key=lambda k: tried[k])
        chosen[name] = [float(v) for v in best.split(":")]
    results["chosen"] = chosen
    path.write_text(json.dumps(results, indent=1))
    return results


def test_selection(args) -> dict:
    return {"skip": args.skip, "max": args.max}


def step_fixed_certify(args, name: str, sigma: float, test_set) -> None:
    folder = Path(args.out) / "test"
    folder.mkdir(parents=True, exist_ok=True)
    model = load_model(args, name)
    certify_dataset(
        model,
        test_set,
        CertifyRun(
            out=str(folder / f"{name}.certify.tsv"),
            n0=args.n0,
            n=args.n,
            alpha=args.alpha,
            sigma=sigma,
            batch=args.cert_batch,
            seed=args.seed,
            progress=not args.no_progress,
            **test_selection(args),
        ),
    )


def dd_rows(args, choices: dict) -> list[tuple[str, str, str, tuple]]:
    """(row stem, model run, selector, certified spread) of every per-input-sigma test row."""
    dd = dd_name(args, choices["chosen"]["dd_lr"])
    fixed = fixed_name(args, args.sigma0)
    rows = [(f"{dd}.{s}", dd, s, tuple(choices["chosen"][dd])) for s in SELECTORS]
    rows.insert(1, (f"{fixed}.certified", fixed, "certified", tuple(choices["chosen"][fixed])))
    return rows


def step_dd_certify(args, stem: str, name: str, selector: str, spread, test_set) -> None:
    folder = Path(args.out) / "test"
    folder.mkdir(parents=True, exist_ok=True)
    model = load_model(args, name)
    certify_with_sigmas(
        args,
        model,
        test_set,
        folder,
        stem,
        selector,
        search_options(args, selector, spread),
        args.sigma0,
        test_selection(args),
        args.n,
        args.seed,
    )


def step_noise_accuracy(args, choices: dict, test_set) -> None:
    """Accuracy of each base classifier under Gaussian noise at each sigma of NOISE_SIGMAS
    (100 draws per test image): what a per-input sigma can trade. noise_accuracy.csv + plot."""
    path = Path(args.out) / "noise_accuracy.csv"
    if path.exists():
        return
    names = [fixed_name(args, s) for s in floats(args.fixed_sigmas)]
    names.append(dd_name(args, choices["chosen"]["dd_lr"]))
    indices = list(range(len(test_set)))[: args.max if args.max >= 0 else None][:: args.skip]
    x = torch.stack([test_set[i][0] for i in indices])
    labels = torch.tensor([int(test_set[i][1]) for i in indices])
    rows = []
    for name in names:
        model = load_model(args, name)
        for sigma in NOISE_SIGMAS:
            counts = sample_counts(
                model,
                x,
                sigma,
                100,
                test_set.info.num_classes,
                batch=args.cert_batch,
                seed=args.seed + 2,
                keys=indices,
            )
            accuracy = counts.gather(1, labels[:, None]).sum().item() / (100 * len(indices))
            rows.append((name, sigma, accuracy))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "sigma", "noisy_accuracy"])
        writer.writerows((m, f"{s:g}", f"{a:.4f}") for m, s, a in rows)
    plot_noise_accuracy(rows, Path(args.out) / "noise_accuracy.png")


def plot_noise_accuracy(rows, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(m for m, _, _ in rows):
        points = [(s, a) for m, s, a in rows if m == name]
        ax.plot(*zip(*points), marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("sigma of the test noise (pixel units)")
    ax.set_ylabel("accuracy under noise (100 draws per image)")
    ax.set_title("CIFAR-10 (JPEG copy): base classifiers under Gaussian noise")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(out, dpi=150, bbox_inches="tight")
    plt.close(fig)


LABELS = {"ascent": "paper's ascent", "grid": "surrogate grid", "certified": "certified selector"}


def step_report(args, choices: dict) -> None:
    folder = Path(args.out) / "test"
    fixed = [
        (f"fixed sigma={s:g}", folder / f"{fixed_name(args, s)}.certify.tsv")
        for s in floats(args.fixed_sigmas)
    ]
    per_input = []
    order = {"ascent": 0, "grid": 1, "certified": 2}
    rows = sorted(dd_rows(args, choices), key=lambda r: ("fixed" in r[1], order[r[2]]))
    for stem, name, selector, _ in rows:
        kind = (
            f"fixed {args.sigma0:g} model"
            if "fixed" in name
            else f"dd-trained (dd-lr {choices['chosen']['dd_lr']:g})"
        )
        per_input.append((f"{kind}, {LABELS[selector]}", folder / f"{stem}.certify.tsv"))
    fixed = [(label, p) for label, p in fixed if p.exists()]
    per_input = [(label, p) for label, p in per_input if p.exists()]
    if not fixed and not per_input:
        print("report: no test results yet")
        return
    fixed_runs = load_runs([str(p) for _, p in fixed], [label for label, _ in fixed])
    dd_runs = load_runs([str(p) for _, p in per_input], [label for label, _ in per_input])
    summaries = [run_summary(r, RADII) for r in fixed_runs]
    if fixed_runs:
        best = envelope_summary(summaries, RADII)
        summaries.append(best | {"label": "fixed-sigma envelope (best per radius)"})
    summaries += [run_summary(r, RADII) for r in dd_runs]
    table = format_table(summaries, RADII, "markdown")
    out = Path(args.out)
    (out / "table.md").write_text(table + "\n")
    plot_certified_accuracy(
        fixed_runs + dd_runs,
        out / "certified_accuracy.png",
        title="CIFAR-10 (JPEG copy): certified accuracy",
        envelope=fixed_runs,
        envelope_label="fixed-sigma envelope",
    )
    plot_sigma_histogram(dd_runs, out / "sigma_histogram.png", sigma0=args.sigma0)
    logs = [(f"dd-lr {lr:g}", out / dd_name(args, lr) / "log.csv") for lr in floats(args.dd_lrs)]
    plot_training_sigmas(
        [(label, p) for label, p in logs if p.exists()], out / "training_sigmas.png"
    )
    print(table)
    print(f"written: {out / 'table.md'} and the plots in {out}")


def main(argv=None) -> None:
    args = parse_args(argv)
    steps = args.steps.split(",")
    unknown = set(steps) - set(STEPS)
    if unknown:
        raise SystemExit(f"unknown steps {sorted(unknown)}; choose from {','.join(STEPS)}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if "train" in steps:
        for sigma in floats(args.fixed_sigmas):
            timed(
                args,
                "train",
                fixed_name(args, sigma),
                step_train,
                args,
                fixed_name(args, sigma),
                sigma,
                None,
            )
        for lr in floats(args.dd_lrs):
            timed(
                args,
                "train",
                dd_name(args, lr),
                step_train,
                args,
                dd_name(args, lr),
                args.sigma0,
                lr,
            )
    choices = None
    if "select" in steps:
        started = time.perf_counter()
        choices = step_select(args)
        log_time(args, "select", "validation", time.perf_counter() - started)
        print(f"choices: {json.dumps(choices['chosen'])}", flush=True)
    if {"certify", "noise", "report"} & set(steps):
        choices = choices or json.loads((Path(args.out) / "choices.json").read_text())
        test_set = get_dataset("cifar10", "test", args.data_root, augment=False)
    if "certify" in steps:
        for sigma in floats(args.fixed_sigmas):
            name = fixed_name(args, sigma)
            timed(args, "certify", name, step_fixed_certify, args, name, sigma, test_set)
        for stem, name, selector, spread in dd_rows(args, choices):
            timed(
                args,
                "sigma+certify",
                stem,
                step_dd_certify,
                args,
                stem,
                name,
                selector,
                spread,
                test_set,
            )
    if "noise" in steps:
        timed(args, "noise", "accuracy under noise", step_noise_accuracy, args, choices, test_set)
    if "report" in steps:
        step_report(args, choices)


if __name__ == "__main__":
    main()
