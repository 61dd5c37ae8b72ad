"""Runs over a dataset that write results files: certify, predict, sigma search; the memory
applied to a finished certify run; certificates recomputed at another alpha.

Each run takes its specification (`ddrs.specs`: checked when built, and the source of its
resume settings), so a call from Python validates and resumes exactly as the command line.
Rows already in the results file (same settings) are skipped. In a sharded run (`rank`, see
`ddrs.launch` and `ddrs.shard`) every rank computes its share and rank 0 writes the files.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.utils.data import TensorDataset
from tqdm import tqdm

from ddrs.core.checks import check_alpha
from ddrs.core.experts import Expert, Experts
from ddrs.core.route import (
    DualSmoothing,
    ExpertCertifier,
    RoutedCertificate,
    Router,
    route_by_certified_radius,
)
from ddrs.core.sampling import auto_batch_size
from ddrs.core.sigma import SEARCHES
from ddrs.core.smooth import certificate_from_counts
from ddrs.core.torchutil import model_device
from ddrs.data.tensors import as_dataset
from ddrs.errors import CheckpointError, InputError, ResultsFileError
from ddrs.launch import ONE_PROCESS, Rank
from ddrs.memory import Answer, CertificationMemory
from ddrs.memory.store import is_url, shown_location
from ddrs.models import load_checkpoint
from ddrs.models.identity import memory_fingerprint
from ddrs.results import (
    CERTIFY_COLUMNS,
    CERTIFY_PART_COLUMNS,
    COUNTS_COLUMNS,
    EXPERT_COLUMNS,
    MEMORY_COLUMNS,
    NO_EXPERT,
    PREDICT_COLUMNS,
    ROUTE_COLUMNS,
    ROUTER_COLUMNS,
    SIGMA_COLUMNS,
    ResultsWriter,
    file_digest,
    read_routes,
    read_table,
    row_count,
)
from ddrs.shard import run_in_index_order
from ddrs.specs import CertifyRun, PredictRun, SigmaRun

# 16 instead of 4 changed nothing measurable on CPU (docs/PERFORMANCE.md section 6), and a
# group is also the unit of progress and of work lost to a kill
GROUP_BATCHES = 4
PLAIN_PROGRESS_SECONDS = 30.0


# -- the loop every run shares ----------------------------------------------------------------
class Outputs(Protocol):
    """Where a run's rows go: `done` (indices already written), `write(row)`, `close()`."""

    done: set[int]

    def write(self, row: dict) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RowSource:
    """How a run computes its rows: `rows_of(group)` for a group of dataset indices, as many
    at a time as `group_size`; `part_columns`: a row's columns (a sharded rank's part file);
    `samples_of(rows)`: noisy samples they took (for the samples/s display), if counted."""

    desc: str
    part_columns: tuple[str, ...]
    group_size: int
    rows_of: Callable[[list[int]], list[dict]]
    samples_of: Callable[[list[dict]], int] | None = None
    dataset: object = None  # the inputs, for a note on the classes the run covers


def _write_rows(
    source: RowSource,
    *,
    out: str,
    settings: dict,
    selected: list[int],
    open_outputs: Callable[[], Outputs],
    progress: bool,
    rank: Rank,
) -> None:
    """The selected inputs not yet in the outputs, group by group, each row written as it
    comes (rank 0, in index order), in one process or many (`shard.run_in_index_order`)."""
    note = note_class_coverage(source.dataset, selected)
    if note and rank.is_main:
        print(note, file=sys.stderr)

    def compute(todo: list[int], emit: Callable[[dict], None]) -> None:
        label = source.desc if not rank.enabled else f"{source.desc}, rank 0 of {rank.world}"
        bar = _progress(len(todo), label, progress and rank.is_main)
        start, samples = time.perf_counter(), 0
        for group in _groups(todo, source.group_size):
            rows = source.rows_of(group)
            for row in rows:
                emit(row)
            bar.update(len(group))
            if source.samples_of is not None:
                samples += source.samples_of(rows)
                bar.set_postfix(samples_s=f"{samples / (time.perf_counter() - start):,.0f}")
        bar.close()

    opened: list[Outputs] = []

    def open_and_check() -> set[int]:
        opened.append(open_outputs())
        _refuse_strays(selected, opened[0], out)
        return opened[0].done

    try:
        run_in_index_order(
            rank, out=out, columns=source.part_columns, settings=settings,
            open_results=open_and_check, selected=selected, compute=compute,
            merge=lambda row: opened[0].write(row),
        )  # fmt: skip
    finally:
        for outputs in opened:
            outputs.close()


