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
from tqdm import tqdm

from ddrs.checks import check_alpha
from ddrs.classifier import memory_fingerprint
from ddrs.errors import ResultsFileError
from ddrs.launch import ONE_PROCESS, Rank
from ddrs.memory import CertificationMemory
from ddrs.results import (
    CERTIFY_COLUMNS,
    CERTIFY_PART_COLUMNS,
    COUNTS_COLUMNS,
    MEMORY_COLUMNS,
    PREDICT_COLUMNS,
    SIGMA_COLUMNS,
    ResultsWriter,
    file_digest,
    read_table,
    row_count,
)
from ddrs.sampling import auto_batch_size
from ddrs.shard import run_in_index_order
from ddrs.sigma import SEARCHES
from ddrs.smooth import Smooth, certificate_from_counts
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
def resolved_row(
    memory: CertificationMemory, x: torch.Tensor, idx: int, label: int, predict: int,
    radius: float, sigma: float, seconds: float,
) -> dict:  # fmt: skip
    """A results row (MEMORY_COLUMNS) for a Monte Carlo certificate (predict, radius) of input
    x: resolved against the memory, which stores the answer."""
    r = memory.resolve_and_store(x, predict, radius, sigma=sigma, idx=idx)
    return {
        "idx": idx, "label": label, "predict": r.predict, "radius": r.radius,
        "correct": int(r.predict == label), "sigma": sigma, "time": seconds,
        "mc_predict": predict, "mc_radius": radius,
    }  # fmt: skip


class CertifyOutputs:
    """The outputs of a certify run: each Monte Carlo certificate (a part row, with its
    counts) goes to the counts file if asked for, then, resolved against the memory if there
    is one (`load_input(idx)` gives the input it needs), to the results file."""

    def __init__(self, out: str, settings: dict, counts: str | None,
                 memory: CertificationMemory | None, load_input: Callable[[int], torch.Tensor]):
        columns = MEMORY_COLUMNS if memory is not None else CERTIFY_COLUMNS
        self.memory, self.load_input = memory, load_input
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
                               part["radius"], part["sigma"], part["time"])  # fmt: skip
        else:
            row = {c: part[c] for c in ("idx", "label", "predict", "radius", "sigma", "time")}
            row["correct"] = int(part["predict"] == label)
        self.results.write(row)

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
                f"{float(radius)!r}) is not in memory {memory.path} ({found}); resume with the "
                "memory this file was written with, or start both afresh"
            )


def _part_row(idx: int, label: int, cert, n0: int, seed: int, elapsed: float) -> dict:
    """A Monte Carlo certificate with its counts (CERTIFY_PART_COLUMNS)."""
    return {
        "idx": idx, "label": label, "predict": cert.predict, "radius": cert.radius,
        "sigma": cert.sigma, "time": round(elapsed, 4), "selected": cert.selected,
        "count": cert.count, "top1": cert.top2[0], "top2": cert.top2[1], "n": cert.n,
        "n0": n0, "seed": seed,
    }  # fmt: skip


def _check_certify_files(run: CertifyRun) -> None:
    """A resumed run needs the files it started with."""
    if run.counts is not None and row_count(run.out) and not row_count(run.counts):
        raise ResultsFileError(
            f"{run.out} already has rows and {run.counts} has none: --counts must be given "
            "from the start of a run (or choose another --out)"
        )
    if run.memory and not Path(run.memory).exists() and row_count(run.out):
        raise ResultsFileError(
            f"cannot resume {run.out}: its rows were resolved against a memory, and "
            f"{run.memory} does not exist; restore that memory, or start both afresh"
        )


def open_memory(path: str, model: nn.Module, dataset) -> CertificationMemory:
    """The certification memory at `path` for this model on this dataset (created if new)."""
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        print(f"note: {path} is an empty file; starting a new memory in it")
    shape = dataset.info.input_shape
    return CertificationMemory(path, memory_fingerprint(model, dataset.info.name, shape), shape)


