"""`ddrs certify` over a dataset: CERTIFY every covered input with one model, with experts
along a routes file, or by dual smoothing; optionally through a memory (in index order), with
a counts file, with input-specific sample sizes. An exact repeat of a stored input is answered
from the memory without sampling."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ddrs.core.cascade import Cascade, CascadeCertificate
from ddrs.core.checks import integer, number, optional_integer, probability
from ddrs.core.experts import Experts, as_experts
from ddrs.core.route import DualSmoothing, ExpertCertifier, RoutedCertificate
from ddrs.core.smooth import DEFAULTS
from ddrs.core.stats import check_radius_reach, largest_radius, look_alpha, radius_looks
from ddrs.core.torchutil import model_device
from ddrs.errors import InputError, ResultsFileError
from ddrs.launch import ONE_PROCESS, Rank
from ddrs.memory import Answer, CertificationMemory
from ddrs.memory.store import is_url, shown_location
from ddrs.options import setting
from ddrs.results import (
    CERTIFY_COLUMNS,
    CERTIFY_PART_COLUMNS,
    COUNTS_COLUMNS,
    MEMORY_COLUMNS,
    NO_EXPERT,
    NORM_COLUMN,
    ResultsWriter,
    file_digest,
    read_table,
    row_count,
)
from ddrs.runs.dataset import SmoothingRun
from ddrs.runs.loop import RowSource, group_size, stack, write_rows
from ddrs.runs.source import inputs_of, load_router, open_memory


@dataclass(frozen=True, kw_only=True)
class CertifyRun(SmoothingRun):
    """CERTIFY every covered input; optionally through a memory, with a counts file, with
    input-specific sample sizes."""

    n0: int = setting(DEFAULTS.n0, "selection samples")
    memory: str | None = setting(
        None,
        "certification memory (an SQLite file, or a postgresql:// URL): resolve answers "
        "online in index order",
    )
    counts: str | None = setting(
        None,
        "also write each input's vote counts here (selected class, its count, top two "
        "counts, N, N0, sigma, seed), for `ddrs recertify` at another alpha",
    )
    pilot: int = setting(
        0,
        "input-specific N: a pilot of this many samples picks each input's N (at most --n) "
        "within --radius-tolerance of the radius predicted at --n; 0: off",
    )
    radius_tolerance: float = setting(
        0.01, "with --pilot: the predicted radius an input may lose to a smaller N"
    )
    radius: float | None = setting(
        None,
        "only ask whether each input is certified at this radius: a sequential test stops "
        "each input once decided (at most --n samples; docs/METHODS.md); rows say R or abstain",
        type=float,
    )
    router: str | None = setting(
        None,
        "dual smoothing: a router checkpoint (`ddrs train-router`) that certifies each "
        "input's route to one of the experts; the answer holds on the smaller of its ball and "
        "the expert's",
        group="sigma source",
    )
    router_n: int | None = setting(None, "the router's CERTIFY samples (default: --n)", type=int)
    router_share: float = setting(
        0.5, "the share of --alpha spent on the router's certificate (the expert gets the rest)"
    )

    def sigma_sources(self) -> list:
        return [*super().sigma_sources(), self.router]

    @property
    def router_samples(self) -> int:
        """The router's N: --router-n, else --n."""
        return self.router_n or self.n

    def __post_init__(self) -> None:
        super().__post_init__()
        integer("--n0", self.n0)
        integer("--pilot", self.pilot, minimum=0)
        number("--radius-tolerance", self.radius_tolerance, minimum=0)
        optional_integer("--router-n", self.router_n)
        probability("--router-share", self.router_share)
        if self.router is not None and not Path(self.router).is_file():
            raise InputError(
                f"--router {self.router}: no such file; train one with `ddrs train-router`"
            )
        if (self.router or self.cascade) and (self.pilot or self.counts or self.radius):
            raise InputError(
                "--router and --cascade certify with fixed N; they take neither --pilot, "
                "--radius nor --counts"
            )
        if largest_radius(1.0, self.n, self.alpha, self.family) <= 0:
            fewest = math.floor(math.log2(1 / self.alpha)) + 1
            raise InputError(
                f"--n {self.n} can certify nothing at --alpha {self.alpha:g} (all N votes for "
                f"the class give pA_lower = alpha^(1/N) < 1/2): use --n {fewest} or more"
            )
        if self.radius is not None:
            self.check_radius()

    def reach(self) -> str:
        """The largest radius this run can certify, for a reader (the fixed --sigma's, or per
        unit of sigma)."""
        alpha = self.alpha
        if self.radius is not None:
            alpha = look_alpha(alpha, radius_looks(self.n))
        family, norm = self.family, self.norm.upper()
        if self.sigma is not None:
            largest = largest_radius(self.sigma, self.n, alpha, family)
            return (
                f"largest certifiable radius: {largest:.3f} "
                f"({norm}, {family.scale} {self.sigma:g}, N {self.n}, alpha {alpha:.3g})"
            )
        return (
            f"largest certifiable radius: {largest_radius(1.0, self.n, alpha, family):.3f} x "
            f"{family.scale} ({norm}, N {self.n}, alpha {alpha:.3g})"
        )

    def check_radius(self) -> None:
        """--radius: positive, alone among the sample-size options, and within reach."""
        check_radius_reach(self.radius, self.sigma, self.n, self.alpha, self.family)
        if self.pilot or self.counts:
            raise InputError(
                "--radius stops each input when decided: it takes neither --pilot nor --counts "
                "(counts of a sequential test cannot be recertified at a fixed N)"
            )

    def columns(self, experts: Experts) -> tuple[str, ...]:
        """The results file's columns."""
        base = MEMORY_COLUMNS if self.memory else CERTIFY_COLUMNS
        return base + self.extra_columns(experts) + (("n",) if self.radius else ())

    def check(self, experts: Experts, dataset, settings: dict | None = None):
        routes = super().check(experts, dataset, settings)
        self.check_resumed_files()
        return routes

    def check_resumed_files(self) -> None:
        """A resumed run has the counts file and the memory it started with."""
        if self.counts is not None and row_count(self.out) and not row_count(self.counts):
            raise ResultsFileError(
                f"{self.out} already has rows and {self.counts} has none: --counts must be "
                "given from the start of a run (or choose another --out)"
            )
        if (
            self.memory
            and not is_url(self.memory)
            and not Path(self.memory).exists()
            and (row_count(self.out))
        ):
            raise ResultsFileError(
                f"cannot resume {self.out}: its rows were resolved against a memory, and "
                f"{self.memory} does not exist; restore that memory, or start both afresh"
            )

    def settings(self, experts: Experts, dataset) -> dict:
        memory = None if self.memory is None else shown_location(self.memory)  # no password
        settings = {
            **self.smoothing_settings("certify", experts, dataset),
            "n0": self.n0,
            "memory": memory,
        }
        if self.pilot:
            settings.update(pilot=self.pilot, radius_tolerance=self.radius_tolerance)
        if self.radius is not None:
            settings.update(radius=self.radius)
        if self.router:
            settings.update(
                router=str(self.router),
                router_sha256=file_digest(self.router),
                router_n=self.router_samples,
                router_share=self.router_share,
            )
        return settings


