"""CIFAR-10 routing study: route each input to the sigma-expert that certifies it best, and
compare with the strongest fixed-sigma baseline (the envelope over the experts).

Experts: the fixed-sigma models of the first studies (cnn_small, Gaussian augmentation at
sigma 0.12, 0.25 and 0.5, 10 epochs on a 20,000-image training subset), each smoothed at
its own sigma; and, for users with one model, the 0.25 model at the same three sigmas.

Rows, all certified on the same test images with the same N0, N and alpha:

* each expert at its sigma, and their envelope (the best of them at each radius);
* routing through the memory: the certified selector over experts (`ddrs sigma --expert`,
  rule "radius" or "agree", chosen on validation images), then each input certified by its
  expert with fresh noise, then the memory;
* dual smoothing: a router (cnn_small, trained with `train_router` on held-out training
  images at sigma_r, chosen on validation images) certifies the route, the expert the class;
  radius min(R_route, R_cls), alpha split in halves;
* the same two with the one-model experts;
* the best data-dependent row of the previous study (docs/results/cifar10/test/), as it
  was measured there (its experts were trained in another session).

Images: training subset (seed 0) for the experts; of the other 30,000 training images,
--val-images spread evenly are the validation images (every choice is made on them) and
--router-images others, spread evenly, label and train the routers. Test: every --skip-th
test image.

Every step writes under --out and is skipped or resumed when re-run:

    python experiments/cifar10_routing.py --data-root data/cifar10 --out runs/cifar10_routing
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
from study_common import HelpFormatter

from ddrs.core.experts import Expert, Experts
from ddrs.data import get_dataset
from ddrs.models import load_checkpoint
from ddrs.report import (
    envelope_summary,
    format_table,
    load_runs,
    plot_certified_accuracy,
    plot_experts,
    run_summary,
    sign_test,
)
from ddrs.results import read_table
from ddrs.runs import CertifyRun, SigmaRun, certify_dataset, sigma_dataset
from ddrs.train.config import TrainConfig
from ddrs.train.loop import train, training_subset
from ddrs.train.router import train_router

RADII = [0.0, 0.25, 0.5, 0.75, 1.0]
SIGMAS = (0.12, 0.25, 0.5)
SETS = ("three", "one")  # three experts; one model (0.25) at three sigmas


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data-root", required=True, help="CIFAR-10 (ImageFolder or python batches)")
    p.add_argument("--out", default="runs/cifar10_routing", help="folder of every file (resumed)")
    p.add_argument("--steps", default="train,routers,select,certify,report", help="steps to run")
    p.add_argument("--seed", type=int, default=0, help="seed of training and noise")
    p.add_argument("--arch", default="cnn_small", help="architecture of experts and routers")
    p.add_argument("--epochs", type=int, default=10, help="experts' training epochs")
    p.add_argument("--train-subset", type=int, default=20000, help="experts' training images")
    p.add_argument("--val-images", type=int, default=200, help="validation images (held out)")
    p.add_argument("--router-images", type=int, default=5000, help="routers' images (held out)")
    p.add_argument("--router-epochs", type=int, default=15, help="routers' epochs")
    p.add_argument("--router-sigmas", default="0.25,0.5", help="sigma_r candidates")
    p.add_argument("--label-samples", type=int, default=64, help="votes per expert for labels")
    p.add_argument("--route-samples", type=int, default=64, help="votes per expert (routing)")
    p.add_argument("--val-n", type=int, default=1000, help="N of the validation certificates")
    p.add_argument("--n0", type=int, default=100, help="selection samples")
    p.add_argument("--n", type=int, default=4000, help="estimation samples")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    p.add_argument("--skip", type=int, default=20, help="every SKIP-th test image (20: 500)")
    p.add_argument("--max", type=int, default=-1, help="stop before this test index (-1: all)")
    p.add_argument("--batch", type=int, default=400, help="noisy samples per forward pass")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p.parse_args(argv)


class Picked:
    """Some images of a dataset, renumbered 0..k-1 (results files index this list)."""

    def __init__(self, base, indices: list[int], name: str):
        self.base, self.indices, self.info = base, indices, base.info
        self.split = f"{base.split}: {name} ({len(indices)} images)"

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        x, label, _ = self.base[self.indices[i]]
        return x, label, i


def held_out(args) -> tuple[list[int], list[int]]:
    """(validation images, router images): disjoint, both among the training images that no
    expert trained on."""
    total = len(get_dataset("cifar10", "train", args.data_root, augment=False))
    used = set(training_subset(total, args.train_subset, args.seed))
    unused = [i for i in range(total) if i not in used]
    val = [unused[k * len(unused) // args.val_images] for k in range(args.val_images)]
    rest = [i for i in unused if i not in set(val)]
    count = min(args.router_images, len(rest))
    return val, [rest[k * len(rest) // count] for k in range(count)]


def expert_path(args, sigma: float) -> Path:
    return Path(args.out) / f"gaussian-fixed-{sigma:g}" / "last.pt"


def experts_of(args, which: str) -> Experts:
    """The three experts, or the 0.25 model at the three sigmas (one model, loaded once)."""
    models, members = {}, []
    for sigma in SIGMAS:
        path = expert_path(args, sigma if which == "three" else 0.25)
        if path not in models:
            models[path] = load_checkpoint(path).model
        name = f"{'g' if which == 'three' else 'one'}{sigma:g}"
        members.append(Expert(name, str(path), sigma, models[path]))
    return Experts(tuple(members))


def log_time(args, step: str, seconds: float) -> None:
    path = Path(args.out) / "timings.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["step", "seconds", "finished"])
        writer.writerow([step, f"{seconds:.1f}", time.strftime("%F %T")])


def timed(args, step: str, fn, *a):
    started = time.perf_counter()
    print(f"== {step}", flush=True)
    result = fn(*a)
    log_time(args, step, time.perf_counter() - started)
    return result


# -- steps ------------------------------------------------------------------------------------
def step_train(args) -> None:
    for sigma in SIGMAS:
        out = expert_path(args, sigma).parent
        if _trained(out / "last.pt", args.epochs):
            continue
        timed(args, f"train expert {sigma:g}", train, expert_config(args, sigma, out))


def expert_config(args, sigma: float, out: Path) -> TrainConfig:
    """An expert's training (the studies' recipe) at `sigma`, resumed where `out` has one."""
    return TrainConfig(
        dataset="cifar10",
        data_root=args.data_root,
        arch=args.arch,
        sigma=sigma,
        epochs=args.epochs,
        train_subset=args.train_subset,
        batch=128,
        lr=0.05,
        lr_step=4,
        weight_decay=1e-4,
        eval_max=1000,
        seed=args.seed,
        out=str(out),
        progress=not args.no_progress,
        resume=(out / "last.pt").exists(),
    )


def _trained(last: Path, epochs: int) -> bool:
    return last.exists() and load_checkpoint(last).meta["epoch"] + 1 >= epochs


def router_dir(args, which: str, sigma_r: float) -> Path:
    return Path(args.out) / f"router-{which}-{sigma_r:g}"


def router_config(args, sigma_r: float, out: Path, **extra) -> TrainConfig:
    """A router's training settings (the memory-free study adds its method and --init)."""
    return TrainConfig(
        dataset="cifar10",
        data_root=args.data_root,
        arch=args.arch,
        sigma=sigma_r,
        epochs=args.router_epochs,
        batch=128,
        lr=0.05,
        lr_step=6,
        weight_decay=1e-4,
        eval_max=None,
        seed=args.seed,
        out=str(out),
        progress=not args.no_progress,
        resume=(out / "last.pt").exists(),
        **extra,
    )


