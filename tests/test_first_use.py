"""What a new user meets first: the public Python API on their own model and tensors, the
version, and the rough edges of a first session (each a one-line answer that names the fix)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_folder
from torch import nn

from ddrs.cli import main


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddrs: error: "), err
    return err[0]


def test_the_public_api_certifies_a_users_module_on_their_own_tensors(tmp_path):
    from ddrs import CertifyRun, Smooth, certify_dataset, predict_dataset
    from ddrs.results import read_table

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()  # any nn.Module to logits
    x, y = torch.rand(6, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    cert = Smooth(model, num_classes=3, seed=0).certify(x[0], sigma=0.5, n0=20, n=200, alpha=0.01)
    assert cert.predict in (-1, 0, 1, 2) and cert.radius >= 0
    out = tmp_path / "cert.tsv"
    run = CertifyRun(out=str(out), sigma=0.5, n0=20, n=200, alpha=0.01, progress=False)
    certify_dataset(model, (x, y), run)  # a pair of tensors
    table = read_table(out)
    assert table["idx"].tolist() == list(range(6)) and table["label"].tolist() == y.tolist()
    certify_dataset(model, torch.utils.data.TensorDataset(x, y), run)  # resumes: same tensors
    assert read_table(out)["idx"].tolist() == list(range(6))
    from ddrs import PredictRun

    predict_dataset(
        model,
        (x, y),
        PredictRun(out=str(tmp_path / "p.tsv"), sigma=0.5, n=100, alpha=0.01, progress=False),
    )
    assert len(read_table(tmp_path / "p.tsv")["idx"]) == 6
    from ddrs.errors import ResultsFileError

    with pytest.raises(ResultsFileError, match="other settings"):  # other tensors, same file
        certify_dataset(model, (x.flip(0), y), run)


def test_version():
    done = subprocess.run(
        [sys.executable, "-m", "ddrs", "--version"], capture_output=True, text=True, timeout=120
    )
    import ddrs

    assert done.returncode == 0 and done.stdout.strip() == f"ddrs {ddrs.__version__}"


def test_quickstart_into_an_existing_file_is_one_line(tmp_path, capsys):
    existing = tmp_path / "cert.tsv"
    existing.write_text("keep me\n")
    assert "give a folder" in one_line_error(capsys, ["quickstart", "--out", str(existing)])
    assert existing.read_text() == "keep me\n"


def test_serve_on_a_busy_port_is_one_line_and_creates_no_memory(
    digits_checkpoint, tmp_path, capsys
):
    memory = tmp_path / "m.sqlite"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_line_error(
            capsys,
            [
                "serve",
                "--checkpoint",
                digits_checkpoint,
                "--dataset",
                "digits",
                "--sigma",
                "0.25",
                "--memory",
                str(memory),
                "--port",
                str(port),
            ],
        )
    assert f"127.0.0.1:{port}" in line and "--port" in line and not memory.exists()


def test_a_missing_checkpoint_is_called_missing(tmp_path, capsys):
    line = one_line_error(
        capsys,
        [
            "certify",
            "--checkpoint",
            str(tmp_path / "nope.pt"),
            "--dataset",
            "digits",
            "--sigma",
            "0.25",
            "--out",
            str(tmp_path / "c.tsv"),
        ],
    )
    assert "checkpoint not found" in line and "other inputs" not in line


def test_recertify_of_a_results_file_names_the_counts_file(digits_checkpoint, tmp_path, capsys):
    out = tmp_path / "cert.tsv"
    assert (
        main(
            [
                "certify",
                "--checkpoint",
                digits_checkpoint,
                "--dataset",
                "digits",
                "--sigma",
                "0.25",
                "--n0",
                "10",
                "--n",
                "50",
                "--max",
                "2",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    line = one_line_error(
        capsys, ["recertify", str(out), "--alpha", "0.01", "--out", str(tmp_path / "re.tsv")]
    )
    assert "--counts" in line and "results file" in line
    line = one_line_error(
        capsys, ["recertify", str(out), "--alpha", "2", "--out", str(tmp_path / "re.tsv")]
    )
    assert "--alpha must be in (0, 1)" in line


def test_a_model_module_in_the_current_folder_is_found(tmp_path, monkeypatch, capsys):
    (tmp_path / "first_use_model.py").write_text(
        "from torch import nn\n\ndef make():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    out = tmp_path / "c.tsv"
    assert (
        main(
            [
                "certify",
                "--model",
                "first_use_model:make",
                "--dataset",
                "digits",
                "--sigma",
                "0.25",
                "--n0",
                "10",
                "--n",
                "50",
                "--max",
                "2",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert out.exists()
    capsys.readouterr()
    line = one_line_error(
        capsys,
        [
            "certify",
            "--model",
            "nomodel:make",
            "--dataset",
            "digits",
            "--sigma",
            "0.25",
            "--out",
            str(tmp_path / "d.tsv"),
        ],
    )
    assert "nomodel.py" in line and "PYTHONPATH" in line


def test_no_data_root_names_the_flag_and_the_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DDRS_DATA_ROOT", raising=False)
    line = one_line_error(
        capsys,
        [
            "train",
            "--dataset",
            "cifar10",
            "--arch",
            "cnn_small",
            "--sigma",
            "0.25",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert "--data-root" in line and "DDRS_DATA_ROOT" in line and "root=..." not in line


def test_a_run_cut_from_a_class_sorted_folder_says_so(tmp_path, capsys):
    """An ImageFolder lists its images class by class: --max keeps the first classes only."""
    root = write_folder(tmp_path / "imgs", {"train": 4, "test": 8}, sizes=(16,))
    train = [
        "train",
        "--dataset",
        "imagefolder",
        "--data-root",
        str(root),
        "--arch",
        "cnn_small",
        "--sigma",
        "0.25",
        "--epochs",
        "1",
        "--batch",
        "8",
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
    ]
    assert main(train) == 0
    capsys.readouterr()
    common = [
        "certify",
        "--checkpoint",
        str(tmp_path / "run" / "last.pt"),
        "--dataset",
        "imagefolder",
        "--data-root",
        str(root),
        "--sigma",
        "0.25",
        "--n0",
        "10",
        "--n",
        "20",
        "--no-progress",
    ]
    assert main([*common, "--max", "8", "--out", str(tmp_path / "cut.tsv")]) == 0
    assert "hold 1 of the dataset's 3 classes" in capsys.readouterr().err
    assert main([*common, "--skip", "3", "--out", str(tmp_path / "spread.tsv")]) == 0
    assert "classes" not in capsys.readouterr().err


def test_help_gives_every_option_a_text_and_its_default(capsys):
    def help_of(*argv) -> str:
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        return " ".join(capsys.readouterr().out.split())

    assert "the resolved results TSV" in help_of("memory", "apply")
    for command in ("stats", "check"):
        assert "an SQLite file or a postgresql:// URL" in help_of("memory", command)
    assert "noisy samples per forward pass (default: automatic)" in help_of("serve")
    sigma = help_of("sigma")
    assert "(default: 0.5,2)" in sigma and "(0.5, 2.0)" not in sigma
    assert "radius_before" in sigma and "top of the candidates' absolute range" in sigma


def test_the_api_reference_builds_without_warnings(tmp_path):
    pytest.importorskip("pdoc")
    done = subprocess.run(
        [sys.executable, "-W", "error", "-m", "pdoc", "ddrs", "-o", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "Warning" not in done.stderr, done.stderr[-3000:]
    page = (tmp_path / "ddrs.html").read_text()
    import ddrs

    for name in ddrs.__all__:
        assert name in page, name


def test_the_citation_file_names_this_version():
    import ddrs

    text = (Path(__file__).resolve().parents[1] / "CITATION.cff").read_text()
    assert f'version: "{ddrs.__version__}"' in text and "Data Dependent Randomized" in text