def certify_dataset(
    model: nn.Module | Experts, dataset, run: CertifyRun, *, rank: Rank = ONE_PROCESS
) -> str:
    """CERTIFY every input `run` covers: one model at its fixed sigma or its sigmas file's
    sigma per input, or experts, each input by the expert its routes file names (a sigmas
    file of `ddrs sigma --expert`), or dual smoothing with `run.router` (docs/METHODS.md).

    With `run.memory`, inputs are resolved against that memory online in index order, and each
    row keeps both the Monte Carlo certificate (mc_predict, mc_radius) and the resolved
    answer. `run.counts`: also write each input's vote counts there (COUNTS_COLUMNS), from
    which `recertify` recomputes the certificate at another alpha. `run.pilot` > 0:
    input-specific sample sizes (`Smooth.certify_batch_adaptive`). `rank`: this process's
    place in a sharded run (only rank 0 opens the memory and writes files).
    """
    experts = as_experts(model)
    dataset = inputs_of(dataset, experts)
    settings = run.settings(experts, dataset)
    routes = run.check(experts, dataset, settings)
    sampler = _sampler(run, experts, dataset.info.num_classes, routes)
    extra = run.extra_columns(experts)
    inputs: dict[int, torch.Tensor] = {}  # the group being certified, for the memory

    def rows_of(group: list[int]) -> list[dict]:
        x, labels = stack(dataset, group)
        inputs.clear()
        inputs.update(zip(group, x))
        t0 = time.perf_counter()
        repeats = _repeats(x, group) if look_up_repeats else {}
        rows = [
            _repeat_row(
                idx, labels[i], repeats[idx], time.perf_counter() - t0, run.seed, experts, extra
            )
            for i, idx in enumerate(group)
            if idx in repeats
        ]
        todo = [i for i, idx in enumerate(group) if idx not in repeats]
        if todo:
            t0 = time.perf_counter()
            keys = [group[i] for i in todo]
            found = sampler.rows(x[todo], keys, [labels[i] for i in todo])
            elapsed = round((time.perf_counter() - t0) / len(todo), 4)
            for row in found:
                row["time"] = elapsed
            rows += found
        if run.norm != "l2":
            for row in rows:
                row[NORM_COLUMN] = run.norm
        return sorted(rows, key=lambda row: group.index(row["idx"]))

    def _repeats(x: torch.Tensor, group: list[int]) -> dict[int, Answer]:
        found = {idx: memory.repeat_answer(x[i]) for i, idx in enumerate(group)}
        return {idx: answer for idx, answer in found.items() if answer is not None}

    memory: CertificationMemory | None = None
    # an exact repeat of a stored input is answered from the memory without sampling (one
    # process: its rows go straight to the memory; a counts file needs every input's votes)
    look_up_repeats = bool(run.memory) and not rank.enabled and run.counts is None
    try:
        if run.memory and rank.is_main:
            memory = open_memory(run.memory, experts, dataset, run.norm)

        def open_outputs() -> CertifyOutputs:
            return CertifyOutputs(
                run.out,
                run.columns(experts),
                settings,
                run.counts,
                memory,
                lambda idx: inputs[idx] if idx in inputs else dataset[idx][0],
            )

        batch = sampler.engine.batch_size(run.batch, dataset.info.input_shape)
        source = RowSource(
            "certify",
            CERTIFY_PART_COLUMNS + extra,
            group_size(run.n, batch),
            rows_of,
            dataset=dataset,
            samples_of=lambda rows: sum(
                row["n0"] + row["n"] + run.pilot + sampler.router_n
                for row in rows
                if "repeat" not in row
            ),
        )
        write_rows(
            source,
            out=run.out,
            settings=settings,
            selected=run.indices(len(dataset)),
            open_outputs=open_outputs,
            progress=run.progress,
            rank=rank,
        )
    finally:
        if memory is not None:
            memory.close()
    return run.out


