"""`ddrs serve`: endpoints, auth, limits, bad input, micro-batching equal to one query at a
time, persistence across restarts, and kill -9 / SIGTERM on a real server (loopback)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from helpers import TOKEN, as_json, free_port, post, start_server  # noqa: E402
from PIL import Image  # noqa: E402

from ddrs.classifier import DataDependentSmoothClassifier
from ddrs.data import dataset_info, get_dataset  # noqa: E402
from ddrs.memory import CertificationMemory  # noqa: E402
from ddrs.models import load_checkpoint  # noqa: E402
from ddrs.models.identity import memory_fingerprint
from ddrs.serve import CertificationService, create_app  # noqa: E402

N0, N, ALPHA = 20, 300, 0.01


@pytest.fixture(scope="module")
def checkpoint(digits_checkpoint):
    return digits_checkpoint


@pytest.fixture(scope="module")
def digits():
    return get_dataset("digits", "test")


def make_service(
    checkpoint, memory_path, *, sigma0=0.25, selector="certified", max_batch=8, max_wait=0.005
):
    info = dataset_info("digits")
    model = load_checkpoint(checkpoint, device="cpu").model
    fingerprint = memory_fingerprint(model, info.name, info.input_shape)

    def make_classifier():
        memory = CertificationMemory(memory_path, fingerprint, info.input_shape)
        search = {"grid": 5, "samples": 16} if selector == "certified" else {}
        return DataDependentSmoothClassifier(
            model, 10, memory, sigma0, n0=N0, n=N, alpha=ALPHA, selector=selector, search=search
        )

    return CertificationService(
        make_classifier,
        info,
        max_batch=max_batch,
        max_wait=max_wait,
        describe={"dataset": "digits"},
    ), make_classifier


def png_of(x: torch.Tensor) -> bytes:
    img = Image.fromarray((x[0].numpy() * 255).round().astype("uint8"), mode="L")
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def entries(path) -> int:
    with CertificationMemory.open_existing(path) as memory:
        return len(memory)


def test_every_endpoint_answers(checkpoint, digits, tmp_path):
    service, _ = make_service(checkpoint, tmp_path / "m.sqlite")
    x = digits[0][0]
    with TestClient(create_app(service)) as client:
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["entries"] == 0 and health["in_flight"] == 0
        answer = client.post("/v1/certify", json=as_json(x)).json()
        assert set(answer) >= {
            "predict",
            "radius",
            "sigma",
            "mc_predict",
            "mc_radius",
            "changed",
            "shrunk",
            "repeat",
            "entry",
        }
        assert answer["entry"] == 0 and not answer["repeat"] and answer["radius"] >= 0
        assert answer["predict"] == answer["mc_predict"]  # the first answer: nothing to change
        predicted = client.post("/v1/predict", json=as_json(digits[1][0])).json()
        assert predicted["radius"] == 0.0 and predicted["entry"] == 1  # a ball of radius 0
        upload = client.post(
            "/v1/certify", files={"file": ("d.png", png_of(digits[2][0]), "image/png")}
        )
        assert upload.status_code == 200, upload.text
        assert upload.json()["entry"] == 2
        again = client.post("/v1/certify", json=as_json(x)).json()
        assert again["repeat"] and (again["predict"], again["radius"], again["entry"]) == (
            answer["predict"],
            answer["radius"],
            0,
        )
        assert again["sigma"] == answer["sigma"]  # the sigma that certified the stored radius
        stats = client.get("/v1/memory/stats").json()
        assert stats["entries"] == 3 and stats["repeats"] == 1
        assert client.get("/health").json()["entries"] == 3
        metrics = client.get("/metrics").text
        assert 'ddrs_requests_total{method="POST",path="/v1/certify",status="200"} 3.0' in metrics
        assert "ddrs_memory_entries 3.0" in metrics and "ddrs_queries_in_flight 0.0" in metrics
        assert "ddrs_request_seconds_count 4.0" in metrics
        assert "ddrs_answers_repeat_total 1.0" in metrics
        page = client.get("/")
        assert page.status_code == 200 and 'type="file"' in page.text
        assert "/v1/" in client.get("/page.js").text and client.get("/page.css").status_code == 200
        assert client.get("/favicon.ico").status_code == 200
    assert entries(tmp_path / "m.sqlite") == 3


def test_a_token_is_required_when_configured(checkpoint, digits, tmp_path):
    service, _ = make_service(checkpoint, tmp_path / "m.sqlite")
    body = as_json(digits[0][0])
    with TestClient(create_app(service, token=TOKEN)) as client:
        assert client.get("/health").status_code == 200  # probes need no token
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = client.post("/v1/certify", json=body, headers=headers)
            assert response.status_code == 401 and "token" in response.json()["error"]
            assert client.get("/metrics", headers=headers).status_code == 401
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert client.post("/v1/certify", json=body, headers=good).status_code == 200
        assert client.get("/v1/memory/stats", headers=good).json()["entries"] == 1


BAD_REQUESTS = {
    "not JSON": (
        {"content": b"certify this", "headers": {"content-type": "application/json"}},
        400,
        "not JSON",
    ),
    "missing field": ({"json": {"image": []}}, 422, '"input"'),
    "wrong shape": ({"json": {"input": [[0.5] * 8] * 8}}, 422, "shape (8, 8)"),
    "ragged": ({"json": {"input": [[[0.5] * 8] * 7 + [[0.5] * 3]]}}, 422, "rectangular"),
    "strings": ({"json": {"input": [[["a"] * 8] * 8]}}, 422, "numbers"),
    "NaN": (
        {
            "content": json.dumps({"input": [[[float("nan")] * 8] * 8]}).encode(),
            "headers": {"content-type": "application/json"},
        },
        422,
        "NaN",
    ),
    "infinity": (
        {
            "content": json.dumps({"input": [[[float("inf")] * 8] * 8]}).encode(),
            "headers": {"content-type": "application/json"},
        },
        422,
        "infinite",
    ),
    "above 1": ({"json": {"input": [[[2.0] * 8] * 8]}}, 422, "[0, 1]"),
    "below 0": ({"json": {"input": [[[-0.1] * 8] * 8]}}, 422, "[0, 1]"),
    "not an image": (
        {"files": {"file": ("x.png", b"GIF89a-not-really", "image/png")}},
        400,
        "not an image",
    ),
    "no file field": ({"files": {"other": ("x.png", b"123", "image/png")}}, 422, '"file"'),
}


def test_bad_input_is_refused_clearly_and_stores_nothing(checkpoint, tmp_path):
    service, _ = make_service(checkpoint, tmp_path / "m.sqlite")
    with TestClient(create_app(service, max_body_bytes=4096)) as client:
        for name, (request, status, words) in BAD_REQUESTS.items():
            for path in ("/v1/certify", "/v1/predict"):
                response = client.post(path, **request)
                assert response.status_code == status, (name, response.text)
                assert words in response.json()["error"], (name, response.json())
        big = client.post(
            "/v1/certify",
            content=b"[" + b"0.5," * 4000 + b"0]",
            headers={"content-type": "application/json"},
        )
        assert big.status_code == 413 and "limit" in big.json()["error"]
        assert client.get("/health").json()["entries"] == 0
    assert entries(tmp_path / "m.sqlite") == 0


def test_micro_batches_answer_as_one_query_at_a_time(checkpoint, digits, tmp_path):
    # arrival order: distinct inputs, a predict, an exact repeat, and a near-copy of input 0
    xs = [digits[i][0] for i in range(6)]
    xs += [xs[1].clone(), (xs[0] + 0.01).clamp(0, 1)]
    kinds = ["certify"] * 3 + ["predict"] + ["certify"] * 4

    service, make_classifier = make_service(
        checkpoint, tmp_path / "batched.sqlite", max_batch=8, max_wait=0.5
    )

    async def all_at_once():
        await service.start()
        try:
            return await asyncio.gather(*(service.submit(k, x) for k, x in zip(kinds, xs)))
        finally:
            await service.stop()

    batched = asyncio.run(all_at_once())
    assert max(service.metrics.batches) > 1, "the queries did share an engine call"

    one_service, make_one = make_service(checkpoint, tmp_path / "single.sqlite")
    clf = make_one()
    try:
        single = [getattr(clf, kind)(x, key=key) for key, (kind, x) in enumerate(zip(kinds, xs))]
    finally:
        clf.memory.close()
    assert batched == single
    assert batched[6].repeat and batched[6].predict == batched[1].predict


def test_answers_survive_a_restart_and_numbering_continues(checkpoint, digits, tmp_path):
    path = tmp_path / "m.sqlite"
    first_service, _ = make_service(checkpoint, path)
    with TestClient(create_app(first_service)) as client:
        first = [client.post("/v1/certify", json=as_json(digits[i][0])).json() for i in (0, 1)]
    service, _ = make_service(checkpoint, path)
    with TestClient(create_app(service)) as client:
        assert client.get("/health").json()["entries"] == 2
        again = client.post("/v1/certify", json=as_json(digits[1][0])).json()
        assert again["repeat"] and again["entry"] == first[1]["entry"]
        assert (again["predict"], again["radius"]) == (first[1]["predict"], first[1]["radius"])
        new = client.post("/v1/certify", json=as_json(digits[2][0])).json()
        assert new["entry"] == 2
    with CertificationMemory.open_existing(path) as memory:
        assert sorted(memory.answers_by_idx()) == [0, 1, 3]  # query numbers go on after 0..2


# -- a real server process ---------------------------------------------------------------------
def load(port, inputs, clients: int, received: list, stop: threading.Event):
    """`clients` threads sending inputs in turn until `stop` or the server goes away."""

    def client(k):
        for i in range(k, len(inputs), clients):
            if stop.is_set():
                return
            try:
                received.append((i, post(port, inputs[i])))
            except (OSError, urllib.error.URLError):
                return

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    return threads


@pytest.mark.slow
def test_kill_9_under_load_loses_no_answer_that_was_sent(checkpoint, digits, tmp_path):
    memory, port = tmp_path / "m.sqlite", free_port()
    inputs = [digits[i][0] for i in range(120)]
    server = start_server(checkpoint, memory, port)
    received, stop = [], threading.Event()
    threads = load(port, inputs, 6, received, stop)
    deadline = time.monotonic() + 60
    while len(received) < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.send_signal(signal.SIGKILL)
    server.communicate()
    stop.set()
    for t in threads:
        t.join()
    assert 8 <= len(received) < len(inputs), "the kill came under load"

    with CertificationMemory.open_existing(memory) as stored:
        assert stored.corrupt_entries() == [] and stored.check() == []
        answers = stored.answers_by_idx()
        for _, sent in received:  # every answer sent is stored, as sent
            assert sent["entry"] < len(stored)
        by_entry = {}
        for chunk in stored.entries():
            x, c, r, _, order, _ = chunk
            by_entry.update({int(o): (int(ci), float(ri)) for o, ci, ri in zip(order, c, r)})
    for _, sent in received:
        assert by_entry[sent["entry"]] == (sent["predict"], sent["radius"])
    assert len(answers) >= len(received)

    server = start_server(checkpoint, memory, port)
    try:
        i, sent = received[0]
        again = post(port, inputs[i])
        assert again["repeat"] and (again["predict"], again["radius"], again["entry"]) == (
            sent["predict"],
            sent["radius"],
            sent["entry"],
        )
    finally:
        server.kill()
        server.communicate()
    checked = subprocess.run(
        [sys.executable, "-m", "ddrs", "memory", "check", str(memory)],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout


@pytest.mark.slow
def test_sigterm_drains_the_queries_in_flight(checkpoint, digits, tmp_path):
    memory, port = tmp_path / "m.sqlite", free_port()
    server = start_server(checkpoint, memory, port, "--n", "20000")
    received, stop = [], threading.Event()
    threads = load(port, [digits[i][0] for i in range(4)], 4, received, stop)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the server holds all four queries
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as response:
            health = json.loads(response.read())
        if health["in_flight"] == 4:
            break
        time.sleep(0.01)
    assert health["in_flight"] == 4 and not received, "all four must be in flight"
    server.send_signal(signal.SIGTERM)
    output, _ = server.communicate(timeout=120)
    for t in threads:
        t.join()
    # uvicorn shuts down gracefully, then re-raises the signal: exit by SIGTERM, after the drain
    assert server.returncode in (0, -signal.SIGTERM), output
    assert "Traceback" not in output, output
    assert len(received) == 4, output
    assert entries(memory) == 4


def test_bad_serve_invocations_are_one_line_and_start_nothing(checkpoint, tmp_path, capsys):
    from ddrs.cli import main

    memory = tmp_path / "m.sqlite"
    short = tmp_path / "short-token"
    short.write_text("abc\n")
    base = ["serve", "--checkpoint", checkpoint, "--memory", str(memory), "--port", "1"]
    cases = {
        "give --dataset": [*base, "--sigma", "0.25"],
        "--sigma must be finite": [*base, "--dataset", "digits", "--sigma", "0"],
        "alpha": [*base, "--dataset", "digits", "--sigma", "0.25", "--alpha", "2"],
        "at least 16": [
            *base,
            "--dataset",
            "digits",
            "--sigma",
            "0.25",
            "--token-file",
            str(short),
        ],
        "--token-file": [
            *base,
            "--dataset",
            "digits",
            "--sigma",
            "0.25",
            "--token-file",
            str(tmp_path / "missing"),
        ],
        "--max-batch": [*base, "--dataset", "digits", "--sigma", "0.25", "--max-batch", "0"],
    }
    for words, argv in cases.items():
        assert main(argv) == 2, words
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (words, err)
        assert not memory.exists(), words
    other = tmp_path / "other.sqlite"
    with CertificationMemory(other, "another model", (1, 8, 8)):
        pass
    argv = [*base[:4], str(other), "--port", "1", "--dataset", "digits", "--sigma", "0.25"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ddrs: error:" in err[0], err


@pytest.mark.slow
def test_a_custom_model_with_a_fixed_sigma_is_served(tmp_path):
    (tmp_path / "tinymodel.py").write_text(
        "import torch\n"
        "def factory():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))\n"
    )
    port, memory = free_port(), tmp_path / "m.sqlite"
    command = [
        sys.executable,
        "-m",
        "ddrs",
        "serve",
        "--model",
        "tinymodel:factory",
        "--input-shape",
        "3,4,4",
        "--num-classes",
        "3",
        "--memory",
        str(memory),
        "--sigma",
        "0.3",
        "--n0",
        "20",
        "--n",
        "500",
        "--alpha",
        "0.01",
        "--device",
        "cpu",
        "--port",
        str(port),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
    }
    server = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    health = json.loads(r.read())
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        assert health["input_shape"] == [3, 4, 4] and health["sigma"] == 0.3
        answer = post(port, torch.full((3, 4, 4), 0.5))
        assert answer["sigma"] == pytest.approx(0.3) and answer["predict"] in (-1, 0, 1, 2)
        rgb = Image.new("RGB", (10, 10), (200, 30, 90))
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG")
        boundary = "ddrs-test-boundary"
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="x.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
        ).encode()
        body += buffer.getvalue() + f"\r\n--{boundary}--\r\n".encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/predict",
            data=body,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            uploaded = json.loads(response.read())
        assert uploaded["radius"] == 0.0 and uploaded["entry"] == 1  # resized to 3 x 4 x 4
    finally:
        server.kill()
        server.communicate()
    assert entries(memory) == 2


def test_an_engine_failure_is_a_500_and_the_service_goes_on(digits, tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    info = dataset_info("digits")

    def make_classifier():
        memory = CertificationMemory(tmp_path / "m.sqlite", "broken", info.input_shape)
        return DataDependentSmoothClassifier(
            Broken(), 10, memory, 0.25, n0=N0, n=N, alpha=ALPHA, selector=None
        )

    service = CertificationService(make_classifier, info)
    with TestClient(create_app(service)) as client:
        for _ in range(2):
            response = client.post("/v1/certify", json=as_json(digits[0][0]))
            assert response.status_code == 500
            assert "RuntimeError: boom" in response.json()["error"]
        assert client.get("/health").json()["entries"] == 0


def test_experts_served_equal_the_offline_pipeline(checkpoint, digits, tmp_path):
    """Queries answered by the service with experts, in arrival order, are the offline
    pipeline's answers: `ddrs sigma --expert` routes, certify with them, then the memory."""
    from ddrs.core.experts import Expert, Experts
    from ddrs.results import read_table
    from ddrs.runs import CertifyRun, SigmaRun, certify_dataset, sigma_dataset

    model = load_checkpoint(checkpoint).model
    experts = Experts(tuple(Expert(f"at{s:g}", checkpoint, s, model) for s in (0.12, 0.25, 0.5)))
    info = dataset_info("digits")

    def make_classifier():
        memory = CertificationMemory(
            tmp_path / "served.sqlite",
            memory_fingerprint(experts, "digits", info.input_shape),
            info.input_shape,
        )
        return DataDependentSmoothClassifier(
            experts, 10, memory, n0=N0, n=N, alpha=ALPHA, search={"samples": 16}
        )

    count = 12
    service = CertificationService(make_classifier, info, max_batch=4)
    with TestClient(create_app(service)) as client:
        served = [
            client.post("/v1/certify", json=as_json(digits[i][0])).json() for i in range(count)
        ]
    routes, offline = tmp_path / "routes.tsv", tmp_path / "offline.tsv"
    sigma_dataset(
        experts,
        digits,
        SigmaRun(out=str(routes), samples=16, n=N, alpha=ALPHA, max=count, progress=False),
    )
    certify_dataset(
        experts,
        digits,
        CertifyRun(
            out=str(offline),
            sigmas=str(routes),
            memory=str(tmp_path / "offline.sqlite"),
            n0=N0,
            n=N,
            alpha=ALPHA,
            max=count,
            progress=False,
        ),
    )
    table = read_table(offline)
    assert [a["expert"] for a in served] == table["expert"].tolist()
    assert len(set(table["expert"].tolist())) > 1  # the inputs do go to different experts
    assert [(a["predict"], a["radius"], a["sigma"]) for a in served] == list(
        zip(table["predict"].tolist(), table["radius"].tolist(), table["sigma"].tolist())
    )