def note_class_coverage(dataset, indices: list[int]) -> str | None:
    """A note when the covered inputs hold far fewer classes than the dataset (a dataset
    sorted by class, cut by --max): certified accuracy would describe a few classes only."""
    targets = getattr(dataset, "targets", None)
    if not targets or not indices:
        return None
    covered = len({targets[i] for i in indices})
    total = len(set(targets))
    if covered >= 0.5 * min(len(indices), total):
        return None
    return (f"note: the {len(indices)} inputs this run covers hold {covered} of the dataset's "
            f"{total} classes (is it sorted by class?); spread them with --skip instead of "
            "cutting with --max")


def _refuse_strays(indices: list[int], outputs: Outputs, out: str) -> None:
    stray = sorted(outputs.done - set(indices))
    if stray:
        raise ResultsFileError(
            f"{out} holds rows for indices this selection does not include (e.g. "
            f"{stray[0]}, {len(stray)} in all): resume with its --skip/--max, or another --out"
        )


def _groups(indices: list[int], size: int) -> Iterator[list[int]]:
    for lo in range(0, len(indices), size):
        yield indices[lo : lo + size]


def _group_size(n: int, batch: int) -> int:
    """Inputs certified together: enough for GROUP_BATCHES forward batches when n is small
    (the engine packs many inputs into one forward pass), one input when n is large."""
    return max(1, min(256, math.ceil(GROUP_BATCHES * batch / n)))


def _stack(dataset, group: list[int]):
    items = [dataset[i] for i in group]
    return torch.stack([item[0] for item in items]), [int(item[1]) for item in items]


class PlainProgress:
    """Progress for logs and pipes (no terminal): one plain line every `interval` seconds."""

    def __init__(self, total: int, desc: str, interval: float = 30.0, stream=None):
        self.total, self.desc, self.interval = total, desc, interval
        self.stream = stream or sys.stderr
        self.done, self.start = 0, time.monotonic()
        self.last, self.postfix = self.start, ""

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.interval or (self.done >= self.total > 0):
            self.last = now
            share = self.done / self.total if self.total else 1.0
            print(
                f"{self.desc}: {self.done}/{self.total} inputs ({share:.0%}), "
                f"{now - self.start:.0f} s{self.postfix}",
                file=self.stream,
                flush=True,
            )

    def set_postfix(self, **values) -> None:
        self.postfix = "".join(f", {k.replace('_', '/')} {v}" for k, v in values.items())

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar on a terminal; plain lines now and then in a log or pipe; or nothing."""
    if enabled and not sys.stderr.isatty():
        return PlainProgress(total, desc, PLAIN_PROGRESS_SECONDS)
    return tqdm(total=total, desc=desc, unit="input", disable=not enabled, dynamic_ncols=True)


# -- certify ----------------------------------------------------------------------------------
Base = nn.Module | Experts  # one model (a sigma per input), or experts to route among


def inputs_of(data, base: Base):
    """The dataset a run goes over: one of ddrs's, or your tensors (a TensorDataset or a pair
    (x, y)), whose number of classes is the model's number of outputs (one probe pass)."""
    if hasattr(data, "info"):
        return data
    x = data.tensors[0] if isinstance(data, TensorDataset) else data[0]
    model = base[0].model if isinstance(base, Experts) else base
    with torch.inference_mode():
        outputs = model(torch.as_tensor(x[:1]).float().to(model_device(model)))
    return as_dataset(data, int(outputs.shape[-1]))


