"""`ddrs quickstart`: the whole method on scikit-learn's bundled digits, in a few minutes.

1. train a small CNN with Gaussian augmentation at a fixed sigma, and the same CNN with
   data-dependent sigma (per-sample sigmas, warm-started every epoch);
2. certify the fixed model at that sigma;
3. optimise a sigma per test input for the data-dependent model, and certify it with the
   certification memory (online, in index order);
4. print the comparison table and write the plots. Every file goes under `out`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ddrs.data import get_dataset
from ddrs.models import load_checkpoint
from ddrs.report import (
    format_table,
    load_runs,
    plot_certified_accuracy,
    plot_sigma_histogram,
    run_summary,
)
from ddrs.results import row_count
from ddrs.runs import certify_dataset, sigma_dataset
from ddrs.specs import CertifyRun, SigmaRun, TrainConfig
from ddrs.train.loop import train


@dataclass(frozen=True)
class QuickstartSettings:
    sigma: float = 0.25
    epochs: int = 30
    lr: float = 0.05
    lr_step: int = 15
    batch: int = 64
    # Training-time search: the authors' ImageNet-like cheap setting (K=1 step, n=4 samples)
    # rather than their CIFAR-10 K=10, n=64 (160x the cost), with a larger step so that the
    # per-sample sigmas move within 30 short epochs.
    dd_iterations: int = 1
    dd_samples: int = 4
    dd_lr: float = 5e-3
    # Test-time sigmas: the certified selector (9 candidates in sigma0 x [0.5, 2], 64 votes
    # each), the search that did best on digits (benchmarks/sigma_search.py)
    sigma_grid: int = 9
    sigma_samples: int = 64
    n0: int = 100
    n: int = 2_000
    alpha: float = 0.001
    skip: int = 1


QUICK = QuickstartSettings(epochs=3, lr_step=2, dd_samples=2, sigma_samples=8, n=200, skip=6)


def _train(
    out: Path, s: QuickstartSettings, data_dependent: bool, progress: bool, name: str
) -> Path:
    config = TrainConfig(
        dataset="digits",
        arch="cnn",
        out=str(out),
        sigma=s.sigma,
        epochs=s.epochs,
        batch=s.batch,
        lr=s.lr,
        lr_step=s.lr_step,
        eval_max=None,
        progress=progress,
        data_dependent=data_dependent,
        dd_iterations=s.dd_iterations,
        dd_lr=s.dd_lr,
        dd_samples=s.dd_samples,
        resume=(out / "last.pt").exists(),
    )
    if config.resume and load_checkpoint(out / "last.pt").meta["epoch"] + 1 >= s.epochs:
        print(f"      {name}: already trained ({out / 'last.pt'})")
        return out / "last.pt"  # already trained: quickstart resumes where it stopped
    print(f"      {name} -> {out}")
    return train(config)


def _already(path: Path, count: int) -> str:
    """' (already done)' when a results file holds all `count` rows (a re-run resumes)."""
    rows = row_count(path)
    if not rows:
        return ""
    return " (already done)" if rows >= count else f" (resuming after {rows} of {count})"


def quickstart(
    out: str | Path = "runs/quickstart", quick: bool = False, progress: bool = True
) -> list[Path]:
    """Run the main job; returns every file it wrote. Re-running resumes finished steps."""
    s = QUICK if quick else QuickstartSettings()
    out = Path(out)
    started = time.perf_counter()
    test_set = get_dataset("digits", "test")
    count = len(range(0, len(test_set), s.skip))
    print(f"[1/4] training two CNNs on digits (sigma {s.sigma}, {s.epochs} epochs each)")
    fixed_ckpt = _train(out / "fixed", s, False, progress, "the fixed-sigma CNN")
    dd_ckpt = _train(out / "data_dependent", s, True, progress, "the data-dependent CNN")

    fixed_tsv = out / "fixed_certify.tsv"
    print(
        f"[2/4] certifying the fixed-sigma model (N={s.n}, alpha={s.alpha})"
        + _already(fixed_tsv, count)
    )
    fixed_model = load_checkpoint(fixed_ckpt).model
    common = {"n0": s.n0, "n": s.n, "alpha": s.alpha, "skip": s.skip, "progress": progress}
    certify_dataset(fixed_model, test_set, CertifyRun(out=str(fixed_tsv), sigma=s.sigma, **common))

    sigmas_tsv = out / "dd_sigmas.tsv"
    print(
        f"[3/4] choosing a sigma per test input (certified selector: {s.sigma_grid} candidates "
        f"in {s.sigma} x [0.5, 2], {s.sigma_samples} votes each)" + _already(sigmas_tsv, count)
    )
    dd_model = load_checkpoint(dd_ckpt).model
    search = SigmaRun(out=str(sigmas_tsv), sigma0=s.sigma, search="certified", grid=s.sigma_grid,
                      samples=s.sigma_samples, n=s.n, alpha=s.alpha, skip=s.skip,
                      progress=progress)  # fmt: skip
    sigma_dataset(dd_model, test_set, search)

    dd_tsv, memory_path = out / "dd_certify.tsv", out / "dd_memory.sqlite"
    print(
        "[4/4] certifying the data-dependent model with its sigmas and the memory"
        + _already(dd_tsv, count)
    )
    certify_dataset(dd_model, test_set, CertifyRun(out=str(dd_tsv), sigmas=str(sigmas_tsv),
                                                   memory=str(memory_path), **common))

    runs = load_runs(
        [str(fixed_tsv), str(dd_tsv)], [f"fixed sigma={s.sigma}", "data-dependent + memory"]
    )
    radii = [0.0, 0.25, 0.5, 0.75, 1.0]
    table = format_table([run_summary(r, radii) for r in runs], radii, "markdown", False)
    (out / "table.md").write_text(table + "\n")
    curves, sigma_hist = out / "certified_accuracy.png", out / "sigma_histogram.png"
    plot_certified_accuracy(runs, curves, title="digits: certified accuracy")
    plot_sigma_histogram(runs, sigma_hist, sigma0=s.sigma)
    print()
    print(table)
    print(f"\nall results in {out.resolve()}  ({time.perf_counter() - started:.0f} s):")
    written = sorted(p for p in out.rglob("*") if p.is_file())
    for path in written:
        print(f"  {path}")
    return written

