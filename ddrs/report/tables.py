"""Tables of run summaries: markdown, LaTeX (booktabs) or CSV; each run against the
envelope with the sign test."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ddrs.errors import InputError
from ddrs.report.metrics import SIGNIFICANCE, Run, envelope_summary, versus_envelope


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
    columns += [
        _Column(f"r={r:g}", "percent", lambda s, r=float(r): s["certified"][r])
        for r in radii
        if r != 0
    ]
    columns += [
        _Column("ACR", "radius", lambda s: s["ACR"]),
        _Column("abstain", "percent", lambda s: s["abstain"]),
    ]
    if any(s["changed"] is not None for s in summaries):
        columns += [
            _Column("changed", "count", lambda s: s["changed"]),
            _Column("shrunk", "count", lambda s: s["shrunk"]),
        ]
    if any(s["sigma_min"] is not None for s in summaries):
        columns += [
            _Column(f"sigma {k}", "sigma", lambda s, k=k: s[f"sigma_{k}"])
            for k in ("min", "median", "max")
        ]
    if any(s.get("experts") for s in summaries):
        columns.append(
            _Column("experts (share of inputs)", "text", lambda s: _shares_text(s.get("experts")))
        )
    return columns


def _shares_text(shares: dict[str, float] | None) -> str:
    if not shares:
        return "–"
    named = {("no route" if name == "-" else name): share for name, share in shares.items()}
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


def format_table(
    summaries: Sequence[dict], radii: Sequence[float], fmt: str = "markdown", envelope: bool = False
) -> str:
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
    return (
        "\n".join(
            [
                r"\begin{tabular}{l" + "r" * (len(headers) - 1) + "}",
                r"\toprule",
                " & ".join(_latex_escape(h) for h in headers) + r" \\",
                r"\midrule",
                *body,
                r"\bottomrule",
                r"\end{tabular}",
            ]
        )
        + "\n"
    )


def _csv_field(text: str) -> str:
    if any(c in text for c in ',"\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def envelope_comparison(
    runs: Sequence[Run], fixed: Sequence[Run], radii: Sequence[float], level: float = SIGNIFICANCE
) -> str:
    """A markdown table: each run against the envelope at each radius, in points, with the
    sign test; a difference with p >= `level` is marked "not significant"."""
    lines = [
        "| run | " + " | ".join("clean" if r == 0 else f"r={r:g}" for r in radii) + " |",
        "| --- |" + " ---: |" * len(radii),
    ]
    for run in runs:
        cells = []
        for r in radii:
            c = versus_envelope(run, fixed, r)
            verdict = f"p = {c['p']:.2g}" if c["p"] < level else "not significant"
            cells.append(f"{c['delta']:+.1f} ({c['only_run']} / {c['only_envelope']}, {verdict})")
        lines.append(f"| {run.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
