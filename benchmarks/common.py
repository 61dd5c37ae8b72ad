"""Shared helpers of the benchmarks: machine description, interleaved timing, tables, JSON.

The benchmark machines are shared and often loaded, so every benchmark compares variants
*side by side*: variants run in turn (the order rotated every round), each is repeated, and
the medians are compared as ratios. Absolute times are printed only for context.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return " ".join(
                        f for f in ("avx2", "fma", "avx512f", "avx512_bf16") if f in flags
                    )
    except OSError:
        pass
    return ""


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def code_version() -> str:
    """Short hashes of the ddrs modules the benchmarks exercise (the tree changes often)."""
    import hashlib

    parts = []
    for name in ("core", "runs", "memory", "train/loop.py"):
        path = REPO / "ddrs" / name
        files = sorted(path.glob("*.py")) if path.is_dir() else [path]  # a package: all of it
        try:
            digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:8]
        except OSError:
            digest = "missing"
        parts.append(f"{name}:{digest}")
    return " ".join(parts)


def machine_info() -> dict:
    return {
        "ddrs_code": code_version(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average_at_start": load_average(),
    }


def print_machine(title: str, args: argparse.Namespace | None = None) -> dict:
    info = machine_info()
    print(f"# {title}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"machine: {info['cpu']} ({info['cpu_flags']}), {info['logical_cpus']} logical CPUs, "
        f"torch {info['torch']}, {info['torch_threads']} threads, python {info['python']}"
    )
    print(f"load average (1, 5, 15 min) at start: {info['load_average_at_start']}")
    print(f"ddrs code: {info['ddrs_code']}")
    if args is not None:
        print(f"arguments: {vars(args)}")
    print(flush=True)
    return info


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a run of about one minute")
    parser.add_argument("--json", metavar="OUT", help="also save the numbers to this JSON file")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def interleaved(
    variants: dict[str, Callable[[], object]],
    repeats: int,
    *,
    warmup: bool = False,
    verbose: bool = True,
) -> dict[str, list[float]]:
    """Seconds of each call of each variant, `repeats` rounds; the order rotates each round so
    that no variant always runs first (or right after the same neighbour)."""
    names = list(variants)
    if warmup:
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, _ = timed(variants[name])
            times[name].append(seconds)
            if verbose:
                print(f"  round {r + 1}/{repeats}  {name:<40s} {seconds:9.3f} s", flush=True)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> str:
    """min-max over the repeats, as a percentage of the median (a crude noise indicator)."""
    m = median(values)
    if len(values) < 2 or m == 0:
        return "-"
    return f"±{50 * (max(values) - min(values)) / m:.0f}%"


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of the per-round ratios num[i] / den[i] (rounds are run side by side)."""
    return median([a / b for a, b in zip(num, den)])


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; floats are printed with 4 significant digits."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save_json(path: str | None, data: dict) -> None:
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, default=_jsonable))
    print(f"numbers saved to {out}")


def _jsonable(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (Linux) in bytes, else 0."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _proc_status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM)."""
    return _proc_status_bytes("VmHWM")


def mib(n: float) -> float:
    return n / (1 << 20)


def _cpu_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (all CPUs, /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class LoadMonitor:
    """How busy *other* processes kept the machine while a benchmark ran.

    other_load = (machine busy CPU seconds - this process's CPU seconds) / wall seconds, in
    cores: 0 on an idle machine, 1.0 means one core was fully taken by someone else.
    """

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self.t0 = time.perf_counter()
        try:
            self.busy0 = _cpu_busy_seconds()
        except OSError:
            self.busy0 = math.nan
        self.own0 = _own_cpu_seconds()

    def read(self) -> dict:
        wall = time.perf_counter() - self.t0
        try:
            busy = _cpu_busy_seconds() - self.busy0
        except OSError:
            busy = math.nan
        own = _own_cpu_seconds() - self.own0
        return {
            "wall_s": wall,
            "own_cpu_s": own,
            "other_load_cores": max(0.0, (busy - own) / wall) if wall > 0 else math.nan,
            "load_average_at_end": load_average(),
        }

    def report(self) -> dict:
        r = self.read()
        print(
            f"\nwall time {r['wall_s']:.0f} s; other processes kept "
            f"{r['other_load_cores']:.2f} of {os.cpu_count()} cores busy on average "
            f"(load average at end: {r['load_average_at_end']})"
        )
        return r
