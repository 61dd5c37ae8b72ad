"""Routing overhead: what routing among experts costs on top of one certification.

On the same inputs, seed and keys, in turn (order rotated every round), median wall time:
  * one certification: one expert at its sigma (N0 + N forward passes per input);
  * routing: the certified selector over the E experts (E x --samples votes per input), then
    the chosen expert's certification;
  * dual smoothing: the router's certification (N0 + N_r) and the routed expert's;
  * the cascade (--p0): one certification per level visited, from the largest sigma down.
Forward passes are counted per input (the cascade's: its mean levels x (N0 + N)); times are
reported as ratios to one certification.

    .venv/bin/python benchmarks/routing.py                    # digits cnn experts, trained here
    .venv/bin/python benchmarks/routing.py --experts-dir runs/cifar10_routing --dataset cifar10 \
        --data-root data/cifar10 --inputs 100 --n 4000 \
        --router runs/cifar10_routing/memory_free/router-0.5/last.pt --p0 0.7
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import interleaved, median, print_machine, save_json, table

from ddrs.core.cascade import Cascade
from ddrs.core.experts import Expert, Experts
from ddrs.core.route import DualSmoothing, ExpertCertifier, route_by_certified_radius
from ddrs.core.smooth import Smooth
from ddrs.data import get_dataset
from ddrs.models import load_checkpoint
from ddrs.runs.source import load_router
from ddrs.train.config import TrainConfig
from ddrs.train.loop import train
from ddrs.train.router import train_router

SIGMAS = (0.12, 0.25, 0.5)


def digits_experts(folder: Path) -> tuple[Experts, Path]:
    """Three digits CNNs (10 epochs on 1,100 images) and a router on the other 337."""
    members = []
    for sigma in SIGMAS:
        path = train(
            TrainConfig(
                dataset="digits",
                arch="cnn",
                sigma=sigma,
                epochs=10,
                batch=64,
                lr=0.05,
                train_subset=1100,
                eval_max=None,
                progress=False,
                out=str(folder / f"{sigma:g}"),
            )
        )
        members.append(Expert(f"{sigma:g}", str(path), sigma, load_checkpoint(path).model))
    experts = Experts(tuple(members))
    router = train_router(
        experts,
        TrainConfig(
            dataset="digits",
            arch="cnn",
            sigma=0.25,
            epochs=10,
            batch=64,
            lr=0.05,
            eval_max=None,
            progress=False,
            out=str(folder / "router"),
        ),
        samples=64,
        n=2000,
        alpha=0.001,
    )
    return experts, router


def study_experts(folder: Path) -> tuple[Experts, Path]:
    """The routing study's experts and its router at sigma_r 0.25 (three experts)."""
    members = []
    for sigma in SIGMAS:
        path = folder / f"gaussian-fixed-{sigma:g}" / "last.pt"
        members.append(Expert(f"g{sigma:g}", str(path), sigma, load_checkpoint(path).model))
    return Experts(tuple(members)), folder / "router-three-0.25" / "last.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts-dir", help="the routing study's --out (default: digits)")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-root")
    parser.add_argument("--inputs", type=int, default=200, help="evenly spaced test inputs")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--samples", type=int, default=64, help="routing votes per expert")
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--router", help="router checkpoint (default: the study's sigma_r 0.25)")
    parser.add_argument("--p0", type=float, default=0.7, help="the cascade's threshold")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    machine = print_machine("routing overhead against one certification", args)
    with tempfile.TemporaryDirectory() as scratch:
        if args.experts_dir:
            experts, router_path = study_experts(Path(args.experts_dir))
        else:
            experts, router_path = digits_experts(Path(scratch))
        router_path = Path(args.router) if args.router else router_path
        test = get_dataset(args.dataset, "test", args.data_root, augment=False)
        count = min(len(test), args.inputs)
        keys = np.linspace(0, len(test) - 1, count).round().astype(int).tolist()
        x = torch.stack([test[i][0] for i in keys])
        classes = test.info.num_classes
        middle = experts[len(experts) // 2]
        single = Smooth(middle.model, classes, seed=0)
        certifier = ExpertCertifier(experts, classes, seed=0)
        dual = DualSmoothing(load_router(str(router_path), experts, "cpu"), experts, classes)
        cascade = Cascade(experts, classes, args.p0)
        batch = single.batch_size(args.batch, test.info.input_shape)
        passes = {
            "one certification": args.n0 + args.n,
            "routing (selector + certification)": len(experts) * args.samples + args.n0 + args.n,
            "dual smoothing (router + expert)": 2 * (args.n0 + args.n),
        }

        def one():
            single.certify_batch(x, middle.sigma, args.n0, args.n, args.alpha, batch, keys)

        def routed():
            found = route_by_certified_radius(
                experts, x, samples=args.samples, n=args.n, alpha=args.alpha, keys=keys, batch=batch
            )
            certifier.certify_batch(
                x, found.expert.tolist(), found.sigma, args.n0, args.n, args.alpha, batch, keys
            )

        levels: list[float] = []

        def cascaded():
            found = cascade.certify_batch(
                x, n0=args.n0, n=args.n, alpha=args.alpha, batch=batch, keys=keys
            )
            levels.append(float(np.mean([c.levels for c in found])))

        def dualed():
            dual.certify_batch(
                x, n0=args.n0, n=args.n, router_n=args.n, alpha=args.alpha, batch=batch, keys=keys
            )

        times = interleaved(
            {
                "one certification": one,
                "routing (selector + certification)": routed,
                "dual smoothing (router + expert)": dualed,
                f"cascade (p0 {args.p0:g})": cascaded,
            },
            args.repeats,
            warmup=True,
        )
    passes[f"cascade (p0 {args.p0:g})"] = round(levels[-1] * (args.n0 + args.n))
    base = median(times["one certification"])
    rows = [
        [
            name,
            f"{passes[name]:,}",
            f"{passes[name] / passes['one certification']:.3f}",
            f"{median(t):.2f}",
            f"{median(t) / base:.3f}",
        ]
        for name, t in times.items()
    ]
    print(
        f"\n## {count} {args.dataset} test inputs, {len(experts)} experts, N0 {args.n0}, "
        f"N {args.n} (router N the same), {args.samples} routing votes per expert"
    )
    print(
        table(
            ["method", "forward passes / input", "passes ratio", "median wall s", "time ratio"],
            rows,
        )
    )
    save_json(args.json, {"machine": machine, "args": vars(args), "times": times, "passes": passes})


if __name__ == "__main__":
    main()