# -- how each mode samples -------------------------------------------------------------------
@dataclass
class _Sampler:
    """One way of certifying a group of inputs: `rows(x, keys, labels)` gives their part rows
    (CERTIFY_PART_COLUMNS, and the mode's columns); `engine` sizes the batches."""

    engine: object
    rows: Callable[[torch.Tensor, list[int], list[int]], list[dict]]
    router_n: int = 0  # the router's samples per input, besides the rows' n0 and n


def _sampler(run: CertifyRun, experts: Experts, num_classes: int, routes) -> _Sampler:
    engine = {"seed": run.seed, "amp": run.amp, "compile": run.compile, "family": run.family}
    if run.cascade is not None:
        cascade = Cascade(experts, num_classes, run.cascade, **engine)

        def cascade_rows(x, keys, labels):
            found = cascade.certify_batch(
                x, n0=run.n0, n=run.n, alpha=run.alpha, batch=run.batch, keys=keys
            )
            return [
                _cascade_part_row(k, y, c, experts, run) for k, y, c in zip(keys, labels, found)
            ]

        return _Sampler(cascade, cascade_rows)
    if routes is None:
        device = model_device(experts[0].model)
        dual = DualSmoothing(
            load_router(run.router, experts, device), experts, num_classes, **engine
        )

        def dual_rows(x, keys, labels):
            found = dual.certify_batch(
                x,
                n0=run.n0,
                n=run.n,
                router_n=run.router_samples,
                alpha=run.alpha,
                router_share=run.router_share,
                batch=run.batch,
                keys=keys,
            )
            return [
                _routed_part_row(k, y, c, experts.names, run)
                for k, y, c in zip(keys, labels, found)
            ]

        return _Sampler(dual, dual_rows, router_n=run.n0 + run.router_samples)
    certifier = ExpertCertifier(experts, num_classes, **engine)
    extra = run.extra_columns(experts)

    def expert_rows(x, keys, labels):
        expert = [routes[k][0] for k in keys]
        sigma = torch.tensor([routes[k][1] for k in keys], dtype=torch.float32)
        found = certifier.certify_batch(
            x,
            expert,
            sigma,
            run.n0,
            run.n,
            run.alpha,
            run.batch,
            keys,
            run.pilot,
            run.radius_tolerance,
            run.radius,
        )
        rows = [_part_row(k, y, c, run.n0, run.seed) for k, y, c in zip(keys, labels, found)]
        if "expert" in extra:
            for row, j in zip(rows, expert):
                row["expert"] = experts[j].name
        return rows

    return _Sampler(certifier, expert_rows)


