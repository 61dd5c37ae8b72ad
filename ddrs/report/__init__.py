"""Reporting results files (never writing them): metrics.py (certified accuracy, ACR, the
envelope, the sign test), tables.py (markdown, LaTeX, CSV), plots.py, command.py
(`ddrs report`)."""

from ddrs.report.command import report_command
from ddrs.report.metrics import (
    ENVELOPE_LABEL,
    Run,
    average_certified_radius,
    certified_accuracy,
    envelope_summary,
    load_runs,
    parse_radii,
    run_summary,
    sign_test,
    significant_claims,
    summarize,
    summary_line,
    versus_envelope,
)
from ddrs.report.plots import (
    plot_certified_accuracy,
    plot_experts,
    plot_sigma_histogram,
    plot_training_sigmas,
)
from ddrs.report.tables import envelope_comparison, format_table

__all__ = [
    "ENVELOPE_LABEL",
    "Run",
    "average_certified_radius",
    "certified_accuracy",
    "envelope_comparison",
    "envelope_summary",
    "format_table",
    "load_runs",
    "parse_radii",
    "plot_certified_accuracy",
    "plot_experts",
    "plot_sigma_histogram",
    "plot_training_sigmas",
    "report_command",
    "run_summary",
    "sign_test",
    "significant_claims",
    "summarize",
    "summary_line",
    "versus_envelope",
]