def step_routers(args) -> None:
    _, images = held_out(args)
    for which in SETS:
        experts = experts_of(args, which)
        for sigma_r in [float(v) for v in args.router_sigmas.split(",")]:
            out = router_dir(args, which, sigma_r)
            last = out / "last.pt"
            if _trained(last, args.router_epochs):
                continue
            config = router_config(args, sigma_r, out)
            labels = Path(args.out) / f"labels-{which}.tsv"  # one file for both sigma_r
            timed(
                args,
                f"router {which} {sigma_r:g}",
                lambda e=experts, c=config, f=labels: train_router(
                    e, c, images, samples=args.label_samples, n=args.n, alpha=args.alpha, labels=f
                ),
            )


def certify_row(
    args, which: str, data, folder: Path, how: str, n: int, seed: int, selection: dict
) -> str:
    """One row: how = "fixed:<k>" (expert k at its sigma), "route:<rule>" (routing + memory)
    or "dual:<sigma_r>" (dual smoothing through the router trained at sigma_r)."""
    kind, value = how.split(":", 1)
    experts, stem = experts_of(args, which), stem_of(which, how)
    common = {
        "n0": args.n0,
        "n": n,
        "alpha": args.alpha,
        "batch": args.batch,
        "seed": seed,
        "progress": not args.no_progress,
        **selection,
    }
    out = folder / f"{stem}.certify.tsv"
    if kind == "fixed":
        expert = experts[int(value)]
        certify_dataset(expert.model, data, CertifyRun(out=str(out), sigma=expert.sigma, **common))
    elif kind == "route":
        routes = folder / f"{stem}.routes.tsv"
        sigma_dataset(
            experts,
            data,
            SigmaRun(
                out=str(routes),
                route_rule=value,
                samples=args.route_samples,
                n=n,
                alpha=args.alpha,
                batch=args.batch,
                seed=seed,
                progress=not args.no_progress,
                **selection,
            ),
        )
        certify_dataset(
            experts,
            data,
            CertifyRun(
                out=str(out),
                sigmas=str(routes),
                memory=str(folder / f"{stem}.memory.sqlite"),
                **common,
            ),
        )
    else:
        router = router_dir(args, which, float(value)) / "last.pt"
        certify_dataset(experts, data, CertifyRun(out=str(out), router=str(router), **common))
    return str(out)


