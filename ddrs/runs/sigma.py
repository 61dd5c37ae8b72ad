"""`ddrs sigma` over a dataset: a sigma per input for one model (the certified selector, the
paper's ascent, or the surrogate grid), or an expert per input among experts (the certified
selector over experts); what `ddrs certify --sigmas` reads."""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import nn

from ddrs.core.checks import integer, positive, probability
from ddrs.core.experts import Experts, as_experts
from ddrs.core.route import (
    ROUTE_RULE_HELP,
    ROUTE_RULES,
    check_route_rule,
    route_by_certified_radius,
)
from ddrs.core.sampling import auto_batch_size
from ddrs.core.sigma import (
    DEFAULT_CLAMP,
    DEFAULT_GRID,
    DEFAULT_SAMPLES,
    MIN_SIGMA,
    SEARCHES,
    check_search_options,
)
from ddrs.core.smooth import DEFAULTS
from ddrs.errors import InputError
from ddrs.launch import ONE_PROCESS, Rank
from ddrs.models.onnx import gives_gradients
from ddrs.options import setting
from ddrs.results import ROUTE_COLUMNS, SIGMA_COLUMNS, ResultsWriter
from ddrs.runs.dataset import DatasetRun, NoiseSettings, check_resumable
from ddrs.runs.loop import RowSource, stack, write_rows
from ddrs.runs.source import inputs_of


@dataclass(frozen=True, kw_only=True)
class SearchSettings:
    """The data-dependent sigma search's flags (`ddrs sigma`, `ddrs serve`)."""

    search: str = setting(
        "certified",
        "certified: by the predicted certified radius (default); ascent: the "
        "paper's gradient ascent; grid: forward-only, by the paper's surrogate",
        choices=["certified", "ascent", "grid"],
    )
    samples: int | None = setting(
        None,
        "noise samples: per candidate (default: certified 64, grid 8) or per ascent step (1)",
        type=int,
    )
    grid: int | None = setting(
        None, "number of candidates (default: certified 9, grid 12)", type=int
    )
    spread: tuple[float, float] = setting(
        (0.5, 2.0), "low,high factors of sigma0 spanned by the candidates", type="pair"
    )
    iterations: int = setting(100, "ascent: steps K (authors: 100)")
    lr: float = setting(1e-4, "ascent: step size (authors: 1e-4)")
    clamp: tuple[float, float] = setting(
        DEFAULT_CLAMP, "ascent, grid: low,high clamp of pA, pB", type="pair"
    )
    min_sigma: float | None = setting(
        None,
        "lower bound on sigma (default: 1e-3); certified: with --max-sigma, the "
        "candidates span this absolute range instead of sigma0 * spread",
        type=float,
    )
    max_sigma: float | None = setting(
        None,
        "upper bound on sigma (default: none); certified: with --min-sigma, the top of "
        "the candidates' absolute range",
        type=float,
    )

    def __post_init__(self) -> None:
        if self.search == "certified" and (self.min_sigma is None) != (self.max_sigma is None):
            raise InputError(
                "--search certified takes both --min-sigma and --max-sigma (an absolute "
                "candidate range) or neither (candidates sigma0 * --spread)"
            )
        check_search_options(self.search, self.search_options(DEFAULTS.n, DEFAULTS.alpha))

    def search_options(self, n: int, alpha: float) -> dict:
        """The keyword arguments of the chosen search (sigma.SEARCHES); `n`, `alpha`: those
        of the certification that follows (what the certified search scores at)."""
        if self.search not in DEFAULT_SAMPLES:
            check_search_options(self.search, {})  # raises: unknown search
        samples = DEFAULT_SAMPLES[self.search] if self.samples is None else self.samples
        grid = DEFAULT_GRID.get(self.search) if self.grid is None else self.grid
        options: dict = {"samples": samples}
        if self.search == "certified":
            options.update(grid=grid, n=n, alpha=alpha)
            if self.min_sigma is not None:
                options["sigma_range"] = (self.min_sigma, self.max_sigma)
            else:
                options["spread"] = tuple(self.spread)
            return options
        options.update(
            clamp=tuple(self.clamp),
            min_sigma=MIN_SIGMA if self.min_sigma is None else self.min_sigma,
            max_sigma=self.max_sigma,
        )
        if self.search == "ascent":
            options.update(iterations=self.iterations, lr=self.lr)
        else:
            options.update(grid=grid, spread=tuple(self.spread))
        return options


