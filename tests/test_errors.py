"""Every user mistake we can think of: one line `ddrs: error: ...`, exit 2, no traceback,
and no file left behind (so the corrected command can use the same --out)."""

import pytest
import torch

from ddrs.cli import main
from ddrs.models import build_model, save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(digits_checkpoint):
    return digits_checkpoint


@pytest.fixture(scope="module")
def cifar_checkpoint(tmp_path_factory):
    """A model for 3x32x32 CIFAR-10 inputs (random weights)."""
    path = tmp_path_factory.mktemp("cifar") / "cifar.pt"
    mean, std = (0.49, 0.48, 0.45), (0.2, 0.2, 0.2)
    model = build_model("cnn_small", 10, (3, 32, 32), mean, std)
    meta = {
        "arch": "cnn_small",
        "num_classes": 10,
        "input_shape": [3, 32, 32],
        "mean": list(mean),
        "std": list(std),
        "dataset": "cifar10",
    }
    save_checkpoint(path, model, meta)
    return str(path)


def certify(ckpt, *extra):
    return [
        "certify",
        "--checkpoint",
        ckpt,
        "--dataset",
        "digits",
        "--n0",
        "10",
        "--n",
        "50",
        "--alpha",
        "0.01",
        "--max",
        "3",
        "--no-progress",
        *extra,
    ]


def sigma(ckpt, *extra):
    return [
        "sigma",
        "--checkpoint",
        ckpt,
        "--dataset",
        "digits",
        "--sigma0",
        "0.25",
        "--max",
        "3",
        "--no-progress",
        *extra,
    ]


def predict(ckpt, *extra):
    return [
        "predict",
        "--checkpoint",
        ckpt,
        "--dataset",
        "digits",
        "--n",
        "50",
        "--alpha",
        "0.01",
        "--max",
        "3",
        "--no-progress",
        *extra,
    ]


