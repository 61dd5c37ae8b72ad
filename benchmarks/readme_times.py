"""The README's blocks on real data, timed: what the README says each command takes.

    .venv/bin/python benchmarks/readme_times.py --work /tmp/readme-times [--first-line L]
                     [--last-line L] [--archive cifar-10-python.tar.gz]

Runs README.md's bash blocks in order, *as written* (no size rule), in a fresh copy of the
repository (tests/readme.py makes it), and prints each block's line and wall-clock seconds.
The data block needs `cifar-10-python.tar.gz` in the work folder: given with --archive, or
built from the CIFAR-10 JPEG copy (`../shared/data/cifar10-jpeg.tar.gz`, ImageFolder) as the
python batches the CIFAR-10 site serves (uint8 rows of 3,072 values, R then G then B planes,
the images in a fixed random order). Run it alone on the machine: the times are what a user
of these cores would wait. Blocks that need a PostgreSQL server are skipped.
"""

from __future__ import annotations

import argparse
import io
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from readme import DATABASE, readme, run_bash, setup  # noqa: E402


def archive_from_jpeg_copy(jpeg_archive: Path, out: Path) -> Path:
    """`cifar-10-python.tar.gz` holding the JPEG copy's pixels."""
    from helpers import CIFAR_CLASSES

    from ddrs.data import get_dataset

    with tempfile.TemporaryDirectory() as folder:
        with tarfile.open(jpeg_archive) as packed:
            packed.extractall(folder, filter="data")
        splits = {
            split: get_dataset("cifar10", split, folder, augment=False)
            for split in ("train", "test")
        }
        rng = np.random.default_rng(0)
        with tarfile.open(out, "w:gz") as archive:

            def add(name: str, payload: dict) -> None:
                data = pickle.dumps(payload)
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))

            for split, dataset in splits.items():
                order = rng.permutation(len(dataset))
                images = dataset.images.numpy().reshape(len(dataset), 3072)[order]
                labels = np.asarray(dataset.targets)[order]
                names = (
                    [f"data_batch_{k}" for k in range(1, 6)] if split == "train" else ["test_batch"]
                )
                for name, rows, ys in zip(
                    names, np.array_split(images, len(names)), np.array_split(labels, len(names))
                ):
                    add(
                        name,
                        {
                            b"data": rows,
                            b"labels": [int(y) for y in ys],
                            b"batch_label": name.encode(),
                        },
                    )
            add("batches.meta", {b"label_names": [c.encode() for c in CIFAR_CLASSES]})
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work", help="folder to run in (default: a new temporary one)")
    p.add_argument("--archive", help="cifar-10-python.tar.gz (default: built from the JPEG copy)")
    p.add_argument("--jpeg-copy", default=str(REPO.parent / "shared/data/cifar10-jpeg.tar.gz"))
    p.add_argument("--first-line", type=int, default=0, help="first README line to run from")
    p.add_argument("--last-line", type=int, default=10**9, help="last README line to run")
    args = p.parse_args()

    namespace: dict = {}
    setup(namespace)  # a fresh copy of the repository and an environment
    if "postgres" in namespace:  # the database blocks are not timed here
        namespace["postgres"].stop("immediate")
    work = namespace["work"]
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        for item in work.iterdir():
            shutil.move(str(item), args.work)
        work = namespace["work"] = Path(args.work)
    (work / "cifar-10-python.tar.gz").unlink()
    if args.archive:
        shutil.copy(args.archive, work / "cifar-10-python.tar.gz")
    else:
        archive_from_jpeg_copy(Path(args.jpeg_copy), work / "cifar-10-python.tar.gz")
    state = work / ".readme-env"
    document = readme.parse(REPO / "README.md")
    print(f"work folder {work}", flush=True)
    for example in document.examples():
        if (
            not (args.first_line <= example.line <= args.last_line)
            or (example.region.evaluator is not run_bash)
            or DATABASE in example.parsed
        ):
            continue
        script = (
            f"set -euo pipefail\nif [ -f {state} ]; then source {state}; fi\n"
            f"{example.parsed}\nexport -p > {state}\n"
        )
        start = time.perf_counter()
        done = subprocess.run(
            ["bash", "-c", script], cwd=work, env=namespace["env"], capture_output=True, text=True
        )
        seconds = time.perf_counter() - start
        first = example.parsed.strip().splitlines()[0][:70]
        print(
            f"line {example.line:4d}  {seconds:8.1f} s  exit {done.returncode}  {first}", flush=True
        )
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-3000:])
            break


if __name__ == "__main__":
    main()
