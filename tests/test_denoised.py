"""Denoised smoothing and ONNX models: a classifier trained on clean images, a denoiser
trained in front of it with the classifier frozen, the composition certified like any model
(every mode reaches it), its identity covering both parts, and exported ONNX models giving
the votes of the torch model they came from."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ddrs.cli import main
from ddrs.core.experts import Experts
from ddrs.data import get_dataset
from ddrs.models import (
    Denoised,
    build_denoiser,
    load_checkpoint,
    load_denoiser,
    memory_fingerprint,
    model_fingerprint,
)
from ddrs.results import read_table
from ddrs.runs.source import ModelSource
from ddrs.train.denoiser import DenoiserConfig, denoiser_loss, train_denoiser
from ddrs.train.loop import TrainConfig, train, training_subset

onnxruntime = pytest.importorskip("onnxruntime", reason="pip install 'ddrs[onnx]'")
SUBSET = 900  # the classifier's training images (of 1,437): the rest are a router's


@pytest.fixture(scope="module")
def clean_classifier(tmp_path_factory) -> str:
    """A digits CNN trained on clean images only (--sigma 0)."""
    out = tmp_path_factory.mktemp("clean")
    config = TrainConfig(
        dataset="digits", arch="cnn", out=str(out), sigma=0.0, epochs=3, batch=64, lr=0.05,
        eval_max=50, progress=False, train_subset=SUBSET,
    )  # fmt: skip
    return str(train(config))


def train_one(classifier: str, out, objective: str, sigmas: str = "0.25", epochs: int = 2) -> str:
    config = DenoiserConfig(
        classifier=classifier, dataset="digits", out=str(out), sigmas=sigmas,
        objective=objective, arch="dncnn_small", epochs=epochs, batch=64, eval_max=50,
        progress=False, train_subset=SUBSET + 100,
    )  # fmt: skip
    return str(train_denoiser(config))


@pytest.fixture(scope="module")
def denoisers(clean_classifier, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("denoisers")
    return {
        "mse": train_one(clean_classifier, root / "mse", "mse", epochs=6),
        "stability": train_one(clean_classifier, root / "stab", "stability"),
        "blind": train_one(clean_classifier, root / "blind", "mse-then-stability", "0.12,0.5"),
    }


def certify_args(model_flag: str, model: str, out, *extra) -> list[str]:
    return [
        "certify", model_flag, model, "--dataset", "digits", "--sigma", "0.25", "--n0", "20",
        "--n", "100", "--alpha", "0.01", "--max", "30", "--skip", "3", "--no-progress",
        "--out", str(out), *extra,
    ]  # fmt: skip


def test_training_without_noise_is_the_clean_model(clean_classifier):
    loaded = load_checkpoint(clean_classifier)
    assert loaded.meta["sigma"] == 0.0
    rows = loaded.payload["log_rows"]
    assert all(r["test_noisy_acc"] == r["test_clean_acc"] for r in rows)  # no noise at all


def test_an_mse_denoiser_removes_noise(denoisers):
    denoiser = load_denoiser(denoisers["mse"], (1, 8, 8))
    x = torch.stack([get_dataset("digits", "test")[i][0] for i in range(100)])
    noisy = x + 0.25 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        after = F.mse_loss(denoiser(noisy), x).item()
    assert after < 0.75 * F.mse_loss(noisy, x).item()  # an untrained D(z) = z would be 1.0 x


def test_the_stability_objective_targets_the_classifiers_own_clean_class():
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.rand(8, 1, 2, 2)
    identity = torch.nn.Identity()
    torch.manual_seed(1)
    loss, logits = denoiser_loss(identity, classifier, x, torch.full((8,), 0.1), stability=True)
    own = classifier(x).argmax(1)
    assert torch.allclose(loss, F.cross_entropy(logits, own))
    torch.manual_seed(1)
    mse, _ = denoiser_loss(identity, classifier, x, torch.full((8,), 0.1), stability=False)
    assert torch.allclose(mse, (0.1 * torch.randn(x.shape, generator=_seeded(1))).pow(2).mean())


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_a_blind_denoiser_records_its_sigmas_and_switches_objective(denoisers):
    loaded = load_checkpoint(denoisers["blind"])
    assert loaded.meta["kind"] == "denoiser" and loaded.meta["sigmas"] == [0.12, 0.5]
    assert [r["objective"] for r in loaded.payload["log_rows"]] == ["mse", "stability"]
    assert {"test_noisy_acc@0.12", "test_noisy_acc@0.5"} <= set(loaded.payload["log_rows"][0])


def test_a_denoiser_run_resumes(clean_classifier, tmp_path):
    train_one(clean_classifier, tmp_path, "mse", epochs=1)
    config = DenoiserConfig(
        classifier=clean_classifier, dataset="digits", out=str(tmp_path), sigmas="0.25",
        objective="mse", arch="dncnn_small", epochs=2, batch=64, eval_max=50, progress=False,
        resume=True,
    )  # fmt: skip
    train_denoiser(config)
    assert [r["epoch"] for r in load_checkpoint(tmp_path / "last.pt").payload["log_rows"]] == [1, 2]


def test_the_fingerprint_covers_both_parts(clean_classifier, denoisers):
    classifier = load_checkpoint(clean_classifier).model
    mse, stab = (load_denoiser(denoisers[k], (1, 8, 8)) for k in ("mse", "stability"))
    prints = {
        model_fingerprint(classifier),
        model_fingerprint(Denoised(mse, classifier)),
        model_fingerprint(Denoised(stab, classifier)),
    }
    assert len(prints) == 3
    again = Denoised(load_denoiser(denoisers["mse"], (1, 8, 8)), classifier)
    assert model_fingerprint(again) == model_fingerprint(Denoised(mse, classifier))
    one = Experts.of_model(Denoised(mse, classifier))
    other = Experts.of_model(Denoised(stab, classifier))
    assert memory_fingerprint(one, "digits", (1, 8, 8)) != memory_fingerprint(
        other, "digits", (1, 8, 8)
    )


def test_a_denoiser_helps_the_clean_classifier_and_a_memory_refuses_another(
    clean_classifier, denoisers, tmp_path, capsys
):
    plain, stab = tmp_path / "plain.tsv", tmp_path / "stab.tsv"
    assert main(certify_args("--checkpoint", clean_classifier, plain)) == 0
    memory = tmp_path / "m.sqlite"
    args = certify_args(
        "--checkpoint", clean_classifier, stab, "--denoiser", denoisers["stability"]
    )
    assert main([*args, "--memory", str(memory)]) == 0
    settings = json.loads(Path(f"{stab}.settings.json").read_text())
    assert settings["denoiser"] == denoisers["stability"]
    denoised_radius = read_table(stab)["radius"].mean()
    assert denoised_radius > read_table(plain)["radius"].mean()
    capsys.readouterr()
    other = certify_args(
        "--checkpoint", clean_classifier, tmp_path / "o.tsv", "--denoiser", denoisers["mse"]
    )
    assert main([*other, "--memory", str(memory)]) == 2
    err = capsys.readouterr().err
    assert "another model" in err and err.count("\n") == 1
    assert not (tmp_path / "o.tsv").exists()


def test_every_mode_runs_the_denoiser(clean_classifier, denoisers, tmp_path):
    den = denoisers["blind"]
    common = ["--dataset", "digits", "--max", "12", "--skip", "4", "--no-progress"]
    expert_args = ["--expert", f"{clean_classifier}:0.12", "--expert", f"{clean_classifier}:0.5"]
    runs = {
        "predict": ["predict", "--checkpoint", clean_classifier, "--sigma", "0.25", "--n", "50"],
        "sigma": ["sigma", "--checkpoint", clean_classifier, "--sigma0", "0.25", "--grid", "3",
                  "--samples", "8"],
        "ascent": ["sigma", "--checkpoint", clean_classifier, "--sigma0", "0.25", "--search",
                   "ascent", "--iterations", "2"],
        "cascade": ["certify", *expert_args, "--cascade", "0.6", "--n0", "20", "--n", "50"],
    }  # fmt: skip
    for name, args in runs.items():
        out = tmp_path / f"{name}.tsv"
        assert main([*args, *common, "--denoiser", den, "--out", str(out)]) == 0, name
        assert len(read_table(out)["idx"]) == 3
    router = tmp_path / "router"
    args = ["train-router", "--dataset", "digits", "--arch", "cnn", "--sigma", "0.5",
            *expert_args, "--denoiser", den, "--epochs", "1", "--label-n", "100",
            "--check-n", "0", "--no-progress", "--out", str(router)]  # fmt: skip
    assert main(args) == 0
    labelled = read_table(router / "labels.tsv")["idx"].tolist()
    assert labelled and not set(labelled) & set(training_subset(1437, SUBSET + 100, 0))
    source = ModelSource(expert=(f"{clean_classifier}:0.12",), denoiser=den, dataset="digits")
    experts, _ = source.load()
    assert isinstance(experts[0].model, Denoised)


def test_the_service_serves_the_denoised_model(clean_classifier, denoisers, tmp_path):
    from ddrs.serve.spec import ServeRun

    run = ServeRun(
        checkpoint=clean_classifier, denoiser=denoisers["mse"], sigma=0.25, dataset="digits"
    )
    experts = run.load_for(10, (1, 8, 8), "digits", "cpu")
    assert isinstance(experts[0].model, Denoised)


def export_onnx(model, path, shape, batch: int | None = None) -> str:
    example = torch.zeros(batch or 2, *shape)
    dynamic = None if batch else {"x": {0: "batch"}, "y": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=17,
            input_names=["x"], output_names=["y"], dynamic_axes=dynamic,
        )  # fmt: skip
    return str(path)


@pytest.mark.parametrize("batch", [None, 1])
def test_an_onnx_model_certifies_as_its_torch_model(digits_checkpoint, tmp_path, batch):
    model = load_checkpoint(digits_checkpoint).model
    onnx = export_onnx(model, tmp_path / "m.onnx", (1, 8, 8), batch)
    torch_out, onnx_out = tmp_path / "t.tsv", tmp_path / "o.tsv"
    counts = {"torch": tmp_path / "t.counts.tsv", "onnx": tmp_path / "o.counts.tsv"}
    args = certify_args(
        "--checkpoint", digits_checkpoint, torch_out, "--counts", str(counts["torch"])
    )
    assert main(args) == 0
    assert main(certify_args("--model", onnx, onnx_out, "--counts", str(counts["onnx"]))) == 0
    a, b = read_table(counts["torch"]), read_table(counts["onnx"])
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a if k != "time")
    a, b = read_table(torch_out), read_table(onnx_out)
    assert (a["predict"] == b["predict"]).all() and (a["radius"] == b["radius"]).all()


def test_an_exported_denoiser_equals_its_torch_denoiser(clean_classifier, denoisers, tmp_path):
    den = load_denoiser(denoisers["stability"], (1, 8, 8))
    onnx = export_onnx(den, tmp_path / "d.onnx", (1, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(den, torch.zeros(2, 1, 8, 8)).save(str(tmp_path / "d.pt"))
    outs = {}
    exported = {"onnx": onnx, "torchscript": str(tmp_path / "d.pt")}
    for name, source in {"torch": denoisers["stability"], **exported}.items():
        outs[name] = tmp_path / f"{name}.tsv"
        args = certify_args("--checkpoint", clean_classifier, outs[name], "--denoiser", source)
        assert main(args) == 0
    a = read_table(outs["torch"])
    for name in exported:
        b = read_table(outs[name])
        assert (a["predict"] == b["predict"]).all() and (a["radius"] == b["radius"]).all(), name


@pytest.fixture
def bad_files(tmp_path, digits_checkpoint):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not an onnx file")
    cifar = tmp_path / "cifar-denoiser.py"
    cifar.write_text("import torch\ndef factory():\n    return torch.nn.Upsample(scale_factor=2)\n")
    onnx = export_onnx(load_checkpoint(digits_checkpoint).model, tmp_path / "c.onnx", (1, 8, 8))
    return {"corrupt": str(corrupt), "resizing": "cifar-denoiser:factory", "onnx": onnx}


def test_bad_denoisers_are_one_line_and_leave_no_file(
    clean_classifier, denoisers, bad_files, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "runs"
    out.mkdir()
    cases = {
        "missing": (["--denoiser", str(tmp_path / "nope.pt")], "nope.pt"),
        "a classifier": (["--denoiser", clean_classifier], "not a denoiser"),
        "corrupt onnx": (["--denoiser", bad_files["corrupt"]], "not a usable ONNX model"),
        "other shape": (["--denoiser", bad_files["resizing"]], "returns an image of its input"),
        "denoiser as model": (["--checkpoint", denoisers["mse"]], "pass it as --denoiser"),
    }
    for name, (flags, message) in cases.items():
        model = flags if flags[0] == "--checkpoint" else ["--checkpoint", clean_classifier, *flags]
        args = certify_args(*model[:2], out / "r.tsv", *model[2:], "--memory", str(out / "m.db"))
        assert main(args) == 2, name
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (name, err)
        assert list(out.iterdir()) == [], name
    ascent = ["sigma", "--model", bad_files["onnx"], "--dataset", "digits", "--sigma0", "0.25",
              "--search", "ascent", "--max", "2", "--out", str(out / "s.tsv")]  # fmt: skip
    assert main(ascent) == 2
    err = capsys.readouterr().err
    assert "ONNX model does not give" in err and err.count("\n") == 1
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--sigmas", "0.25,x"], "expected a number"),
        (["--sigmas", "0"], "> 0"),
        (["--sigmas", "0.25", "--mse-epochs", "2"], "--mse-epochs belongs"),
        (["--sigmas", "0.25", "--epochs", "0"], "--epochs"),
    ],
)
def test_bad_denoiser_training_is_one_line(clean_classifier, tmp_path, capsys, extra, message):
    out = tmp_path / "den"
    args = ["train-denoiser", "--classifier", clean_classifier, "--dataset", "digits",
            "--out", str(out), *extra]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_a_denoiser_for_another_classifier_refuses_to_resume(
    clean_classifier, digits_checkpoint, tmp_path, capsys
):
    train_one(clean_classifier, tmp_path, "mse", epochs=1)
    args = ["train-denoiser", "--classifier", digits_checkpoint, "--dataset", "digits",
            "--out", str(tmp_path), "--sigmas", "0.25", "--arch", "dncnn_small", "--epochs",
            "2", "--resume", "--no-progress"]  # fmt: skip
    assert main(args) == 2
    assert "another classifier" in capsys.readouterr().err
    other = ["train-denoiser", "--classifier", clean_classifier, "--dataset", "digits",
             "--out", str(tmp_path), "--sigmas", "0.25", "--arch", "dncnn_small",
             "--objective", "stability", "--resume", "--no-progress"]  # fmt: skip
    assert main(other) == 2
    assert "with --objective mse" in capsys.readouterr().err


def test_a_denoiser_architecture_keeps_the_image_shape():
    for shape in [(1, 8, 8), (3, 32, 32)]:
        denoiser = build_denoiser("dncnn_small", shape)
        assert denoiser(torch.rand(2, *shape)).shape == (2, *shape)


def test_a_denoiser_trains_for_an_onnx_classifier_with_mse_only(clean_classifier, tmp_path, capsys):
    onnx = export_onnx(load_checkpoint(clean_classifier).model, tmp_path / "c.onnx", (1, 8, 8))
    args = ["train-denoiser", "--classifier", onnx, "--dataset", "digits", "--sigmas", "0.25",
            "--arch", "dncnn_small", "--epochs", "1", "--no-progress"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "stab")]) == 2
    assert "ONNX classifier does not give" in capsys.readouterr().err
    assert not (tmp_path / "stab").exists()
    assert main([*args, "--objective", "mse", "--out", str(tmp_path / "mse")]) == 0
    assert load_checkpoint(tmp_path / "mse" / "last.pt").meta["objective"] == "mse"
