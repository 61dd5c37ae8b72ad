"""Several `ddrs serve` replicas on one PostgreSQL memory: the invariant across replicas, no
two queries with one noise key, a kill -9 of a replica mid-load loses no answer that was
sent, a restarted replica catches up, and a database restart gives 503s, then service."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from helpers import as_json, free_port, start_server

from ddrs.classifier import DataDependentSmoothClassifier
from ddrs.data import get_dataset
from ddrs.memory import CertificationMemory
from ddrs.models import load_checkpoint
from ddrs.models.identity import memory_fingerprint

pytestmark = pytest.mark.slow
N0, N, ALPHA = 20, 4000, 0.01  # start_server's


def post(port, x, timeout=120) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/certify",
        data=json.dumps(as_json(x)).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def post_to_either(ports, first: int, x) -> dict | None:
    """The answer of replica `first`, or of the other one when it does not answer 200 (it is
    down); None when neither does."""
    for port in (ports[first], ports[1 - first]):
        try:
            status, body = post(port, x)
        except OSError:
            continue
        if status == 200:
            return body
    return None


def stored_answers(url) -> dict[int, tuple]:
    """{entry: (input, class, radius, idx)} of every stored entry."""
    with CertificationMemory.open_existing(url) as memory:
        found = {}
        for x, c, r, _, order, idx in memory.entries():
            for k in range(len(order)):
                found[int(order[k])] = (x[k], int(c[k]), float(r[k]), int(idx[k]))
        return found


def test_two_replicas_answer_as_one_process_and_survive_a_kill(digits_checkpoint, pg_url):
    digits = get_dataset("digits", "test")
    inputs = [digits[i][0] for i in range(50)]
    inputs += [inputs[3], inputs[7]]  # exact repeats
    inputs += [(inputs[i] + 0.02).clamp(0, 1) for i in range(6)]  # near-copies: conflicts
    ports = [free_port(), free_port()]
    servers = [start_server(digits_checkpoint, pg_url, port) for port in ports]
    received, lock = [], threading.Lock()

    def client(k: int) -> None:
        for i in range(k, len(inputs), 4):
            body = post_to_either(ports, k % 2, inputs[i])
            if body is not None:
                with lock:
                    received.append((i, body))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while len(received) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    servers[0].send_signal(signal.SIGKILL)  # replica 0 dies mid-load
    at_kill = len(received)
    servers[0].communicate()
    for t in threads:
        t.join(timeout=600)
    try:
        assert 10 <= at_kill < len(inputs), "the kill came under load"
        assert len(received) == len(inputs), "the surviving replica answered the rest"
        stored = stored_answers(pg_url)
        for _, sent in received:  # every answer sent is stored, as sent
            x, c, r, _ = stored[sent["entry"]]
            assert (c, r) == (sent["predict"], sent["radius"])
        keys = [idx for *_, idx in stored.values()]
        assert len(set(keys)) == len(keys), "no two queries shared a noise key"
        checked = subprocess.run(
            [sys.executable, "-m", "ddrs", "memory", "check", pg_url],
            capture_output=True,
            text=True,
        )
        assert checked.returncode == 0, checked.stdout
        # one process, given the stored queries in the memory's order with their keys,
        # answers exactly what the replicas answered
        model = load_checkpoint(digits_checkpoint).model
        with CertificationMemory(
            ":memory:", memory_fingerprint(model, "digits", (1, 8, 8)), (1, 8, 8)
        ) as memory:
            one = DataDependentSmoothClassifier(
                model, 10, memory, 0.25, n0=N0, n=N, alpha=ALPHA, search={"grid": 5, "samples": 16}
            )
            for entry in sorted(stored):
                x, c, r, idx = stored[entry]
                answer = one.certify(x, key=idx)
                assert (answer.predict, answer.radius) == (c, r), entry
        # a restarted replica catches up: it answers an input stored by the other as a repeat
        servers[0] = start_server(digits_checkpoint, pg_url, ports[0])
        i, sent = received[-1]
        status, again = post(ports[0], inputs[i])
        assert status == 200 and again["repeat"] and again["entry"] == sent["entry"]
    finally:
        for server in servers:
            server.kill()
            server.communicate()


def test_a_database_restart_gives_503s_then_service_resumes(digits_checkpoint, postgres, pg_url):
    digits = get_dataset("digits", "test")
    port = free_port()
    server = start_server(digits_checkpoint, pg_url, port, "--n", "500")
    answered = []
    try:
        for i in range(3):
            status, body = post(port, digits[i][0])
            assert status == 200
            answered.append(body)
        postgres.stop("fast")
        try:
            for i in range(3, 5):
                status, body = post(port, digits[i][0])
                assert status == 503 and "database" in body["error"], body
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as response:
                assert json.loads(response.read())["status"] == "ok"  # the service lives on
        finally:
            postgres.start()
        for i in range(3, 6):
            status, body = post(port, digits[i][0])
            assert status == 200, body
            answered.append(body)
    finally:
        server.kill()
        output, _ = server.communicate()
    assert "Traceback" not in output
    stored = stored_answers(pg_url)
    assert len(stored) == len(answered) == 6  # nothing lost, nothing extra
    for body in answered:
        assert stored[body["entry"]][1:3] == (body["predict"], body["radius"])
    assert torch.is_tensor(stored[0][0])