# -- the rows and where they go -----------------------------------------------------------------
def resolved_row(
    memory: CertificationMemory,
    x: torch.Tensor,
    idx: int,
    label: int,
    predict: int,
    radius: float,
    sigma: float,
    seconds: float,
    repeat: Answer | None = None,
) -> dict:
    """A results row (MEMORY_COLUMNS) for a Monte Carlo certificate (predict, radius) of input
    x: resolved against the memory, which stores the answer (`repeat`: the stored answer of an
    exact repeat, found before sampling)."""
    r = repeat or memory.resolve_and_store(x, predict, radius, sigma=sigma, idx=idx)
    return {
        "idx": idx,
        "label": label,
        "predict": r.predict,
        "radius": r.radius,
        "correct": int(r.predict == label),
        "sigma": sigma,
        "time": seconds,
        "mc_predict": predict,
        "mc_radius": radius,
    }


class CertifyOutputs:
    """The outputs of a certify run: each Monte Carlo certificate (a part row, with its
    counts) goes to the counts file if asked for, then, resolved against the memory if there
    is one (`load_input(idx)` gives the input it needs), to the results file (`columns`)."""

    def __init__(
        self,
        out: str,
        columns: tuple[str, ...],
        settings: dict,
        counts: str | None,
        memory: CertificationMemory | None,
        load_input: Callable[[int], torch.Tensor],
    ):
        self.memory, self.load_input, self.columns = memory, load_input, columns
        self.results = ResultsWriter(out, columns, settings)
        self.done = self.results.done
        self.counts = None
        try:
            if memory is not None and self.results.done:
                check_results_agree_with_memory(out, memory)
            if counts:
                self.counts = ResultsWriter(
                    counts, COUNTS_COLUMNS, {**settings, "counts_of": str(out)}
                )
        except BaseException:
            self.results.close()
            raise

    def write(self, part: dict) -> None:
        idx, label = part["idx"], part["label"]
        if self.counts is not None and idx not in self.counts.done:
            # before the results row: a kill between the two repeats identical counts
            self.counts.write({c: part[c] for c in COUNTS_COLUMNS})
        if self.memory is not None:
            row = resolved_row(
                self.memory,
                self.load_input(idx),
                idx,
                label,
                part["predict"],
                part["radius"],
                part["sigma"],
                part["time"],
                part.get("repeat"),
            )
        else:
            row = {"correct": int(part["predict"] == label)}
        self.results.write({**part, **row})

    def close(self) -> None:
        self.results.close()
        if self.counts is not None:
            self.counts.close()


