"""Run specifications: one place for defaults and checks, shared by the CLI and Python."""

import json
from dataclasses import fields

import pytest

from ddrs.cli import build_parser, main
from ddrs.data import get_dataset
from ddrs.errors import InputError, ResultsFileError
from ddrs.models import load_checkpoint
from ddrs.options import from_namespace
from ddrs.results import settings_path
from ddrs.runs import CertifyRun, ModelSource, PredictRun, SigmaRun, certify_dataset
from ddrs.serve.spec import ServeRun
from ddrs.train.config import TrainConfig

MINIMAL = {
    CertifyRun: (["certify", "--sigma", "0.25"], {"sigma": 0.25}),
    PredictRun: (["predict", "--sigma", "0.25"], {"sigma": 0.25}),
    SigmaRun: (["sigma", "--sigma0", "0.25"], {"sigma0": 0.25}),
}


@pytest.mark.parametrize("spec", list(MINIMAL))
def test_the_command_line_defaults_are_the_specs(spec, tmp_path):
    argv, given = MINIMAL[spec]
    args = build_parser().parse_args(
        [*argv, "--checkpoint", "c.pt", "--dataset", "digits", "--out", str(tmp_path / "o.tsv")]
    )
    assert from_namespace(spec, args) == spec(out=str(tmp_path / "o.tsv"), **given)
    assert from_namespace(ModelSource, args) == ModelSource(checkpoint="c.pt", dataset="digits")


def test_train_and_serve_options_are_their_specs_fields():
    parser = build_parser()
    train = parser.parse_args(
        [
            "train",
            "--dataset",
            "digits",
            "--arch",
            "cnn",
            "--sigma",
            "0.5",
            "--out",
            "o",
            "--setting",
            "eps=1",
        ]
    )
    for f in fields(TrainConfig):
        assert hasattr(train, f.name), f.name
    config = from_namespace(TrainConfig, train, method_settings={})
    assert config == TrainConfig(dataset="digits", arch="cnn", sigma=0.5, out="o")
    serve = parser.parse_args(
        [
            "serve",
            "--checkpoint",
            "c.pt",
            "--dataset",
            "digits",
            "--memory",
            "m.sqlite",
            "--sigma0",
            "0.25",
        ]
    )
    assert from_namespace(ServeRun, serve) == ServeRun(
        checkpoint="c.pt", dataset="digits", memory="m.sqlite", sigma0=0.25
    )


@pytest.mark.parametrize(
    "spec, values, message",
    [
        (CertifyRun, {"sigma": 0.0}, "--sigma must be finite and > 0"),
        (CertifyRun, {"sigma": 0.25, "n0": 0}, "--n0 must be an integer >= 1"),
        (CertifyRun, {"sigma": 0.25, "alpha": 1.0}, "alpha must be in"),
        (CertifyRun, {"sigma": 0.25, "pilot": -1}, "--pilot"),
        (CertifyRun, {}, "exactly one of"),
        (PredictRun, {"sigma": 0.25, "skip": 0}, "--skip"),
        (SigmaRun, {"sigma0": 0.25, "search": "nope"}, "unknown sigma search"),
        (SigmaRun, {"sigma0": 0.25, "min_sigma": 0.1}, "--max-sigma"),
        (
            ServeRun,
            {"checkpoint": "c", "dataset": "digits", "memory": "m", "sigma": 0.25, "max_batch": 0},
            "--max-batch",
        ),
    ],
)
def test_a_spec_checks_itself_when_built(spec, values, message, tmp_path):
    with pytest.raises(InputError, match=message) as refused:
        spec(out=str(tmp_path / "o.tsv"), **values) if spec is not ServeRun else spec(**values)
    assert "\n" not in str(refused.value)  # one line, as the command line prints it


def test_a_python_run_resumes_a_command_line_run_and_refuses_other_settings(
    digits_checkpoint, tmp_path
):
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
                "20",
                "--n",
                "100",
                "--max",
                "6",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    written = out.read_text()
    model = load_checkpoint(digits_checkpoint).model
    test = get_dataset("digits", "test")
    run = CertifyRun(out=str(out), sigma=0.25, n0=20, n=100, max=9, progress=False)
    assert run.settings(model, test) == json.loads(settings_path(out).read_text())
    certify_dataset(model, test, run)
    assert out.read_text().startswith(written) and len(out.read_text().splitlines()) == 10
    with pytest.raises(ResultsFileError, match="other settings"):
        certify_dataset(model, test, CertifyRun(out=str(out), sigma=0.25, n0=20, n=200))
