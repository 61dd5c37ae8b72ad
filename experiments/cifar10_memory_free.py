"""CIFAR-10, memory-free routing among sigma-experts (issue 26), beside the routing study.

The experts, images and settings are the routing study's (`cifar10_routing.py`: cnn_small at
sigma 0.12, 0.25 and 0.5, 10 epochs on a 20,000-image training subset; 200 validation
images; every 20th test image). New rows, certified on the same test images:

* **the multi-scale cascade** (Jeong & Shin 2023; `certify --cascade P0`): no router, no
  memory; P0 chosen on the validation images;
* **the learned router** (`train_router`): soft targets softmax(R / T) from the experts'
  predicted radii, without the images no expert certifies, class-balanced, the consistency
  term, started from the 0.5 expert's weights, at two sigma_r >= the largest expert's, on
  every held-out training image but the validation ones;
* **routing + memory with a rule for clean accuracy**: "agree:P" keeps the smallest sigma's
  class where it is confident (top-class share >= P); the rule chosen on validation;
* beside them, the routing study's rows remeasured with these experts: each expert, their
  envelope, and routing + memory (rule radius).

Options of the routing study (--epochs, --train-subset, --seed, ...) pass through to it.
Every choice (P0, the rule; which router is reported first) is made on the 200 validation
images at --val-n, by the issue's goal itself against the validation envelope: how many of
its conditions a row meets (r = 0 and 0.75 at most 1 point below, r = 0.25 and 0.5 above,
ACR >= 1.15 x the best expert's), then ACR.

    python experiments/cifar10_memory_free.py --data-root data/cifar10 --out runs/cifar10_routing
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cifar10_routing as base
import numpy as np
from study_common import HelpFormatter

from ddrs.data import get_dataset
from ddrs.report import (
    envelope_summary,
    format_table,
    load_runs,
    plot_certified_accuracy,
    plot_experts,
    run_summary,
)
from ddrs.report.metrics import certified_accuracy, versus_envelope
from ddrs.report.tables import envelope_comparison
from ddrs.results import read_table
from ddrs.runs import CertifyRun, certify_dataset
from ddrs.train.router import RouterOptions, train_router

RADII = base.RADII
GOAL_RADII = (0.0, 0.25, 0.5, 0.75)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data-root", required=True, help="CIFAR-10 (ImageFolder or python batches)")
    p.add_argument(
        "--out", default="runs/cifar10_routing", help="the routing study's folder (its experts)"
    )
    p.add_argument("--steps", default="train,routers,validate,certify,report", help="steps to run")
    p.add_argument("--router-sigmas", default="0.5,0.75", help="the learned router's sigma_r")
    p.add_argument("--router-epochs", type=int, default=15, help="routers' epochs")
    p.add_argument("--temperature", type=float, default=0.1, help="soft targets' temperature")
    p.add_argument("--p0s", default="0.5,0.6,0.7,0.8,0.9", help="cascade thresholds to try")
    p.add_argument(
        "--rules", default="radius,agree,agree:0.6,agree:0.8,agree:0.9", help="route rules to try"
    )
    p.add_argument(
        "--router-images", type=int, default=10**9, help="routers' images (default: all held out)"
    )
    p.add_argument("--val-images", type=int, default=200, help="validation images (held out)")
    p.add_argument("--val-n", type=int, default=1000, help="N of the validation certificates")
    p.add_argument("--n0", type=int, default=100, help="selection samples")
    p.add_argument("--n", type=int, default=4000, help="estimation samples")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    p.add_argument("--skip", type=int, default=20, help="every SKIP-th test image (20: 500)")
    p.add_argument("--max", type=int, default=-1, help="stop before this test index (-1: all)")
    p.add_argument("--batch", type=int, default=400, help="noisy samples per forward pass")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args, rest = p.parse_known_args(argv)
    # the routing study's options (--epochs, --train-subset, ...): its experts and images
    study = base.parse_args(["--data-root", args.data_root, "--out", args.out, *rest])
    for name, value in vars(study).items():
        if not hasattr(args, name):
            setattr(args, name, value)
    return args


def folder(args, *parts: str) -> Path:
    path = Path(args.out, "memory_free", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def router_path(args, sigma_r: float) -> Path:
    return folder(args, f"router-{sigma_r:g}") / "last.pt"


def step_routers(args) -> None:
    _, images = base.held_out(args)
    experts = base.experts_of(args, "three")
    for sigma_r in [float(v) for v in args.router_sigmas.split(",")]:
        last = router_path(args, sigma_r)
        if base._trained(last, args.router_epochs):
            continue
        config = base.router_config(
            args,
            sigma_r,
            last.parent,
            method="consistency",
            init=str(base.expert_path(args, max(base.SIGMAS))),
        )
        base.timed(
            args,
            f"memory-free: router {sigma_r:g} ({len(images)} images)",
            lambda c=config: train_router(
                experts,
                c,
                images,
                samples=args.label_samples,
                n=args.n,
                alpha=args.alpha,
                options=RouterOptions(temperature=args.temperature),
                labels=folder(args) / "labels-three.tsv",
            ),
        )


def certify_row(args, data, where: Path, how: str, n: int, seed: int, selection: dict) -> str:
    """One row of the three experts: "cascade:<p0>", "router:<sigma_r>" (the learned router),
    or the routing study's kinds ("fixed:<k>", "route:<rule>")."""
    kind, value = how.split(":", 1)
    if kind not in ("cascade", "router"):
        return base.certify_row(args, "three", data, where, how, n, seed, selection)
    out = where / f"three.{how.replace(':', '-')}.certify.tsv"
    if kind == "cascade":
        extra = {"cascade": float(value)}
    else:
        extra = {"router": str(router_path(args, float(value)))}
    run = CertifyRun(
        out=str(out),
        n0=args.n0,
        n=n,
        alpha=args.alpha,
        batch=args.batch,
        seed=seed,
        progress=not args.no_progress,
        **selection,
        **extra,
    )
    certify_dataset(base.experts_of(args, "three"), data, run)
    return str(out)


