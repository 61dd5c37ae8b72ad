"""The main job (quickstart) and the CIFAR-10 study script, each in a reduced form."""

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from ddrs.models import load_checkpoint
from ddrs.quickstart import quickstart
from ddrs.results import read_table

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # end-to-end runs of the main job and the study scripts


def test_quickstart_reduced_runs_end_to_end(tmp_path, capsys):
    written = quickstart(tmp_path / "qs", quick=True, progress=False)
    names = {p.name for p in written}
    assert {
        "expert-0.12_certify.tsv",
        "expert-0.25_certify.tsv",
        "expert-0.5_certify.tsv",
        "dd_certify.tsv",
        "dd_sigmas.tsv",
        "dd_memory.sqlite",
        "routes.tsv",
        "routed_certify.tsv",
        "routed_memory.sqlite",
        "cascade_certify.tsv",
        "dual_certify.tsv",
        "labels.tsv",
        "table.md",
        "certified_accuracy.png",
        "experts.png",
        "last.pt",
        "log.csv",
    } <= names
    out = capsys.readouterr().out
    for row in (
        "fixed sigma=0.25",
        "fixed-sigma envelope",
        "data-dependent + memory",
        "experts routed + memory",
        "experts, cascade (no memory)",
        "experts, dual smoothing (no memory)",
    ):
        assert row in out, row
    assert "the cascade: from sigma 0.5 down" in out and "held-out training images" in out
    cascade = read_table(tmp_path / "qs" / "cascade_certify.tsv")
    assert {"level_radius", "guard_radius", "levels"} <= set(cascade)
    assert all(
        r <= min(a, b) or r == 0
        for r, a, b in zip(cascade["radius"], cascade["level_radius"], cascade["guard_radius"])
    )
    dd = read_table(tmp_path / "qs" / "dd_certify.tsv")
    assert {"mc_predict", "mc_radius"} <= set(dd) and len(dd["idx"]) == 60
    routed = read_table(tmp_path / "qs" / "routed_certify.tsv")
    assert set(routed["expert"]) <= {"sigma=0.12", "sigma=0.25", "sigma=0.5"}
    dual = read_table(tmp_path / "qs" / "dual_certify.tsv")
    assert {"route_radius", "expert_radius"} <= set(dual)
    assert all(
        r <= min(a, b)
        for r, a, b in zip(dual["radius"], dual["route_radius"], dual["expert_radius"])
    )
    fixed = read_table(tmp_path / "qs" / "expert-0.25_certify.tsv")
    assert fixed["correct"].mean() > 0.3  # a 3-epoch model is well above chance (0.1)
    # re-running resumes: nothing is retrained or recertified, results are unchanged
    assert "-> " in out and "the data-dependent CNN" in out  # says which model trains
    before = (tmp_path / "qs" / "dual_certify.tsv").read_bytes()
    quickstart(tmp_path / "qs", quick=True, progress=False)
    assert (tmp_path / "qs" / "dual_certify.tsv").read_bytes() == before
    again = capsys.readouterr().out
    assert again.count("already trained") == 5 and again.count("(already done)") == 7


def _write_cifar_batches(root: Path, per_batch: int) -> None:
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, per_batch)
        # class-dependent brightness, so that a model can learn something
        data = (rng.random((per_batch, 3072)) * 100 + labels[:, None] * 15).astype(np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels.tolist()}, f)


def test_cifar10_study_script_runs_every_step_on_tiny_data(tmp_path):
    _write_cifar_batches(tmp_path / "data", per_batch=40)
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import cifar10_study
    finally:
        sys.path.pop(0)
    out = tmp_path / "study"
    args = [
        "--data-root",
        str(tmp_path / "data"),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--train-subset",
        "150",
        "--batch",
        "50",
        "--fixed-sigmas",
        "0.12,0.25",
        "--dd-lrs",
        "0.01,0.0001",
        "--spreads",
        "0.5:2,0.71:1.41",
        "--val-images",
        "10",
        "--val-n",
        "50",
        "--ascent-iterations",
        "2",
        "--certified-samples",
        "8",
        "--n0",
        "10",
        "--n",
        "50",
        "--skip",
        "4",
        "--no-progress",
    ]
    cifar10_study.main(args)
    test = out / "test"
    rows = ["gaussian-fixed-0.12", "gaussian-fixed-0.25"] + [
        f"gaussian-dd-lr{lr}.{s}" for lr in ("0.01",) for s in ("ascent", "grid", "certified")
    ]
    choices = __import__("json").loads((out / "choices.json").read_text())
    chosen_dd = f"gaussian-dd-lr{choices['chosen']['dd_lr']:g}"
    rows = [r.replace("gaussian-dd-lr0.01", chosen_dd) for r in rows]
    rows.append("gaussian-fixed-0.25.certified")
    for row in rows:
        assert len(read_table(test / f"{row}.certify.tsv")["idx"]) == 10, row
    # validation images are training images the models never trained on
    from ddrs.train.loop import training_subset

    assert not set(choices["validation_images"]) & set(training_subset(200, 150, 0))
    assert len(choices["validation_images"]) == 10
    assert set(choices["dd_lr"]) == {"0.01", "0.0001"}
    table = (out / "table.md").read_text()
    assert "fixed-sigma envelope" in table and "fixed 0.25 model, certified selector" in table
    assert (out / "certified_accuracy.png").exists() and (out / "training_sigmas.png").exists()
    assert len((out / "noise_accuracy.csv").read_text().splitlines()) == 1 + 3 * 9
    before = {row: (test / f"{row}.certify.tsv").read_bytes() for row in rows}
    cifar10_study.main(args)  # everything done: a re-run changes no result
    assert all((test / f"{row}.certify.tsv").read_bytes() == before[row] for row in rows)


