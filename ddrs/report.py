"""Certified accuracy, ACR and friends, computed from results files. Never writes them.

`ddrs report` reads one or more results TSVs (ours or the reference format of Cohen et
al.'s `certify.py`), prints a table (markdown, LaTeX or CSV) and optionally plots certified
accuracy against radius and the per-input sigmas of data-dependent runs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddrs.errors import InputError
from ddrs.results import REFERENCE_COLUMNS, read_settings, read_table

ENVELOPE_LABEL = "envelope (best over runs)"
SHRINK_TOLERANCE = 1e-12
MAX_RADII = 1000


def certified_accuracy(table: dict[str, np.ndarray], radius: float) -> float:
    """Fraction of inputs predicted correctly with a certified radius >= `radius`."""
    if len(table["idx"]) == 0:
        return float("nan")
    return float(np.mean((table["correct"] == 1) & (table["radius"] >= radius)))


def average_certified_radius(table: dict[str, np.ndarray]) -> float:
    """ACR: mean over inputs of radius x correct (abstentions and errors count as 0)."""
    if len(table["idx"]) == 0:
        return float("nan")
    return float(np.mean(table["radius"] * (table["correct"] == 1)))


def summarize(table: dict[str, np.ndarray], radii) -> dict[str, float]:
    summary = {f"r={r:g}": certified_accuracy(table, r) for r in radii}
    summary["ACR"] = average_certified_radius(table)
    summary["abstain"] = float(np.mean(table["predict"] == -1)) if len(table["idx"]) else 0.0
    return summary


def summary_line(path, radii=(0.0, 0.25, 0.5, 0.75, 1.0)) -> str:
    table = read_table(path, required=REFERENCE_COLUMNS)
    parts = [f"certified accuracy ({len(table['idx'])} inputs):"]
    parts += [f"{k} {v:.3f}" for k, v in summarize(table, radii).items()]
    return "  ".join(parts)


# ---------------------------------------------------------------- runs and their numbers


@dataclass
class Run:
    """One results file, read once."""

    label: str
    path: Path
    table: dict[str, np.ndarray]

    @property
    def size(self) -> int:
        return len(self.table["idx"])

    @property
    def is_memory_run(self) -> bool:
        return "mc_predict" in self.table and "mc_radius" in self.table

    def varying_sigmas(self) -> np.ndarray | None:
        """The per-input sigmas, or None without a sigma column or with a constant one."""
        sigma = self.table.get("sigma")
        if sigma is None or len(sigma) == 0 or np.all(sigma == sigma[0]):
            return None
        return sigma


def load_runs(paths: Sequence[str | os.PathLike], labels: Sequence[str] | None = None) -> list[Run]:
    """Read each results file; labels default to the file names without extension."""
    if labels is not None and len(labels) != len(paths):
        raise InputError(f"--labels: got {len(labels)} label(s) for {len(paths)} run(s)")
    if labels is None:
        labels = [Path(p).stem for p in paths]
    return [Run(label, Path(p), read_table(p, required=REFERENCE_COLUMNS))
            for label, p in zip(labels, paths)]


def idx_mismatch(runs: Sequence[Run]) -> str | None:
    """A one-line description of how the runs' input sets differ, or None if they agree."""
    sets = [set(r.table["idx"].tolist()) for r in runs]
    if len(runs) < 2 or all(s == sets[0] for s in sets):
        return None
    common = set.intersection(*sets)
    sizes = ", ".join(f"{r.label}: {len(s)}" for r, s in zip(runs, sets))
    return f"the runs cover different inputs ({sizes}; {len(common)} in common)"


def restrict_to_common(runs: Sequence[Run]) -> list[Run]:
    """The runs restricted to the inputs (idx) that all of them certified."""
    common = set.intersection(*(set(r.table["idx"].tolist()) for r in runs))
    out = []
    for run in runs:
        keep = np.isin(run.table["idx"], sorted(common))
        out.append(Run(run.label, run.path, {k: v[keep] for k, v in run.table.items()}))
    return out