def certify_dataset(model: nn.Module, dataset, run: CertifyRun, *, rank: Rank = ONE_PROCESS) -> str:
    """CERTIFY every input `run` covers (its fixed sigma, or its sigmas file by dataset index).

    With `run.memory`, inputs are resolved against that memory online in index order, and each
    row keeps both the Monte Carlo certificate (mc_predict, mc_radius) and the resolved
    answer. `run.counts`: also write each input's vote counts there (COUNTS_COLUMNS), from
    which `recertify` recomputes the certificate at another alpha. `run.pilot` > 0:
    input-specific sample sizes (`Smooth.certify_batch_adaptive`). `rank`: this process's
    place in a sharded run (only rank 0 opens the memory and writes files).
    """
    selected = run.indices(len(dataset))
    sigma_of = run.sigma_by_index(selected)
    _check_certify_files(run)
    settings = run.settings(model, dataset)
    smooth = Smooth(model, dataset.info.num_classes, seed=run.seed, amp=run.amp,
                    compile=run.compile)  # fmt: skip
    inputs: dict[int, torch.Tensor] = {}  # the group being certified, for the memory

    def rows_of(group: list[int]) -> list[dict]:
        x, labels = _stack(dataset, group)
        inputs.clear()
        inputs.update(zip(group, x))
        sigma = torch.tensor([sigma_of[i] for i in group], dtype=torch.float32)
        t0 = time.perf_counter()
        if run.pilot:
            found = smooth.certify_batch_adaptive(
                x, sigma, run.n0, run.n, run.alpha, run.pilot, run.radius_tolerance, run.batch,
                keys=group,
            )  # fmt: skip
        else:
            found = smooth.certify_batch(x, sigma, run.n0, run.n, run.alpha, run.batch, group)
        elapsed = (time.perf_counter() - t0) / len(group)
        return [_part_row(idx, labels[i], found[i], run.n0, run.seed, elapsed)
                for i, idx in enumerate(group)]  # fmt: skip

    memory: CertificationMemory | None = None
    try:
        if run.memory and rank.is_main:
            memory = open_memory(run.memory, model, dataset)

        def open_outputs() -> CertifyOutputs:
            return CertifyOutputs(
                run.out, settings, run.counts, memory,
                lambda idx: inputs[idx] if idx in inputs else dataset[idx][0],
            )  # fmt: skip

        batch = smooth.batch_size(run.batch, dataset.info.input_shape)
        source = RowSource(
            "certify", CERTIFY_PART_COLUMNS, _group_size(run.n, batch), rows_of,
            samples_of=lambda rows: sum(run.n0 + run.pilot + row["n"] for row in rows),
        )  # fmt: skip
        _write_rows(source, out=run.out, settings=settings, selected=selected,
                    open_outputs=open_outputs, progress=run.progress, rank=rank)  # fmt: skip
    finally:
        if memory is not None:
            memory.close()
    return run.out


# -- predict and sigma ------------------------------------------------------------------------
def predict_dataset(model: nn.Module, dataset, run: PredictRun, *, rank: Rank = ONE_PROCESS) -> str:
    """PREDICT every input `run` covers; rows `idx label predict correct time`."""
    selected = run.indices(len(dataset))
    sigma_of = run.sigma_by_index(selected)
    settings = run.settings(model, dataset)
    smooth = Smooth(model, dataset.info.num_classes, seed=run.seed, amp=run.amp,
                    compile=run.compile)  # fmt: skip

    def rows_of(group: list[int]) -> list[dict]:
        x, labels = _stack(dataset, group)
        sigma = torch.tensor([sigma_of[i] for i in group], dtype=torch.float32)
        t0 = time.perf_counter()
        answers = smooth.predict_batch(x, sigma, run.n, run.alpha, run.batch, keys=group)
        elapsed = round((time.perf_counter() - t0) / len(group), 4)
        return [
            {"idx": idx, "label": label, "predict": answer, "correct": int(answer == label),
             "time": elapsed}
            for idx, label, answer in zip(group, labels, answers)
        ]  # fmt: skip

    batch = smooth.batch_size(run.batch, dataset.info.input_shape)
    source = RowSource("predict", PREDICT_COLUMNS, _group_size(run.n, batch), rows_of)
    _write_rows(source, out=run.out, settings=settings, selected=selected,
                open_outputs=lambda: ResultsWriter(run.out, PREDICT_COLUMNS, settings),
                progress=run.progress, rank=rank)  # fmt: skip
    return run.out


def sigma_dataset(model: nn.Module, dataset, run: SigmaRun, *, rank: Rank = ONE_PROCESS) -> str:
    """Choose a sigma for every input `run` covers with its search; rows `idx sigma sigma0
    radius_before radius_after time` (the search's score at sigma0 and at the chosen sigma)."""
    options = run.options
    settings = run.settings(model, dataset)
    batch = run.batch or auto_batch_size(model, dataset.info.input_shape)

    def rows_of(group: list[int]) -> list[dict]:
        x, _ = _stack(dataset, group)
        t0 = time.perf_counter()
        found = SEARCHES[run.search](model, x, run.sigma0, seed=run.seed, keys=group,
                                     batch=batch, **options)  # fmt: skip
        elapsed = round((time.perf_counter() - t0) / len(group), 4)
        return [
            {"idx": idx, "sigma": float(found.sigma[i]), "sigma0": run.sigma0,
             "radius_before": float(found.radius_before[i]),
             "radius_after": float(found.radius_after[i]), "time": elapsed}
            for i, idx in enumerate(group)
        ]  # fmt: skip

    group_size = max(1, min(100, batch // options.get("samples", 1)))
    source = RowSource("sigma", SIGMA_COLUMNS, group_size, rows_of)
    _write_rows(source, out=run.out, settings=settings, selected=run.indices(len(dataset)),
                open_outputs=lambda: ResultsWriter(run.out, SIGMA_COLUMNS, settings),
                progress=run.progress, rank=rank)  # fmt: skip
    return run.out


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
        "results_sha256": file_digest(results), "memory": memory,
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
