"""`ddrs quickstart`: the whole method on scikit-learn's bundled digits, in a few minutes.

1. train small CNNs with Gaussian augmentation at sigma 0.12, 0.25 and 0.5 (the experts),
   and one with data-dependent sigma (per-sample sigmas, warm-started every epoch), all on
   the same training subset; the training images left out label and train a router;
2. certify each expert at its sigma (their envelope is the strongest fixed-sigma baseline);
3. the data-dependent model: a sigma per test input (certified selector), then CERTIFY with
   the memory;
4. the experts routed by the certified selector over experts, with the memory; and two ways
   without a memory: the multi-scale cascade (the largest sigma that is confident answers;
   its threshold p0 chosen on the held-out training images) and dual smoothing (a router,
   trained on the held-out images, certifies the route, the expert the class);
5. print the comparison table and write the plots. Every file goes under `out`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddrs.core.cascade import Cascade
from ddrs.core.experts import Expert, Experts
from ddrs.data import get_dataset
from ddrs.errors import InputError
from ddrs.models import load_checkpoint
from ddrs.report import (
    envelope_comparison,
    envelope_summary,
    format_table,
    load_runs,
    plot_certified_accuracy,
    plot_experts,
    plot_sigma_histogram,
    run_summary,
    significant_claims,
)
from ddrs.results import row_count
from ddrs.runs import CertifyRun, SigmaRun, certify_dataset, sigma_dataset
from ddrs.train.config import TrainConfig
from ddrs.train.loop import train
from ddrs.train.router import held_out_indices, train_router


@dataclass(frozen=True)
class QuickstartSettings:
    sigma: float = 0.25  # the data-dependent model's sigma0, and the middle expert's
    expert_sigmas: tuple[float, ...] = (0.12, 0.25, 0.5)
    train_subset: int = 1100  # of 1,437 training images; the other 337 train the router
    epochs: int = 30
    lr: float = 0.05
    lr_step: int = 15
    batch: int = 64
    # Training-time search: the authors' ImageNet-like cheap setting (K=1 step, n=4 samples)
    # rather than their CIFAR-10 K=10, n=64 (160x the cost), with a larger step so that the
    # per-sample sigmas move within 30 short epochs.
    dd_iterations: int = 1
    dd_samples: int = 4
    dd_lr: float = 5e-3
    # Test-time sigmas: the certified selector (9 candidates in sigma0 x [0.5, 2], 64 votes
    # each), the search that did best on digits (benchmarks/sigma_search.py); the same 64
    # votes per expert route among the experts
    sigma_grid: int = 9
    sigma_samples: int = 64
    route_rule: str = "radius"
    router_sigma: float = 0.5  # the largest expert's: the route radius does not cap it
    router_epochs: int = 30
    p0_candidates: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
    n0: int = 100
    n: int = 2_000
    alpha: float = 0.001
    skip: int = 1


QUICK = QuickstartSettings(
    epochs=3, lr_step=2, dd_samples=2, sigma_samples=8, n=200, skip=6, router_epochs=2
)


def _train(out: Path, s: QuickstartSettings, name: str, **config) -> Path:
    config = TrainConfig(
        dataset="digits",
        arch="cnn",
        out=str(out),
        batch=s.batch,
        lr=s.lr,
        lr_step=s.lr_step,
        eval_max=None,
        resume=(out / "last.pt").exists(),
        **config,
    )
    if config.resume and load_checkpoint(out / "last.pt").meta["epoch"] + 1 >= config.epochs:
        print(f"      {name}: already trained ({out / 'last.pt'})")
        return out / "last.pt"  # already trained: quickstart resumes where it stopped
    print(f"      {name} -> {out}")
    return train(config)


def _already(path: Path, count: int) -> str:
    """' (already done)' when a results file holds all `count` rows (a re-run resumes)."""
    rows = row_count(path)
    if not rows:
        return ""
    return " (already done)" if rows >= count else f" (resuming after {rows} of {count})"


def quickstart(
    out: str | Path = "runs/quickstart", quick: bool = False, progress: bool = True
) -> list[Path]:
    """Run the main job; returns every file it wrote. Re-running resumes finished steps."""
    s = QUICK if quick else QuickstartSettings()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(
            f"--out {out} is a file; give a folder (the quickstart writes several files into it)"
        )
    started = time.perf_counter()
    test_set = get_dataset("digits", "test")
    count = len(range(0, len(test_set), s.skip))
    common = {"n0": s.n0, "n": s.n, "alpha": s.alpha, "skip": s.skip, "progress": progress}
    training = {"epochs": s.epochs, "train_subset": s.train_subset, "progress": progress}

    print(
        f"[1/5] training CNNs on {s.train_subset} digits: experts at sigma "
        f"{', '.join(f'{v:g}' for v in s.expert_sigmas)}, and data-dependent from {s.sigma}"
    )
    members = []
    for sigma in s.expert_sigmas:
        path = _train(
            out / f"expert-{sigma:g}", s, f"the sigma={sigma:g} expert", sigma=sigma, **training
        )
        members.append(Expert(f"sigma={sigma:g}", str(path), sigma, load_checkpoint(path).model))
    experts = Experts(tuple(members))
    dd_ckpt = _train(
        out / "data_dependent",
        s,
        "the data-dependent CNN",
        sigma=s.sigma,
        data_dependent=True,
        dd_iterations=s.dd_iterations,
        dd_lr=s.dd_lr,
        dd_samples=s.dd_samples,
        **training,
    )

    print(f"[2/5] certifying each expert at its sigma (N={s.n}, alpha={s.alpha})")
    fixed = []
    for expert in experts:
        path = out / f"expert-{expert.sigma:g}_certify.tsv"
        print(f"      {expert.name}{_already(path, count)}")
        certify_dataset(
            expert.model, test_set, CertifyRun(out=str(path), sigma=expert.sigma, **common)
        )
        fixed.append(path)

    sigmas_tsv, dd_tsv = out / "dd_sigmas.tsv", out / "dd_certify.tsv"
    print(
        f"[3/5] data-dependent: a sigma per test input (certified selector, {s.sigma_grid} "
        f"candidates in {s.sigma:g} x [0.5, 2]), then CERTIFY with the memory"
        + _already(dd_tsv, count)
    )
    dd_model = load_checkpoint(dd_ckpt).model
    sigma_dataset(
        dd_model,
        test_set,
        SigmaRun(
            out=str(sigmas_tsv),
            sigma0=s.sigma,
            search="certified",
            grid=s.sigma_grid,
            samples=s.sigma_samples,
            n=s.n,
            alpha=s.alpha,
            skip=s.skip,
            progress=progress,
        ),
    )
    certify_dataset(
        dd_model,
        test_set,
        CertifyRun(
            out=str(dd_tsv),
            sigmas=str(sigmas_tsv),
            memory=str(out / "dd_memory.sqlite"),
            **common,
        ),
    )

    routes_tsv, routed_tsv = out / "routes.tsv", out / "routed_certify.tsv"
    print(
        f"[4/5] the experts routed: the certified selector over them ({s.sigma_samples} "
        "votes each), then CERTIFY with the memory" + _already(routed_tsv, count)
    )
    sigma_dataset(
        experts,
        test_set,
        SigmaRun(
            out=str(routes_tsv),
            samples=s.sigma_samples,
            route_rule=s.route_rule,
            n=s.n,
            alpha=s.alpha,
            skip=s.skip,
            progress=progress,
        ),
    )
    certify_dataset(
        experts,
        test_set,
        CertifyRun(
            out=str(routed_tsv),
            sigmas=str(routes_tsv),
            memory=str(out / "routed_memory.sqlite"),
            **common,
        ),
    )
    held = held_out_indices(experts, len(get_dataset("digits", "train")))
    cascade_tsv = out / "cascade_certify.tsv"
    p0 = _choose_p0(experts, held, s)
    print(
        f"      the cascade: from sigma {max(s.expert_sigmas):g} down, the first confident "
        f"level answers (p0 {p0:g}, the best ACR on the {len(held)} held-out training images)"
        + _already(cascade_tsv, count)
    )
    certify_dataset(experts, test_set, CertifyRun(out=str(cascade_tsv), cascade=p0, **common))
    dual_tsv = out / "dual_certify.tsv"
    print(
        f"      dual smoothing: a router (sigma_r {s.router_sigma:g}) trained on the {len(held)} "
        "training images no expert saw, then router and expert certified"
        + _already(dual_tsv, count)
    )
    router = _router(out / "router", s, experts, held, progress)
    certify_dataset(experts, test_set, CertifyRun(out=str(dual_tsv), router=str(router), **common))

    print("[5/5] the table and the plots")
    labels = [f"fixed sigma={v:g}" for v in s.expert_sigmas]
    runs = load_runs(
        [str(p) for p in fixed + [dd_tsv, routed_tsv, cascade_tsv, dual_tsv]],
        labels
        + [
            "data-dependent + memory",
            "experts routed + memory",
            "experts, cascade (no memory)",
            "experts, dual smoothing (no memory)",
        ],
    )
    radii = [0.0, 0.25, 0.5, 0.75, 1.0]
    summaries = [run_summary(r, radii) for r in runs]
    envelope = envelope_summary(summaries[:3], radii) | {"label": "fixed-sigma envelope"}
    table = format_table(summaries[:3] + [envelope] + summaries[3:], radii, "markdown", False)
    table += (
        "\nAgainst the fixed-sigma envelope, in points (inputs only this run certifies "
        "correctly / only the envelope's run does, two-sided sign test):\n\n"
        + envelope_comparison(runs[3:], runs[:3], radii[:4])
        + "\n"
        + significant_claims(runs[3:], runs[:3], radii[:4])
        + "\n"
    )
    (out / "table.md").write_text(table + "\n")
    plot_certified_accuracy(
        runs,
        out / "certified_accuracy.png",
        title="digits: certified accuracy",
        envelope=runs[:3],
        envelope_label="fixed-sigma envelope",
    )
    plot_sigma_histogram(runs[3:4], out / "sigma_histogram.png", sigma0=s.sigma)
    plot_experts(runs[4:], out / "experts.png", title="digits: the expert of each input")
    print()
    print(table)
    print(f"\nall results in {out.resolve()}  ({time.perf_counter() - started:.0f} s):")
    written = sorted(p for p in out.rglob("*") if p.is_file())
    for path in written:
        print(f"  {path}")
    return written


def _router(
    out: Path, s: QuickstartSettings, experts: Experts, images: list[int], progress: bool
) -> Path:
    last = out / "last.pt"
    if last.exists() and load_checkpoint(last).meta["epoch"] + 1 >= s.router_epochs:
        print(f"      the router: already trained ({last})")
        return last
    largest = max(experts, key=lambda e: e.sigma)
    config = TrainConfig(
        dataset="digits",
        arch="cnn",
        out=str(out),
        method="consistency",
        init=largest.source,
        sigma=s.router_sigma,
        epochs=s.router_epochs,
        batch=s.batch,
        lr=s.lr,
        lr_step=s.lr_step,
        eval_max=None,
        progress=progress,
        resume=last.exists(),
    )
    print(f"      the router -> {out}")
    return train_router(experts, config, images, samples=s.sigma_samples, n=s.n, alpha=s.alpha)


def _choose_p0(experts: Experts, held: list[int], s: QuickstartSettings) -> float:
    """The cascade's threshold with the best ACR (then the smaller p0) on the held-out
    training images, at the run's N and alpha; never the test images."""
    train_set = get_dataset("digits", "train", augment=False)
    items = [train_set[i] for i in held]
    x = torch.stack([item[0] for item in items])
    y = np.array([int(item[1]) for item in items])
    cascade = Cascade(experts, 10, s.p0_candidates[0], seed=1)
    found = cascade.certify_thresholds(x, s.p0_candidates, n0=s.n0, n=s.n, alpha=s.alpha, keys=held)
    acr = {p0: np.mean([c.radius * (c.predict == t) for c, t in zip(found[p0], y)]) for p0 in found}
    best = max(s.p0_candidates, key=lambda p0: (acr[p0], -p0))
    return best