def resolved_row(
    memory: CertificationMemory, x: torch.Tensor, idx: int, label: int, predict: int,
    radius: float, sigma: float, seconds: float, repeat: Answer | None = None,
) -> dict:  # fmt: skip
    """A results row (MEMORY_COLUMNS) for a Monte Carlo certificate (predict, radius) of input
    x: resolved against the memory, which stores the answer (`repeat`: the stored answer of an
    exact repeat, found before sampling)."""
    r = repeat or memory.resolve_and_store(x, predict, radius, sigma=sigma, idx=idx)
    return {
        "idx": idx, "label": label, "predict": r.predict, "radius": r.radius,
        "correct": int(r.predict == label), "sigma": sigma, "time": seconds,
        "mc_predict": predict, "mc_radius": radius,
    }  # fmt: skip


class CertifyOutputs:
    """The outputs of a certify run: each Monte Carlo certificate (a part row, with its
    counts) goes to the counts file if asked for, then, resolved against the memory if there
    is one (`load_input(idx)` gives the input it needs), to the results file (`columns`)."""

    def __init__(self, out: str, columns: tuple[str, ...], settings: dict, counts: str | None,
                 memory: CertificationMemory | None, load_input: Callable[[int], torch.Tensor]):
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
            row = resolved_row(self.memory, self.load_input(idx), idx, label, part["predict"],
                               part["radius"], part["sigma"], part["time"],
                               part.get("repeat"))  # fmt: skip
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


def _part_row(idx: int, label: int, cert, n0: int, seed: int, elapsed: float) -> dict:
    """A Monte Carlo certificate with its counts (CERTIFY_PART_COLUMNS)."""
    return {
        "idx": idx, "label": label, "predict": cert.predict, "radius": cert.radius,
        "sigma": cert.sigma, "time": round(elapsed, 4), "selected": cert.selected,
        "count": cert.count, "top1": cert.top2[0], "top2": cert.top2[1], "n": cert.n,
        "n0": n0, "seed": seed,
    }  # fmt: skip


def _routed_part_row(idx: int, label: int, found: RoutedCertificate, names, n0: int,
                     seed: int, elapsed: float) -> dict:  # fmt: skip
    """A dual-smoothing certificate (ROUTER_COLUMNS besides CERTIFY_PART_COLUMNS)."""
    cert = found.certificate
    counts = {"selected": -1, "count": 0, "top1": 0, "top2": 0, "n": 0} if cert is None else {
        "selected": cert.selected, "count": cert.count, "top1": cert.top2[0],
        "top2": cert.top2[1], "n": cert.n,
    }  # fmt: skip
    return {
        "idx": idx, "label": label, "predict": found.predict, "radius": found.radius,
        "sigma": found.sigma, "time": round(elapsed, 4), **counts, "n0": n0, "seed": seed,
        "expert": names[found.expert] if found.expert >= 0 else NO_EXPERT,
        "route_radius": found.route_radius, "expert_radius": found.expert_radius,
    }  # fmt: skip


def _repeat_row(idx: int, label: int, answer: Answer, elapsed: float, seed: int,
                experts: Experts, extra: tuple[str, ...]) -> dict:  # fmt: skip
    """An exact repeat of a stored input: the stored Monte Carlo certificate, no votes (n 0);
    `repeat` carries the stored answer to the memory's writer."""
    row = {
        "idx": idx, "label": label, "predict": answer.mc_predict, "radius": answer.mc_radius,
        "sigma": answer.sigma, "time": round(elapsed, 4), "selected": -1, "count": 0,
        "top1": 0, "top2": 0, "n": 0, "n0": 0, "seed": seed, "repeat": answer,
    }  # fmt: skip
    if extra:
        names = [e.name for e in experts if e.sigma == answer.sigma]
        row["expert"] = names[0] if len(names) == 1 else NO_EXPERT
        if "route_radius" in extra:
            row.update(route_radius=0.0, expert_radius=answer.mc_radius)
    return row


def _extra_columns(run, base: Base) -> tuple[str, ...]:
    """What experts add to a results file: which one answered (and the router's radius)."""
    if not isinstance(base, Experts):
        return ()
    return ROUTER_COLUMNS if getattr(run, "router", None) else EXPERT_COLUMNS