@dataclass(frozen=True, kw_only=True)
class SigmaRun(NoiseSettings, SearchSettings, DatasetRun):
    """Choose a sigma (lambda, with --norm l1) for every covered input."""

    out: str = setting(
        None,
        "TSV of idx and sigma (one model: radius_before / radius_after, the search's "
        "score at sigma0 and at the chosen sigma; experts: expert and score)",
        required=True,
    )
    sigma0: float | None = setting(
        None,
        "centre of the candidates / ascent start (one model; experts have their own)",
        type=float,
    )
    route_rule: str = setting(
        ROUTE_RULES[0],
        f"experts: {ROUTE_RULE_HELP}",
    )
    n: int = setting(
        DEFAULTS.n,
        "certified: the N of the certification that follows (--num-samples under torchrun)",
        aliases=("--num-samples",),
    )
    alpha: float = setting(DEFAULTS.alpha, "certified: the alpha of the certification that follows")

    def __post_init__(self) -> None:
        DatasetRun.__post_init__(self)
        NoiseSettings.__post_init__(self)
        if self.sigma0 is not None:
            positive("--sigma0", self.sigma0)
        check_route_rule(self.route_rule)
        integer("--n", self.n)
        probability("--alpha", self.alpha)
        SearchSettings.__post_init__(self)

    @property
    def options(self) -> dict:
        return self.search_options(self.n, self.alpha)

    def columns(self, experts: Experts | nn.Module) -> tuple[str, ...]:
        return SIGMA_COLUMNS if as_experts(experts).is_model else ROUTE_COLUMNS

    def check(self, experts: Experts, dataset, settings: dict | None = None) -> None:
        check_resumable(self, experts, dataset, settings)
        if as_experts(experts).is_model == (self.sigma0 is None):
            raise InputError(
                "give --sigma0 for one model's sigma search; experts have their "
                "own sigmas (no --sigma0)"
            )
        if self.search == "ascent" and not gives_gradients(as_experts(experts)[0].model):
            raise InputError(
                "--search ascent follows gradients, which an ONNX model does not give: use "
                "--search certified or grid, or the torch model"
            )

    def settings(self, experts: Experts | nn.Module, dataset) -> dict:
        if not as_experts(experts).is_model:
            return {
                **self.base_settings("sigma", experts, dataset),
                "route_rule": self.route_rule,
                "samples": self.options["samples"],
                "n": self.n,
                "alpha": self.alpha,
                **self.noise_settings(),
            }
        return {
            **self.base_settings("sigma", experts, dataset),
            "sigma0": self.sigma0,
            "search": self.search,
            **self.options,
            **self.noise_settings(),
        }


def sigma_dataset(
    model: nn.Module | Experts, dataset, run: SigmaRun, *, rank: Rank = ONE_PROCESS
) -> str:
    """Choose a sigma for every input `run` covers: for one model with its search (rows `idx
    sigma sigma0 radius_before radius_after time`: the search's score at sigma0 and at the
    chosen sigma); for experts, an expert (and its sigma) by the certified selector over
    experts (rows `idx expert sigma score time`)."""
    experts = as_experts(model)
    dataset = inputs_of(dataset, experts)
    settings = run.settings(experts, dataset)
    run.check(experts, dataset, settings)
    columns = run.columns(experts)
    batch = run.batch or auto_batch_size(experts[0].model, dataset.info.input_shape)
    options = run.options
    if experts.is_model:
        rows_of = _sigma_rows(experts[0].model, dataset, run, batch)
        per_input = options["samples"]
    else:
        rows_of = _route_rows(experts, dataset, run, batch)
        per_input = options["samples"] * len(experts)
    source = RowSource(
        "sigma", columns, max(1, min(100, batch // per_input)), rows_of, dataset=dataset
    )
    write_rows(
        source,
        out=run.out,
        settings=settings,
        selected=run.indices(len(dataset)),
        open_outputs=lambda: ResultsWriter(run.out, columns, settings),
        progress=run.progress,
        rank=rank,
    )
    return run.out


def _sigma_rows(model: nn.Module, dataset, run: SigmaRun, batch: int):
    def rows_of(group: list[int]) -> list[dict]:
        x, _ = stack(dataset, group)
        t0 = time.perf_counter()
        found = SEARCHES[run.search](
            model,
            x,
            run.sigma0,
            seed=run.seed,
            keys=group,
            batch=batch,
            family=run.family,
            **run.options,
        )
        elapsed = round((time.perf_counter() - t0) / len(group), 4)
        return [
            {
                "idx": idx,
                "sigma": float(found.sigma[i]),
                "sigma0": run.sigma0,
                "radius_before": float(found.radius_before[i]),
                "radius_after": float(found.radius_after[i]),
                "time": elapsed,
            }
            for i, idx in enumerate(group)
        ]

    return rows_of


def _route_rows(experts: Experts, dataset, run: SigmaRun, batch: int):
    def rows_of(group: list[int]) -> list[dict]:
        x, _ = stack(dataset, group)
        t0 = time.perf_counter()
        found = route_by_certified_radius(
            experts,
            x,
            samples=run.options["samples"],
            n=run.n,
            alpha=run.alpha,
            rule=run.route_rule,
            seed=run.seed,
            keys=group,
            batch=batch,
            family=run.family,
        )
        elapsed = round((time.perf_counter() - t0) / len(group), 4)
        return [
            {
                "idx": idx,
                "expert": experts[int(found.expert[i])].name,
                "sigma": float(found.sigma[i]),
                "score": float(found.score[i]),
                "time": elapsed,
            }
            for i, idx in enumerate(group)
        ]

    return rows_of
