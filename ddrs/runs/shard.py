"""Sharded runs: one certify / predict / sigma run split over the processes of a launch
(`ddrs.launch`), and merged into one results file.

Every rank takes a deterministic share of the inputs left to do (every world-th one, in index
order, `Rank.share`) and writes its rows to its own part file, `OUT.parts/part-RANK.tsv`, so
that a killed run resumes from what each rank finished. Rank 0 alone writes the results file:
it merges rows in index order and, with a memory, resolves each input against it (one
writer, in index order). One process is world size 1 of the same protocol: its rows go
straight to the merge (no part files), and part files a killed sharded run left are merged
first. Noise is keyed by (seed, stream, dataset index), so the merged file equals a
one-process run in every column but time.

Only small control messages cross processes (the list of indices to do, the finished rows),
so the process group is Gloo, also on GPUs. Part files are read by the rank that wrote them
and sent to rank 0, so the machines need no shared file system.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from ddrs.errors import DDRSError, ResultsFileError
from ddrs.launch import Rank
from ddrs.results import ResultsWriter, read_table


class OtherRankError(DDRSError):
    """An error found by rank 0 and already printed there; the other ranks stop quietly."""

    quiet = True


# -- part files ---------------------------------------------------------------------------------
def parts_dir(out: str | os.PathLike) -> Path:
    return Path(f"{out}.parts")


def part_path(out: str | os.PathLike, rank: int) -> Path:
    return parts_dir(out) / f"part-{rank:05d}.tsv"


def part_settings(settings: dict, out) -> dict:
    return {**settings, "part_of": str(out)}


def read_parts(out, columns: tuple[str, ...], settings: dict) -> dict[int, dict]:
    """Rows of every part file this machine sees ({idx: row}); refuses parts of other
    settings. A torn last line (a killed worker) is left out."""
    rows: dict[int, dict] = {}
    for path in sorted(parts_dir(out).glob("part-*.tsv")):
        if b"\n" not in path.read_bytes():
            continue  # not even a complete header
        ResultsWriter.check_settings(path, columns, part_settings(settings, out))
        table = read_table(path, required=columns, drop_torn_line=True)
        for k, idx in enumerate(table["idx"].tolist()):
            rows.setdefault(idx, {c: _scalar(table[c][k]) for c in columns})
    return rows


def _scalar(value):
    """A numpy number as a Python one; a string column's value as it is."""
    return value.item() if hasattr(value, "item") else value


def remove_parts(out) -> None:
    """Remove the part files (ranks sharing a file system may race on it: that is fine)."""
    folder = parts_dir(out)
    try:
        for path in list(folder.iterdir()):
            path.unlink(missing_ok=True)
        folder.rmdir()
    except OSError:
        pass  # another rank removed it first, or a file appeared: harmless either way


# -- collectives (no-ops in one process) -------------------------------------------------------
def gather_to_main(value, rank: Rank) -> list | None:
    """Every rank's `value` on rank 0 (None elsewhere)."""
    if not rank.enabled:
        return [value]
    received = [None] * rank.world if rank.is_main else None
    dist.gather_object(value, received, dst=0)
    return received


def from_main(value, rank: Rank):
    """Rank 0's `value` on every rank."""
    if not rank.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(step: Callable[[], object], rank: Rank):
    """Run `step` on rank 0 and return its result on every rank; an error it raises is raised
    on every rank (quietly on the others), so no rank waits for one that stopped."""
    result, error = None, None
    if rank.is_main:
        try:
            result = step()
        except DDRSError as caught:
            error = caught
    message = from_main(None if error is None else str(error), rank)
    if error is not None:
        raise error
    if message is not None:
        raise OtherRankError(message)
    return from_main(result, rank)


class IndexOrderMerge:
    """Rank 0's merge: rows arrive in any order, and are merged in the selection's index
    order, up to the first index nobody has done yet, so that the results file is always a
    prefix of the one-process run (a memory needs that order)."""

    def __init__(self, selected: list[int], done: set[int], merge: Callable[[dict], None]):
        self.selected, self.done, self.merge = selected, set(done), merge
        self.pending: dict[int, dict] = {}
        self.position = 0  # selected[:position] are all done

    def add(self, row: dict) -> None:
        self.pending.setdefault(int(row["idx"]), row)

    def advance(self) -> None:
        while self.position < len(self.selected):
            idx = self.selected[self.position]
            if idx not in self.done:
                if idx not in self.pending:
                    return
                self.merge(self.pending.pop(idx))
                self.done.add(idx)
            self.position += 1

    @property
    def complete(self) -> bool:
        return self.position == len(self.selected)


def run_in_index_order(
    rank: Rank,
    *,
    out,
    columns: tuple[str, ...],
    settings: dict,
    open_results: Callable[[], set[int]],
    selected: list[int],
    compute: Callable[[list[int], Callable[[dict], None]], None],
    merge: Callable[[dict], None],
) -> None:
    """The protocol of every run, in one process or many.

    `open_results()` (rank 0) opens the results file and returns the indices it holds;
    `compute(share, emit)` (every rank) works through its share and emits each row (part-file
    columns); `merge(row)` (rank 0) turns a row into results rows, in index order.
    """
    found = gather_to_main(_read_parts_or_error(out, columns, settings), rank)
    merger: list[IndexOrderMerge] = []

    def prepare() -> list[int]:
        errors = [f for f in found if isinstance(f, str)]
        if errors:
            raise ResultsFileError(errors[0])
        merger.append(IndexOrderMerge(selected, open_results(), merge))
        for rows in found:
            for row in rows.values():
                merger[0].add(row)
        merger[0].advance()
        return [i for i in selected if i not in merger[0].done and i not in merger[0].pending]

    todo = agree(prepare, rank)
    if not rank.enabled:  # one process: each row is merged as soon as it is computed

        def emit(row: dict) -> None:
            merger[0].add(row)
            merger[0].advance()

        compute(todo, emit)
    else:
        finished: list[dict] = []
        part_file = part_path(out, rank.rank)
        with ResultsWriter(part_file, columns, part_settings(settings, out)) as part:

            def emit(row: dict) -> None:
                part.write(row)
                finished.append(row)

            compute(rank.share(todo), emit)
        everything = gather_to_main(finished, rank)
        if rank.is_main:
            for rows in everything:
                for row in rows:
                    merger[0].add(row)
            merger[0].advance()
    if from_main(rank.is_main and merger[0].complete, rank):
        remove_parts(out)
    if rank.enabled:
        dist.barrier()


def _read_parts_or_error(out, columns, settings) -> dict[int, dict] | str:
    try:
        return read_parts(out, columns, settings)
    except DDRSError as error:
        return str(error)
