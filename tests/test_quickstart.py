"""The main job (quickstart) and the CIFAR-10 study script, each in a reduced form."""

import pickle
import sys
from pathlib import Path

import numpy as np

from ddrs.quickstart import quickstart
from ddrs.results import read_table

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_reduced_runs_end_to_end(tmp_path, capsys):
    written = quickstart(tmp_path / "qs", quick=True, progress=False)
    names = {p.name for p in written}
    assert {
        "fixed_certify.tsv",
        "dd_certify.tsv",
        "dd_sigmas.tsv",
        "dd_memory.sqlite",
        "table.md",
        "certified_accuracy.png",
        "last.pt",
        "log.csv",
    } <= names
    out = capsys.readouterr().out
    assert "fixed sigma=0.25" in out and "data-dependent + memory" in out
    dd = read_table(tmp_path / "qs" / "dd_certify.tsv")
    assert {"mc_predict", "mc_radius"} <= set(dd) and len(dd["idx"]) == 60
    fixed = read_table(tmp_path / "qs" / "fixed_certify.tsv")
    assert fixed["correct"].mean() > 0.3  # a 3-epoch model is well above chance (0.1)
    # re-running resumes: nothing is retrained or recertified, results are unchanged
    before = (tmp_path / "qs" / "dd_certify.tsv").read_bytes()
    quickstart(tmp_path / "qs", quick=True, progress=False)
    assert (tmp_path / "qs" / "dd_certify.tsv").read_bytes() == before


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
        "0",
        "--batch",
        "50",
        "--methods",
        "gaussian,macer",
        "--macer-k",
        "2",
        "--macer-warmup",
        "0",
        "--sigma-iterations",
        "2",
        "--n0",
        "10",
        "--n",
        "50",
        "--skip",
        "4",
        "--no-progress",
    ]
    cifar10_study.main(args)
    for run in ("gaussian-fixed", "gaussian-dd", "macer-fixed", "macer-dd"):
        assert len(read_table(out / run / "certify.tsv")["idx"]) == 10
    assert (out / "gaussian-dd" / "sigmas.tsv").exists()
    assert (out / "table.md").read_text().count("|") > 20
    timings = (out / "timings.csv").read_text().splitlines()
    assert len(timings) == 1 + 3 * 4  # header + (train, sigma, certify) x 4 runs
    cifar10_study.main(args)  # everything done: a re-run only re-reports
