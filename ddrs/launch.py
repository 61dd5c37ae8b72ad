"""Process launch: how a run becomes one or many processes, which device each uses, and how
they stop.

One process is rank 0 of a world of 1; `ddrs ... --nproc-per-node K` starts K workers on this
machine through torch.distributed's own launcher, and `torchrun` starts them across machines.
Every worker runs the entry point it is handed (the command line's `main`), joins the process
group the launcher describes (`join`), works on its own device (`device_for`), and leaves the
group before it exits (`leave`).

Which machine is rank 0 (the one that writes results files): torchrun's static rendezvous
(`--master-addr/--master-port`, its default) numbers ranks by `--node-rank`, so the machine
started with `--node-rank 0` is rank 0 whatever the order machines start in. (A c10d
rendezvous ignores `--node-rank` and ranks machines in arrival order.)
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ddrs.core.checks import integer
from ddrs.errors import DDRSError, InputError

# a worker may wait for the slowest one for as long as a long certification takes
COLLECTIVE_TIMEOUT = timedelta(days=7)
LAUNCHED_BY_DDRS = "DDRS_LAUNCHED_WORKER"  # set for the workers a ddrs process starts


@dataclass(frozen=True)
class Rank:
    """This process's place among the processes of a run (rank 0 of 1: one process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    comm_device: str = "cpu"  # where collective tensors live (cuda for NCCL)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, todo: list[int]) -> list[int]:
        """This rank's part of `todo`: every world-th item, from its rank on."""
        return todo[self.rank :: self.world]


ONE_PROCESS = Rank()


def in_worker() -> bool:
    """True inside a process started by torchrun or `--nproc-per-node` (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(backend: str = "gloo") -> Rank:
    """Join the process group the launcher describes in the environment; rank 0 of 1
    outside one. Gloo for runs that send only rows and index lists; NCCL for training on
    GPUs."""
    if not in_worker():
        return ONE_PROCESS
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    comm_device = f"cuda:{local_rank}" if backend == "nccl" else "cpu"
    return Rank(dist.get_rank(), dist.get_world_size(), local_rank, comm_device)


def leave(together: bool = False) -> None:
    """Leave the process group (a group left open can abort the interpreter at exit:
    "terminate called without an active exception"). `together`: wait for every rank first,
    after a finished run, so that none tears its connections down while another still
    needs them; never after an error (the others may never come)."""
    if dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def device_for(name: str) -> torch.device:
    """The device a process works on: `auto` is CUDA when there is one, and in a worker
    `auto`/`cuda` become its own GPU, cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and in_worker():
        name = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return torch.device(name)


def starts_workers(nproc: int, device: str) -> bool:
    """True when this process should start `nproc` workers rather than work itself (nproc >
    1 outside a worker); refuses more workers than GPUs when the workers would use CUDA."""
    integer("--nproc-per-node", nproc)
    starts = nproc > 1 and not in_worker()
    gpus = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    if starts and 0 < gpus < nproc:
        raise InputError(
            f"--nproc-per-node {nproc} gives each worker its own GPU, and this machine has "
            f"{gpus}; use at most {gpus} (or --device cpu)"
        )
    return starts


def quiet_on_interrupt() -> bool:
    """A worker whose launcher is a ddrs process leaves reporting Ctrl-C to that one."""
    return os.environ.get(LAUNCHED_BY_DDRS) == "1" or int(os.environ.get("RANK", "0")) > 0


def worker_main(entry: Callable[[list[str]], int], argv: list[str]) -> int:
    """What each worker runs: the entry point on the launcher's arguments. A failed worker
    raises, so that the launcher stops the others."""
    code = entry(argv)
    if code:
        raise SystemExit(code)
    return code


def launch(entry: Callable[[list[str]], int], argv: list[str], nproc: int) -> int:
    """Run `entry(argv)` in `nproc` workers on this machine (torch.distributed's launcher).
    Returns 0, or 2 when a worker stopped on an error it printed; a Ctrl-C comes back as
    KeyboardInterrupt once the workers are stopped."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in list(logging.root.manager.loggerDict):  # the launcher's own chatter
        if name.startswith(("torch.distributed.elastic", "torch.multiprocessing")):
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
    os.environ["OMP_NUM_THREADS"] = threads or str(max(1, (os.cpu_count() or 1) // nproc))
    os.environ[LAUNCHED_BY_DDRS] = "1"
    try:
        elastic_launch(config, worker_main)(entry, argv)
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