def parse_radii(text: str) -> list[float]:
    """'start:stop:step' (stop included when it lands on the grid) or '0,0.5,1'; sorted."""
    try:
        if ":" in text:
            radii = _radius_range(*(float(v) for v in text.split(":")))
        else:
            radii = [float(v) for v in text.split(",")]
    except (TypeError, ValueError):
        raise InputError(
            f"--radii {text!r}: expected start:stop:step (e.g. 0:1:0.25) or a comma list"
        ) from None
    if not all(math.isfinite(r) and r >= 0 for r in radii):
        raise InputError(f"--radii {text!r}: radii must be finite and >= 0")
    return sorted(set(radii))


def _radius_range(start: float, stop: float, step: float) -> list[float]:
    if not all(map(math.isfinite, (start, stop, step))) or not step > 0 or not stop >= start:
        raise InputError(f"radii {start:g}:{stop:g}:{step:g}: need step > 0 and stop >= start")
    count = math.floor((stop - start) / step + 1e-9) + 1  # tolerance: 0:1:0.1 includes 1
    if count > MAX_RADII:
        raise InputError(f"radii {start:g}:{stop:g}:{step:g}: {count} radii, at most {MAX_RADII}")
    return [round(start + i * step, 12) for i in range(count)]


def run_summary(run: Run, radii: Sequence[float]) -> dict:
    """Numbers of one run. Accuracies are fractions (NaN for an empty run); memory and sigma
    entries are None when the run has no such columns."""
    t = run.table
    summary: dict = {
        "label": run.label,
        "inputs": run.size,
        "clean": certified_accuracy(t, 0.0),
        "certified": {float(r): certified_accuracy(t, r) for r in radii},
        "ACR": average_certified_radius(t),
        "abstain": float(np.mean(t["predict"] == -1)) if run.size else float("nan"),
        "changed": None, "shrunk": None,
        "sigma_min": None, "sigma_median": None, "sigma_max": None,
        "experts": expert_shares(t),
    }
    if run.is_memory_run:
        same = t["predict"] == t["mc_predict"]
        summary["changed"] = int(np.sum(~same))
        summary["shrunk"] = int(np.sum(same & (t["radius"] < t["mc_radius"] - SHRINK_TOLERANCE)))
    sigmas = run.varying_sigmas()
    if sigmas is not None:
        summary["sigma_min"] = float(np.min(sigmas))
        summary["sigma_median"] = float(np.median(sigmas))
        summary["sigma_max"] = float(np.max(sigmas))
    return summary


def expert_shares(table: dict[str, np.ndarray]) -> dict[str, float] | None:
    """{expert: share of the inputs it answered} of a run with an expert column (a router's
    abstentions count as "-"), or None."""
    experts = table.get("expert")
    if experts is None or len(experts) == 0:
        return None
    names, counts = np.unique(experts.astype(str), return_counts=True)
    return {str(n): float(k) / len(experts) for n, k in zip(names, counts)}


def sign_test(a: dict[str, np.ndarray], b: dict[str, np.ndarray], radius: float):
    """Paired comparison of two runs at `radius` on the inputs both cover: (inputs only a
    certifies correctly at >= radius, inputs only b does, two-sided sign-test p-value)."""
    common = np.intersect1d(a["idx"], b["idx"])

    def certified(t):
        keep = np.isin(t["idx"], common)
        order = np.argsort(t["idx"][keep])
        ok = (t["correct"][keep] == 1) & (t["radius"][keep] >= radius)
        return ok[order]

    ok_a, ok_b = certified(a), certified(b)
    a_only, b_only = int(np.sum(ok_a & ~ok_b)), int(np.sum(ok_b & ~ok_a))
    if a_only + b_only == 0:
        return a_only, b_only, 1.0
    from scipy.stats import binomtest

    return a_only, b_only, float(binomtest(a_only, a_only + b_only, 0.5).pvalue)


SIGNIFICANCE = 0.05


def versus_envelope(run: Run, fixed: Sequence[Run], radius: float) -> dict:
    """`run` against the envelope at `radius`: the fixed run with the best certified accuracy
    there. The difference in points, and the paired sign test on the inputs both cover."""
    best = max(fixed, key=lambda f: certified_accuracy(f.table, radius))
    only_run, only_best, p = sign_test(run.table, best.table, radius)
    delta = certified_accuracy(run.table, radius) - certified_accuracy(best.table, radius)
    return {"delta": 100 * delta, "only_run": only_run, "only_envelope": only_best, "p": p,
            "envelope_run": best.label}  # fmt: skip