def test_a_real_server_of_experts_answers_with_the_expert(checkpoint, digits, tmp_path):
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "ddrs",
        "serve",
        "--expert",
        f"small={checkpoint}:0.12",
        "--expert",
        f"large={checkpoint}:0.5",
        "--dataset",
        "digits",
        "--memory",
        str(tmp_path / "m.sqlite"),
        "--samples",
        "16",
        "--n0",
        "20",
        "--n",
        "300",
        "--alpha",
        "0.01",
        "--device",
        "cpu",
        "--port",
        str(port),
    ]
    server = subprocess.Popen(
        command,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    health = json.loads(r.read())
                break
            except OSError:
                assert server.poll() is None, server.communicate()[0]
                time.sleep(0.1)
        assert health["experts"] == [["small", 0.12], ["large", 0.5]]
        answer = post(port, digits[0][0])
        assert answer["expert"] in ("small", "large")
        assert answer["sigma"] == pytest.approx({"small": 0.12, "large": 0.5}[answer["expert"]])
    finally:
        server.terminate()
        server.communicate(timeout=60)


# -- real users and hostile networks (issue 17) ------------------------------------------------
def test_deep_json_and_odd_numbers_are_clear_4xx(checkpoint, tmp_path):
    service, _ = make_service(checkpoint, tmp_path / "m.sqlite")
    headers = {"content-type": "application/json"}
    with TestClient(create_app(service)) as client:
        deep = b'{"input": ' + b"[" * 1000 + b"]" * 1000 + b"}"
        response = client.post("/v1/certify", content=deep, headers=headers)
        assert response.status_code == 400 and "nested too deeply" in response.json()["error"]
        booleans = client.post("/v1/certify", json={"input": [[[True] * 8] * 8]})
        assert booleans.status_code == 422 and "booleans" in booleans.json()["error"]
        huge = b'{"input": [[' + b",".join([b"[" + b",".join([b"1e400"] * 8) + b"]"] * 8) + b"]]}"
        response = client.post("/v1/certify", content=huge, headers=headers)
        assert response.status_code == 422 and "infinite" in response.json()["error"]
        assert client.get("/nowhere").json() == {"error": "Not Found"}
        assert client.put("/v1/certify").status_code == 405
        assert "error" in client.put("/v1/certify").json()
        assert client.get("/health").json()["entries"] == 0


def test_no_other_site_can_write_or_read_through_a_browser(checkpoint, digits, tmp_path):
    service, _ = make_service(checkpoint, tmp_path / "m.sqlite")
    body = json.dumps(as_json(digits[0][0]))
    app = create_app(service, allowed_hosts=["127.0.0.1", "localhost"])
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        plain = client.post("/v1/certify", content=body, headers={"content-type": "text/plain"})
        assert plain.status_code == 415  # what an enctype="text/plain" form sends
        form = client.post(
            "/v1/certify",
            files={"file": ("d.png", png_of(digits[0][0]), "image/png")},
            headers={"origin": "http://evil.example"},
        )
        assert form.status_code == 403 and "cross-origin" in form.json()["error"]
        rebound = client.get("/health", headers={"host": "evil.example:8000"})
        assert rebound.status_code == 400 and "--allowed-host" in rebound.json()["error"]
        same = client.post(
            "/v1/certify",
            content=body,
            headers={"content-type": "application/json", "origin": "http://127.0.0.1:8000"},
        )
        assert same.status_code == 200
        assert client.get("/health").json()["entries"] == 1
    tokened = create_app(make_service(checkpoint, tmp_path / "t.sqlite")[0], token=TOKEN)
    with TestClient(tokened) as client:
        good = {
            "Authorization": f"Bearer {TOKEN}",
            "content-type": "application/json",
            "origin": "http://elsewhere.example",
        }
        assert client.post("/v1/certify", content=body, headers=good).status_code == 200


def test_with_a_token_nothing_is_shown_to_strangers(checkpoint, tmp_path):
    service, _ = make_service(checkpoint, tmp_path / "m.sqlite")
    service.describe = {"memory": str(tmp_path / "m.sqlite"), "model": "abcdef0123456789"}
    with TestClient(create_app(service, token=TOKEN)) as client:
        assert client.get("/health").json() == {"status": "ok"}
        page = client.get("/").text
        assert str(tmp_path) not in page and "abcdef0123456789" not in page
        assert "needs a token" in page
        full = client.get("/health", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert full["memory"] == str(tmp_path / "m.sqlite")


def _big_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def test_huge_images_are_refused_before_decoding(checkpoint, tmp_path):
    service, _ = make_service(checkpoint, tmp_path / "m.sqlite")
    with TestClient(create_app(service, max_body_bytes=8 << 20)) as client:
        for side in (12_000, 20_000):
            data = _big_png(side, side)
            assert len(data) < 2 << 20  # a small file of very many pixels
            response = client.post(
                "/v1/certify", content=data, headers={"content-type": "image/png"}
            )
            assert response.status_code == 413, response.text
            assert "pixels" in response.json()["error"]
        assert client.get("/health").json()["entries"] == 0


def test_an_upload_shrinks_by_area_averaging(digits):
    """A digit enlarged 8x (nearest) comes back exactly, so it gets the original's answer."""
    from ddrs.serve import parse_image

    info = dataset_info("digits")
    for i in range(5):
        x = digits[i][0]
        grey = Image.fromarray((x[0].numpy() * 255).round().astype("uint8"), mode="L")
        buffer = io.BytesIO()
        grey.resize((64, 64), Image.NEAREST).save(buffer, format="PNG")
        back = parse_image(buffer.getvalue(), info)
        assert torch.equal(
            back, torch.from_numpy((x.numpy() * 255).round().astype("uint8")).float() / 255
        )


def test_metrics_labels_are_bounded_and_can_be_public(checkpoint, tmp_path):
    service, _ = make_service(checkpoint, tmp_path / "m.sqlite")
    with TestClient(create_app(service, token=TOKEN, metrics_public=True)) as client:
        client.request("XMETHOD1", "/health")
        client.get("/no/such/path/1")
        client.get("/no/such/path/2")
        text = client.get("/metrics").text  # no token: --metrics-public
        assert "XMETHOD1" not in text and "/no/such" not in text
        assert 'method="other",path="/health"' in text and 'path="other"' in text
    service2, _ = make_service(checkpoint, tmp_path / "n.sqlite")
    with TestClient(create_app(service2, token=TOKEN)) as client:
        assert client.get("/metrics").status_code == 401


def test_the_api_contract_is_documented(checkpoint, tmp_path):
    service, _ = make_service(checkpoint, tmp_path / "m.sqlite")
    with TestClient(create_app(service, token=TOKEN)) as client:
        schema = client.get("/openapi.json").json()
    certify = schema["paths"]["/v1/certify"]["post"]
    content = certify["requestBody"]["content"]
    assert {"application/json", "multipart/form-data", "image/png"} <= set(content)
    assert {"200", "400", "401", "403", "413", "415", "422", "500"} <= set(certify["responses"])
    assert certify["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert certify["security"] == [{"bearer": []}]
    assert "security" not in schema["paths"]["/health"]["get"]


def test_a_closed_pipe_is_not_an_error(checkpoint, digits, tmp_path):
    memory = tmp_path / "m.sqlite"
    with CertificationMemory(memory, "m", (1, 8, 8)) as store:
        for i in range(3):
            store.resolve_and_store(digits[i][0], i, 0.1, sigma=0.25, idx=i)
    done = subprocess.run(
        f"{sys.executable} -m ddrs memory stats {memory} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.startswith("memory ") and "Traceback" not in done.stderr, done.stderr
    assert done.stderr == ""


@pytest.mark.slow
@pytest.mark.parametrize("with_token", [False, True], ids=["no token", "token"])
def test_contract_fuzzing_finds_no_failure_of_any_check(checkpoint, tmp_path, with_token):
    """schemathesis against the live /openapi.json, every check (ST202 schema-valid requests
    accepted, ST204 405 with Allow among them), deterministic, a few hundred cases; the image
    types the contract names get real images (tests/schemathesis_hooks.py)."""
    pytest.importorskip("schemathesis")
    port = free_port()
    extra = []
    if with_token:
        (tmp_path / "token").write_text(TOKEN)
        extra = ["--token-file", str(tmp_path / "token")]
    server = start_server(checkpoint, tmp_path / "m.sqlite", port, "--n", "200", *extra)
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
        "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])),
    }
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "run",
                f"http://127.0.0.1:{port}/openapi.json",
                "--checks",
                "all",
                "--max-examples",
                "40",
                "--generation-deterministic",
                "-w",
                "1",
                *(["-H", f"Authorization: Bearer {TOKEN}"] if with_token else []),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            cwd=tmp_path,
        )
    finally:
        server.kill()
        server.communicate()
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-4000:]
    assert "failure" not in report.split("SUMMARY")[-1].lower(), report[-3000:]
    generated = int(re.search(r"(\d+) generated", report).group(1))
    assert generated >= 200, report[-2000:]
    assert entries(tmp_path / "m.sqlite") > 0  # valid queries were among them, and answered


@pytest.mark.slow
def test_health_stays_fast_while_an_upload_decodes(checkpoint, tmp_path):
    """Decoding runs off the event loop: /health answers during a large upload about as fast
    as when idle (a ratio in the same run, generous)."""
    port = free_port()
    server = start_server(checkpoint, tmp_path / "m.sqlite", port, "--max-pixels", str(5000 * 5000))
    big = _big_png(5000, 5000)  # 25 M pixels to decode and shrink

    def health_seconds() -> float:
        start = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=60):
            pass
        return time.perf_counter() - start

    try:
        idle = sorted(health_seconds() for _ in range(15))[7]
        uploads, during = [], []

        def upload():
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/predict",
                data=big,
                headers={"Content-Type": "image/png"},
            )
            with urllib.request.urlopen(request, timeout=120) as response:
                uploads.append(response.status)

        for _ in range(3):
            thread = threading.Thread(target=upload)
            thread.start()
            while thread.is_alive():
                during.append(health_seconds())
            thread.join()
        assert uploads == [200, 200, 200] and len(during) >= 3
        # while the loop decoded, one /health waited the whole decoding (0.3 s and more)
        assert max(during) < 50 * idle + 0.05, (idle, max(during))
    finally:
        server.kill()
        server.communicate()