def candidates(args) -> dict[str, list[str]]:
    return {
        "fixed": [f"fixed:{k}" for k in range(len(base.SIGMAS))],
        "route": [f"route:{rule}" for rule in args.rules.split(",")],
        "cascade": [f"cascade:{p0}" for p0 in args.p0s.split(",")],
        "router": [f"router:{s}" for s in args.router_sigmas.split(",")],
    }


def goal(run, fixed) -> dict:
    """The issue's goal for `run` against the envelope of `fixed`: each condition, met or not,
    with its numbers."""
    best_acr = max(float(np.mean(f.table["radius"] * (f.table["correct"] == 1))) for f in fixed)
    acr = float(np.mean(run.table["radius"] * (run.table["correct"] == 1)))
    checks = {}
    for r in GOAL_RADII:
        c = versus_envelope(run, fixed, r)
        above = r in (0.25, 0.5)
        met = c["delta"] > 0 and c["p"] < 0.05 if above else c["delta"] >= -1.0
        checks[f"r={r:g}"] = {**c, "met": bool(met), "wanted": "above" if above else ">= -1"}
    checks["ACR"] = {"ratio": acr / best_acr, "met": acr >= 1.15 * best_acr}
    return checks


def validation_score(run, fixed) -> tuple[int, float]:
    """(conditions met, ACR) on the validation images; the p-values are not asked of 200
    images: a condition "above" is met by any gain there."""
    checks = goal(run, fixed)
    met = 0
    for r in GOAL_RADII:
        c = checks[f"r={r:g}"]
        met += c["delta"] > 0 if c["wanted"] == "above" else c["delta"] >= -1.0
    met += checks["ACR"]["met"]
    acr = float(np.mean(run.table["radius"] * (run.table["correct"] == 1)))
    return met, acr


