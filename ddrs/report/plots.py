"""Plots: certified accuracy against radius, the per-input sigmas, each input's expert, the
per-sample training sigmas over epochs. Written atomically, readable by everyone."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ddrs.report.metrics import ENVELOPE_LABEL, Run, average_certified_radius
from ddrs.results import read_settings


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless; must come before importing pyplot
    import matplotlib.pyplot as plt

    return plt


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _save_atomically(fig, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; plots are as readable as TSVs
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def certified_accuracy_curve(table: dict[str, np.ndarray], radii: np.ndarray) -> np.ndarray:
    """Certified accuracy at each radius of `radii`, vectorised (NaN for an empty run)."""
    if len(table["idx"]) == 0:
        return np.full(len(radii), np.nan)
    certified = np.sort(table["radius"][table["correct"] == 1])
    below = np.searchsorted(certified, radii, side="left")  # certified radii < r
    return (len(certified) - below) / len(table["idx"])


def radius_label(runs: Sequence[Run]) -> str:
    """The radius axis in the runs' units (their settings' radius_units when they agree)."""
    units = {read_settings(run.path).get("radius_units") for run in runs}
    if len(units) == 1 and None not in units:
        return units.pop()
    return "L2 radius (pixel units in [0, 1])"


def plot_certified_accuracy(
    runs: Sequence[Run],
    path: str | os.PathLike,
    title: str | None = None,
    envelope: Sequence[Run] | None = None,
    envelope_label: str = ENVELOPE_LABEL,
) -> None:
    """Certified accuracy vs radius, one step curve per run, saved as a PNG. With `envelope`,
    also the best of those runs at each radius, as a dashed black curve."""
    plt = _pyplot()
    certified = [r.table["radius"][r.table["correct"] == 1] for r in runs]
    top = max((float(c.max()) for c in certified if len(c)), default=0.0)
    grid = np.linspace(0.0, 1.05 * top if top > 0 else 1.0, 1000)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        for run in runs:
            if run.size:
                acr = average_certified_radius(run.table)
                ax.plot(
                    grid,
                    certified_accuracy_curve(run.table, grid),
                    drawstyle="steps-post",
                    linewidth=1.8,
                    label=f"{run.label} (ACR {acr:.3f})",
                )
        curves = [certified_accuracy_curve(r.table, grid) for r in envelope or () if r.size]
        if curves:
            ax.plot(
                grid,
                np.max(curves, axis=0),
                drawstyle="steps-post",
                color="black",
                linestyle="--",
                linewidth=1.4,
                label=envelope_label,
            )
        ax.set_xlabel(radius_label(runs))
        ax.set_ylabel("certified accuracy")
        ax.set_title(title or "Certified accuracy vs radius")
        ax.set_xlim(grid[0], grid[-1])
        ax.set_ylim(0.0, 1.02)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(loc="upper right")
        else:
            ax.text(0.5, 0.5, "no inputs in any run", ha="center", transform=ax.transAxes)
        _save_atomically(fig, path)
    finally:
        plt.close(fig)


def plot_sigma_histogram(
    runs: Sequence[Run],
    path: str | os.PathLike,
    sigma0: float | None = None,
    title: str | None = None,
) -> bool:
    """Overlaid histograms of per-input sigmas, `sigma0` marked; False (no file) if no run
    has varying sigmas."""
    from matplotlib.ticker import MaxNLocator

    sigmas = [(run.label, s) for run in runs if (s := run.varying_sigmas()) is not None]
    if not sigmas:
        return False
    plt = _pyplot()
    bins = np.histogram_bin_edges(np.concatenate([s for _, s in sigmas]), bins=40)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        for label, s in sigmas:
            ax.hist(
                s,
                bins=bins,
                alpha=0.5,
                edgecolor="black",
                linewidth=0.4,
                label=f"{label} (median {np.median(s):.3f})",
            )
        if sigma0 is not None:
            ax.axvline(
                sigma0, color="black", linestyle="--", linewidth=1.2, label=f"sigma0 = {sigma0:g}"
            )
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of inputs
        ax.set_xlabel("sigma (noise std, pixel units)")
        ax.set_ylabel("inputs")
        ax.set_title(title or "Per-input sigmas")
        ax.grid(True, alpha=0.3)
        # below the axes, so that it never covers the bars
        ax.legend(
            loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, fontsize=8, frameon=False
        )
        _save_atomically(fig, path)
    finally:
        plt.close(fig)
    return True


def plot_experts(runs: Sequence[Run], path: str | os.PathLike, title: str | None = None) -> bool:
    """Per input (by index): the sigma it was certified at, coloured by the expert that
    answered (one colour per sigma in every panel, so that panels compare), filled where the
    answer is certified correct; inputs with no route (a router abstained, or no cascade
    level was confident) are grey crosses. One panel per run with an expert column. False
    (no file) if no run has one."""
    routed = [run for run in runs if "expert" in run.table and run.size]
    if not routed:
        return False
    sigmas = sorted(
        {
            float(s)
            for run in routed
            for s in run.table["sigma"][run.table["expert"].astype(str) != "-"]
        }
    )
    plt = _pyplot()
    fig, axes = plt.subplots(
        len(routed), 1, figsize=(8, 2.6 * len(routed) + 0.8), squeeze=False, layout="constrained"
    )
    try:
        for ax, run in zip(axes[:, 0], routed):
            _plot_expert_panel(ax, run, sigmas)
        axes[-1, 0].set_xlabel("input (dataset index); filled: certified correct")
        fig.suptitle(title or "Which expert answered each input")
        _save_atomically(fig, path)
    finally:
        plt.close(fig)
    return True


def _plot_expert_panel(ax, run: Run, sigmas: list[float]) -> None:
    t = run.table
    experts = t["expert"].astype(str)
    abstained = experts == "-"
    sigma_of = {e: float(t["sigma"][experts == e][0]) for e in set(experts[~abstained])}
    for name in sorted(sigma_of, key=lambda e: (sigma_of[e], e)):
        mine = experts == name
        right = mine & (t["correct"] == 1)
        color = f"C{sigmas.index(sigma_of[name]) % 10}"
        ax.scatter(
            t["idx"][right],
            t["sigma"][right],
            s=12,
            color=color,
            label=f"{name} ({np.mean(mine):.0%})",
        )
        ax.scatter(
            t["idx"][mine & ~right],
            t["sigma"][mine & ~right],
            s=12,
            facecolors="none",
            edgecolors=color,
        )
    if abstained.any():
        ax.scatter(
            t["idx"][abstained],
            np.full(abstained.sum(), min(sigmas or [0.0])),
            s=14,
            marker="x",
            color="0.5",
            label=f"no route ({np.mean(abstained):.0%})",
        )
    ax.set_ylabel("sigma")
    ax.set_title(run.label, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def plot_training_sigmas(
    logs: Sequence[tuple[str, str | os.PathLike]], path: str | os.PathLike
) -> bool:
    """The per-sample training sigmas over epochs, from training logs (log.csv with the
    sigma_min/p10/median/p90/max columns): median line, p10-p90 band, min-max dotted.
    `logs` is (label, path) pairs; False (no file) when no log has those columns."""
    import csv

    series = []
    for label, log in logs:
        with open(log, newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and "sigma_p10" in rows[0]:
            series.append(
                (
                    label,
                    {
                        k: np.array([float(r[k]) for r in rows])
                        for k in (
                            "epoch",
                            "sigma_min",
                            "sigma_p10",
                            "sigma_median",
                            "sigma_p90",
                            "sigma_max",
                        )
                    },
                )
            )
    if not series:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        for label, v in series:
            (line,) = ax.plot(
                v["epoch"],
                v["sigma_median"],
                marker="o",
                markersize=3,
                label=f"{label} (median; band p10-p90; dotted min, max)",
            )
            ax.fill_between(
                v["epoch"], v["sigma_p10"], v["sigma_p90"], alpha=0.2, color=line.get_color()
            )
            for key in ("sigma_min", "sigma_max"):
                ax.plot(v["epoch"], v[key], linestyle=":", color=line.get_color())
        ax.set_xlabel("epoch")
        ax.set_ylabel("training sigma (pixel units)")
        ax.set_title("Per-sample training sigmas")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
        _save_atomically(fig, path)
    finally:
        plt.close(fig)
    return True
