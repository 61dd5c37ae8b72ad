"""End-to-end command-line runs on digits: certify, resume, sigmas, memory, errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from ddrs.cli import main
from ddrs.results import read_table


@pytest.fixture
def checkpoint(digits_checkpoint):
    return digits_checkpoint


def certify_args(checkpoint, out, *extra):
    return [
        "certify",
        "--checkpoint",
        checkpoint,
        "--dataset",
        "digits",
        "--n0",
        "20",
        "--n",
        "100",
        "--alpha",
        "0.01",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def test_certify_writes_reference_format_and_resumes(checkpoint, tmp_path, capsys):
    out = tmp_path / "cert.tsv"
    assert main(certify_args(checkpoint, out, "--sigma", "0.25", "--max", "10")) == 0
    assert "certified accuracy (10 inputs)" in capsys.readouterr().out
    first = out.read_text()
    assert first.splitlines()[0].split("\t") == [
        "idx",
        "label",
        "predict",
        "radius",
        "correct",
        "sigma",
        "time",
    ]
    with open(out, "a") as f:
        f.write("10\t3\t3\t0.1")  # an interrupted row: no newline
    assert main(certify_args(checkpoint, out, "--sigma", "0.25", "--max", "20")) == 0
    table = read_table(out)
    assert table["idx"].tolist() == list(range(20))
    assert out.read_text().startswith(first)  # earlier rows untouched
    # a resumed run gives the same rows as an uninterrupted one
    whole = tmp_path / "whole.tsv"
    assert main(certify_args(checkpoint, whole, "--sigma", "0.25", "--max", "20")) == 0
    for column in ("predict", "radius", "correct"):
        assert np.array_equal(read_table(whole)[column], table[column])


def test_different_settings_refuse_to_append(checkpoint, tmp_path, capsys):
    out = tmp_path / "cert.tsv"
    assert main(certify_args(checkpoint, out, "--sigma", "0.25", "--max", "4")) == 0
    before = out.read_bytes()
    assert main(certify_args(checkpoint, out, "--sigma", "0.5", "--max", "8")) == 2
    assert "refusing to append" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_sigmas_then_certify_with_memory_online_equals_offline(checkpoint, tmp_path, capsys):
    sigmas = tmp_path / "sigmas.tsv"
    assert (
        main(
            [
                "sigma",
                "--checkpoint",
                checkpoint,
                "--dataset",
                "digits",
                "--sigma0",
                "0.25",
                "--iterations",
                "5",
                "--lr",
                "0.01",
                "--samples",
                "2",
                "--max",
                "40",
                "--no-progress",
                "--out",
                str(sigmas),
            ]
        )
        == 0
    )
    table = read_table(sigmas)
    assert table["idx"].tolist() == list(range(40)) and (table["sigma"] > 0).all()
    assert len(np.unique(table["sigma"])) > 1

    online, memory = tmp_path / "online.tsv", tmp_path / "memory.sqlite"
    assert (
        main(
            certify_args(
                checkpoint, online, "--sigmas", str(sigmas), "--max", "40", "--memory", str(memory)
            )
        )
        == 0
    )
    resolved = read_table(online)
    assert {"mc_predict", "mc_radius"} <= set(resolved)
    kept = resolved["predict"] == resolved["mc_predict"]
    assert (resolved["radius"][kept] <= resolved["mc_radius"][kept]).all()

    plain = tmp_path / "plain.tsv"
    assert main(certify_args(checkpoint, plain, "--sigmas", str(sigmas), "--max", "40")) == 0
    offline = tmp_path / "offline.tsv"
    assert (
        main(
            [
                "memory",
                "apply",
                str(plain),
                "--checkpoint",
                checkpoint,
                "--dataset",
                "digits",
                "--out",
                str(offline),
                "--no-progress",
            ]
        )
        == 0
    )
    offline_table = read_table(offline)
    for column in ("idx", "predict", "radius", "mc_predict", "mc_radius"):
        assert np.array_equal(offline_table[column], resolved[column]), column

    capsys.readouterr()
    assert main(["memory", "check", str(memory)]) == 0
    assert "ok: 40 entries" in capsys.readouterr().out
    assert main(["memory", "stats", str(memory)]) == 0
    text = capsys.readouterr().out
    assert "40 entries of shape (1, 8, 8)" in text and "certified radius" in text
    assert "{" not in text  # a summary for a reader, not a Python dict
    assert main(["memory", "stats", str(memory), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["entries"] == 40 and sum(stats["radius_histogram"]["counts"]) <= 40


def test_missing_sigma_index_is_an_error(checkpoint, tmp_path, capsys):
    sigmas = tmp_path / "sigmas.tsv"
    sigmas.write_text("idx\tsigma\n0\t0.3\n2\t0.3\n")
    assert (
        main(certify_args(checkpoint, tmp_path / "o.tsv", "--sigmas", str(sigmas), "--max", "3"))
        == 2
    )
    assert "no row for dataset index 1" in capsys.readouterr().err


def test_memory_refuses_another_model(checkpoint, other_digits_checkpoint, tmp_path, capsys):
    memory = tmp_path / "m.sqlite"
    assert (
        main(
            certify_args(
                checkpoint,
                tmp_path / "a.tsv",
                "--sigma",
                "0.25",
                "--max",
                "2",
                "--memory",
                str(memory),
            )
        )
        == 0
    )
    other = other_digits_checkpoint
    assert (
        main(
            certify_args(
                other, tmp_path / "b.tsv", "--sigma", "0.25", "--max", "2", "--memory", str(memory)
            )
        )
        == 2
    )
    assert "another model" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dataset", "nope"], "unknown dataset"),
        (["--sigma", "-0.5"], "sigma must be"),
        (["--alpha", "1.5"], "alpha"),
    ],
)
def test_bad_arguments_get_clear_errors(checkpoint, tmp_path, capsys, args, message):
    base = certify_args(checkpoint, tmp_path / "x.tsv", "--sigma", "0.25", "--max", "2")
    for flag, value in zip(args[::2], args[1::2]):
        base[base.index(flag) + 1] = value
    assert main(base) == 2
    assert message in capsys.readouterr().err.lower()


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    assert main(certify_args(str(bad), tmp_path / "x.tsv", "--sigma", "0.25")) == 2
    assert "ddrs: error:" in capsys.readouterr().err


def test_user_model_spec_and_predict(tmp_path, monkeypatch, capsys):
    (tmp_path / "mymodel.py").write_text(
        "import torch\n"
        "def factory():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "pred.tsv"
    assert (
        main(
            [
                "predict",
                "--model",
                "mymodel:factory",
                "--dataset",
                "digits",
                "--sigma",
                "0.25",
                "--n",
                "50",
                "--alpha",
                "0.01",
                "--max",
                "5",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    table = read_table(out)
    assert table["idx"].tolist() == list(range(5))
    assert "accuracy" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "ddrs", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "certify" in result.stdout


def test_resume_refuses_a_memory_that_does_not_hold_the_written_rows(checkpoint, tmp_path, capsys):
    out, memory = tmp_path / "r.tsv", tmp_path / "m.sqlite"
    memory.write_bytes(b"")  # an existing empty file is fine, and said so
    args = certify_args(checkpoint, out, "--sigma", "0.25", "--memory", str(memory))
    assert main([*args, "--max", "4"]) == 0
    assert "empty file; starting a new memory" in capsys.readouterr().out
    memory.rename(tmp_path / "kept.sqlite")  # the memory was lost ...
    assert main([*args, "--max", "8"]) == 2
    assert "does not exist" in capsys.readouterr().err and not memory.exists()
    other = certify_args(
        checkpoint, tmp_path / "o.tsv", "--sigma", "0.25", "--memory", str(memory), "--skip", "3"
    )
    assert main([*other, "--max", "8"]) == 0  # ... or replaced by another run's memory
    assert main([*args, "--max", "8"]) == 2
    assert "is not in memory" in capsys.readouterr().err
    memory.unlink()
    (tmp_path / "kept.sqlite").rename(memory)  # ... and restored: resuming works again
    assert main([*args, "--max", "8"]) == 0
    assert read_table(out)["idx"].tolist() == list(range(8))


def test_resume_refuses_another_selection(checkpoint, tmp_path, capsys):
    out = tmp_path / "r.tsv"
    assert main(certify_args(checkpoint, out, "--sigma", "0.25", "--max", "6")) == 0
    assert (
        main(certify_args(checkpoint, out, "--sigma", "0.25", "--max", "60", "--skip", "20")) == 2
    )
    assert "skip" in capsys.readouterr().err
    assert main(certify_args(checkpoint, out, "--sigma", "0.25", "--max", "3")) == 2
    assert "does not include" in capsys.readouterr().err


def test_output_to_a_file_gets_plain_progress_lines(checkpoint, tmp_path, monkeypatch, capsys):
    from ddrs.runs import progress

    monkeypatch.setattr(progress, "PLAIN_SECONDS", 0.0)  # a line per group
    args = certify_args(checkpoint, tmp_path / "r.tsv", "--sigma", "0.25", "--max", "4")
    args.remove("--no-progress")
    assert main(args) == 0
    err = capsys.readouterr().err  # pytest's capture is not a terminal
    assert "certify: 4/4 inputs (100%)" in err and "\r" not in err


@pytest.mark.parametrize("command", ["certify", "predict", "sigma", "train"])
def test_help_shows_defaults_and_every_option_has_help(command, capsys):
    from ddrs.cli import build_parser

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    if command in ("certify", "predict"):
        assert "(default: 100000)" in text and "(default: 0.001)" in text
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._actions[-1])))
    for action in sub.choices[command]._actions:
        assert action.help, f"{command} {action.option_strings} has no help"


def test_counts_file_recertifies_at_another_alpha_exactly(checkpoint, tmp_path, capsys):
    # the counts do not depend on alpha: recomputed radii equal a run at that alpha
    counts, first = tmp_path / "counts.tsv", tmp_path / "a01.tsv"
    base = ["--sigma", "0.25", "--max", "12"]
    assert main(certify_args(checkpoint, first, *base, "--counts", str(counts))) == 0
    table = read_table(counts)
    assert table["idx"].tolist() == list(range(12))
    assert ((table["top1"] >= table["top2"]) & (table["count"] <= table["top1"])).all()
    assert (table["n"] == 100).all() and (table["n0"] == 20).all()
    direct = tmp_path / "a1e-4.tsv"
    args = certify_args(checkpoint, direct, *base)
    args[args.index("--alpha") + 1] = "0.0001"
    assert main(args) == 0
    again = tmp_path / "re.tsv"
    assert main(["recertify", str(counts), "--alpha", "0.0001", "--out", str(again)]) == 0
    a, b = read_table(direct), read_table(again)
    for column in ("idx", "predict", "radius", "correct", "sigma"):
        assert np.array_equal(a[column], b[column]), column
    assert not np.array_equal(read_table(first)["radius"], a["radius"])  # alpha mattered


def test_counts_cannot_be_added_to_a_run_half_way(checkpoint, tmp_path, capsys):
    out = tmp_path / "r.tsv"
    assert main(certify_args(checkpoint, out, "--sigma", "0.25", "--max", "3")) == 0
    args = certify_args(
        checkpoint, out, "--sigma", "0.25", "--max", "6", "--counts", str(tmp_path / "c.tsv")
    )
    assert main(args) == 2
    assert "from the start of a run" in capsys.readouterr().err


def test_input_specific_sample_size_from_the_command_line(checkpoint, tmp_path, capsys):
    out, counts = tmp_path / "r.tsv", tmp_path / "c.tsv"
    args = certify_args(
        checkpoint,
        out,
        "--sigma",
        "0.25",
        "--max",
        "12",
        "--pilot",
        "50",
        "--radius-tolerance",
        "0.05",
        "--counts",
        str(counts),
    )
    args[args.index("--n") + 1] = "800"
    assert main(args) == 0
    used = read_table(counts)["n"]
    assert (used <= 800).all() and used.min() < 800  # some inputs needed fewer samples
    assert (
        main(["recertify", str(counts), "--alpha", "0.01", "--out", str(tmp_path / "re.tsv")]) == 0
    )  # each row recomputed at its own N
    assert np.array_equal(read_table(tmp_path / "re.tsv")["radius"], read_table(out)["radius"])
    bad = certify_args(checkpoint, tmp_path / "x.tsv", "--sigma", "0.25", "--pilot", "-3")
    assert main(bad) == 2
