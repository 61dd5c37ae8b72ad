"""Runs over a dataset that write results files: certify, predict, sigma search.

Each run is resumable: rows already in `out` (same settings) are skipped. Inputs are chosen
as in Cohen et al.'s `certify.py`: every `skip`-th index, below `max` (None: to the end).
"""

from __future__ import annotations

import math
import numbers
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from ddrs.errors import InputError, ResultsFileError
from ddrs.memory import CertificationMemory
from ddrs.results import (
    CERTIFY_COLUMNS,
    CERTIFY_PART_COLUMNS,
    COUNTS_COLUMNS,
    MEMORY_COLUMNS,
    PREDICT_COLUMNS,
    SIGMA_COLUMNS,
    ResultsWriter,
    read_table,
    row_count,
)
from ddrs.sampling import auto_batch_size
from ddrs.shard import ONE_PROCESS, Shard, parts_dir, run_sharded
from ddrs.sigma import SEARCHES, check_search_options
from ddrs.smooth import Smooth, certificate_from_counts
from ddrs.stats import check_alpha


@dataclass(frozen=True)
class Selection:
    """Which dataset indices a run covers (Cohen et al.'s --skip / --max semantics)."""

    skip: int = 1
    max: int | None = None

    def indices(self, length: int) -> list[int]:
        if self.skip < 1:
            raise InputError(f"--skip must be >= 1, got {self.skip}")
        stop = length if self.max is None or self.max < 0 else min(self.max, length)
        return list(range(0, stop, self.skip))


