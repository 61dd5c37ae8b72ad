"""Sharded certification and input grouping, measured side by side through the CLI.

(a) `ddrs certify` in one process against `--nproc-per-node K` (K workers, the cores split
    between them), same model, inputs, N and batch; the merged results are checked equal to
    the one-process file in every column but time.
(b) At small N, inputs per engine call: enough inputs for 4 forward batches
    (runs.GROUP_BATCHES, the default) against 16, in one process.

Each call is a full CLI run (start-up and model loading included, as a user sees it), on
fresh output files. Variants run in turn, the order rotated every round; ratios are medians
of per-round ratios. Random weights: the time does not depend on them.

    .venv/bin/python benchmarks/sharded_certify.py --quick
    .venv/bin/python benchmarks/sharded_certify.py --arch cnn_small --dataset cifar10 \\
        --data-root data/cifar10 --inputs 40 --n 10000
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import tempfile
from pathlib import Path

from common import add_common_args, interleaved, median, paired_ratio, print_machine, table

from ddrs.data import get_dataset
from ddrs.models import build_model, save_checkpoint
from ddrs.results import read_table


def random_checkpoint(folder: Path, arch: str, dataset: str, data_root: str | None) -> str:
    info = get_dataset(dataset, "test", data_root, augment=False).info
    model = build_model(arch, info.num_classes, info.input_shape, info.mean, info.std)
    path = folder / f"{arch}.pt"
    meta = {
        "arch": arch,
        "num_classes": info.num_classes,
        "input_shape": list(info.input_shape),
        "mean": list(info.mean),
        "std": list(info.std),
        "dataset": dataset,
    }
    save_checkpoint(path, model, meta)
    return str(path)


def certify_command(args, checkpoint: str, out: Path, n: int, *extra: str) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "ddrs",
        "certify",
        "--checkpoint",
        checkpoint,
        "--dataset",
        args.dataset,
        "--sigma",
        "0.25",
        "--n0",
        "100",
        "--n",
        str(n),
        "--alpha",
        "0.001",
        "--max",
        str(args.inputs),
        "--batch",
        str(args.batch),
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]
    if args.data_root:
        command += ["--data-root", args.data_root]
    return command


GROUPING = """
import sys
import ddrs.runs
ddrs.runs.GROUP_BATCHES = int(sys.argv[1])
from ddrs.cli import main
raise SystemExit(main(sys.argv[2:]))
"""


def run(command: list[str]) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


def without_time(path: Path) -> dict:
    return {c: v.tolist() for c, v in read_table(path).items() if c != "time"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--arch", default="cnn")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-root")
    parser.add_argument("--inputs", type=int, default=60)
    parser.add_argument("--n", type=int, default=20_000, help="N of the sharding comparison")
    parser.add_argument("--small-n", type=int, default=1_000, help="N of the grouping one")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.inputs, args.n, args.repeats = 20, 5_000, 2
    print_machine("sharded certification and grouping", args)
    folder = Path(tempfile.mkdtemp(prefix="ddrs-shard-bench-"))
    checkpoint = random_checkpoint(folder, args.arch, args.dataset, args.data_root)
    counter = itertools.count()

    def fresh(name: str) -> Path:
        return folder / f"{name}-{next(counter)}.tsv"

    outs: dict[str, Path] = {}

    def variant(name: str, n: int, *extra: str, grouping: int | None = None):
        def call() -> None:
            outs[name] = fresh(name)
            command = certify_command(args, checkpoint, outs[name], n, *extra)
            if grouping is not None:
                command[1:3] = ["-c", GROUPING, str(grouping)]
            run(command)

        return call

    sharding = interleaved(
        {
            "one process": variant("one", args.n),
            f"{args.workers} workers": variant(
                "sharded", args.n, "--nproc-per-node", str(args.workers)
            ),
        },
        args.repeats,
    )
    assert without_time(outs["one"]) == without_time(outs["sharded"]), "sharded run differs"
    grouping = interleaved(
        {
            "group for 4 batches (default)": variant("g4", args.small_n, grouping=4),
            "group for 16 batches": variant("g16", args.small_n, grouping=16),
        },
        args.repeats,
    )
    assert without_time(outs["g4"]) == without_time(outs["g16"]), "grouping changed results"

    rows = []
    for label, times, base in (
        ("sharding", sharding, "one process"),
        ("grouping", grouping, "group for 4 batches (default)"),
    ):
        for name, seconds in times.items():
            rows.append(
                [
                    label,
                    name,
                    f"{median(seconds):.2f}",
                    f"{paired_ratio(times[base], seconds):.2f}x",
                ]
            )
    print()
    print(
        f"{args.arch} on {args.dataset}, {args.inputs} inputs, batch {args.batch}; sharding "
        f"at N {args.n:,}, grouping at N {args.small_n:,} (whole CLI runs, median s)"
    )
    print(table(["comparison", "variant", "seconds", "speed-up vs first"], rows))


if __name__ == "__main__":
    main()