def envelope_comparison(runs: Sequence[Run], fixed: Sequence[Run], radii: Sequence[float],
                        level: float = SIGNIFICANCE) -> str:  # fmt: skip
    """A markdown table: each run against the envelope at each radius, in points, with the
    sign test; a difference with p >= `level` is marked "not significant"."""
    lines = ["| run | " + " | ".join("clean" if r == 0 else f"r={r:g}" for r in radii) + " |",
             "| --- |" + " ---: |" * len(radii)]  # fmt: skip
    for run in runs:
        cells = []
        for r in radii:
            c = versus_envelope(run, fixed, r)
            verdict = f"p = {c['p']:.2g}" if c["p"] < level else "not significant"
            cells.append(f"{c['delta']:+.1f} ({c['only_run']} / {c['only_envelope']}, "
                         f"{verdict})")  # fmt: skip
        lines.append(f"| {run.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def significant_claims(runs: Sequence[Run], fixed: Sequence[Run], radii: Sequence[float],
                       level: float = SIGNIFICANCE) -> str:  # fmt: skip
    """The differences to the envelope that the sign test finds significant, in words: the
    only ones a reader should take as results (the others may change with the CPU)."""
    claims = []
    for run in runs:
        above, below = [], []
        for r in radii:
            c = versus_envelope(run, fixed, r)
            if c["p"] < level:
                where = "clean" if r == 0 else f"r={r:g}"
                (above if c["delta"] > 0 else below).append(f"{where} ({c['delta']:+.1f})")
        if above:
            claims.append(f"{run.label} above the envelope at {', '.join(above)}")
        if below:
            claims.append(f"{run.label} below it at {', '.join(below)}")
    found = "; ".join(claims) if claims else "none"
    return (f"Significant at p < {level:g} (two-sided sign test): {found}. Every other "
            "difference is not significant.")


def envelope_summary(summaries: Sequence[dict], radii: Sequence[float]) -> dict:
    """Best value over runs at each radius (and the best ACR); other entries are None."""
    return {
        "label": ENVELOPE_LABEL, "inputs": None,
        "clean": _nanmax(s["clean"] for s in summaries),
        "certified": {float(r): _nanmax(s["certified"][float(r)] for s in summaries)
                      for r in radii},
        "ACR": _nanmax(s["ACR"] for s in summaries),
        "abstain": None, "changed": None, "shrunk": None,
        "sigma_min": None, "sigma_median": None, "sigma_max": None, "experts": None,
    }


def _nanmax(values) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else float("nan")


# ---------------------------------------------------------------- tables


@dataclass(frozen=True)
class _Column:
    header: str
    kind: str  # "text", "count", "percent", "radius", "sigma"
    get: Callable[[dict], object]  # summary -> value


def _columns(summaries: Sequence[dict], radii: Sequence[float]) -> list[_Column]:
    columns = [
        _Column("run", "text", lambda s: s["label"]),
        _Column("inputs", "count", lambda s: s["inputs"]),
        _Column("clean", "percent", lambda s: s["clean"]),
    ]
    # Radius 0 is the clean column already.
    columns += [_Column(f"r={r:g}", "percent", lambda s, r=float(r): s["certified"][r])
                for r in radii if r != 0]
    columns += [_Column("ACR", "radius", lambda s: s["ACR"]),
                _Column("abstain", "percent", lambda s: s["abstain"])]
    if any(s["changed"] is not None for s in summaries):
        columns += [_Column("changed", "count", lambda s: s["changed"]),
                    _Column("shrunk", "count", lambda s: s["shrunk"])]
    if any(s["sigma_min"] is not None for s in summaries):
        columns += [_Column(f"sigma {k}", "sigma", lambda s, k=k: s[f"sigma_{k}"])
                    for k in ("min", "median", "max")]
    if any(s.get("experts") for s in summaries):
        columns.append(_Column("experts (share of inputs)", "text",
                               lambda s: _shares_text(s.get("experts"))))
    return columns


def _shares_text(shares: dict[str, float] | None) -> str:
    if not shares:
        return "–"
    named = {("router abstained" if name == "-" else name): share for name, share in shares.items()}
    return ", ".join(f"{name} {share:.0%}" for name, share in named.items())


