"""`ddrs report`: the table to stdout (or --out) and the plots; never writes a results file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddrs.errors import InputError
from ddrs.report.metrics import (
    idx_mismatch,
    load_runs,
    parse_radii,
    restrict_to_common,
    run_summary,
)
from ddrs.report.plots import plot_certified_accuracy, plot_experts, plot_sigma_histogram
from ddrs.report.tables import format_table
from ddrs.results import read_settings


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse to write over a results file: reporting never modifies them."""
    inputs = {Path(p).resolve() for p in args.runs}
    for option, out in (
        ("--out", args.out),
        ("--plot", args.plot),
        ("--sigma-plot", args.sigma_plot),
        ("--expert-plot", args.expert_plot),
    ):
        if out and Path(out).resolve() in inputs:
            raise InputError(f"{option} {out} is one of the results files being reported")


def report_command(args: argparse.Namespace) -> None:
    """`ddrs report`: the table to stdout (or --out); paths written go to stderr."""
    _check_outputs(args)
    radii = parse_radii(args.radii)
    runs = load_runs(args.runs, args.labels)
    norms = sorted({read_settings(run.path).get("norm", "l2") for run in runs})
    if len(norms) > 1:
        raise InputError(
            f"these runs certify radii in different norms ({', '.join(norms)}): their "
            "certified accuracies at a radius are not comparable; report each norm apart"
        )
    mismatch = idx_mismatch(runs)
    if mismatch and args.common:
        runs = restrict_to_common(runs)
        print(
            f"note: {mismatch}; comparing on the {runs[0].size} common inputs (--common)",
            file=sys.stderr,
        )
    elif mismatch:
        print(
            f"warning: {mismatch}; their numbers are not comparable one to one "
            "(--common compares on the inputs all runs share)",
            file=sys.stderr,
        )
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
        plot_certified_accuracy(
            runs, args.plot, title=args.title, envelope=runs if args.envelope else None
        )
        print(f"plot: {args.plot}", file=sys.stderr)
    if args.expert_plot:
        if plot_experts(runs, args.expert_plot, title=args.title):
            print(f"expert plot: {args.expert_plot}", file=sys.stderr)
        else:
            print(
                "expert plot: no run has an expert column (runs of experts); nothing written",
                file=sys.stderr,
            )
    if args.sigma_plot:
        if plot_sigma_histogram(runs, args.sigma_plot, sigma0=args.sigma0):
            print(f"sigma plot: {args.sigma_plot}", file=sys.stderr)
        else:
            print(
                "sigma plot: no run has per-input sigmas (a sigma column that varies); "
                "nothing written",
                file=sys.stderr,
            )
