"""Replicas on one PostgreSQL memory under load, with kill -9: is every answer that was sent
stored as sent?

A PostgreSQL server is started for the run (as the tests do). `--rounds` times: two `ddrs
serve` replicas on one new memory, `--clients` clients sending `--queries` certify queries
(digits test images, with repeats and near-copies so that answers meet) to either replica
(the other one when theirs is down); at a random moment one replica is killed with SIGKILL
and restarted. At the end of each round: every answer a client received must be in the memory
as sent, `ddrs memory check` must pass, no two entries may share a noise key. Prints answers
sent, stored as sent, lost, and the check.

    .venv/bin/python benchmarks/replica_soak.py --rounds 3
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import print_machine, table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_replicas import post_to_either, stored_answers  # noqa: E402
from test_serve import _free_port, start_server  # noqa: E402

from conftest import PostgresServer  # noqa: E402
from ddrs.data import get_dataset  # noqa: E402
from ddrs.train.config import TrainConfig
from ddrs.train.loop import train  # noqa: E402


def one_round(checkpoint: str, url: str, queries: int, clients: int, seed: int) -> dict:
    digits = get_dataset("digits", "test")
    inputs = [digits[i][0] for i in range(queries)]
    rng = random.Random(seed)
    for k in range(0, queries, 7):  # repeats and near-copies
        inputs[k] = (inputs[rng.randrange(queries)] + 0.01 * (k % 2)).clamp(0, 1)
    ports = [_free_port(), _free_port()]
    servers = [start_server(checkpoint, url, port, "--n", "2000") for port in ports]
    received, lock = [], threading.Lock()

    def client(k: int) -> None:
        for i in range(k, len(inputs), clients):
            body = post_to_either(ports, k % 2, inputs[i])
            if body is not None:
                with lock:
                    received.append(body)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    time.sleep(rng.uniform(2, 8))
    victim = rng.randrange(2)
    servers[victim].kill()
    servers[victim].communicate()
    servers[victim] = start_server(checkpoint, url, ports[victim], "--n", "2000")
    for t in threads:
        t.join()
    for server in servers:
        server.kill()
        server.communicate()
    stored = stored_answers(url)
    as_sent = sum(
        stored.get(b["entry"], (None, None, None))[1:3] == (b["predict"], b["radius"])
        for b in received
    )
    keys = [idx for *_, idx in stored.values()]
    check = subprocess.run(
        [sys.executable, "-m", "ddrs", "memory", "check", url], capture_output=True, text=True
    )
    return {
        "sent": len(received),
        "stored_as_sent": as_sent,
        "lost": len(received) - as_sent,
        "entries": len(stored),
        "distinct_keys": len(set(keys)) == len(keys),
        "check": "ok" if check.returncode == 0 else "FAILED",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--queries", type=int, default=150)
    parser.add_argument("--clients", type=int, default=6)
    args = parser.parse_args()
    print_machine("replicas on one PostgreSQL memory, kill -9 soak", args)
    with tempfile.TemporaryDirectory(prefix="ddrs-pg-soak-") as folder:
        checkpoint = str(
            train(
                TrainConfig(
                    dataset="digits",
                    arch="cnn",
                    sigma=0.25,
                    epochs=2,
                    batch=64,
                    lr=0.05,
                    eval_max=None,
                    progress=False,
                    out=str(Path(folder) / "model"),
                )
            )
        )
        server = PostgresServer(folder)
        rows = []
        try:
            for k in range(args.rounds):
                url = server.fresh_database(f"soak{k}")
                result = one_round(checkpoint, url, args.queries, args.clients, seed=k)
                print(result, flush=True)
                rows.append(
                    [
                        k + 1,
                        result["sent"],
                        result["stored_as_sent"],
                        result["lost"],
                        result["entries"],
                        result["distinct_keys"],
                        result["check"],
                    ]
                )
        finally:
            server.stop("immediate")
    print(
        table(
            [
                "round",
                "answers sent",
                "stored as sent",
                "lost",
                "entries",
                "keys distinct",
                "memory check",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
