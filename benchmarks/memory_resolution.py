"""Cost of one `resolve_and_store` as the memory grows: the full scan (before) against the exact
index (after), on SQLite and PostgreSQL, side by side in one run.

Entries are real images: the CIFAR-10 JPEG copy (`--cifar` folder, ImageFolder layout; train
and test images and their mirror images, so 120,000 distinct inputs) with their labels as
classes and radii drawn like a certified run's (30% abstentions at radius 0, the rest uniform
in [0, 0.8]). They are bulk-loaded into the store (the same rows `resolve_and_store` writes,
checksums included). Queries are other test images, slightly perturbed, each with a Monte
Carlo certificate of radius 0.5 of a random class; each query is resolved and stored, its
commit included (SQLite synchronous=FULL, PostgreSQL synchronous_commit on). Reported: the
median ms per query after the first (which loads the index), for
  * scan (before): the rule over every stored entry in RAM, as the memory did before the index;
  * index (after): the rule over the candidates the exact index keeps.
The curve: MNIST-size inputs (CIFAR images in grey, 28 x 28, shifted copies) up to --curve-max
entries, index only, SQLite.

A PostgreSQL server is started for the run (as the tests do: initdb in a temporary folder).

    .venv/bin/python benchmarks/memory_resolution.py --cifar data/cifar10
    .venv/bin/python benchmarks/memory_resolution.py --cifar data/cifar10 --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import print_machine, save_json, table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import PostgresServer  # noqa: E402
from ddrs.data import get_dataset  # noqa: E402
from ddrs.memory import CertificationMemory  # noqa: E402
from ddrs.memory.index import Index  # noqa: E402
from ddrs.memory.store import entry_checksum  # noqa: E402

FINGERPRINT = "benchmark"


class FullScan(Index):
    """The memory before the index: every stored entry is a candidate (a view of them all,
    as the scan of the in-RAM copy was)."""

    def candidates(self, x, predict, radius):
        return slice(0, self.n)


def cifar_images(root: str, count: int, grey28: bool = False) -> tuple[torch.Tensor, list[int]]:
    """`count` distinct inputs from the CIFAR-10 folder: images, then mirrored, then (28 x 28
    grey) shifted copies."""
    images, labels = [], []
    for split in ("train", "test"):
        data = get_dataset("cifar10", split, root, augment=False)
        images.append(
            data.images
            if hasattr(data, "images")
            else torch.stack([data[i][0] for i in range(len(data))])
        )
        labels += list(data.targets)
    x = torch.cat(images)
    x = x.float() / 255 if x.dtype == torch.uint8 else x
    if grey28:
        x = F.interpolate(x.mean(dim=1, keepdim=True), size=(28, 28), mode="area")
    copies, copy_labels, k = [x, x.flip(-1)], labels * 2, 0
    while sum(len(c) for c in copies) < count:
        k += 1
        copies.append(torch.roll(x, shifts=(k % 3 - 1, k // 3 % 3 - 1), dims=(-2, -1)))
        copy_labels += labels
    return torch.cat(copies)[:count].contiguous(), copy_labels[:count]


def bulk_load(location: str, x: torch.Tensor, labels: list[int]) -> None:
    """Append entries after the stored ones, as `resolve_and_store` writes them, in
    transactions of 5,000."""
    with CertificationMemory(location, FINGERPRINT, tuple(x.shape[1:]), cache_bytes=0) as memory:
        start = len(memory)
        rng = np.random.default_rng(start)
        flat = x.reshape(len(x), -1)
        for lo in range(0, len(x), 5000):
            with memory.store.serialised():
                for k in range(lo, min(lo + 5000, len(x))):
                    order = start + k
                    abstain = rng.random() < 0.3
                    c = -1 if abstain else int(labels[k])
                    r = 0.0 if abstain else float(rng.uniform(0, 0.8))
                    data = flat[k].numpy().astype("<f4").tobytes()
                    norm = float(flat[k].double().square().sum())
                    memory.store.insert(
                        (
                            order,
                            order,
                            data,
                            norm,
                            c,
                            r,
                            0.25,
                            c,
                            r,
                            0,
                            0,
                            time.time(),
                            entry_checksum(order, data, c, r),
                        )
                    )


def query_times(location: str, shape, queries: torch.Tensor, scan: bool) -> list[float]:
    """Seconds of each resolve_and_store (the first loads the index; it is left out)."""
    rng = np.random.default_rng(1)
    with CertificationMemory(location, FINGERPRINT, shape, cache_bytes=8 << 30) as memory:
        if scan:
            memory.index = FullScan(memory.dim)
        times = []
        for q in queries:
            start = time.perf_counter()
            memory.resolve_and_store(q, int(rng.integers(0, 10)), 0.5, sigma=0.25)
            times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifar", required=True, help="CIFAR-10 folder (ImageFolder layout)")
    parser.add_argument("--sizes", default="10000,50000,100000")
    parser.add_argument("--curve", default="10000,30000,100000,300000,1000000")
    parser.add_argument("--queries", type=int, default=31)
    parser.add_argument("--quick", action="store_true", help="sizes 2,000 and 10,000 only")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.curve, args.queries = "2000,10000", "2000,10000,30000", 11
    machine = print_machine("memory resolution: full scan against the exact index", args)
    sizes = [int(v) for v in args.sizes.split(",")]
    curve = [int(v) for v in args.curve.split(",")]
    results: dict = {"machine": machine, "args": vars(args), "table": [], "curve": []}
    with tempfile.TemporaryDirectory(prefix="ddrs-pg-bench-") as folder:
        server = PostgresServer(folder)
        try:
            x, labels = cifar_images(args.cifar, max(sizes) + args.queries)
            queries = (x[-args.queries :] + 0.01).clamp(0, 1)  # not stored: perturbed
            rows = []
            for size in sizes:
                locations = {
                    "SQLite": str(Path(folder) / f"cifar{size}.sqlite"),
                    "PostgreSQL": server.fresh_database(f"cifar{size}"),
                }
                for store, location in locations.items():
                    bulk_load(location, x[:size], labels[:size])
                    for name, scan in (("scan (before)", True), ("index (after)", False)):
                        seconds = query_times(location, (3, 32, 32), queries, scan)
                        ms = 1000 * statistics.median(seconds)
                        results["table"].append(
                            {"entries": size, "store": store, "method": name, "median_ms": ms}
                        )
                        rows.append([f"{size:,}", store, name, f"{ms:.1f}"])
                        print(rows[-1], flush=True)
            print(
                "\n## CIFAR-10 inputs (3 x 32 x 32): ms per resolve_and_store (median, commit "
                "included)"
            )
            print(table(["stored entries", "store", "method", "median ms"], rows))
            grey, grey_labels = cifar_images(args.cifar, max(curve) + args.queries, grey28=True)
            grey_queries = (grey[-args.queries :] + 0.01).clamp(0, 1)
            location, done = str(Path(folder) / "curve.sqlite"), 0
            for size in curve:
                bulk_load(location, grey[done:size], grey_labels[done:size])
                done = size
                ms = 1000 * statistics.median(
                    query_times(location, (1, 28, 28), grey_queries, False)
                )
                results["curve"].append({"entries": size, "median_ms": ms})
                print(size, f"{ms:.1f} ms", flush=True)
            first = results["curve"][0]
            print("\n## MNIST-size inputs (1 x 28 x 28), index, SQLite: the curve")
            print(
                table(
                    ["stored entries", "median ms", "x entries", "x time"],
                    [
                        [
                            f"{c['entries']:,}",
                            f"{c['median_ms']:.1f}",
                            f"{c['entries'] / first['entries']:.0f}",
                            f"{c['median_ms'] / first['median_ms']:.1f}",
                        ]
                        for c in results["curve"]
                    ],
                )
            )
        finally:
            server.stop("immediate")
    save_json(args.json, results)


if __name__ == "__main__":
    main()