def results_columns(run: CertifyRun | PredictRun | SigmaRun, base: Base) -> tuple[str, ...]:
    """The columns of a run's results file."""
    if isinstance(run, SigmaRun):
        return ROUTE_COLUMNS if isinstance(base, Experts) else SIGMA_COLUMNS
    if isinstance(run, PredictRun):
        return PREDICT_COLUMNS + _extra_columns(run, base)
    return (MEMORY_COLUMNS if run.memory else CERTIFY_COLUMNS) + _extra_columns(run, base)


def _routes(run: CertifyRun | PredictRun, base: Base, indices: list[int]) -> dict | None:
    """Each covered input's (expert, sigma): expert 0 for one model, the routes file's for
    experts; None when a router chooses at certification time."""
    if isinstance(base, Experts):
        if run.sigma is not None:
            raise InputError("experts certify at their own sigmas: give --sigmas from `ddrs "
                             "sigma --expert ...` (or a --router), not --sigma")  # fmt: skip
        if run.sigmas is None:
            return None
        routes = read_routes(run.sigmas)
        run.sigma_by_index(indices)  # every input has a row
        return {i: (base.index(routes[i][0]), routes[i][1]) for i in indices}
    if getattr(run, "router", None):
        raise InputError("--router routes among experts: give them with --expert or --experts")
    return {i: (0, s) for i, s in run.sigma_by_index(indices).items()}


def check_files(run: CertifyRun | PredictRun | SigmaRun, base: Base, dataset,
                settings: dict | None = None) -> dict[int, tuple[int, float]] | None:  # fmt: skip
    """What a run checks against the dataset and the files on disk before it writes anything
    (also before a sharded run starts its workers): a results file to resume was written
    with these settings, a sigmas file covers every input (and names known experts), and a
    resumed certify run has the counts file and memory it started with. Returns each covered
    input's (expert, sigma) for certify and predict (expert 0 for one model)."""
    if Path(run.out).is_file() and Path(run.out).stat().st_size > 0:  # a run to resume
        settings = settings or run.settings(base, dataset)
        ResultsWriter.check_settings(Path(run.out), results_columns(run, base), settings)
    if isinstance(run, SigmaRun):
        if isinstance(base, Experts) == (run.sigma0 is not None):
            raise InputError("give --sigma0 for one model's sigma search; experts have their "
                             "own sigmas (no --sigma0)")  # fmt: skip
        return None
    routes = _routes(run, base, run.indices(len(dataset)))
    if isinstance(run, CertifyRun):
        _check_resumed_files(run)
    return routes


def _check_resumed_files(run: CertifyRun) -> None:
    if run.counts is not None and row_count(run.out) and not row_count(run.counts):
        raise ResultsFileError(
            f"{run.out} already has rows and {run.counts} has none: --counts must be given "
            "from the start of a run (or choose another --out)"
        )
    if run.memory and not is_url(run.memory) and not Path(run.memory).exists() and (
            row_count(run.out)):  # fmt: skip
        raise ResultsFileError(
            f"cannot resume {run.out}: its rows were resolved against a memory, and "
            f"{run.memory} does not exist; restore that memory, or start both afresh"
        )


def open_memory(path: str, base: Base, dataset) -> CertificationMemory:
    """The certification memory at `path` for this model (or these experts) on this dataset,
    created if new."""
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        print(f"note: {path} is an empty file; starting a new memory in it")
    shape = dataset.info.input_shape
    if isinstance(base, Experts):
        fingerprint = memory_fingerprint(base, dataset.info.name, shape)
    else:
        fingerprint = memory_fingerprint(base, dataset.info.name, shape)
    return CertificationMemory(path, fingerprint, shape)


def as_experts(base: Base) -> Experts:
    """Experts as they are; one model as the one expert of every input (its sigma per input)."""
    if isinstance(base, Experts):
        return base
    return Experts((Expert("model", "", math.nan, base),))


def load_router(path: str, experts: Experts, device) -> Router:
    """A router checkpoint of `ddrs train-router`, for these experts."""
    loaded = load_checkpoint(path, device=device)
    about = loaded.meta.get("router")
    if not about:
        raise CheckpointError(f"{path} is not a router (train one with `ddrs train-router`)")
    return Router(loaded.model, float(about["sigma"]), tuple(about["experts"]))


