"""Sharded runs: one certify / predict / sigma run split over processes and machines.

Workers are started by torch.distributed's own launcher (`ddrs ... --nproc-per-node K`, or
`torchrun` across machines). Every worker takes a deterministic share of the inputs left to
do (every world-th one, in index order) and writes its rows to its own part file,
`OUT.parts/part-RANK.tsv`, so that a killed run resumes from what each worker finished.
Rank 0 alone writes the results file: it merges the parts in index order and, with a memory,
resolves each input against it (one writer, in index order). Noise is keyed by (seed,
stream, dataset index), so the merged file equals a one-process run in every column but
time.

Only small control messages cross processes (the list of indices to do, the finished rows),
so the process group is always Gloo, also on GPUs; each worker uses its own device.
Part files are read by the worker that wrote them and sent to rank 0, so the machines need no
shared file system.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from ddrs.errors import DDRSError, ResultsFileError
from ddrs.results import ResultsWriter, read_table

# a worker may wait for the slowest one for as long as a long certification takes
COLLECTIVE_TIMEOUT = timedelta(days=7)


class OtherRankError(DDRSError):
    """An error found by rank 0 and already printed there; the other ranks stop quietly."""

    quiet = True


@dataclass(frozen=True)
class Shard:
    """This process's place in a sharded run (rank 0 of 1: not sharded)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, todo: list[int]) -> list[int]:
        return todo[self.rank :: self.world]


ONE_PROCESS = Shard()


LAUNCHED_BY_DDRS = "DDRS_LAUNCHED_WORKER"  # set for workers this process starts


def quiet_on_interrupt() -> bool:
    """A worker whose launcher is a ddrs process: that one reports an interruption."""
    return os.environ.get(LAUNCHED_BY_DDRS) == "1" or int(os.environ.get("RANK", "0")) > 0


def in_worker() -> bool:
    """True inside a process started by torchrun or `--nproc-per-node` (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current_shard() -> Shard:
    """Join the process group the launcher describes (Gloo); rank 0 of 1 outside one."""
    if not in_worker():
        return Shard()
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    return Shard(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def worker_device(name: str) -> str:
    """One device per worker: `cuda` (or `auto` with CUDA) becomes cuda:LOCAL_RANK."""
    if in_worker() and name in ("cuda", "auto"):
        import torch

        if torch.cuda.is_available():
            return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return name


def _worker_main(argv: list[str]) -> int:
    from ddrs.cli import main

    code = main(argv)
    if code:
        raise SystemExit(code)  # a failed worker must stop the others (the launcher does it)
    return code


def launch(argv: list[str], nproc: int) -> int:
    """Run `ddrs ARGV` in `nproc` workers on this machine (torch.distributed's launcher)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in list(logging.root.manager.loggerDict):  # the launcher's own chatter
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"ddrs-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.5,
    )
    # the workers inherit this process's environment: split the cores between them
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = threads or str(_threads_per_worker(nproc))
    os.environ[LAUNCHED_BY_DDRS] = "1"
    try:
        elastic_launch(config, _worker_main)(argv)
    except SignalException:
        raise KeyboardInterrupt from None  # Ctrl-C: the workers were stopped, rows are kept
    except ChildFailedError as error:
        codes = sorted({failure.exitcode for failure in error.failures.values()})
        if 2 not in codes:  # 2: a worker printed its ddrs error (the others were stopped)
            raise DDRSError(
                f"a worker stopped (exit code {codes}); the rows finished so far are kept in "
                "the part files: re-run the same command to resume"
            ) from None
        return 2
    finally:
        del os.environ[LAUNCHED_BY_DDRS]
        if threads is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = threads
    return 0


def _threads_per_worker(nproc: int) -> int:
    return max(1, (os.cpu_count() or 1) // nproc)


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
            rows.setdefault(idx, {c: table[c][k].item() for c in columns})
    return rows


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
def gather_to_main(value, shard: Shard) -> list | None:
    """Every rank's `value` on rank 0 (None elsewhere)."""
    if not shard.enabled:
        return [value]
    received = [None] * shard.world if shard.is_main else None
    dist.gather_object(value, received, dst=0)
    return received


def from_main(value, shard: Shard):
    """Rank 0's `value` on every rank."""
    if not shard.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(step: Callable[[], object], shard: Shard):
    """Run `step` on rank 0 and return its result on every rank; an error it raises is raised
    on every rank (quietly on the others), so no rank waits for one that stopped."""
    result, error = None, None
    if shard.is_main:
        try:
            result = step()
        except DDRSError as caught:
            error = caught
    message = from_main(None if error is None else str(error), shard)
    if error is not None:
        raise error
    if message is not None:
        raise OtherRankError(message)
    return from_main(result, shard)


def run_sharded(
    shard: Shard,
    *,
    out,
    columns: tuple[str, ...],
    settings: dict,
    open_results: Callable[[], set[int]],
    selected: list[int],
    compute: Callable[[list[int], Callable[[dict], None]], None],
    merge: Callable[[dict], None],
) -> None:
    """The sharded run's protocol (also used by one process that finds part files of a
    killed sharded run, so that their rows are not computed again).

    `open_results()` (rank 0) opens the results file and returns the indices it holds;
    `compute(share, emit)` (every rank) works through its share and emits each row (part-file
    columns); `merge(row)` (rank 0) turns a part row into results rows, in index order.
    """
    found = gather_to_main(_read_parts_or_error(out, columns, settings), shard)
    state: dict = {}

    def prepare() -> list[int]:
        errors = [f for f in found if isinstance(f, str)]
        if errors:
            raise ResultsFileError(errors[0])
        done = open_results()
        pending: dict[int, dict] = {}
        for rows in found:
            for idx, row in rows.items():
                pending.setdefault(idx, row)
        state.update(pending=pending, done=_merge_prefix(selected, done, pending, merge))
        return [i for i in selected if i not in state["done"] and i not in pending]

    todo = agree(prepare, shard)
    finished: list[dict] = []
    with ResultsWriter(part_path(out, shard.rank), columns, part_settings(settings, out)) as part:

        def emit(row: dict) -> None:
            part.write(row)
            finished.append(row)

        compute(shard.share(todo), emit)
    everything = gather_to_main(finished, shard)
    complete = False
    if shard.is_main:
        pending = state["pending"]
        for rows in everything:
            for row in rows:
                pending.setdefault(int(row["idx"]), row)
        done = _merge_prefix(selected, state["done"], pending, merge)
        complete = all(i in done for i in selected)
    if from_main(complete, shard):
        remove_parts(out)
    if shard.enabled:
        dist.barrier()


def _read_parts_or_error(out, columns, settings) -> dict[int, dict] | str:
    try:
        return read_parts(out, columns, settings)
    except DDRSError as error:
        return str(error)


def _merge_prefix(selected, done: set[int], pending: dict[int, dict], merge) -> set[int]:
    """Merge pending rows in index order, up to the first selected index nobody has done, so
    that the results file is always a prefix of the one-process run (a memory needs that
    order). Returns the indices the results file now holds."""
    done = set(done)
    for idx in selected:
        if idx in done:
            continue
        if idx not in pending:
            break
        merge(pending.pop(idx))
        done.add(idx)
    return done
