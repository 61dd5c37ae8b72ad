"""What the digits end-to-end runs write, as a comparable snapshot: the check that a refactor
changes no output.

    .venv/bin/python benchmarks/outputs_snapshot.py OUT_DIR            # run and record
    .venv/bin/python benchmarks/outputs_snapshot.py --compare A B      # compare two snapshots

Runs, on the built-in digits: training (two epochs), certify with a memory and counts,
recertify, the certified sigma search and certify through the memory, predict, a sharded
certify (2 workers), experts routed through a memory, a router and dual smoothing, memory
apply and stats, served answers (a real `ddrs serve`), and the quickstart's reduced table.
Each results file is recorded without its `time` column (and a training log without its
timing columns); `--compare` prints every file that differs, and exits 1 if any does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

TIMING_COLUMNS = {"time", "epoch_time", "throughput"}


def ddrs(*argv: str, cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    subprocess.run(
        [sys.executable, "-m", "ddrs", *argv],
        cwd=cwd,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run_all(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    common = [
        "--dataset",
        "digits",
        "--device",
        "cpu",
        "--n0",
        "20",
        "--n",
        "400",
        "--alpha",
        "0.01",
        "--skip",
        "12",
    ]
    ddrs(
        "train",
        "--dataset",
        "digits",
        "--arch",
        "cnn",
        "--sigma",
        "0.25",
        "--epochs",
        "2",
        "--batch",
        "64",
        "--lr",
        "0.05",
        "--train-subset",
        "1100",
        "--eval-max",
        "100",
        "--out",
        "model",
        cwd=out,
    )
    for sigma in ("0.12", "0.5"):
        ddrs(
            "train",
            "--dataset",
            "digits",
            "--arch",
            "cnn",
            "--sigma",
            sigma,
            "--epochs",
            "2",
            "--batch",
            "64",
            "--lr",
            "0.05",
            "--train-subset",
            "1100",
            "--eval-max",
            "100",
            "--out",
            f"model{sigma}",
            cwd=out,
        )
    model = ["--checkpoint", "model/last.pt"]
    ddrs(
        "certify",
        *model,
        *common,
        "--sigma",
        "0.25",
        "--memory",
        "fixed.sqlite",
        "--counts",
        "counts.tsv",
        "--out",
        "fixed.tsv",
        cwd=out,
    )
    ddrs("recertify", "counts.tsv", "--alpha", "0.001", "--out", "recertified.tsv", cwd=out)
    ddrs(
        "sigma",
        *model,
        "--dataset",
        "digits",
        "--device",
        "cpu",
        "--sigma0",
        "0.25",
        "--n",
        "400",
        "--alpha",
        "0.01",
        "--skip",
        "12",
        "--samples",
        "16",
        "--out",
        "sigmas.tsv",
        cwd=out,
    )
    ddrs(
        "certify",
        *model,
        *common,
        "--sigmas",
        "sigmas.tsv",
        "--memory",
        "dd.sqlite",
        "--out",
        "dd.tsv",
        cwd=out,
    )
    ddrs(
        "predict",
        *model,
        "--dataset",
        "digits",
        "--device",
        "cpu",
        "--sigma",
        "0.25",
        "--n",
        "400",
        "--alpha",
        "0.01",
        "--skip",
        "12",
        "--out",
        "predict.tsv",
        cwd=out,
    )
    ddrs(
        "certify",
        *model,
        *common,
        "--sigma",
        "0.25",
        "--nproc-per-node",
        "2",
        "--out",
        "sharded.tsv",
        cwd=out,
    )
    experts = [
        "--expert",
        "model0.12/last.pt:0.12",
        "--expert",
        "model/last.pt:0.25",
        "--expert",
        "model0.5/last.pt:0.5",
    ]
    ddrs(
        "sigma",
        *experts,
        "--dataset",
        "digits",
        "--device",
        "cpu",
        "--n",
        "400",
        "--alpha",
        "0.01",
        "--skip",
        "12",
        "--samples",
        "16",
        "--out",
        "routes.tsv",
        cwd=out,
    )
    ddrs(
        "certify",
        *experts,
        *common,
        "--sigmas",
        "routes.tsv",
        "--memory",
        "routed.sqlite",
        "--out",
        "routed.tsv",
        cwd=out,
    )
    ddrs(
        "train-router",
        *experts,
        "--dataset",
        "digits",
        "--arch",
        "cnn",
        "--sigma",
        "0.5",
        "--epochs",
        "2",
        "--batch",
        "64",
        "--lr",
        "0.05",
        "--label-samples",
        "16",
        "--label-n",
        "400",
        "--out",
        "router",
        cwd=out,
    )
    ddrs("certify", *experts, *common, "--router", "router/last.pt", "--out", "dual.tsv", cwd=out)
    ddrs(
        "memory",
        "apply",
        "fixed.tsv",
        *model,
        "--dataset",
        "digits",
        "--memory",
        "applied.sqlite",
        "--out",
        "applied.tsv",
        cwd=out,
    )
    stats = subprocess.run(
        [sys.executable, "-m", "ddrs", "memory", "stats", "dd.sqlite", "--json"],
        cwd=out,
        capture_output=True,
        text=True,
        check=True,
    )
    (out / "memory-stats.json").write_text(stats.stdout)
    served(out)
    ddrs("quickstart", "--quick", "--out", "quickstart", cwd=out)


def served(out: Path) -> None:
    """Six queries to a real `ddrs serve` (one of them a repeat); their answers."""
    import socket

    from ddrs.data import get_dataset

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ddrs",
            "serve",
            "--checkpoint",
            "model/last.pt",
            "--dataset",
            "digits",
            "--memory",
            "served.sqlite",
            "--sigma0",
            "0.25",
            "--samples",
            "16",
            "--n0",
            "20",
            "--n",
            "400",
            "--alpha",
            "0.01",
            "--device",
            "cpu",
            "--port",
            str(port),
        ],
        cwd=out,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        test = get_dataset("digits", "test")
        answers = []
        for i in (0, 1, 2, 3, 4, 0):
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/certify",
                data=json.dumps({"input": test[i][0].tolist()}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=120) as response:
                answers.append(json.loads(response.read()))
        (out / "served.json").write_text(json.dumps(answers, indent=1, sort_keys=True) + "\n")
    finally:
        server.terminate()
        server.wait(timeout=120)


def comparable(path: Path) -> bytes:
    """A file's bytes without timing columns (TSV and CSV), as they are otherwise."""
    if path.suffix not in (".tsv", ".csv"):
        return path.read_bytes()
    sep = "\t" if path.suffix == ".tsv" else ","
    lines = path.read_text().splitlines()
    if not lines:
        return b""
    header = lines[0].split(sep)
    keep = [i for i, name in enumerate(header) if name not in TIMING_COLUMNS]
    return "\n".join(sep.join(row.split(sep)[i] for i in keep) for row in lines).encode()


def digests(folder: Path) -> dict[str, str]:
    wanted = (".tsv", ".csv", ".json", ".md")
    return {
        str(p.relative_to(folder)): hashlib.sha256(comparable(p)).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix in wanted and not p.name.endswith(".settings.json")
    }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out", nargs="?", help="folder to run in and record")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two snapshot folders")
    args = p.parse_args()
    if args.compare:
        a, b = (digests(Path(f)) for f in args.compare)
        differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        for name in differ:
            print(f"differs: {name}")
        print(f"{len(set(a) | set(b))} files compared, {len(differ)} differ")
        return 1 if differ else 0
    run_all(Path(args.out))
    print(f"{len(digests(Path(args.out)))} files recorded in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