def score(path: str) -> tuple[float, float]:
    """(ACR, certified accuracy at 0.5): what a choice maximises, in that order."""
    t = read_table(path, required=("correct", "radius"))
    ok = t["correct"] == 1
    return float(np.mean(t["radius"] * ok)), float(np.mean(ok & (t["radius"] >= 0.5)))


def step_select(args) -> dict:
    """Choose, per expert set, the route rule and the router's sigma_r by ACR on the
    validation images (ties: certified accuracy at 0.5); choices.json."""
    path = Path(args.out) / "choices.json"
    if path.exists():
        return json.loads(path.read_text())
    val, _ = held_out(args)
    data = Picked(get_dataset("cifar10", "train", args.data_root, augment=False), val, "validation")
    folder = Path(args.out) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    results: dict = {"validation_images": val, "n": args.val_n, "tried": {}, "chosen": {}}
    for which in SETS:
        tried = {}
        for how in ["route:radius", "route:agree"] + [
            f"dual:{s}" for s in args.router_sigmas.split(",")
        ]:
            out = timed(
                args,
                f"validation {stem_of(which, how)}",
                certify_row,
                args,
                which,
                data,
                folder,
                how,
                args.val_n,
                args.seed + 1,
                {},
            )
            tried[how] = score(out)
        results["tried"][which] = tried
        for kind in ("route", "dual"):
            options = {k: v for k, v in tried.items() if k.startswith(kind)}
            results["chosen"][f"{which}-{kind}"] = max(options, key=lambda k: options[k])
    path.write_text(json.dumps(results, indent=1))
    return results


def test_rows(args, choices: dict) -> list[tuple[str, str, str]]:
    """(label, expert set, how) of every test row, in report order."""
    rows = [(f"expert sigma {s:g}", "three", f"fixed:{k}") for k, s in enumerate(SIGMAS)]
    for which, title in (("three", "3 experts"), ("one", "0.25 model at 3 sigmas")):
        for kind, name in (("route", "routing + memory"), ("dual", "dual smoothing")):
            how = choices["chosen"][f"{which}-{kind}"]
            rows.append((f"{title}: {name} ({how})", which, how))
    return rows