def _is_count(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def check_run_args(
    *,
    n: int,
    alpha: float,
    n0: int | None = None,
    batch: int | None = None,
    selection: Selection = Selection(),
    sigma: float | None = None,
) -> None:
    """Reject bad settings of a certify / predict run before any file is created."""
    for name, value in (("n", n), ("n0", n0)):
        if value is not None and not _is_count(value):
            raise InputError(f"--{name} must be a positive integer, got {value!r}")
    check_alpha(alpha)
    if batch is not None and not _is_count(batch):
        raise InputError(f"--batch must be a positive integer, got {batch!r}")
    if not _is_count(selection.skip):
        raise InputError(f"--skip must be >= 1, got {selection.skip}")
    if sigma is not None and not (math.isfinite(sigma) and sigma > 0):
        raise InputError(f"--sigma must be finite and > 0, got {sigma!r}")


def check_sigmas_cover(indices: list[int], sigmas: dict[int, float] | None) -> None:
    missing = [i for i in indices if sigmas is not None and i not in sigmas]
    if missing:
        raise ResultsFileError(
            f"the sigmas file has no row for dataset index {missing[0]} ({len(missing)} of "
            f"the {len(indices)} selected inputs missing); run `ddrs sigma` with the same "
            "--skip/--max"
        )


def recertify(counts: str, out: str, alpha: float, settings: dict | None = None) -> str:
    """CERTIFY's answers recomputed from a counts file at another `alpha`; rows in the certify
    format (`idx label predict radius correct sigma time`, time 0). The counts do not depend
    on alpha, so this equals a run at that alpha with the same seed and inputs."""
    alpha = check_alpha(alpha)
    table = read_table(counts, required=COUNTS_COLUMNS)
    rows = []
    for k in range(len(table["idx"])):
        cert = certificate_from_counts(
            int(table["selected"][k]),
            int(table["count"][k]),
            int(table["n"][k]),
            alpha,
            float(table["sigma"][k]),
        )
        label = int(table["label"][k])
        rows.append({
            "idx": int(table["idx"][k]), "label": label, "predict": cert.predict,
            "radius": cert.radius, "correct": int(cert.predict == label),
            "sigma": float(table["sigma"][k]), "time": 0.0,
        })  # fmt: skip
    with ResultsWriter(
        out, CERTIFY_COLUMNS, {"recertify": str(counts), "alpha": alpha, **(settings or {})}
    ) as writer:
        for row in rows:
            if row["idx"] not in writer.done:
                writer.write(row)
    return out


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


def _groups(indices: list[int], size: int) -> Iterator[list[int]]:
    for lo in range(0, len(indices), size):
        yield indices[lo : lo + size]


# 16 instead of 4 changed nothing measurable on CPU (docs/PERFORMANCE.md section 6), and a
# group is also the unit of progress and of work lost to a kill
GROUP_BATCHES = 4


def _group_size(n: int, batch: int) -> int:
    """Inputs certified together: enough for GROUP_BATCHES forward batches when n is small
    (the engine packs many inputs into one forward pass), one input when n is large."""
    return max(1, min(256, math.ceil(GROUP_BATCHES * batch / n)))


def _stack(dataset, group: list[int]):
    items = [dataset[i] for i in group]
    x = torch.stack([item[0] for item in items])
    labels = [int(item[1]) for item in items]
    return x, labels


def _sigmas_for(group: list[int], sigma: float | None, sigmas: dict[int, float] | None):
    if sigmas is None:
        return torch.full((len(group),), float(sigma))
    missing = [i for i in group if i not in sigmas]
    if missing:
        raise ResultsFileError(
            f"the sigmas file has no row for dataset index {missing[0]} "
            f"({len(missing)} missing in this group); run `ddrs sigma` on the same inputs"
        )
    return torch.tensor([sigmas[i] for i in group], dtype=torch.float32)


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


PLAIN_PROGRESS_SECONDS = 30.0


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar on a terminal; plain lines now and then in a log or pipe; or nothing."""
    if enabled and not sys.stderr.isatty():
        return PlainProgress(total, desc, PLAIN_PROGRESS_SECONDS)
    return tqdm(total=total, desc=desc, unit="input", disable=not enabled, dynamic_ncols=True)


def _todo(indices: list[int], writer: ResultsWriter) -> list[int]:
    """The selected indices not yet in the file; refuses a file holding unselected ones."""
    selected = set(indices)
    stray = sorted(writer.done - selected)
    if stray:
        raise ResultsFileError(
            f"{writer.path} holds rows for indices this selection does not include (e.g. "
            f"{stray[0]}, {len(stray)} in all): resume with its --skip/--max, or another --out"
        )
    return [i for i in indices if i not in writer.done]


def _part_row(idx: int, label: int, cert, n0: int, seed: int, elapsed: float) -> dict:
    """A Monte Carlo certificate with its counts (CERTIFY_PART_COLUMNS)."""
    return {
        "idx": idx, "label": label, "predict": cert.predict, "radius": cert.radius,
        "sigma": cert.sigma, "time": round(elapsed, 4), "selected": cert.selected,
        "count": cert.count, "top1": cert.top2[0], "top2": cert.top2[1], "n": cert.n,
        "n0": n0, "seed": seed,
    }  # fmt: skip


class _CertifyResults:
    """The files of a certify run (results, counts) and its memory, behind a ResultsWriter's
    interface: each Monte Carlo certificate written becomes a counts row, then, resolved
    against the memory (which needs the input: `load_input(idx)`), a results row."""

    def __init__(self, out, settings, counts, memory, on_row, load_input):
        columns = MEMORY_COLUMNS if memory is not None else CERTIFY_COLUMNS
        self.memory, self.on_row, self.load_input = memory, on_row, load_input
        self.writer = ResultsWriter(out, columns, settings)
        self.path, self.done = self.writer.path, self.writer.done
        self.counts = None
        try:
            if memory is not None and self.writer.done:
                check_results_agree_with_memory(out, memory)
            if counts:
                self.counts = ResultsWriter(
                    counts, COUNTS_COLUMNS, {**settings, "counts_of": str(out)}
                )
        except BaseException:
            self.writer.close()
            raise

    def write(self, part: dict) -> None:
        idx, label = part["idx"], part["label"]
        if self.counts is not None and idx not in self.counts.done:
            # before the results row: a kill between the two repeats identical counts
            self.counts.write({c: part[c] for c in COUNTS_COLUMNS})
        row = {c: part[c] for c in ("idx", "label", "predict", "radius", "sigma", "time")}
        if self.memory is not None:
            resolved = self.memory.resolve_and_store(
                self.load_input(idx), part["predict"], part["radius"], sigma=part["sigma"], idx=idx
            )
            row.update(
                predict=resolved.predict,
                radius=resolved.radius,
                mc_predict=part["predict"],
                mc_radius=part["radius"],
            )
        row["correct"] = int(row["predict"] == label)
        self.writer.write(row)
        if self.on_row:
            self.on_row(row)

    def close(self) -> None:
        self.writer.close()
        if self.counts is not None:
            self.counts.close()


def certify_dataset(
    model: nn.Module,
    dataset,
    out: str,
    *,
    n0: int,
    n: int,
    alpha: float,
    sigma: float | None = None,
    sigmas: dict[int, float] | None = None,
    batch: int | None = None,
    selection: Selection = Selection(),
    seed: int = 0,
    memory: CertificationMemory | None = None,
    settings: dict | None = None,
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
    amp: str | None = None,
    compile: bool = False,
    counts: str | None = None,
    pilot: int = 0,
    tolerance: float = 0.01,
    shard: Shard = ONE_PROCESS,
) -> str:
    """CERTIFY every selected input (fixed `sigma`, or per-input `sigmas` by dataset index).

    With a `memory`, inputs are resolved against it online in index order, and the row keeps
    both the Monte Carlo certificate (mc_predict, mc_radius) and the resolved answer.
    `batch` None: automatic; `amp`, `compile`: see `Smooth`. `counts`: also write each
    input's vote counts there (COUNTS_COLUMNS), from which `recertify` recomputes the Monte
    Carlo certificate at another alpha without sampling again. `pilot` > 0: input-specific
    sample sizes (`Smooth.certify_batch_adaptive`, radius `tolerance`); each row's N is in
    the counts file. `shard`: this worker's place in a sharded run (see `ddrs.shard`; only
    rank 0 needs the memory).
    """
    if (sigma is None) == (sigmas is None):
        raise InputError("give exactly one of a fixed sigma or a per-input sigmas file")
    check_run_args(n=n, alpha=alpha, n0=n0, batch=batch, selection=selection, sigma=sigma)
    selected = selection.indices(len(dataset))
    check_sigmas_cover(selected, sigmas)
    if pilot and not (_is_count(pilot) and math.isfinite(tolerance) and tolerance >= 0):
        raise InputError(
            f"--pilot must be a positive integer and --radius-tolerance finite and >= 0, got "
            f"{pilot!r} and {tolerance!r}"
        )
    if counts is not None and row_count(out) and not row_count(counts):
        raise ResultsFileError(
            f"{out} already has rows and {counts} has none: --counts must be given from the "
            "start of a run (or choose another --out)"
        )
    smooth = Smooth(model, dataset.info.num_classes, seed=seed, amp=amp, compile=compile)
    group_size = _group_size(n, smooth.batch_size(batch, dataset.info.input_shape))
    settings = settings or {}

    inputs = {}  # the group being certified, for the memory (a merge reloads the item)

    def certify_group(group: list[int]) -> list[dict]:
        x, labels = _stack(dataset, group)
        inputs.clear()
        inputs.update(zip(group, x))
        group_sigma = _sigmas_for(group, sigma, sigmas)
        t0 = time.perf_counter()
        if pilot:
            certificates = smooth.certify_batch_adaptive(
                x, group_sigma, n0, n, alpha, pilot, tolerance, batch, keys=group
            )
        else:
            certificates = smooth.certify_batch(x, group_sigma, n0, n, alpha, batch, keys=group)
        elapsed = (time.perf_counter() - t0) / len(group)
        return [
            _part_row(idx, labels[i], certificates[i], n0, seed, elapsed)
            for i, idx in enumerate(group)
        ]

    def load_input(idx: int) -> torch.Tensor:
        return inputs[idx] if idx in inputs else dataset[idx][0]

    def open_results() -> _CertifyResults:
        return _CertifyResults(out, settings, counts, memory, on_row, load_input)

    _write_rows(
        out,
        open_results,
        CERTIFY_PART_COLUMNS,
        settings,
        selected,
        group_size,
        certify_group,
        "certify",
        progress,
        shard,
        samples_of=lambda rows: sum(n0 + pilot + row["n"] for row in rows),
    )
    return out


def _write_rows(
    out: str,
    open_results: Callable[[], ResultsWriter | _CertifyResults],
    part_columns: tuple[str, ...],
    settings: dict,
    selected: list[int],
    group_size: int,
    rows_of: Callable[[list[int]], list[dict]],
    desc: str,
    progress: bool,
    shard: Shard,
    samples_of: Callable[[list[dict]], int] | None = None,
) -> None:
    """The loop of every run: the selected inputs not yet in the results, group by group,
    each group's rows written as they come; in one process, or sharded (rows in part files,
    merged into the results in index order by rank 0). `samples_of(rows)`: show samples/s."""

    def compute(todo: list[int], write: Callable[[dict], None], label: str) -> None:
        bar = _progress(len(todo), label, progress and shard.is_main)
        start, samples = time.perf_counter(), 0
        for group in _groups(todo, group_size):
            rows = rows_of(group)
            for row in rows:
                write(row)
            bar.update(len(group))
            if samples_of is not None:
                samples += samples_of(rows)
                rate = samples / (time.perf_counter() - start)
                bar.set_postfix(samples_s=f"{rate:,.0f}")
        bar.close()

    if not shard.enabled and not parts_dir(out).exists():
        results = open_results()
        try:
            compute(_todo(selected, results), results.write, desc)
        finally:
            results.close()
        return
    opened: list = []

    def open_and_check() -> set[int]:
        opened.append(open_results())
        _todo(selected, opened[0])
        return opened[0].done

    try:
        run_sharded(
            shard,
            out=out,
            columns=part_columns,
            settings=settings,
            open_results=open_and_check,
            selected=selected,
            compute=lambda share, emit: compute(share, emit, f"{desc}, rank 0 of {shard.world}"),
            merge=lambda row: opened[0].write(row),
        )
    finally:
        for results in opened:
            results.close()


def predict_dataset(
    model: nn.Module,
    dataset,
    out: str,
    *,
    n: int,
    alpha: float,
    sigma: float | None = None,
    sigmas: dict[int, float] | None = None,
    batch: int | None = None,
    selection: Selection = Selection(),
    seed: int = 0,
    settings: dict | None = None,
    progress: bool = True,
    amp: str | None = None,
    compile: bool = False,
    shard: Shard = ONE_PROCESS,
) -> str:
    """PREDICT every selected input; rows `idx label predict correct time`."""
    if (sigma is None) == (sigmas is None):
        raise InputError("give exactly one of a fixed sigma or a per-input sigmas file")
    check_run_args(n=n, alpha=alpha, batch=batch, selection=selection, sigma=sigma)
    selected = selection.indices(len(dataset))
    check_sigmas_cover(selected, sigmas)
    smooth = Smooth(model, dataset.info.num_classes, seed=seed, amp=amp, compile=compile)

    def rows_of(group: list[int]) -> list[dict]:
        x, labels = _stack(dataset, group)
        t0 = time.perf_counter()
        answers = smooth.predict_batch(
            x, _sigmas_for(group, sigma, sigmas), n, alpha, batch, keys=group
        )
        elapsed = round((time.perf_counter() - t0) / len(group), 4)
        return [
            {"idx": idx, "label": label, "predict": answer, "correct": int(answer == label),
             "time": elapsed}
            for idx, label, answer in zip(group, labels, answers)
        ]  # fmt: skip

    group_size = _group_size(n, smooth.batch_size(batch, dataset.info.input_shape))
    settings = settings or {}
    _write_rows(
        out,
        lambda: ResultsWriter(out, PREDICT_COLUMNS, settings),
        PREDICT_COLUMNS,
        settings,
        selected,
        group_size,
        rows_of,
        "predict",
        progress,
        shard,
    )
    return out


def sigma_dataset(
    model: nn.Module,
    dataset,
    out: str,
    *,
    sigma0: float,
    search: str = "certified",
    options: dict | None = None,
    batch: int | None = None,
    selection: Selection = Selection(),
    seed: int = 0,
    settings: dict | None = None,
    progress: bool = True,
    shard: Shard = ONE_PROCESS,
) -> str:
    """Choose a sigma for every selected input with `search` (a name in sigma.SEARCHES:
    "certified", "ascent" or "grid") and its `options`; rows `idx sigma sigma0 radius_before
    radius_after time` (the search's score at sigma0 and at the chosen sigma)."""
    options = options or {}
    check_search_options(search, options)
    if not (isinstance(sigma0, (int, float)) and math.isfinite(sigma0) and sigma0 > 0):
        raise InputError(f"sigma0 must be finite and > 0, got {sigma0!r}")
    if batch is not None and (not isinstance(batch, int) or batch < 1):
        raise InputError(f"batch must be a positive integer, got {batch!r}")
    batch = batch or auto_batch_size(model, dataset.info.input_shape)

    def rows_of(group: list[int]) -> list[dict]:
        x, _ = _stack(dataset, group)
        t0 = time.perf_counter()
        found = SEARCHES[search](model, x, sigma0, seed=seed, keys=group, batch=batch, **options)
        elapsed = round((time.perf_counter() - t0) / len(group), 4)
        return [
            {"idx": idx, "sigma": float(found.sigma[i]), "sigma0": sigma0,
             "radius_before": float(found.radius_before[i]),
             "radius_after": float(found.radius_after[i]), "time": elapsed}
            for i, idx in enumerate(group)
        ]  # fmt: skip

    group_size = max(1, min(100, batch // options.get("samples", 1)))
    settings = settings or {}
    _write_rows(
        out,
        lambda: ResultsWriter(out, SIGMA_COLUMNS, settings),
        SIGMA_COLUMNS,
        settings,
        selection.indices(len(dataset)),
        group_size,
        rows_of,
        "sigma",
        progress,
        shard,
    )
    return out