BAD = {
    "certify --n 0": (certify, ["--sigma", "0.25", "--n", "0"], "--n must be"),
    "certify --n0 0": (certify, ["--sigma", "0.25", "--n0", "0"], "--n0 must be"),
    "certify --n -5": (certify, ["--sigma", "0.25", "--n", "-5"], "--n must be"),
    "certify --alpha 1.5": (certify, ["--sigma", "0.25", "--alpha", "1.5"], "--alpha must"),
    "certify --alpha 0": (certify, ["--sigma", "0.25", "--alpha", "0"], "alpha"),
    "certify --alpha nan": (certify, ["--sigma", "0.25", "--alpha", "nan"], "alpha"),
    "certify --batch 0": (certify, ["--sigma", "0.25", "--batch", "0"], "--batch"),
    "certify --skip 0": (certify, ["--sigma", "0.25", "--skip", "0"], "--skip"),
    "certify --sigma 0": (certify, ["--sigma", "0"], "sigma must be"),
    "certify --sigma nan": (certify, ["--sigma", "nan"], "sigma must be"),
    "certify --sigmas missing": (certify, ["--sigmas", "nope.tsv"], "no such file"),
    "certify --dataset nope": (certify, ["--sigma", "0.25", "--dataset", "nope"], "dataset"),
    "predict --n 0": (predict, ["--sigma", "0.25", "--n", "0"], "--n must be"),
    "predict --alpha 2": (
        predict,
        ["--sigma", "0.25", "--alpha", "2"],
        "--alpha must be in (0, 1), got 2",
    ),
    "sigma --samples 0": (sigma, ["--samples", "0"], "samples"),
    "sigma --grid 0": (sigma, ["--grid", "0"], "grid"),
    "sigma ascent --samples 0": (sigma, ["--search", "ascent", "--samples", "0"], "samples"),
    "sigma --sigma0 0": (sigma, ["--sigma0", "0"], "sigma0"),
    "sigma certified, one bound": (sigma, ["--min-sigma", "0.1"], "--max-sigma"),
    "sigma certified --n 0": (sigma, ["--n", "0"], "n "),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_invocation_is_one_clear_line_and_leaves_no_file(name, checkpoint, tmp_path, capsys):
    build, extra, message = BAD[name]
    out = tmp_path / "out"
    out.mkdir()
    args = build(checkpoint, *extra, "--out", str(out / "r.tsv"))
    if "--memory" not in args and args[0] == "certify":
        args += ["--memory", str(out / "m.sqlite")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddrs: error:") and err.count("\n") == 1, err
    assert message in err
    assert "Traceback" not in err
    assert list(out.iterdir()) == []


def test_a_checkpoint_of_other_inputs_is_refused(cifar_checkpoint, tmp_path, capsys):
    args = certify(cifar_checkpoint, "--sigma", "0.25", "--out", str(tmp_path / "r.tsv"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "input_shape" in err and "(1, 8, 8)" in err and err.count("\n") == 1
    assert not (tmp_path / "r.tsv").exists()


def test_a_user_model_of_other_inputs_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "wrongshape.py").write_text(
        "import torch\n"
        "def factory():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 10))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = [
        "certify",
        "--model",
        "wrongshape:factory",
        "--dataset",
        "digits",
        "--sigma",
        "0.25",
        "--n",
        "20",
        "--out",
        str(tmp_path / "r.tsv"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "fails on one digits input" in err and err.count("\n") == 1


def test_a_huge_batch_is_sized_by_the_work(checkpoint, tmp_path):
    # --batch 1e9 used to allocate buffers for a billion samples; now they hold the work only
    from ddrs.results import read_table

    huge, usual = tmp_path / "huge.tsv", tmp_path / "usual.tsv"
    assert (
        main(certify(checkpoint, "--sigma", "0.25", "--batch", "1000000000", "--out", str(huge)))
        == 0
    )
    assert main(certify(checkpoint, "--sigma", "0.25", "--batch", "64", "--out", str(usual))) == 0
    # the same certificates: keyed noise makes the batch irrelevant to the counts
    a, b = read_table(huge), read_table(usual)
    assert len(a["idx"]) == 3
    for column in ("idx", "predict", "radius"):
        assert a[column].tolist() == b[column].tolist(), column


def test_corrected_run_after_a_rejected_one_uses_the_same_out(checkpoint, tmp_path, capsys):
    out = str(tmp_path / "r.tsv")
    assert main(certify(checkpoint, "--sigma", "0.25", "--alpha", "1.5", "--out", out)) == 2
    assert main(certify(checkpoint, "--sigma", "0.25", "--out", out)) == 0


def test_numpy_scalars_are_accepted_like_python_numbers():
    import numpy as np

    from ddrs.core.smooth import Smooth

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    smooth = Smooth(model, 3)
    x = torch.rand(2, 1, 2, 2)
    a = smooth.certify_batch(x, 0.25, np.int64(10), np.int64(50), np.float32(0.125), keys=[0, 1])
    b = smooth.certify_batch(x, 0.25, 10, 50, 0.125, keys=[0, 1])  # exact in float32
    assert a == b
    assert smooth.predict_batch(
        x, np.float64(0.25), np.int32(50), np.float32(0.01), keys=[0, 1]
    ) == smooth.predict_batch(x, 0.25, 50, 0.01, keys=[0, 1])


def test_a_malformed_pair_names_its_format(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "sigma",
                "--checkpoint",
                "c.pt",
                "--dataset",
                "digits",
                "--sigma0",
                "0.25",
                "--spread",
                "abc",
                "--out",
                "s.tsv",
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "expected two numbers LOW,HIGH" in err and "_floats" not in err


def _expert_cases(ckpt: str, cifar: str, tmp_path) -> dict:
    (tmp_path / "two.txt").write_text("a b\n")
    (tmp_path / "nan.txt").write_text(f"# name source sigma\na {ckpt} x\n")
    (tmp_path / "routes.tsv").write_text("idx\texpert\tsigma\tscore\ttime\n0\tzzz\t0.25\t0\t0\n")
    (tmp_path / "router.pt").write_bytes(b"")
    base = ["--dataset", "digits", "--n", "50", "--alpha", "0.01", "--max", "1", "--no-progress"]
    two = ["--expert", f"{ckpt}:0.12", "--expert", f"{ckpt}:0.5"]
    return {
        "an expert without a sigma": (
            ["certify", "--expert", ckpt, "--sigma", "0.2"],
            "SOURCE:SIGMA",
        ),
        "an expert at sigma 0": (
            ["certify", "--expert", f"{ckpt}:0", "--sigma", "0.2"],
            "sigma must be finite and > 0",
        ),
        "two experts of one name": (
            ["certify", "--expert", f"a={ckpt}:0.1", "--expert", f"a={ckpt}:0.2", "--sigma", "0.2"],
            "given twice",
        ),
        "no experts file": (
            ["certify", "--experts", str(tmp_path / "none.txt"), "--sigma", "0.2"],
            "no such file",
        ),
        "an experts file line of two fields": (
            ["certify", "--experts", str(tmp_path / "two.txt"), "--sigma", "0.2"],
            "line 1: expected NAME SOURCE SIGMA",
        ),
        "an experts file sigma that is no number": (
            ["certify", "--experts", str(tmp_path / "nan.txt"), "--sigma", "0.2"],
            "line 2: sigma 'x' is not a number",
        ),
        "an expert of other inputs": (
            [
                "certify",
                "--expert",
                f"{cifar}:0.25",
                "--expert",
                f"{ckpt}:0.25",
                "--sigmas",
                str(tmp_path / "routes.tsv"),
            ],
            "input_shape",
        ),
        "experts at one --sigma": (["certify", *two, "--sigma", "0.25"], "own sigmas"),
        "a routes file naming no expert": (
            ["certify", *two, "--sigmas", str(tmp_path / "routes.tsv")],
            "no expert is called",
        ),
        "a router for one model": (
            ["certify", "--checkpoint", ckpt, "--router", str(tmp_path / "router.pt")],
            "routes among experts",
        ),
        "a router that is no checkpoint": (
            ["certify", *two, "--router", str(tmp_path / "router.pt")],
            "router.pt",
        ),
        "a cascade threshold out of range": (
            ["certify", *two, "--cascade", "1.5"],
            "--cascade P0 must be a probability in [0.5, 1)",
        ),
        "a cascade for one model": (
            ["certify", "--checkpoint", ckpt, "--cascade", "0.7"],
            "--cascade routes among experts",
        ),
        "a route rule out of range": (
            ["sigma", *two, "--route-rule", "agree:1.5"],
            "use radius, agree or agree:P",
        ),
        "sigma0 with experts": (["sigma", *two, "--sigma0", "0.25"], "own sigmas"),
        "sigma without sigma0": (["sigma", "--checkpoint", ckpt], "--sigma0"),
    }, base


EXPERT_CASES = [
    "an expert without a sigma",
    "an expert at sigma 0",
    "two experts of one name",
    "no experts file",
    "an experts file line of two fields",
    "an experts file sigma that is no number",
    "an expert of other inputs",
    "experts at one --sigma",
    "a routes file naming no expert",
    "a router for one model",
    "a router that is no checkpoint",
    "a cascade threshold out of range",
    "a cascade for one model",
    "a route rule out of range",
    "sigma0 with experts",
    "sigma without sigma0",
]


@pytest.mark.parametrize("name", EXPERT_CASES)
def test_bad_experts_are_one_clear_line_and_leave_no_file(
    name, checkpoint, cifar_checkpoint, tmp_path, capsys
):
    (tmp_path / "in").mkdir()
    cases, base = _expert_cases(checkpoint, cifar_checkpoint, tmp_path / "in")
    args, message = cases[name]
    out = tmp_path / "out"
    out.mkdir()
    assert main([*args, *base, "--out", str(out / "r.tsv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddrs: error:") and err.count("\n") == 1, err
    assert message in err, err
    assert list(out.iterdir()) == []