def step_validate(args) -> dict:
    path = folder(args) / "choices.json"
    if path.exists():
        return json.loads(path.read_text())
    val, _ = base.held_out(args)
    plain = get_dataset("cifar10", "train", args.data_root, augment=False)
    data = base.Picked(plain, val, "validation")
    where = folder(args, "validation")
    rows = {}
    for hows in candidates(args).values():
        for how in hows:
            rows[how] = base.timed(
                args,
                f"memory-free validation {how}",
                certify_row,
                args,
                data,
                where,
                how,
                args.val_n,
                args.seed + 1,
                {},
            )
    runs = dict(zip(rows, load_runs(list(rows.values()), list(rows))))
    fixed = [runs[h] for h in candidates(args)["fixed"]]
    tried = {how: validation_score(run, fixed) for how, run in runs.items()}
    chosen = {
        kind: max(hows, key=lambda h: tried[h])
        for kind, hows in candidates(args).items()
        if kind != "fixed"
    }
    result = {"validation_images": len(val), "n": args.val_n, "tried": tried, "chosen": chosen}
    path.write_text(json.dumps(result, indent=1))
    return result


def test_rows(args, choices: dict) -> list[tuple[str, str]]:
    """(label, how) of every test row, in report order."""
    rows = [(f"expert sigma {s:g}", f"fixed:{k}") for k, s in enumerate(base.SIGMAS)]
    rows.append(("routing + memory (rule radius)", "route:radius"))
    rule = choices["chosen"]["route"]
    if rule != "route:radius":
        rows.append((f"routing + memory (rule {rule.split(':', 1)[1]})", rule))
    p0 = choices["chosen"]["cascade"].split(":")[1]
    rows.append((f"cascade (p0 {p0}), no memory", choices["chosen"]["cascade"]))
    for how in candidates(args)["router"]:
        rows.append((f"learned router (sigma_r {how.split(':')[1]}), no memory", how))
    return rows


def step_certify(args, choices: dict) -> None:
    test = get_dataset("cifar10", "test", args.data_root, augment=False)
    where = folder(args, "test")
    for label, how in test_rows(args, choices):
        base.timed(
            args,
            f"memory-free test {label}",
            certify_row,
            args,
            test,
            where,
            how,
            args.n,
            args.seed,
            {"skip": args.skip, "max": args.max},
        )


def step_report(args, choices: dict) -> None:
    where = folder(args, "test")
    rows = [
        (label, where / f"three.{how.replace(':', '-')}.certify.tsv")
        for label, how in test_rows(args, choices)
    ]
    rows = [(label, p) for label, p in rows if p.exists()]
    runs = load_runs([str(p) for _, p in rows], [label for label, _ in rows])
    fixed, others = runs[:3], runs[3:]
    summaries = [run_summary(r, RADII) for r in runs]
    envelope = envelope_summary(summaries[:3], RADII) | {"label": "envelope of the 3 experts"}
    lines = [
        format_table(summaries[:3] + [envelope] + summaries[3:], RADII, "markdown"),
        "",
        "Against the envelope (points; inputs only the row certifies / only the envelope's "
        "expert does; two-sided sign test):",
        "",
        envelope_comparison(others, fixed, GOAL_RADII),
        "The goal, per row (r = 0 and 0.75: at most 1 point below; r = 0.25 and 0.5: above "
        "with p < 0.05; ACR >= 1.15 x the best expert's):",
        "",
        "| row | r=0 | r=0.25 | r=0.5 | r=0.75 | ACR ratio | met |",
        "| --- | --- | --- | --- | --- | ---: | ---: |",
    ]
    for run in others:
        checks = goal(run, fixed)
        cells = [
            f"{checks[f'r={r:g}']['delta']:+.1f} ({'yes' if checks[f'r={r:g}']['met'] else 'no'})"
            for r in GOAL_RADII
        ]
        met = sum(c["met"] for c in checks.values())
        acr = checks["ACR"]
        lines.append(
            f"| {run.label} | {' | '.join(cells)} | {acr['ratio']:.3f} "
            f"({'yes' if acr['met'] else 'no'}) | {met} / 5 |"
        )
    lines += ["", *why_lines(args, runs)]
    text = "\n".join(lines)
    (folder(args) / "report.md").write_text(text + "\n")
    plot_certified_accuracy(
        runs,
        folder(args) / "certified_accuracy.png",
        title="CIFAR-10 (JPEG copy): memory-free routing among sigma-experts",
        envelope=fixed,
        envelope_label="envelope of the 3 experts",
    )
    plot_experts(others, folder(args) / "experts.png")
    print(text)