def certify_dataset(base: Base, dataset, run: CertifyRun, *, rank: Rank = ONE_PROCESS) -> str:
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
    dataset = inputs_of(dataset, base)
    settings = run.settings(base, dataset)
    routes = check_files(run, base, dataset, settings)
    experts = as_experts(base)
    num_classes = dataset.info.num_classes
    if routes is None:
        device = model_device(experts[0].model)
        dual = DualSmoothing(load_router(run.router, experts, device), experts, num_classes,
                             seed=run.seed, amp=run.amp)  # fmt: skip
        certifier = dual.certifier
    else:
        certifier = ExpertCertifier(experts, num_classes, seed=run.seed, amp=run.amp,
                                    compile=run.compile)  # fmt: skip
    extra = _extra_columns(run, base)
    inputs: dict[int, torch.Tensor] = {}  # the group being certified, for the memory

    def rows_of(group: list[int]) -> list[dict]:
        x, labels = _stack(dataset, group)
        inputs.clear()
        inputs.update(zip(group, x))
        t0 = time.perf_counter()
        repeats = _repeats(x, group) if look_up_repeats else {}
        rows = [_repeat_row(idx, labels[i], repeats[idx], time.perf_counter() - t0, run.seed,
                            experts, extra) for i, idx in enumerate(group) if idx in repeats]
        todo = [i for i, idx in enumerate(group) if idx not in repeats]
        if todo:
            rows += sample_rows([group[i] for i in todo], x[todo], [labels[i] for i in todo])
        return sorted(rows, key=lambda row: group.index(row["idx"]))

    def sample_rows(group: list[int], x: torch.Tensor, labels: list[int]) -> list[dict]:
        t0 = time.perf_counter()
        if routes is None:
            found = dual.certify_batch(x, n0=run.n0, n=run.n, router_n=run.router_n or run.n,
                                       alpha=run.alpha, router_share=run.router_share,
                                       batch=run.batch, keys=group)  # fmt: skip
            elapsed = (time.perf_counter() - t0) / len(group)
            return [_routed_part_row(idx, labels[i], found[i], experts.names, run.n0, run.seed,
                                     elapsed) for i, idx in enumerate(group)]  # fmt: skip
        expert = [routes[i][0] for i in group]
        sigma = torch.tensor([routes[i][1] for i in group], dtype=torch.float32)
        found = certifier.certify_batch(x, expert, sigma, run.n0, run.n, run.alpha, run.batch,
                                        group, run.pilot, run.radius_tolerance)  # fmt: skip
        elapsed = (time.perf_counter() - t0) / len(group)
        rows = [_part_row(idx, labels[i], found[i], run.n0, run.seed, elapsed)
                for i, idx in enumerate(group)]  # fmt: skip
        if extra:
            for row, k in zip(rows, expert):
                row["expert"] = experts[k].name
        return rows

    def _repeats(x: torch.Tensor, group: list[int]) -> dict[int, Answer]:
        found = {idx: memory.repeat_answer(x[i]) for i, idx in enumerate(group)}
        return {idx: answer for idx, answer in found.items() if answer is not None}

    memory: CertificationMemory | None = None
    # an exact repeat of a stored input is answered from the memory without sampling (one
    # process: its rows go straight to the memory; a counts file needs every input's votes)
    look_up_repeats = bool(run.memory) and not rank.enabled and run.counts is None
    try:
        if run.memory and rank.is_main:
            memory = open_memory(run.memory, base, dataset)

        def open_outputs() -> CertifyOutputs:
            return CertifyOutputs(
                run.out, results_columns(run, base), settings, run.counts, memory,
                lambda idx: inputs[idx] if idx in inputs else dataset[idx][0],
            )  # fmt: skip

        batch = certifier.batch_size(run.batch, dataset.info.input_shape)
        router_n = run.router_n or run.n if routes is None else 0
        source = RowSource(
            "certify", CERTIFY_PART_COLUMNS + extra, _group_size(run.n, batch), rows_of,
            dataset=dataset,
            samples_of=lambda rows: sum(run.n0 + run.pilot + row["n"] + router_n
                                        for row in rows if "repeat" not in row),
        )  # fmt: skip
        _write_rows(source, out=run.out, settings=settings, selected=run.indices(len(dataset)),
                    open_outputs=open_outputs, progress=run.progress, rank=rank)  # fmt: skip
    finally:
        if memory is not None:
            memory.close()
    return run.out


