"""Tests of `ddrs report` (ddrs.report) against small hand-computed results files."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pytest

from ddrs.cli import main
from ddrs.errors import InputError, ResultsFileError
from ddrs.report import (
    ENVELOPE_LABEL,
    format_table,
    load_runs,
    parse_radii,
    plot_certified_accuracy,
    plot_sigma_histogram,
    run_summary,
)

RADII = [0.0, 0.25, 0.5, 0.75]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Ours, constant sigma. Row 0: radius 0.5 exactly (a tie at r=0.5); row 1: correct with
# radius 0; row 2: abstention; row 3: wrong. Clean 2/4; r=0.25: 1/4; r=0.5: 1/4; r=0.75: 0;
# ACR (0.5 + 0) / 4 = 0.125; abstain 1/4.
OURS = """idx\tlabel\tpredict\tradius\tcorrect\tsigma\ttime
0\t1\t1\t0.5\t1\t0.25\t0.1
1\t2\t2\t0.0\t1\t0.25\t0.1
2\t3\t-1\t0.0\t0\t0.25\t0.1
3\t4\t5\t0.8\t0\t0.25\t0.1
"""

# Reference format without sigma and time. Clean 2/2; r=0.25: 2/2 (a tie); r=0.5 and
# r=0.75: 1/2; ACR (1.0 + 0.25) / 2 = 0.625; abstain 0.
REFERENCE = """idx\tlabel\tpredict\tradius\tcorrect
0\t1\t1\t1.0\t1
1\t2\t2\t0.25\t1
"""

# Memory-based, varying sigma. Row 0 shrunk (0.3 < 0.5, same class); row 1 equal radius;
# rows 2 and 3 changed (3 vs 1, -1 vs 0); row 4 differs from mc_radius by ~1e-16 only.
# changed 2, shrunk 1; sigma min 0.1, median 0.3, max 0.5.
MEMORY = """idx\tlabel\tpredict\tradius\tcorrect\tsigma\ttime\tmc_predict\tmc_radius
0\t1\t1\t0.3\t1\t0.2\t0.1\t1\t0.5
1\t2\t2\t0.4\t1\t0.3\t0.1\t2\t0.4
2\t3\t3\t0.2\t0\t0.5\t0.1\t1\t0.6
3\t0\t-1\t0.0\t0\t0.4\t0.1\t0\t0.1
4\t0\t0\t0.1\t1\t0.1\t0.1\t0\t0.1000000000000001
"""

EMPTY = "idx\tlabel\tpredict\tradius\tcorrect\tsigma\ttime\n"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return {
        "ours": write(tmp_path, "ours.tsv", OURS),
        "reference": write(tmp_path, "reference.tsv", REFERENCE),
        "memory": write(tmp_path, "memory.tsv", MEMORY),
        "empty": write(tmp_path, "empty.tsv", EMPTY),
    }


def summary_of(path: Path, radii=RADII) -> dict:
    return run_summary(load_runs([path])[0], radii)


def test_ties_abstentions_and_zero_radius(files):
    s = summary_of(files["ours"])
    assert s["label"] == "ours" and s["inputs"] == 4
    assert s["clean"] == pytest.approx(2 / 4)
    assert s["certified"] == pytest.approx({0.0: 2 / 4, 0.25: 1 / 4, 0.5: 1 / 4, 0.75: 0.0})
    assert s["ACR"] == pytest.approx(0.125)
    assert s["abstain"] == pytest.approx(1 / 4)
    assert s["changed"] is None and s["shrunk"] is None
    assert s["sigma_min"] is None  # constant sigma: no stats


def test_reference_format_without_sigma_or_time(files):
    s = summary_of(files["reference"])
    assert s["inputs"] == 2 and s["clean"] == 1.0
    assert s["certified"] == pytest.approx({0.0: 1.0, 0.25: 1.0, 0.5: 0.5, 0.75: 0.5})
    assert s["ACR"] == pytest.approx(0.625)
    assert s["abstain"] == 0.0
    assert s["sigma_min"] is None and s["changed"] is None


def test_header_only_file_is_an_empty_run(files):
    s = summary_of(files["empty"])
    assert s["inputs"] == 0
    assert all(
        math.isnan(v) for v in [s["clean"], s["ACR"], s["abstain"], *s["certified"].values()]
    )
    table = format_table([s], RADII, "markdown")
    assert "| empty | 0 | – | – |" in table


def test_memory_changed_shrunk_and_sigma_stats(files):
    s = summary_of(files["memory"])
    assert (s["changed"], s["shrunk"]) == (2, 1)
    assert (s["sigma_min"], s["sigma_median"], s["sigma_max"]) == pytest.approx((0.1, 0.3, 0.5))
    # correct radii 0.3, 0.4, 0.1 of 5 inputs
    assert s["certified"] == pytest.approx({0.0: 3 / 5, 0.25: 2 / 5, 0.5: 0.0, 0.75: 0.0})
    assert s["ACR"] == pytest.approx(0.8 / 5)
    table = format_table([s], RADII, "markdown")
    assert "| 2 | 1 | 0.100 | 0.300 | 0.500 |" in table


@pytest.mark.parametrize(
    "text, message",
    [
        ("idx\tlabel\tpredict\tradius\tcorrect\n0\t1\t1\t0.5\n", "fields"),
        ("idx\tlabel\tpredict\tradius\tcorrect\n0\t1\t1\tabc\t1\n", "expected a number"),
        ("idx\tlabel\tpredict\tcorrect\n0\t1\t1\t1\n", "missing column"),
    ],
)
def test_malformed_files_raise(tmp_path, text, message):
    path = write(tmp_path, "bad.tsv", text)
    with pytest.raises(ResultsFileError, match=message):
        load_runs([path])


def test_envelope_values(files):
    summaries = [
        summary_of(files["ours"]),
        summary_of(files["reference"]),
        summary_of(files["empty"]),
    ]
    table = format_table(summaries, RADII, "csv", envelope=True)
    rows = list(csv.DictReader(io.StringIO(table)))
    best = rows[-1]
    assert best["run"] == ENVELOPE_LABEL
    # max of ours and reference per column (the empty run's NaN is ignored)
    assert float(best["clean"]) == 1.0
    assert float(best["r=0.25"]) == 1.0
    assert float(best["r=0.5"]) == 0.5
    assert float(best["r=0.75"]) == 0.5
    assert float(best["ACR"]) == pytest.approx(0.625)
    assert best["inputs"] == "" and best["abstain"] == ""


def test_markdown_table(files):
    summaries = [summary_of(files["ours"]), summary_of(files["reference"])]
    table = format_table(summaries, RADII, "markdown", envelope=True)
    lines = table.splitlines()
    assert lines[0] == "| run | inputs | clean | r=0.25 | r=0.5 | r=0.75 | ACR | abstain |"
    assert lines[2] == "| ours | 4 | 50.0% | 25.0% | 25.0% | 0.0% | 0.125 | 25.0% |"
    assert lines[3] == "| reference | 2 | 100.0% | 100.0% | 50.0% | 50.0% | 0.625 | 0.0% |"
    envelope = f"| {ENVELOPE_LABEL} | – | 100.0% | 100.0% | 50.0% | 50.0% | 0.625 (max) | – |"
    assert lines[4] == envelope


def test_latex_table(files):
    summaries = [summary_of(files["ours"]), summary_of(files["reference"])]
    table = format_table(summaries, RADII, "latex", envelope=True)
    assert table.startswith(r"\begin{tabular}{lrrrrrrr}")
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\end{tabular}"):
        assert rule in table
    assert r"ours & 4 & 50.0\% & 25.0\% & 25.0\% & 0.0\% & 0.125 & 25.0\% \\" in table
    assert r"0.625 (max) & -- \\" in table


def test_csv_table_has_raw_fractions(files):
    summaries = [summary_of(files["ours"]), summary_of(files["memory"])]
    rows = list(csv.DictReader(io.StringIO(format_table(summaries, RADII, "csv"))))
    ours, memory = rows
    assert float(ours["clean"]) == 0.5 and float(ours["ACR"]) == 0.125
    assert float(ours["abstain"]) == 0.25 and ours["inputs"] == "4"
    assert ours["changed"] == "" and ours["sigma min"] == ""
    assert memory["changed"] == "2" and memory["shrunk"] == "1"
    assert float(memory["sigma median"]) == pytest.approx(0.3)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0:1:0.25", [0.0, 0.25, 0.5, 0.75, 1.0]),
        ("0:0.9:0.25", [0.0, 0.25, 0.5, 0.75]),
        ("0:1:0.1", [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]),
        ("0.5:0.5:0.1", [0.5]),
        ("0.5,0,1", [0.0, 0.5, 1.0]),
        ("0.25", [0.25]),
    ],
)
def test_parse_radii(text, expected):
    assert parse_radii(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "0:1",
        "0:1:0",
        "0:1:-0.1",
        "1:0:0.1",
        "-1",
        "0,nan",
        "0,,1",
        "0:1000:0.001",
        "0:inf:0.1",
    ],
)
def test_parse_radii_rejects_bad_text(text):
    with pytest.raises(InputError):
        parse_radii(text)


def test_labels(files):
    runs = load_runs([files["ours"], files["reference"]], ["A", "B"])
    assert [r.label for r in runs] == ["A", "B"]
    with pytest.raises(InputError, match="1 label"):
        load_runs([files["ours"], files["reference"]], ["only one"])


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1024


def test_plots(files, tmp_path):
    runs = load_runs(list(files.values()))
    plot_certified_accuracy(runs, tmp_path / "curves.png", title="test")
    assert_png(tmp_path / "curves.png")
    assert plot_sigma_histogram(runs, tmp_path / "sigmas.png")
    assert_png(tmp_path / "sigmas.png")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_sigma_plot_without_varying_sigmas(files, tmp_path):
    runs = load_runs([files["ours"], files["reference"]])
    assert not plot_sigma_histogram(runs, tmp_path / "sigmas.png")
    assert not (tmp_path / "sigmas.png").exists()


def test_cli_end_to_end_leaves_results_unchanged(files, tmp_path, capsys):
    before = {p: p.read_bytes() for p in files.values()}
    argv = [
        "report",
        str(files["ours"]),
        str(files["reference"]),
        str(files["memory"]),
        "--radii",
        "0:0.75:0.25",
        "--envelope",
        "--labels",
        "A",
        "B",
        "C",
        "--plot",
        str(tmp_path / "curves.png"),
        "--sigma-plot",
        str(tmp_path / "s.png"),
    ]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "| A | 4 | 50.0% | 25.0% | 25.0% | 0.0% | 0.125 | 25.0% | – | – |" in out
    assert ENVELOPE_LABEL in out
    assert "curves.png" in err and "s.png" in err
    assert_png(tmp_path / "curves.png")
    assert_png(tmp_path / "s.png")
    assert {p: p.read_bytes() for p in files.values()} == before


def test_cli_out_file_and_errors(files, tmp_path, capsys):
    out = tmp_path / "table.csv"
    assert main(["report", str(files["ours"]), "--format", "csv", "--out", str(out)]) == 0
    assert capsys.readouterr().out == ""
    assert out.read_text().splitlines()[0].startswith("run,inputs,clean,r=0.25")
    assert main(["report", str(files["ours"]), "--labels", "A", "B"]) == 2
    assert "label" in capsys.readouterr().err
    assert main(["report", str(files["ours"]), "--out", str(files["ours"])]) == 2
    assert files["ours"].read_text() == OURS
    assert main(["report", str(files["ours"]), "--sigma-plot", str(tmp_path / "x.png")]) == 0
    assert "nothing written" in capsys.readouterr().err


def test_reference_time_column_in_timedelta_spelling_is_read(tmp_path):
    # Cohen et al.'s certify.py writes str(datetime.timedelta): 10 of their 13 published
    # logs look like this and used to be refused.
    from ddrs.report import load_runs, run_summary
    from ddrs.results import parse_seconds

    path = tmp_path / "noise_0.25.tsv"
    path.write_text(
        "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
        "0\t3\t3\t0.52\t1\t0:00:13.736080\n"
        "20\t8\t-1\t0.0\t0\t1 day, 2:03:04.5\n"
        "40\t1\t1\t0.9\t1\t12.5\n"
        "60\t2\t2\t0.1\t1\tn/a\n"
    )
    run = load_runs([path])[0]
    assert run.table["time"][:3].tolist() == [13.73608, 93784.5, 12.5]
    assert np.isnan(run.table["time"][3])
    assert run_summary(run, [0.5])["certified"][0.5] == 0.5
    assert parse_seconds("13.7s") == 13.7 and parse_seconds("0:01:00") == 60.0


def _write_run(path, idx, correct):
    lines = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"]
    lines += [f"{i}\t1\t1\t0.6\t{c}\t0.1" for i, c in zip(idx, correct)]
    path.write_text("\n".join(lines) + "\n")


def test_runs_over_different_inputs_are_flagged_and_common_compares_like_with_like(
    tmp_path, capsys
):
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    _write_run(a, range(0, 10), [1] * 10)
    _write_run(b, range(0, 20), [1] * 10 + [0] * 10)
    assert main(["report", str(a), str(b), "--envelope", "--radii", "0.5"]) == 0
    captured = capsys.readouterr()
    assert "warning: the runs cover different inputs (a: 10, b: 20; 10 in common)" in captured.err
    assert "50.0%" in captured.out  # b over its 20 inputs
    assert main(["report", str(a), str(b), "--common", "--radii", "0.5"]) == 0
    captured = capsys.readouterr()
    assert "comparing on the 10 common inputs" in captured.err
    assert "50.0%" not in captured.out and captured.out.count("100.0%") >= 2
    assert main(["report", str(a), str(a), "--radii", "0.5"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_plots_are_world_readable_and_take_a_title_and_sigma0(tmp_path, capsys):
    import os
    import stat

    run = tmp_path / "dd.tsv"
    lines = ["idx\tlabel\tpredict\tradius\tcorrect\tsigma\ttime"]
    lines += [f"{i}\t1\t1\t0.4\t1\t{0.2 + 0.01 * i}\t0.1" for i in range(8)]
    run.write_text("\n".join(lines) + "\n")
    plot, hist = tmp_path / "curves.png", tmp_path / "sigmas.png"
    old = os.umask(0o022)
    try:
        assert (
            main(
                [
                    "report",
                    str(run),
                    "--plot",
                    str(plot),
                    "--title",
                    "My title",
                    "--sigma-plot",
                    str(hist),
                    "--sigma0",
                    "0.25",
                ]
            )
            == 0
        )
    finally:
        os.umask(old)
    for png in (plot, hist):
        assert stat.S_IMODE(png.stat().st_mode) == 0o644, png  # like the TSVs, not 0600
    assert not list(tmp_path.glob(".*.png"))  # no temporary file left


def test_sigma_histogram_marks_sigma0_and_counts_in_whole_inputs(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from ddrs import report
    from ddrs.report import plots

    seen = {}
    real_save = plots._save_atomically

    def capture(fig, path):
        ax = fig.axes[0]
        seen["ticks"] = [t for t in ax.get_yticks() if t >= 0]
        seen["labels"] = [t.get_text() for t in ax.get_legend().get_texts()]
        real_save(fig, path)

    monkeypatch.setattr(plots, "_save_atomically", capture)
    run = tmp_path / "dd.tsv"
    lines = ["idx\tlabel\tpredict\tradius\tcorrect\tsigma\ttime"]
    lines += [f"{i}\t1\t1\t0.4\t1\t{0.2 + 0.1 * (i % 3)}\t0.1" for i in range(5)]
    run.write_text("\n".join(lines) + "\n")
    runs = report.load_runs([run])
    assert report.plot_sigma_histogram(runs, tmp_path / "h.png", sigma0=0.25)
    assert all(float(t).is_integer() for t in seen["ticks"])
    assert any("sigma0 = 0.25" in label for label in seen["labels"])
    plt.close("all")


def test_expert_plot_colours_each_sigma_alike_in_every_panel_and_marks_router_abstentions(
    tmp_path, monkeypatch
):
    from matplotlib.colors import to_hex

    from ddrs import report
    from ddrs.report import plots

    seen = []

    def capture(fig, path):
        for ax in fig.axes:
            labels = [t.get_text() for t in ax.get_legend().get_texts()]
            colours = [
                to_hex(c.get_facecolor()[0])
                for c in ax.collections
                if len(c.get_offsets()) and c.get_facecolor().size
            ]  # filled markers
            seen.append((labels, colours))

    monkeypatch.setattr(plots, "_save_atomically", capture)
    header = "idx\tlabel\tpredict\tradius\tcorrect\tsigma\ttime\texpert"
    routed = [header] + [
        f"{i}\t1\t1\t0.3\t1\t{s}\t0.1\t{e}"
        for i, (e, s) in enumerate([("a", 0.12), ("b", 0.25), ("c", 0.5)])
    ]
    dual = [header, "0\t1\t-1\t0.0\t0\t0.5\t0.1\t-", "1\t1\t1\t0.3\t1\t0.5\t0.1\tc"]
    (tmp_path / "routed.tsv").write_text("\n".join(routed) + "\n")
    (tmp_path / "dual.tsv").write_text("\n".join(dual) + "\n")
    runs = report.load_runs([tmp_path / "routed.tsv", tmp_path / "dual.tsv"])
    assert report.plot_experts(runs, tmp_path / "experts.png")
    (routed_labels, routed_colours), (dual_labels, dual_colours) = seen
    assert routed_labels == ["a (33%)", "b (33%)", "c (33%)"]
    assert dual_labels == ["c (50%)", "no route (50%)"]
    assert dual_colours[0] == routed_colours[2]  # expert c (sigma 0.5) alike in both panels
    table = format_table([run_summary(r, RADII) for r in runs], RADII)
    assert "| a 33%, b 33%, c 33% |" in table
    assert "| no route 50%, c 50% |" in table
    (tmp_path / "plain.tsv").write_text(OURS)
    assert not report.plot_experts(report.load_runs([tmp_path / "plain.tsv"]), tmp_path / "x.png")


def _run(label: str, correct, radius):
    from ddrs.report import Run

    n = len(correct)
    table = {
        "idx": np.arange(n),
        "label": np.zeros(n, int),
        "predict": np.zeros(n, int),
        "correct": np.asarray(correct),
        "radius": np.asarray(radius, float),
    }
    return Run(label, Path(label), table)


def test_the_envelope_comparison_uses_the_best_fixed_run_per_radius_and_a_sign_test():
    from ddrs.report import envelope_comparison, significant_claims, versus_envelope

    n = 40
    small = _run("small", [1] * n, [0.3] * n)  # right everywhere, radius 0.3
    large = _run("large", [1] * 20 + [0] * 20, [0.9] * n)  # half right, radius 0.9
    better = _run("better", [1] * n, [0.3] * 20 + [0.9] * 20)
    c = versus_envelope(better, [small, large], 0.5)  # the envelope at 0.5 is "large"
    assert c["envelope_run"] == "large" and (c["only_run"], c["only_envelope"]) == (20, 20)
    assert c["delta"] == 0.0 and c["p"] == 1.0  # 20 / 20: no evidence either way
    c = versus_envelope(better, [small, large], 0.25)  # "small" at 0.25: both all right
    assert c["envelope_run"] == "small" and c["delta"] == 0.0
    worse = _run("worse", [1] * 10 + [0] * 30, [0.3] * n)
    c = versus_envelope(worse, [small, large], 0.0)
    assert (c["only_run"], c["only_envelope"]) == (0, 30) and c["delta"] == -75.0
    assert c["p"] == pytest.approx(2 * 0.5**30)  # the two-sided binomial test, exactly
    table = envelope_comparison([better, worse], [small, large], [0.0, 0.5])
    assert "| worse | -75.0 (0 / 30, p = 1.9e-09) | -50.0 (0 / 20, p = 1.9e-06) |" in table
    assert "| better | +0.0 (0 / 0, not significant) | +0.0 (20 / 20, not significant) |" in table
    claims = significant_claims([better, worse], [small, large], [0.0, 0.5])
    assert "worse below it at clean (-75.0), r=0.5 (-50.0)" in claims
    assert "better" not in claims


def test_a_difference_of_whole_images_is_exact_in_points():
    """5 images of 500 below is -1.0 points, as a goal of "at most 1 point below" reads it
    (0.182 - 0.192 in floating point is -0.010000000000000009)."""
    from ddrs.report import versus_envelope

    n = 500
    fixed = _run("fixed", [1] * 96 + [0] * 404, [0.8] * n)
    row = _run("row", [1] * 91 + [0] * 409, [0.8] * n)
    c = versus_envelope(row, [fixed], 0.75)
    assert c["delta"] == -1.0 and c["delta"] >= -1.0