def stem_of(which: str, how: str) -> str:
    return f"{which}.{how.replace(':', '-')}"


def step_certify(args, choices: dict) -> None:
    test = get_dataset("cifar10", "test", args.data_root, augment=False)
    folder = Path(args.out) / "test"
    folder.mkdir(parents=True, exist_ok=True)
    for label, which, how in test_rows(args, choices):
        timed(
            args,
            f"test {label}",
            certify_row,
            args,
            which,
            test,
            folder,
            how,
            args.n,
            args.seed,
            {"skip": args.skip, "max": args.max},
        )


def step_report(args, choices: dict) -> None:
    out, folder = Path(args.out), Path(args.out) / "test"
    rows = [
        (label, folder / f"{stem_of(which, how)}.certify.tsv")
        for label, which, how in test_rows(args, choices)
    ]
    rows = [(label, p) for label, p in rows if p.exists()]
    runs = load_runs([str(p) for _, p in rows], [label for label, _ in rows])
    fixed = runs[:3]
    summaries = [run_summary(r, RADII) for r in runs]
    envelope = envelope_summary(summaries[:3], RADII) | {"label": "envelope of the 3 experts"}
    table = format_table(summaries[:3] + [envelope] + summaries[3:], RADII, "markdown")
    lines = [
        table,
        "",
        "Sign tests against the envelope's expert at each radius (inputs only "
        "the row certifies / only the expert does, two-sided p):",
        "",
    ]
    lines.append("| row | " + " | ".join(f"r={r:g}" for r in RADII[:4]) + " |")
    lines.append("|---|" + "---:|" * 4)
    for run in runs[3:]:
        cells = []
        for r in RADII[:4]:
            best = max(fixed, key=lambda f, r=r: run_summary(f, [r])["certified"][r])
            a, b, p = sign_test(run.table, best.table, r)
            cells.append(f"{a} / {b}, p = {p:.3g} ({best.label})")
        lines.append(f"| {run.label} | " + " | ".join(cells) + " |")
    lines += ["", router_numbers(args, choices, runs)]
    text = "\n".join(lines)
    (out / "report.md").write_text(text + "\n")
    plot_certified_accuracy(
        runs,
        out / "certified_accuracy.png",
        title="CIFAR-10 (JPEG copy): routing among sigma-experts",
        envelope=fixed,
        envelope_label="envelope of the 3 experts",
    )
    plot_experts(runs[3:], out / "experts.png")
    print(text)


def router_numbers(args, choices: dict, runs) -> str:
    """Why the dual rows are what they are: router accuracy on its own held-out labels, the
    routes it certified, and how often its radius caps the answer."""
    lines = []
    for run in runs[3:]:
        t = run.table
        if "route_radius" not in t:
            continue
        certified = t["correct"] == 1
        capped = certified & (t["route_radius"] < t["expert_radius"])
        abstained = np.mean(t["expert"].astype(str) == "-")
        lines.append(
            f"- {run.label}: router abstained on {abstained:.1%}; of the "
            f"{int(certified.sum())} certified-correct inputs, the router's radius "
            f"was the smaller one for {int(capped.sum())}"
        )
    for which in SETS:
        for sigma_r in args.router_sigmas.split(","):
            log = router_dir(args, which, float(sigma_r)) / "log.csv"
            if log.exists():
                with open(log) as f:
                    last = list(csv.DictReader(f))[-1]
                lines.append(
                    f"- router {which} sigma_r {sigma_r}: accuracy on its held-out "
                    f"labels {float(last['test_clean_acc']):.3f} clean, "
                    f"{float(last['test_noisy_acc']):.3f} under its noise"
                )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    steps = set(args.steps.split(","))
    if "train" in steps:
        step_train(args)
    if "routers" in steps:
        step_routers(args)
    choices = step_select(args) if steps & {"select", "certify", "report"} else {}
    if "certify" in steps:
        step_certify(args, choices)
    if "report" in steps:
        step_report(args, choices)


if __name__ == "__main__":
    main()