# -- predict and sigma ------------------------------------------------------------------------
def predict_dataset(base: Base, dataset, run: PredictRun, *, rank: Rank = ONE_PROCESS) -> str:
    """PREDICT every input `run` covers; rows `idx label predict correct time` (and the
    expert, for experts)."""
    dataset = inputs_of(dataset, base)
    settings = run.settings(base, dataset)
    routes = check_files(run, base, dataset, settings)
    experts = as_experts(base)
    certifier = ExpertCertifier(experts, dataset.info.num_classes, seed=run.seed, amp=run.amp,
                                compile=run.compile)  # fmt: skip
    extra = _extra_columns(run, base)

    def rows_of(group: list[int]) -> list[dict]:
        x, labels = _stack(dataset, group)
        expert = [routes[i][0] for i in group]
        sigma = torch.tensor([routes[i][1] for i in group], dtype=torch.float32)
        t0 = time.perf_counter()
        answers = certifier.predict_batch(x, expert, sigma, run.n, run.alpha, run.batch, group)
        elapsed = round((time.perf_counter() - t0) / len(group), 4)
        rows = [
            {"idx": idx, "label": label, "predict": answer, "correct": int(answer == label),
             "time": elapsed}
            for idx, label, answer in zip(group, labels, answers)
        ]  # fmt: skip
        if extra:
            for row, k in zip(rows, expert):
                row["expert"] = experts[k].name
        return rows

    columns = results_columns(run, base)
    batch = certifier.batch_size(run.batch, dataset.info.input_shape)
    source = RowSource("predict", columns, _group_size(run.n, batch), rows_of, dataset=dataset)
    _write_rows(source, out=run.out, settings=settings, selected=run.indices(len(dataset)),
                open_outputs=lambda: ResultsWriter(run.out, columns, settings),
                progress=run.progress, rank=rank)  # fmt: skip
    return run.out


