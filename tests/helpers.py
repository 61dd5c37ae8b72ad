"""Helpers the test modules share: free ports, a `ddrs serve` process, JSON requests, a
folder of images (ImageFolder layout, sorted by class)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TOKEN = "s3cret-token-of-the-tests"
CLASSES = ("circle", "cross", "square")


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


def pattern_image(kind: int, size: int, rng) -> np.ndarray:
    """A class-shaped pattern (H, W) in 0..255 with noise: learnable in a few epochs."""
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    shapes = [(xx**2 + yy**2) < 0.1, (np.abs(xx) < 0.08) | (np.abs(yy) < 0.08),
              (np.abs(xx) < 0.3) & (np.abs(yy) < 0.3)]
    img = shapes[kind] * 200.0 + rng.normal(0, 20, (size, size)) + 30
    return img.clip(0, 255).astype(np.uint8)


def write_folder(root: Path, per_class: dict, sizes=(32, 40)) -> Path:
    """PNG and JPEG, colour and grey, two sizes."""
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(count):
                grey = pattern_image(label, sizes[k % len(sizes)], rng)
                if k % 2:
                    Image.fromarray(grey, "L").save(folder / f"{k}.png")
                else:
                    colour = np.stack([grey, grey // 2, 255 - grey], axis=2)
                    Image.fromarray(colour, "RGB").save(folder / f"{k}.jpg", quality=95)
    return root
