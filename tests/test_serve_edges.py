"""`ddrs serve`, third pass: no secret reaches a client, a log or a file; the protocol's edges
(IPv6 loopback, numbers JSON or Python cannot hold, clients that go away or are slow, 405 and
HEAD, encoded slashes, duplicate keys, truncated forms); canonical inputs and repeats answered
from the memory without sampling, in the service and on the command line."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch
from torch import nn

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from helpers import TOKEN, as_json, free_port, start_server, url_of  # noqa: E402

from ddrs.classifier import DataDependentSmoothClassifier
from ddrs.data import dataset_info, get_dataset  # noqa: E402
from ddrs.memory import CertificationMemory  # noqa: E402
from ddrs.models import load_checkpoint  # noqa: E402
from ddrs.models.identity import memory_fingerprint
from ddrs.serve import CertificationService, create_app  # noqa: E402

N0, N, ALPHA = 20, 300, 0.01


class Counting(nn.Module):
    """A model that counts its forward passes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


@pytest.fixture(scope="module")
def digits():
    return get_dataset("digits", "test")


def counting_app(checkpoint, memory_path, **app_options):
    info = dataset_info("digits")
    model = Counting(load_checkpoint(checkpoint, device="cpu").model)
    fingerprint = memory_fingerprint(model.model, info.name, info.input_shape)

    def make_classifier():
        memory = CertificationMemory(memory_path, fingerprint, info.input_shape)
        return DataDependentSmoothClassifier(
            model, 10, memory, 0.25, n0=N0, n=N, alpha=ALPHA, search={"grid": 5, "samples": 16}
        )

    service = CertificationService(make_classifier, info, describe={"alpha": ALPHA})
    return create_app(service, **app_options), model


