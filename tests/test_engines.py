"""Engines and precisions: ONNX Runtime and OpenVINO at fp32 give eager's votes in every mode;
bf16 and int8 models are other models (their memories refuse fp32, and the reverse); `auto`
measures once and reuses its choice; a missing extra or an impossible precision is one line
and leaves no file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ddrs.cli import main
from ddrs.models import model_fingerprint
from ddrs.models.engines import EngineModel, installed
from ddrs.results import read_table
from ddrs.runs.source import ModelSource

pytest.importorskip("onnxruntime", reason="pip install 'ddrs[onnx]'")
RUNTIMES = [e for e in ("onnxruntime", "openvino") if installed(e)]
COMMON = ["--dataset", "digits", "--max", "40", "--skip", "4", "--no-progress"]


def rows(path) -> dict:
    """A results file's columns, without the timings."""
    table = read_table(path)
    return {k: v.tolist() for k, v in table.items() if k != "time"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A digits CNN trained on 900 of the 1,437 training images (the rest are a router's)."""
    from ddrs.train.loop import TrainConfig, train

    config = TrainConfig(
        dataset="digits", arch="cnn", out=str(tmp_path_factory.mktemp("cnn")), sigma=0.25,
        epochs=10, batch=64, lr=0.05, eval_max=20, progress=False, train_subset=900,
    )  # fmt: skip
    return str(train(config))


@pytest.fixture(scope="module")
def router(checkpoint, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("router")
    args = ["train-router", "--dataset", "digits", "--arch", "cnn", "--sigma", "0.5",
            "--expert", f"{checkpoint}:0.12", "--expert", f"{checkpoint}:0.5",
            "--epochs", "1", "--label-n", "100", "--check-n", "0", "--no-progress",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    return str(out / "last.pt")


def mode_runs(checkpoint: str, router: str, tmp_path: Path) -> dict[str, list[str]]:
    experts = ["--expert", f"{checkpoint}:0.12", "--expert", f"{checkpoint}:0.5"]
    routes = tmp_path / "routes.tsv"
    assert main(["sigma", *experts, *COMMON, "--n", "100", "--out", str(routes)]) == 0
    certify = ["certify", "--n0", "20", "--n", "200"]
    return {
        "certify": [*certify, "--checkpoint", checkpoint, "--sigma", "0.25"],
        "predict": ["predict", "--checkpoint", checkpoint, "--sigma", "0.25", "--n", "100"],
        "grid": ["sigma", "--checkpoint", checkpoint, "--sigma0", "0.25", "--grid", "3",
                 "--samples", "16"],
        "ascent": ["sigma", "--checkpoint", checkpoint, "--sigma0", "0.25", "--search",
                   "ascent", "--iterations", "2"],
        "experts": [*certify, *experts, "--sigmas", str(routes)],
        "cascade": [*certify, *experts, "--cascade", "0.6"],
        "router": [*certify, *experts, "--router", router],
        "memory": [*certify, *experts, "--sigmas", str(routes), "--memory",
                   str(tmp_path / "ENGINE.sqlite")],
    }  # fmt: skip


@pytest.mark.parametrize("engine", RUNTIMES)
def test_fp32_engines_give_eager_votes_in_every_mode(engine, checkpoint, router, tmp_path):
    for mode, args in mode_runs(checkpoint, router, tmp_path).items():
        results = {}
        for name in ("eager", engine):
            out = tmp_path / f"{mode}-{name}.tsv"
            run = [a.replace("ENGINE", name) for a in args]
            assert main([*run, *COMMON, "--engine", name, "--out", str(out)]) == 0, mode
            results[name] = rows(out)
            settings = json.loads(Path(f"{out}.settings.json").read_text())
            assert (settings["engine"], settings["precision"]) == (name, "fp32")
        if mode == "ascent":  # a soft surrogate, not votes: equal up to float rounding
            for column, values in results["eager"].items():
                assert np.allclose(results[engine][column], values, rtol=1e-5), column
        else:
            assert results[engine] == results["eager"], mode
        assert len(results["eager"]["idx"]) == 10


@pytest.mark.parametrize("engine", RUNTIMES)
def test_the_service_loads_the_engine(engine, checkpoint):
    from ddrs.serve.spec import ServeRun

    run = ServeRun(checkpoint=checkpoint, sigma=0.25, dataset="digits", engine=engine)
    experts = run.load_for(10, (1, 8, 8), "digits", "cpu")
    assert isinstance(experts[0].model, EngineModel) and experts[0].model.engine == engine
    int8 = ServeRun(checkpoint=checkpoint, sigma=0.25, engine=engine, precision="int8",
                    input_shape=(1, 8, 8), num_classes=10)  # fmt: skip
    from ddrs.errors import InputError

    with pytest.raises(InputError, match="int8 calibrates on 256 training images"):
        int8.load_for(10, (1, 8, 8), "custom", "cpu")  # no dataset: nothing to calibrate on


def test_int8_and_bf16_are_other_models_whose_memories_refuse_fp32(checkpoint, tmp_path, capsys):
    precisions = [("onnxruntime", "int8")]
    if installed("openvino"):
        precisions += [("openvino", "int8"), ("openvino", "bf16")]
    base = model_fingerprint(
        ModelSource(checkpoint=checkpoint, dataset="digits").load()[0][0].model
    )
    certify = ["certify", "--checkpoint", checkpoint, "--sigma", "0.25", "--n0", "20",
               "--n", "200", *COMMON]  # fmt: skip
    for engine, precision in precisions:
        source = ModelSource(
            checkpoint=checkpoint, dataset="digits", engine=engine, precision=precision
        )
        model = source.load()[0][0].model
        assert model_fingerprint(model) != base, (engine, precision)
        memory = tmp_path / f"{engine}-{precision}.sqlite"
        out = tmp_path / f"{engine}-{precision}.tsv"
        low = ["--engine", engine, "--precision", precision]
        assert main([*certify, *low, "--memory", str(memory), "--out", str(out)]) == 0
        refused = tmp_path / "refused.tsv"
        capsys.readouterr()
        assert main([*certify, "--memory", str(memory), "--out", str(refused)]) == 2
        err = capsys.readouterr().err
        assert "another model" in err and err.count("\n") == 1
        assert not refused.exists()
        fp32_memory = tmp_path / "fp32.sqlite"
        assert main([*certify, "--memory", str(fp32_memory), "--out", str(tmp_path / "a.tsv")]) == 0
        assert main([*certify, *low, "--memory", str(fp32_memory), "--out", str(refused)]) == 2
        assert not refused.exists()
        fp32_memory.unlink()
        (tmp_path / "a.tsv").unlink()


def test_auto_measures_once_and_reuses_its_choice(checkpoint, tmp_path, capsys):
    out = tmp_path / "auto.tsv"
    args = ["certify", "--checkpoint", checkpoint, "--sigma", "0.25", "--n0", "20",
            "--n", "100", *COMMON, "--engine", "auto"]  # fmt: skip
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 0
    measured = capsys.readouterr().out
    assert "engine auto:" in measured
    record = Path(measured.split("cached in ")[1].split()[0])
    chosen = json.loads(record.read_text())
    assert chosen["equal"][chosen["engine"]] and set(chosen["rates"]) == {"eager", *RUNTIMES}
    settings = json.loads(Path(f"{out}.settings.json").read_text())
    assert settings["engine"] == chosen["engine"]
    # a recorded choice is reused, not measured again
    other = "eager" if chosen["engine"] != "eager" else RUNTIMES[0]
    record.write_text(json.dumps({**chosen, "engine": other}))
    again = tmp_path / "again.tsv"
    assert main([*args, "--out", str(again)]) == 0
    assert "engine auto:" not in capsys.readouterr().out
    assert json.loads(Path(f"{again}.settings.json").read_text())["engine"] == other


def test_missing_extras_and_impossible_precisions_are_one_line_and_leave_no_file(
    checkpoint, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out.tsv"
    base = ["certify", "--checkpoint", checkpoint, "--sigma", "0.25", "--n", "50",
            *COMMON, "--out", str(out)]  # fmt: skip
    cases = {
        "int8 on eager": (["--engine", "eager", "--precision", "int8"], "onnxruntime or"),
        "bf16 on ORT": (["--engine", "onnxruntime", "--precision", "bf16"], "OpenVINO"),
        "bf16 on compile": (["--engine", "compile", "--precision", "bf16"], "OpenVINO"),
    }
    for name, (extra, says) in cases.items():
        capsys.readouterr()
        assert main([*base, *extra]) == 2, name
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, name
        assert not out.exists() and not Path(f"{out}.settings.json").exists()
    for engine, extra in (("openvino", "openvino"), ("onnxruntime", "onnx")):
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, engine, None)  # as if not installed
            capsys.readouterr()
            assert main([*base, "--engine", engine]) == 2
        err = capsys.readouterr().err
        assert f"pip install 'ddrs[{extra}]'" in err and err.count("\n") == 1
        assert not out.exists()


def test_bf16_on_a_cpu_without_it_is_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    pytest.importorskip("openvino")
    import openvino

    class NoBf16Core(openvino.Core):
        def get_property(self, device, name):
            found = super().get_property(device, name)
            return (
                [c for c in found if c != "BF16"] if name == "OPTIMIZATION_CAPABILITIES" else found
            )

    monkeypatch.setattr(openvino, "Core", NoBf16Core)
    out = tmp_path / "bf16.tsv"
    args = ["certify", "--checkpoint", checkpoint, "--sigma", "0.25", "--n", "50", *COMMON,
            "--engine", "openvino", "--precision", "bf16", "--out", str(out)]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no bf16 instructions" in err and err.count("\n") == 1
    assert not out.exists()


def test_a_run_from_before_engines_were_recorded_still_resumes(checkpoint, tmp_path):
    out = tmp_path / "old.tsv"
    args = ["certify", "--checkpoint", checkpoint, "--sigma", "0.25", "--n", "50",
            "--dataset", "digits", "--skip", "4", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main([*args, "--max", "20"]) == 0
    sidecar = Path(f"{out}.settings.json")
    settings = json.loads(sidecar.read_text())
    del settings["engine"], settings["precision"]  # as an earlier ddrs wrote it
    sidecar.write_text(json.dumps(settings))
    assert main([*args, "--max", "40"]) == 0
    assert len(read_table(out)["idx"]) == 10
    assert main([*args, "--max", "60", "--precision", "int8", "--engine", "onnxruntime"]) == 2


def test_a_setting_recorded_later_defaults_only_where_the_new_run_records_it(tmp_path):
    from ddrs.errors import ResultsFileError
    from ddrs.results import ResultsWriter

    out = tmp_path / "labels.tsv"
    out.write_text("idx\n0\n")
    Path(f"{out}.settings.json").write_text(json.dumps({"command": "labels"}))
    ResultsWriter.check_settings(out, ("idx",), {"command": "labels"})  # records no precision
    ResultsWriter.check_settings(out, ("idx",), {"command": "labels", "precision": "fp32"})
    with pytest.raises(ResultsFileError, match="precision"):
        ResultsWriter.check_settings(out, ("idx",), {"command": "labels", "precision": "int8"})
