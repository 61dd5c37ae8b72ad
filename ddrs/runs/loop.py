"""The loop every run over a dataset shares: the inputs not yet written, group by group, each
row written as it comes, in one process or many (shard.py), with progress."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from ddrs.errors import ResultsFileError
from ddrs.launch import Rank
from ddrs.runs.progress import progress_bar
from ddrs.runs.shard import run_in_index_order

# 16 instead of 4 changed nothing measurable on CPU (docs/PERFORMANCE.md section 6), and a
# group is also the unit of progress and of work lost to a kill
GROUP_BATCHES = 4


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


def write_rows(
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
        bar = progress_bar(len(todo), label, progress and rank.is_main)
        start, samples = time.perf_counter(), 0
        for group in groups(todo, source.group_size):
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
        refuse_strays(selected, opened[0], out)
        return opened[0].done

    try:
        run_in_index_order(
            rank,
            out=out,
            columns=source.part_columns,
            settings=settings,
            open_results=open_and_check,
            selected=selected,
            compute=compute,
            merge=lambda row: opened[0].write(row),
        )
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
    return (
        f"note: the {len(indices)} inputs this run covers hold {covered} of the dataset's "
        f"{total} classes (is it sorted by class?); spread them with --skip instead of "
        "cutting with --max"
    )


def refuse_strays(indices: list[int], outputs: Outputs, out: str) -> None:
    stray = sorted(outputs.done - set(indices))
    if stray:
        raise ResultsFileError(
            f"{out} holds rows for indices this selection does not include (e.g. "
            f"{stray[0]}, {len(stray)} in all): resume with its --skip/--max, or another --out"
        )


def groups(indices: list[int], size: int) -> Iterator[list[int]]:
    for lo in range(0, len(indices), size):
        yield indices[lo : lo + size]


def group_size(n: int, batch: int) -> int:
    """Inputs certified together: enough for GROUP_BATCHES forward batches when n is small
    (the engine packs many inputs into one forward pass), one input when n is large."""
    return max(1, min(256, math.ceil(GROUP_BATCHES * batch / n)))


def stack(dataset, group: list[int]):
    items = [dataset[i] for i in group]
    return torch.stack([item[0] for item in items]), [int(item[1]) for item in items]
