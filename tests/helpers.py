"""Helpers the test modules share: free ports, a `ddrs serve` process, JSON requests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import torch

TOKEN = "s3cret-token-of-the-tests"


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def url_of(port: int, host: str = "127.0.0.1") -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def start_server(checkpoint, memory, port, *extra, host: str = "127.0.0.1"):
    """`ddrs serve` of a digits checkpoint (certified sigma search, small N), started and
    answering /health; its output (stdout and stderr) is read with `.communicate()`."""
    command = [sys.executable, "-m", "ddrs", "serve", "--checkpoint", checkpoint, "--dataset",
               "digits", "--memory", str(memory), "--sigma0", "0.25", "--grid", "5",
               "--samples", "16", "--n0", "20", "--n", "4000", "--alpha", "0.01", "--device",
               "cpu", "--port", str(port), "--host", host, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url_of(port, host)}/health", timeout=1):
                return server
        except OSError:
            assert server.poll() is None, server.communicate()[0]
            time.sleep(0.1)
    server.kill()
    raise AssertionError("the server did not start")


def as_json(x: torch.Tensor) -> dict:
    return {"input": x.tolist()}


def post(port, x: torch.Tensor, timeout=60, path="/v1/certify", headers=None) -> dict:
    """POST x as JSON; the answer's body."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     data=json.dumps(as_json(x)).encode(),
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())