def test_the_python_api_example_runs_as_written(tmp_path):
    import subprocess

    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "python_api.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "certify:" in result.stdout and "input 3: class" in result.stdout


def test_cifar10_routing_study_runs_every_step_on_tiny_data(tmp_path):
    _write_cifar_batches(tmp_path / "data", per_batch=40)
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import cifar10_routing
    finally:
        sys.path.pop(0)
    out = tmp_path / "study"
    cifar10_routing.main(
        [
            "--data-root",
            str(tmp_path / "data"),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--train-subset",
            "120",
            "--val-images",
            "10",
            "--router-images",
            "40",
            "--router-epochs",
            "1",
            "--router-sigmas",
            "0.25",
            "--label-samples",
            "4",
            "--route-samples",
            "4",
            "--val-n",
            "50",
            "--n0",
            "10",
            "--n",
            "50",
            "--skip",
            "4",
            "--batch",
            "50",
            "--no-progress",
        ]
    )
    choices = __import__("json").loads((out / "choices.json").read_text())
    assert set(choices["chosen"]) == {"three-route", "three-dual", "one-route", "one-dual"}
    certified = sorted((out / "test").glob("*.certify.tsv"))
    assert len(certified) == 7  # 3 experts, routing and dual for each expert set
    for path in certified:
        assert len(read_table(path)["idx"]) == 10, path
    rule = choices["chosen"]["three-route"].split(":")[1]  # the rule chosen on validation
    routed = read_table(out / "test" / f"three.route-{rule}.certify.tsv")
    assert set(routed["expert"]) <= {"g0.12", "g0.25", "g0.5"}
    # the routers' images and the validation images are held out from the experts, and apart
    from ddrs.train.loop import training_subset

    labels = read_table(out / "labels-three.tsv")
    trained = set(training_subset(200, 120, 0))
    assert not set(labels["idx"].tolist()) & trained
    assert not set(choices["validation_images"]) & (trained | set(labels["idx"].tolist()))
    assert "Sign tests" in (out / "report.md").read_text()


def test_memory_free_study_runs_every_step_on_tiny_data(tmp_path):
    _write_cifar_batches(tmp_path / "data", per_batch=40)
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import cifar10_memory_free
        import cifar10_routing
    finally:
        sys.path.pop(0)
    out, data = tmp_path / "study", str(tmp_path / "data")
    small = ["--data-root", data, "--out", str(out), "--val-images", "10", "--no-progress"]
    small += ["--epochs", "1", "--train-subset", "120"]
    cifar10_routing.main([*small, "--steps", "train"])
    cifar10_memory_free.main(
        [
            *small,
            "--router-images",
            "40",
            "--router-epochs",
            "1",
            "--router-sigmas",
            "0.5",
            "--p0s",
            "0.6,0.9",
            "--rules",
            "radius,agree:0.8",
            "--val-n",
            "50",
            "--n0",
            "10",
            "--n",
            "50",
            "--skip",
            "4",
            "--batch",
            "50",
        ]
    )
    folder = out / "memory_free"
    choices = __import__("json").loads((folder / "choices.json").read_text())
    assert set(choices["chosen"]) == {"route", "cascade", "router"}
    assert choices["chosen"]["cascade"] in ("cascade:0.6", "cascade:0.9")
    certified = sorted((folder / "test").glob("*.certify.tsv"))
    assert len(certified) >= 6  # 3 experts, routing (+ the chosen rule), cascade, router
    for path in certified:
        assert len(read_table(path)["idx"]) == 10, path
    report = (folder / "report.md").read_text()
    assert "The goal, per row" in report and "cascade (p0" in report
    assert (folder / "router-0.5" / "router-summary.json").exists()


def test_denoised_study_runs_every_step_on_tiny_data(tmp_path):
    _write_cifar_batches(tmp_path / "data", per_batch=40)
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import cifar10_denoised
        import cifar10_routing
    finally:
        sys.path.pop(0)
    data, routing, out = str(tmp_path / "data"), tmp_path / "routing", tmp_path / "denoised"
    small = ["--data-root", data, "--epochs", "1", "--train-subset", "120", "--no-progress"]
    cifar10_routing.main([*small, "--out", str(routing), "--steps", "train"])
    cifar10_denoised.main(
        [*small, "--out", str(out), "--routing", str(routing), "--denoiser-epochs", "1",
         "--denoiser-images", "120", "--n0", "10", "--n", "50", "--skip", "4", "--batch", "50",
         "--route-samples", "4"]
    )  # fmt: skip
    certified = sorted((out / "test").glob("*.certify.tsv"))
    assert len(certified) == 10  # no denoiser, Gaussian, 3 objectives, 3 blind, route, cascade
    for path in certified:
        assert len(read_table(path)["idx"]) == 10, path
    report = (out / "test" / "report.md").read_text()
    assert "stability denoiser at r = 0.25" in report and "sign test p" in report
    assert load_checkpoint(out / "denoiser-blind" / "last.pt").meta["sigmas"] == [0.12, 0.25, 0.5]