def raw_exchange(port: int, request: bytes, wait: float = 0.0, host="127.0.0.1") -> bytes:
    """Send raw bytes, wait, and read what the server answers until it closes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.settimeout(30)
        s.connect((host, port))
        s.sendall(request)
        time.sleep(wait)
        received = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return received
            received += chunk


# -- secrets ------------------------------------------------------------------------------------
def test_no_password_reaches_a_client_a_log_or_a_file(
    digits_checkpoint, postgres, pg_url, digits, tmp_path
):
    """The service on a PostgreSQL URL with a password: every response (with and without the
    token), the page, the service's log, a 503 while the database is down, a certify run's
    results and settings, and `ddrs memory stats` are searched for the password."""
    from ddrs.cli import main

    secret = "Pw-7f3e9c2a-not-for-clients"
    url = pg_url.replace("postgresql://ddrs@", f"postgresql://ddrs:{secret}@")
    shown = pg_url  # the location as it may be shown: the user, the host, no password
    (tmp_path / "token").write_text(TOKEN)
    port = free_port()
    server = start_server(
        digits_checkpoint, url, port, "--token-file", str(tmp_path / "token"), "--log-level", "info"
    )
    seen: list[str] = []

    def fetch(path, data=None, token=True, expect=200):
        headers = {"Authorization": f"Bearer {TOKEN}"} if token else {}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(f"{url_of(port)}{path}", data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, body = response.status, response.read().decode()
                headers = str(response.headers)
        except urllib.error.HTTPError as error:
            status, body, headers = error.code, error.read().decode(), str(error.headers)
        assert status == expect, (path, status, body)
        seen.append(headers + body)
        return body

    query = json.dumps(as_json(digits[0][0])).encode()
    try:
        for token in (False, True):
            for path in ("/health", "/", "/page.js", "/openapi.json"):
                fetch(path, token=token)
        assert shown in fetch("/health")  # the settings do show the location, without it
        fetch("/metrics")
        fetch("/v1/certify", query)
        fetch("/v1/memory/stats")
        postgres.stop()
        try:
            body = fetch("/v1/certify", json.dumps(as_json(digits[1][0])).encode(), expect=503)
            assert json.loads(body) == {
                "error": "the memory's database is unavailable; retry in a moment"
            }  # no host, no driver text
        finally:
            postgres.start()
    finally:
        server.kill()
        log = server.communicate()[0]
    assert shown in log and "cannot be reached" in log  # the details stay in the server's log
    out = tmp_path / "cert.tsv"
    assert (
        main(
            [
                "certify",
                "--checkpoint",
                digits_checkpoint,
                "--dataset",
                "digits",
                "--sigma",
                "0.25",
                "--n0",
                "20",
                "--n",
                "200",
                "--max",
                "3",
                "--memory",
                url,
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    stats = subprocess.run(
        [sys.executable, "-m", "ddrs", "memory", "stats", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    files = out.read_text() + (tmp_path / "cert.tsv.settings.json").read_text()
    assert shown in files and shown in stats.stdout
    for text in [*seen, log, files, stats.stdout, stats.stderr]:
        assert secret not in text


# -- the protocol's edges -----------------------------------------------------------------------
def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_ipv6_loopback_answers_its_own_url(digits_checkpoint, tmp_path):
    port = free_port("::1")
    server = start_server(digits_checkpoint, tmp_path / "m.sqlite", port, host="::1")
    try:
        with urllib.request.urlopen(f"{url_of(port, '::1')}/health", timeout=30) as response:
            assert response.status == 200
        empty = raw_exchange(
            port, b"GET /health HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n", host="::1"
        )
        assert empty.startswith(b"HTTP/1.1 400")  # an empty Host is no allowed host
    finally:
        server.kill()
        output = server.communicate()[0]
    assert "http://[::1]:" in output


def test_numbers_json_or_python_cannot_hold_are_clear_422s(digits_checkpoint, tmp_path):
    app, _ = counting_app(digits_checkpoint, tmp_path / "m.sqlite")
    row = ",".join(["0.5"] * 8)
    headers = {"content-type": "application/json"}

    def with_first(value: str) -> bytes:
        first = ",".join([value] + ["0.5"] * 7)
        return ('{"input": [[[' + first + "]," + ",".join([f"[{row}]"] * 7) + "]]}").encode()

    with TestClient(app) as client:
        for value in ("1" * 5000, str(10**400), "1e400", "-" + "9" * 4400):
            response = client.post("/v1/certify", content=with_first(value), headers=headers)
            assert response.status_code == 422, (value[:10], response.text)
            error = response.json()["error"]
            assert "infinite" in error and "float32" in error, error
        for value in ("NaN", "Infinity", "-Infinity"):
            response = client.post("/v1/certify", content=with_first(value), headers=headers)
            assert response.status_code == 422 and "send numbers in [0, 1]" in response.text
        twice = b'{"input": 1, "input": [[[' + row.encode() + b"]]]}"
        response = client.post("/v1/certify", content=twice, headers=headers)
        assert response.status_code == 422 and "send each once" in response.json()["error"]
        assert client.get("/health").json()["entries"] == 0


def test_405_says_what_is_allowed_and_head_answers_where_get_does(digits_checkpoint, tmp_path):
    app, _ = counting_app(digits_checkpoint, tmp_path / "m.sqlite")
    with TestClient(app) as client:
        for path in (
            "/health",
            "/",
            "/metrics",
            "/favicon.ico",
            "/openapi.json",
            "/v1/memory/stats",
            "/page.js",
        ):
            head = client.head(path)
            assert head.status_code == 200 and head.content == b"", path
        for method, path, allowed in (
            ("PUT", "/v1/certify", {"POST"}),
            ("TRACE", "/health", {"GET", "HEAD"}),
            ("DELETE", "/", {"GET", "HEAD"}),
        ):
            response = client.request(method, path)
            assert response.status_code == 405 and "error" in response.json()
            assert set(response.headers["allow"].replace(" ", "").split(",")) == allowed


def test_responses_forbid_framing_and_sniffing_and_encoded_slashes_go_nowhere(
    digits_checkpoint, digits, tmp_path
):
    app, _ = counting_app(digits_checkpoint, tmp_path / "m.sqlite")
    with TestClient(app) as client:
        for response in (client.get("/"), client.get("/health"), client.get("/nowhere")):
            assert response.headers["x-frame-options"] == "DENY"
            assert response.headers["x-content-type-options"] == "nosniff"
            assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert "script-src 'self'" in client.get("/").headers["content-security-policy"]
        assert "<script>" not in client.get("/").text  # no inline script: the policy holds
        sneaky = client.post("/v1%2Fcertify", json=as_json(digits[0][0]))
        assert sneaky.status_code == 404
        assert client.get("/health").json()["entries"] == 0


def test_multipart_forms_hold_one_image_and_must_be_complete(digits_checkpoint, digits, tmp_path):
    from test_serve import png_of

    app, _ = counting_app(digits_checkpoint, tmp_path / "m.sqlite")
    png = png_of(digits[0][0])
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="d.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + png + b"\r\n"
    )
    headers = {"content-type": "multipart/form-data; boundary=XyZ"}
    with TestClient(app) as client:
        cut = client.post("/v1/certify", content=body, headers=headers)
        assert cut.status_code == 400 and "closing boundary" in cut.json()["error"]
        renamed = client.post("/v1/certify", files={"image": ("d.png", png, "image/png")})
        assert renamed.status_code == 422 and 'field named "file"' in renamed.json()["error"]
        extra = client.post(
            "/v1/certify", files={"file": ("d.png", png, "image/png")}, data={"note": "x"}
        )
        assert extra.status_code == 422 and "['note']" in extra.json()["error"]
        whole = client.post("/v1/certify", content=body + b"--XyZ--\r\n", headers=headers)
        assert whole.status_code == 200, whole.text
        schema = client.get("/openapi.json").json()
        form = schema["paths"]["/v1/certify"]["post"]["requestBody"]["content"][
            "multipart/form-data"
        ]
        assert form["schema"]["additionalProperties"] is False
        assert form["schema"]["required"] == ["file"]
        assert form["encoding"]["file"]["contentType"] == "image/png, image/jpeg"


@pytest.mark.slow
def test_clients_that_go_away_or_are_slow_are_no_server_errors(digits_checkpoint, tmp_path):
    port = free_port()
    server = start_server(
        digits_checkpoint,
        tmp_path / "m.sqlite",
        port,
        "--log-level",
        "info",
        "--header-timeout",
        "1",
        "--body-timeout",
        "1",
    )
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:  # gone mid-body
            s.sendall(
                b"POST /v1/certify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                b"application/json\r\nContent-Length: 100000\r\n\r\n" + b"[" * 100
            )
            time.sleep(0.3)
        headers_late = raw_exchange(port, b"GET /health HTTP/1.1\r\nHost: 127.0", wait=0.2)
        assert headers_late.startswith(b"HTTP/1.1 408") and b"headers" in headers_late
        body_late = raw_exchange(
            port,
            b"POST /v1/certify HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            b'{"input"',
            wait=0.2,
        )
        assert body_late.startswith(b"HTTP/1.1 408") and b"body" in body_late
        with urllib.request.urlopen(f"{url_of(port)}/metrics", timeout=30) as response:
            metrics = response.read().decode()
    finally:
        server.kill()
        log = server.communicate()[0]
    assert 'status="5' not in metrics, metrics
    assert 'path="/v1/certify",status="499"} 1.0' in metrics
    assert log.count("the client went away") == 1 and "Traceback" not in log, log


def test_help_and_the_readme_agree_on_where_the_service_listens(capsys):
    from ddrs.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "0.0.0.0" in text and "loopback, the default" in text and "--header-timeout" in text


# -- canonical inputs, repeats without sampling -------------------------------------------------
def test_minus_zero_is_a_repeat_answered_without_sampling(digits_checkpoint, digits, tmp_path):
    app, model = counting_app(digits_checkpoint, tmp_path / "m.sqlite")
    x = digits[0][0]
    assert (x == 0).any()
    negated = torch.where(x == 0, torch.tensor(-0.0), x)
    assert not torch.equal(x.view(torch.int32), negated.view(torch.int32))
    with TestClient(app) as client:
        first = client.post("/v1/certify", json=as_json(x)).json()
        calls = model.calls
        assert calls > 0 and not first["repeat"]
        again = client.post("/v1/certify", json={"input": negated.tolist()}).json()
        assert json.dumps(negated.tolist()).count("-0.0") > 0  # sent as -0.0
        assert model.calls == calls, "a repeat is answered from the memory, not sampled"
        assert again["repeat"] and {
            k: again[k] for k in ("predict", "radius", "entry", "sigma", "mc_predict", "mc_radius")
        } == {
            k: first[k] for k in ("predict", "radius", "entry", "sigma", "mc_predict", "mc_radius")
        }
        predicted = client.post("/v1/predict", json=as_json(x)).json()
        assert predicted["repeat"] and model.calls == calls  # predict repeats too
        stats = client.get("/v1/memory/stats").json()
        assert stats["entries"] == 1 and stats["repeats"] == 2


def test_the_command_line_answers_repeats_from_the_memory_without_sampling(
    digits_checkpoint, digits, tmp_path
):
    from ddrs.results import read_table
    from ddrs.runs import CertifyRun, certify_dataset

    model = Counting(load_checkpoint(digits_checkpoint).model)
    memory = str(tmp_path / "m.sqlite")

    def run(out: str) -> dict:
        certify_dataset(
            model,
            digits,
            CertifyRun(
                out=str(tmp_path / out),
                sigma=0.25,
                n0=N0,
                n=N,
                alpha=ALPHA,
                max=12,
                memory=memory,
                batch=64,
                progress=False,
            ),
        )
        return read_table(tmp_path / out)

    first = run("first.tsv")
    calls = model.calls
    assert calls > 0
    second = run("second.tsv")
    assert model.calls == calls, "every input is a repeat: nothing is sampled"
    for column in ("predict", "radius", "sigma", "mc_predict", "mc_radius"):
        assert second[column].tolist() == first[column].tolist(), column
    with CertificationMemory.open_existing(memory) as stored:
        assert len(stored) == 12 and stored.stats()["repeats"] == 12