def check_results_agree_with_memory(out: str, memory: CertificationMemory) -> None:
    """Before resuming a memory run: every row already written must be the memory's answer
    for that index (class and radius), else the two files do not belong together."""
    table = read_table(out, required=MEMORY_COLUMNS)
    stored = memory.answers_by_idx()
    for idx, predict, radius in zip(table["idx"], table["predict"], table["radius"]):
        answer = stored.get(int(idx))
        if answer is None or answer[0] != int(predict) or answer[1] != float(radius):
            found = "no entry" if answer is None else f"class {answer[0]}, radius {answer[1]!r}"
            raise ResultsFileError(
                f"cannot resume {out}: its row for idx {int(idx)} (class {int(predict)}, radius "
                f"{float(radius)!r}) is not in memory {shown_location(memory.path)} ({found}); "
                "resume with the memory this file was written with, or start both afresh"
            )


def _part_row(idx: int, label: int, cert, n0: int, seed: int) -> dict:
    """A Monte Carlo certificate with its counts (CERTIFY_PART_COLUMNS; its time is the
    caller's)."""
    return {
        "idx": idx,
        "label": label,
        "predict": cert.predict,
        "radius": cert.radius,
        "sigma": cert.sigma,
        "selected": cert.selected,
        "count": cert.count,
        "top1": cert.top2[0],
        "top2": cert.top2[1],
        "n": cert.n,
        "n0": n0,
        "seed": seed,
    }


def _routed_part_row(
    idx: int, label: int, found: RoutedCertificate, names, run: CertifyRun
) -> dict:
    """A dual-smoothing certificate (ROUTER_COLUMNS besides CERTIFY_PART_COLUMNS)."""
    cert = found.certificate
    counts = (
        {"selected": -1, "count": 0, "top1": 0, "top2": 0, "n": 0}
        if cert is None
        else {
            "selected": cert.selected,
            "count": cert.count,
            "top1": cert.top2[0],
            "top2": cert.top2[1],
            "n": cert.n,
        }
    )
    return {
        "idx": idx,
        "label": label,
        "predict": found.predict,
        "radius": found.radius,
        "sigma": found.sigma,
        **counts,
        "n0": run.n0,
        "seed": run.seed,
        "expert": names[found.expert] if found.expert >= 0 else NO_EXPERT,
        "route_radius": found.route_radius,
        "expert_radius": found.expert_radius,
    }


def _cascade_part_row(
    idx: int, label: int, found: CascadeCertificate, experts: Experts, run: CertifyRun
) -> dict:
    """A cascade certificate (CASCADE_COLUMNS besides CERTIFY_PART_COLUMNS; n and n0 count
    the samples of every level it drew)."""
    return {
        "idx": idx,
        "label": label,
        "predict": found.predict,
        "radius": found.radius,
        "sigma": found.sigma,
        "selected": -1,
        "count": 0,
        "top1": 0,
        "top2": 0,
        "n": found.levels * run.n,
        "n0": found.levels * run.n0,
        "seed": run.seed,
        "expert": experts[found.expert].name if found.expert >= 0 else NO_EXPERT,
        "level_radius": found.level_radius,
        "guard_radius": found.guard_radius,
        "levels": found.levels,
    }


def _repeat_row(
    idx: int,
    label: int,
    answer: Answer,
    elapsed: float,
    seed: int,
    experts: Experts,
    extra: tuple[str, ...],
) -> dict:
    """An exact repeat of a stored input: the stored Monte Carlo certificate, no votes (n 0);
    `repeat` carries the stored answer to the memory's writer."""
    row = {
        "idx": idx,
        "label": label,
        "predict": answer.mc_predict,
        "radius": answer.mc_radius,
        "sigma": answer.sigma,
        "time": round(elapsed, 4),
        "selected": -1,
        "count": 0,
        "top1": 0,
        "top2": 0,
        "n": 0,
        "n0": 0,
        "seed": seed,
        "repeat": answer,
    }
    if "expert" in extra:
        row["expert"] = experts.name_at(answer.sigma) or NO_EXPERT
        row.update(
            {column: math.nan for column in extra if column not in ("expert", NORM_COLUMN)}
        )  # not sampled
    return row