def why_lines(args, runs) -> list[str]:
    """What explains the memory-free rows: the routers' held-out summaries, how often the
    route radius caps the answer, the cascade's levels."""
    lines = []
    for sigma_r in args.router_sigmas.split(","):
        summary = router_path(args, float(sigma_r)).parent / "router-summary.json"
        if summary.exists():
            s = json.loads(summary.read_text())
            q = s["route_radius_quantiles"]
            lines.append(
                f"- router sigma_r {sigma_r}, {s['images']} held-out router images: route "
                f"accuracy {s['route_accuracy']:.3f} (the most common route: "
                f"{s['majority_accuracy']:.3f}), abstains {s['abstain']:.1%}, route radius "
                f"median {q['p50']:.2f} (p10 {q['p10']:.2f}, p90 {q['p90']:.2f})"
            )
    for run in runs[3:]:
        t = run.table
        ok = t["correct"] == 1
        if "route_radius" in t:
            capped = ok & (t["route_radius"] < t["expert_radius"])
            lines.append(
                f"- {run.label}: of {int(ok.sum())} certified-correct inputs the route "
                f"radius was the smaller for {int(capped.sum())}"
            )
        if "levels" in t:
            levels = np.bincount(t["levels"].astype(int), minlength=4)[1:]
            guard = ok & (t["guard_radius"] < t["level_radius"])
            lines.append(
                f"- {run.label}: levels sampled per input 1 / 2 / 3: "
                + " / ".join(str(int(v)) for v in levels)
                + f" (mean {t['levels'].mean():.2f}); the larger sigmas' guard was the "
                f"smaller radius for {int(guard.sum())} of {int(ok.sum())} certified-correct"
            )
        if "expert" in t:
            names, counts = np.unique(t["expert"].astype(str), return_counts=True)
            share = ", ".join(f"{n} {c / len(t['idx']):.0%}" for n, c in zip(names, counts))
            lines.append(f"- {run.label}: experts {share}")
    labels = folder(args) / "labels-three.tsv"
    if labels.exists():
        t = read_table(labels)
        radii = np.stack([t[f"radius_{j}"] for j in range(len(base.SIGMAS))], axis=1)
        certified = radii.max(axis=1) > 0
        best = np.bincount(t["route"][certified].astype(int), minlength=3) / certified.sum()
        lines.append(
            f"- router images: {len(t['idx'])}; {certified.mean():.1%} certified by some "
            "expert (the others left out); best expert among those: "
            + ", ".join(f"{s:g} {b:.1%}" for s, b in zip(base.SIGMAS, best))
        )
    lines.append(
        "- clean accuracy of each expert: "
        + ", ".join(f"{r.label} {certified_accuracy(r.table, 0):.1%}" for r in runs[:3])
    )
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    steps = set(args.steps.split(","))
    if "train" in steps:
        base.step_train(args)
    if "routers" in steps:
        step_routers(args)
    choices = step_validate(args) if steps & {"validate", "certify", "report"} else {}
    if "certify" in steps:
        step_certify(args, choices)
    if "report" in steps:
        step_report(args, choices)


if __name__ == "__main__":
    main()