def _cell(value, kind: str, fmt: str) -> str:
    if kind == "text":
        return _latex_escape(value) if fmt == "latex" else str(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        if fmt == "csv":
            return "" if value is None else "nan"
        return "--" if fmt == "latex" else "–"
    if fmt == "csv":
        return str(value) if kind == "count" else repr(float(value))
    if kind == "count":
        return str(value)
    if kind == "percent":
        return f"{100 * value:.1f}" + ("\\%" if fmt == "latex" else "%")
    return f"{value:.3f}"


def _latex_escape(text: str) -> str:
    for char in "\\&%$#_{}":
        text = text.replace(char, "\\" + char)
    return text


def format_table(summaries: Sequence[dict], radii: Sequence[float], fmt: str = "markdown",
                 envelope: bool = False) -> str:
    """The summaries as a markdown, LaTeX (booktabs) or CSV table, one row per run."""
    if fmt not in ("markdown", "latex", "csv"):
        raise InputError(f"unknown table format {fmt!r}: use markdown, latex or csv")
    columns = _columns(summaries, radii)
    headers = [c.header for c in columns]
    rows = [[_cell(c.get(s), c.kind, fmt) for c in columns] for s in summaries]
    if envelope and summaries:
        best = envelope_summary(summaries, radii)
        row = [_cell(c.get(best), c.kind, fmt) for c in columns]
        if fmt != "csv":  # the ACR cell is a max over runs too, not one run's ACR
            acr = headers.index("ACR")
            row[acr] = f"{row[acr]} (max)"
        rows.append(row)
    if fmt == "markdown":
        return _markdown(headers, rows)
    if fmt == "latex":
        return _latex(headers, rows, has_envelope=envelope and bool(summaries))
    return "\n".join(",".join(_csv_field(v) for v in line) for line in [headers, *rows]) + "\n"


def _markdown(headers: list[str], rows: list[list[str]]) -> str:
    align = ["---"] + ["---:"] * (len(headers) - 1)
    lines = [headers, align, *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"


def _latex(headers: list[str], rows: list[list[str]], has_envelope: bool) -> str:
    body = [" & ".join(row) + r" \\" for row in rows]
    if has_envelope:
        body.insert(len(body) - 1, r"\midrule")
    return "\n".join([
        r"\begin{tabular}{l" + "r" * (len(headers) - 1) + "}",
        r"\toprule",
        " & ".join(_latex_escape(h) for h in headers) + r" \\",
        r"\midrule",
        *body,
        r"\bottomrule",
        r"\end{tabular}",
    ]) + "\n"


def _csv_field(text: str) -> str:
    if any(c in text for c in ',"\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


# ---------------------------------------------------------------- plots


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


def plot_certified_accuracy(runs: Sequence[Run], path: str | os.PathLike,
                            title: str | None = None,
                            envelope: Sequence[Run] | None = None,
                            envelope_label: str = ENVELOPE_LABEL) -> None:
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
                ax.plot(grid, certified_accuracy_curve(run.table, grid), drawstyle="steps-post",
                        linewidth=1.8, label=f"{run.label} (ACR {acr:.3f})")
        curves = [certified_accuracy_curve(r.table, grid) for r in envelope or () if r.size]
        if curves:
            ax.plot(grid, np.max(curves, axis=0), drawstyle="steps-post", color="black",
                    linestyle="--", linewidth=1.4, label=envelope_label)
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


def plot_sigma_histogram(runs: Sequence[Run], path: str | os.PathLike,
                         sigma0: float | None = None, title: str | None = None) -> bool:
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
            ax.hist(s, bins=bins, alpha=0.5, edgecolor="black", linewidth=0.4,
                    label=f"{label} (median {np.median(s):.3f})")
        if sigma0 is not None:
            ax.axvline(sigma0, color="black", linestyle="--", linewidth=1.2,
                       label=f"sigma0 = {sigma0:g}")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of inputs
        ax.set_xlabel("sigma (noise std, pixel units)")
        ax.set_ylabel("inputs")
        ax.set_title(title or "Per-input sigmas")
        ax.grid(True, alpha=0.3)
        # below the axes, so that it never covers the bars
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, fontsize=8,
                  frameon=False)
        _save_atomically(fig, path)
    finally:
        plt.close(fig)
    return True


def plot_experts(runs: Sequence[Run], path: str | os.PathLike, title: str | None = None) -> bool:
    """Per input (by index): the sigma it was certified at, coloured by the expert that
    answered (one colour per sigma in every panel, so that panels compare), filled where the
    answer is certified correct; inputs on which a router abstained are grey crosses. One
    panel per run with an expert column. False (no file) if no run has one."""
    routed = [run for run in runs if "expert" in run.table and run.size]
    if not routed:
        return False
    sigmas = sorted({float(s) for run in routed
                     for s in run.table["sigma"][run.table["expert"].astype(str) != "-"]})
    plt = _pyplot()
    fig, axes = plt.subplots(len(routed), 1, figsize=(8, 2.6 * len(routed) + 0.8), squeeze=False,
                             layout="constrained")
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
        ax.scatter(t["idx"][right], t["sigma"][right], s=12, color=color,
                   label=f"{name} ({np.mean(mine):.0%})")
        ax.scatter(t["idx"][mine & ~right], t["sigma"][mine & ~right], s=12,
                   facecolors="none", edgecolors=color)
    if abstained.any():
        ax.scatter(t["idx"][abstained], np.full(abstained.sum(), min(sigmas or [0.0])), s=14,
                   marker="x", color="0.5", label=f"router abstained ({np.mean(abstained):.0%})")
    ax.set_ylabel("sigma")
    ax.set_title(run.label, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


# ---------------------------------------------------------------- the command


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse to write over a results file: reporting never modifies them."""
    inputs = {Path(p).resolve() for p in args.runs}
    for option, out in (("--out", args.out), ("--plot", args.plot),
                        ("--sigma-plot", args.sigma_plot), ("--expert-plot", args.expert_plot)):
        if out and Path(out).resolve() in inputs:
            raise InputError(f"{option} {out} is one of the results files being reported")


def report_command(args: argparse.Namespace) -> None:
    """`ddrs report`: the table to stdout (or --out); paths written go to stderr."""
    _check_outputs(args)
    radii = parse_radii(args.radii)
    runs = load_runs(args.runs, args.labels)
    mismatch = idx_mismatch(runs)
    if mismatch and args.common:
        runs = restrict_to_common(runs)
        print(f"note: {mismatch}; comparing on the {runs[0].size} common inputs (--common)",
              file=sys.stderr)
    elif mismatch:
        print(f"warning: {mismatch}; their numbers are not comparable one to one "
              "(--common compares on the inputs all runs share)", file=sys.stderr)
    summaries = [run_summary(run, radii) for run in runs]
    table = format_table(summaries, radii, args.format, args.envelope)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
        print(f"table: {out}", file=sys.stderr)
    else:
        sys.stdout.write(table)
    if args.plot:
        plot_certified_accuracy(runs, args.plot, title=args.title,
                                envelope=runs if args.envelope else None)
        print(f"plot: {args.plot}", file=sys.stderr)
    if args.expert_plot:
        if plot_experts(runs, args.expert_plot, title=args.title):
            print(f"expert plot: {args.expert_plot}", file=sys.stderr)
        else:
            print("expert plot: no run has an expert column (runs of experts); nothing written",
                  file=sys.stderr)
    if args.sigma_plot:
        if plot_sigma_histogram(runs, args.sigma_plot, sigma0=args.sigma0):
            print(f"sigma plot: {args.sigma_plot}", file=sys.stderr)
        else:
            print("sigma plot: no run has per-input sigmas (a sigma column that varies); "
                  "nothing written", file=sys.stderr)


def plot_training_sigmas(logs: Sequence[tuple[str, str | os.PathLike]],
                         path: str | os.PathLike) -> bool:
    """The per-sample training sigmas over epochs, from training logs (log.csv with the
    sigma_min/p10/median/p90/max columns): median line, p10-p90 band, min-max dotted.
    `logs` is (label, path) pairs; False (no file) when no log has those columns."""
    import csv

    series = []
    for label, log in logs:
        with open(log, newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and "sigma_p10" in rows[0]:
            series.append((label, {k: np.array([float(r[k]) for r in rows])
                                   for k in ("epoch", "sigma_min", "sigma_p10", "sigma_median",
                                             "sigma_p90", "sigma_max")}))
    if not series:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        for label, v in series:
            (line,) = ax.plot(v["epoch"], v["sigma_median"], marker="o", markersize=3,
                              label=f"{label} (median; band p10-p90; dotted min, max)")
            ax.fill_between(v["epoch"], v["sigma_p10"], v["sigma_p90"], alpha=0.2,
                            color=line.get_color())
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
