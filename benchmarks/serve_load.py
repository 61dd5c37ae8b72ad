"""`ddrs serve` under load: certificates/s and latency, micro-batching on vs off; a kill -9 soak.

(a) For each concurrency (clients sending one query after another) and each setting of
    micro-batching (`--max-batch 32` against `--max-batch 1`), a fresh server on a fresh
    memory answers `--requests` certify queries (distinct digits test images); we report
    certificates/s over the run and the latency p50 / p99 seen by the clients. Settings run
    in turn (order rotated every round); ratios are medians of per-round ratios.
(b) Soak: `--kills` times, start the server on one memory, load it with 8 clients, kill -9 it
    at a random moment; at the end, every answer a client received must be in the memory as
    sent, `memory check` must pass. Prints answers sent vs stored.

Loopback only; the model has random weights (the cost does not depend on them).

    .venv/bin/python benchmarks/serve_load.py --quick
    .venv/bin/python benchmarks/serve_load.py --n 1000 --requests 96 --repeats 2 --kills 10
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from common import add_common_args, median, paired_ratio, print_machine, table

from ddrs.data import get_dataset
from ddrs.memory import CertificationMemory
from ddrs.models import build_model, save_checkpoint


def random_checkpoint(folder: Path) -> str:
    data = get_dataset("digits", "test")
    info = data.info
    model = build_model("cnn", info.num_classes, info.input_shape, info.mean, info.std)
    path = folder / "cnn.pt"
    save_checkpoint(
        path,
        model,
        {
            "arch": "cnn",
            "num_classes": info.num_classes,
            "input_shape": list(info.input_shape),
            "mean": list(info.mean),
            "std": list(info.std),
            "dataset": "digits",
        },
    )
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MAX_WAIT_MS = ["--max-wait-ms", "0"]


def start(checkpoint: str, memory: Path, port: int, n: int, max_batch: int) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "ddrs",
        "serve",
        "--checkpoint",
        checkpoint,
        "--dataset",
        "digits",
        "--memory",
        str(memory),
        "--sigma0",
        "0.25",
        "--n",
        str(n),
        "--device",
        "cpu",
        "--port",
        str(port),
        "--max-batch",
        str(max_batch),
        *MAX_WAIT_MS,
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return server
        except OSError:
            if server.poll() is not None:
                raise RuntimeError("the server stopped at start-up") from None
            time.sleep(0.1)
    raise RuntimeError("the server did not start")


def certify(port: int, x) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/certify",
        data=json.dumps({"input": x}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def drive(
    port: int,
    inputs: list,
    clients: int,
    received: list,
    latencies: list | None = None,
    stop: threading.Event | None = None,
) -> list[threading.Thread]:
    def client(k: int) -> None:
        for i in range(k, len(inputs), clients):
            if stop is not None and stop.is_set():
                return
            t0 = time.perf_counter()
            try:
                received.append(certify(port, inputs[i]))
            except OSError:
                return  # the server is gone
            if latencies is not None:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    return threads


def load_run(checkpoint, folder, inputs, n, clients, max_batch) -> tuple[float, float, float]:
    memory, port = folder / f"load-{time.monotonic_ns()}.sqlite", free_port()
    server = start(checkpoint, memory, port, n, max_batch)
    try:
        certify(port, inputs[-1])  # warm-up (the automatic batch size is measured here)
        received, latencies = [], []
        t0 = time.perf_counter()
        for t in drive(port, inputs[:-1], clients, received, latencies):
            t.join()
        seconds = time.perf_counter() - t0
    finally:
        server.kill()
        server.wait()
    assert len(received) == len(inputs) - 1, "a request failed"
    return (
        len(received) / seconds,
        float(np.percentile(latencies, 50)),
        float(np.percentile(latencies, 99)),
    )


def soak(checkpoint, folder, inputs, n, kills: int, seed: int) -> dict:
    memory, port = folder / "soak.sqlite", free_port()
    rng = random.Random(seed)
    received: list[dict] = []
    for kill in range(kills):
        server = start(checkpoint, memory, port, n, 32)
        stop = threading.Event()
        # new inputs every round (shifted by 1e-3 per round): new entries, near earlier ones
        shifted = (np.clip(np.asarray(inputs) + 1e-3 * kill, 0, 1)).tolist()
        threads = drive(port, shifted, 8, received, stop=stop)
        time.sleep(rng.uniform(0.5, 3.0))
        server.send_signal(signal.SIGKILL)
        server.wait()
        stop.set()
        for t in threads:
            t.join()
    with CertificationMemory.open_existing(memory) as stored:
        answers = {}
        for _, c, r, _, order, _ in stored.entries():
            answers.update({int(o): (int(ci), float(ri)) for o, ci, ri in zip(order, c, r)})
        lost = [a for a in received if answers.get(a["entry"]) != (a["predict"], a["radius"])]
        corrupt, overlaps = stored.corrupt_entries(), stored.check()
    sent_entries = {a["entry"] for a in received}
    return {
        "kills": kills,
        "answers_sent": len(received),
        "distinct_entries_sent": len(sent_entries),
        "entries_stored": len(answers),
        "sent_but_not_stored": len(lost),
        "changed": sum(a["changed"] for a in received),
        "shrunk": sum(a["shrunk"] for a in received),
        "corrupt": len(corrupt),
        "overlapping_pairs": len(overlaps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--n", type=int, default=1000, help="N of each certificate")
    parser.add_argument("--requests", type=int, default=96, help="queries per measured run")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-wait-ms", type=float, default=0.0, help="the server's wait for company in a batch"
    )
    args = parser.parse_args()
    if args.quick:
        args.requests, args.repeats, args.kills, args.concurrency = 24, 1, 2, "1,8"
    print_machine("ddrs serve under load", args)
    MAX_WAIT_MS[1] = str(args.max_wait_ms)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    folder = Path(tempfile.mkdtemp(prefix="ddrs-serve-bench-"))
    checkpoint = random_checkpoint(folder)
    data = get_dataset("digits", "test")
    inputs = [data[i][0].tolist() for i in range(min(len(data), args.requests + 1))]

    rows = []
    for clients in (int(c) for c in args.concurrency.split(",")):
        runs: dict[str, list] = {"micro-batching (32)": [], "off (1)": []}
        for r in range(args.repeats):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for name in order:
                max_batch = 32 if name.startswith("micro") else 1
                result = load_run(checkpoint, folder, inputs, args.n, clients, max_batch)
                runs[name].append(result)
                print(
                    f"  concurrency {clients:3d}  {name:<20s} {result[0]:7.2f} cert/s  "
                    f"p50 {result[1]:.3f} s  p99 {result[2]:.3f} s",
                    flush=True,
                )
        off = [1 / run[0] for run in runs["off (1)"]]
        for name, results in runs.items():
            rate = median([run[0] for run in results])
            speedup = paired_ratio(off, [1 / run[0] for run in results])
            rows.append(
                [
                    clients,
                    name,
                    f"{rate:.2f}",
                    f"{speedup:.2f}x",
                    f"{median([run[1] for run in results]):.3f}",
                    f"{median([run[2] for run in results]):.3f}",
                ]
            )
    print()
    print(f"digits cnn, N {args.n:,}, certified selector (9 x 64), {args.requests} queries per run")
    print(table(["clients", "batching", "cert/s", "vs off", "p50 s", "p99 s"], rows))
    if args.kills:
        result = soak(checkpoint, folder, inputs, args.n, args.kills, args.seed)
        print()
        print("kill -9 soak: " + ", ".join(f"{k} {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