def sigma_dataset(base: Base, dataset, run: SigmaRun, *, rank: Rank = ONE_PROCESS) -> str:
    """Choose a sigma for every input `run` covers: for one model with its search (rows `idx
    sigma sigma0 radius_before radius_after time`: the search's score at sigma0 and at the
    chosen sigma); for experts, an expert (and its sigma) by the certified selector over
    experts (rows `idx expert sigma score time`)."""
    dataset = inputs_of(dataset, base)
    settings = run.settings(base, dataset)
    check_files(run, base, dataset, settings)
    columns = results_columns(run, base)
    first = base[0].model if isinstance(base, Experts) else base
    batch = run.batch or auto_batch_size(first, dataset.info.input_shape)
    options = run.options
    if isinstance(base, Experts):
        rows_of = _route_rows(base, dataset, run, batch)
        per_input = options["samples"] * len(base)
    else:
        rows_of = _sigma_rows(base, dataset, run, batch)
        per_input = options["samples"]
    source = RowSource("sigma", columns, max(1, min(100, batch // per_input)), rows_of,
                       dataset=dataset)
    _write_rows(source, out=run.out, settings=settings, selected=run.indices(len(dataset)),
                open_outputs=lambda: ResultsWriter(run.out, columns, settings),
                progress=run.progress, rank=rank)  # fmt: skip
    return run.out


def _sigma_rows(model: nn.Module, dataset, run: SigmaRun, batch: int):
    def rows_of(group: list[int]) -> list[dict]:
        x, _ = _stack(dataset, group)
        t0 = time.perf_counter()
        found = SEARCHES[run.search](model, x, run.sigma0, seed=run.seed, keys=group,
                                     batch=batch, **run.options)  # fmt: skip
        elapsed = round((time.perf_counter() - t0) / len(group), 4)
        return [
            {"idx": idx, "sigma": float(found.sigma[i]), "sigma0": run.sigma0,
             "radius_before": float(found.radius_before[i]),
             "radius_after": float(found.radius_after[i]), "time": elapsed}
            for i, idx in enumerate(group)
        ]  # fmt: skip

    return rows_of


def _route_rows(experts: Experts, dataset, run: SigmaRun, batch: int):
    def rows_of(group: list[int]) -> list[dict]:
        x, _ = _stack(dataset, group)
        t0 = time.perf_counter()
        found = route_by_certified_radius(
            experts, x, samples=run.options["samples"], n=run.n, alpha=run.alpha,
            rule=run.route_rule, seed=run.seed, keys=group, batch=batch,
        )  # fmt: skip
        elapsed = round((time.perf_counter() - t0) / len(group), 4)
        return [
            {"idx": idx, "expert": experts[int(found.expert[i])].name,
             "sigma": float(found.sigma[i]), "score": float(found.score[i]), "time": elapsed}
            for i, idx in enumerate(group)
        ]  # fmt: skip

    return rows_of


# -- from finished files ----------------------------------------------------------------------
def apply_memory(
    results: str, model: nn.Module, dataset, out: str, memory: str, progress: bool = True
) -> str:
    """Resolve a finished certify run against a memory, offline, in dataset-index order;
    rows in MEMORY_COLUMNS. Resumable when `memory` is a file."""
    table = read_table(results, required=("idx", "label", "predict", "radius", "sigma"))
    if memory == ":memory:" and Path(out).exists():
        raise ResultsFileError(
            f"{out} exists; an in-RAM memory cannot resume it. Pass --memory FILE to make the "
            "run resumable, or choose another --out"
        )
    mc_predict = table.get("mc_predict", table["predict"])
    mc_radius = table.get("mc_radius", table["radius"])
    seconds = table["time"] if "time" in table else [0.0] * len(table["idx"])
    from ddrs.models import model_fingerprint

    settings = {
        "command": "memory apply", "results": str(results),
        "results_sha256": file_digest(results), "memory": shown_location(memory),
        "model": model_fingerprint(model)[:16], "dataset": dataset.info.name,
        "split": dataset.split,
    }  # fmt: skip
    with (
        open_memory(memory, model, dataset) as store,
        ResultsWriter(out, MEMORY_COLUMNS, settings) as writer,
    ):
        order = table["idx"].argsort(kind="stable").tolist()
        bar = _progress(len(order), "memory apply", progress)
        for row in order:
            idx = int(table["idx"][row])
            bar.update(1)
            if idx in writer.done:
                continue
            x, label, _ = dataset[idx]
            if int(label) != int(table["label"][row]):
                raise ResultsFileError(
                    f"{results}: idx {idx} has label {int(table['label'][row])}, the dataset "
                    f"says {int(label)} — wrong dataset or split?"
                )
            writer.write(resolved_row(
                store, x, idx, int(label), int(mc_predict[row]), float(mc_radius[row]),
                float(table["sigma"][row]), float(seconds[row]),
            ))  # fmt: skip
        bar.close()
    return out


def recertify(counts: str, out: str, alpha: float) -> str:
    """CERTIFY's answers recomputed from a counts file at another `alpha`; rows in the certify
    format (`idx label predict radius correct sigma time`, time 0). The counts do not depend
    on alpha, so this equals a run at that alpha with the same seed and inputs."""
    alpha = check_alpha(alpha)
    table = read_table(counts)
    if "count" not in table and "radius" in table:
        raise ResultsFileError(
            f"{counts} is a results file; recertify reads the counts file that `ddrs certify "
            "... --counts FILE` writes beside it (re-run that certify with --counts)"
        )
    table = read_table(counts, required=COUNTS_COLUMNS)
    rows = []
    for k in range(len(table["idx"])):
        cert = certificate_from_counts(
            int(table["selected"][k]), int(table["count"][k]), int(table["n"][k]), alpha,
            float(table["sigma"][k]),
        )  # fmt: skip
        label = int(table["label"][k])
        rows.append({
            "idx": int(table["idx"][k]), "label": label, "predict": cert.predict,
            "radius": cert.radius, "correct": int(cert.predict == label),
            "sigma": float(table["sigma"][k]), "time": 0.0,
        })  # fmt: skip
    with ResultsWriter(out, CERTIFY_COLUMNS, {"recertify": str(counts), "alpha": alpha}) as writer:
        for row in rows:
            if row["idx"] not in writer.done:
                writer.write(row)
    return out
