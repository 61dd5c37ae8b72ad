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
        "--grid",
        "5",
        "--samples",
        "16",
        "--n0",
        "20",
        "--n",
        "4000",
        "--alpha",
        "0.01",
        "--device",
        "cpu",
        "--port",
        str(port),
        "--host",
        host,
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
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
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(as_json(x)).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def pattern_image(kind: int, size: int, rng) -> np.ndarray:
    """A class-shaped pattern (H, W) in 0..255 with noise: learnable in a few epochs."""
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    shapes = [
        (xx**2 + yy**2) < 0.1,
        (np.abs(xx) < 0.08) | (np.abs(yy) < 0.08),
        (np.abs(xx) < 0.3) & (np.abs(yy) < 0.3),
    ]
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


CIFAR_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def cifar_batches(per_class: dict[str, int], seed: int = 0) -> dict[str, tuple]:
    """A small CIFAR-10 in its python-batches form ({file name: (data uint8 (N, 3072),
    labels)}): each class a colour with noise, so that a model learns something in an epoch.
    The training images fill data_batch_1..5 in turn."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(30, 226, (len(CIFAR_CLASSES), 3))

    def images(count: int):
        labels = np.repeat(np.arange(len(CIFAR_CLASSES)), count)
        rng.shuffle(labels)
        noise = rng.normal(0, 40, (len(labels), 3, 32, 32))
        data = (colours[labels][:, :, None, None] + noise).clip(0, 255).astype(np.uint8)
        return data.reshape(len(labels), 3072), [int(y) for y in labels]

    train_data, train_labels = images(per_class["train"])
    files = {
        f"data_batch_{k + 1}": (part, list(labels))
        for k, (part, labels) in enumerate(
            zip(np.array_split(train_data, 5), np.array_split(np.array(train_labels), 5))
        )
    }
    files["test_batch"] = images(per_class["test"])
    return files


def write_cifar_archive(path: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """`cifar-10-python.tar.gz` as the CIFAR-10 site serves it (cifar-10-batches-py/...),
    holding `cifar_batches(per_class)`."""
    import io
    import pickle
    import tarfile

    with tarfile.open(path, "w:gz") as archive:

        def add(name: str, payload: dict) -> None:
            data = pickle.dumps(payload)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))

        for name, (data, labels) in cifar_batches(per_class, seed).items():
            add(
                name,
                {b"data": data, b"labels": [int(v) for v in labels], b"batch_label": name.encode()},
            )
        add("batches.meta", {b"label_names": [c.encode() for c in CIFAR_CLASSES]})
    return path


class PostgresMissing(Exception):
    """No PostgreSQL server binaries on this machine."""


class PostgresServer:
    """A PostgreSQL server of the tests' own: initdb into a temporary folder, on a free port,
    run as the `postgres` user when the tests run as root (PostgreSQL refuses root)."""

    def __init__(self, folder):
        import getpass
        import glob
        import shutil
        import socket

        found = shutil.which("initdb") or next(
            iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)), None
        )
        if found is None:
            raise PostgresMissing("PostgreSQL is not installed (apt-get install postgresql)")
        self.bin = os.path.dirname(os.path.realpath(found))
        if not os.path.exists(os.path.join(self.bin, "pg_ctl")):
            self.bin = os.path.dirname(found)
        self.folder = folder
        self.data = os.path.join(folder, "data")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.as_user = []
        if os.geteuid() == 0:
            import pwd

            user = pwd.getpwnam("postgres")
            os.chown(folder, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.user = "postgres" if self.as_user else getpass.getuser()
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", "ddrs", "--no-sync")
        self.url = f"postgresql://ddrs@127.0.0.1:{self.port}/postgres"
        self.start()

    def _run(self, tool, *args):
        import subprocess

        command = [*self.as_user, os.path.join(self.bin, tool), *args]
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.folder)
        assert done.returncode == 0, done.stdout + done.stderr

    def start(self):
        self._run(
            "pg_ctl",
            "-D",
            self.data,
            "-w",
            "-l",
            os.path.join(self.folder, "log"),
            "-o",
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder}",
            "start",
        )

    def stop(self, mode="fast"):
        self._run("pg_ctl", "-D", self.data, "-w", "-m", mode, "stop")

    def fresh_database(self, name):
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + f"/{name}"


def rule_oracle(x, c: int, r: float, xs, cs, rs, p: int = 2) -> tuple[int, float]:
    """The memory's rule written out entry by entry in plain numpy float64, with L2 distances
    (p = 2) or L1 (p = 1); an exact repeat gets the stored answer."""
    xv = x.float().double().numpy().ravel()
    best = None
    for j in range(len(xs)):
        xj = xs[j].float().double().numpy().ravel()
        gap = np.abs(xv - xj)
        d = float(np.sqrt(np.sum(gap**2)) if p == 2 else np.sum(gap))
        if d == 0 and xs[j].float().numpy().tobytes() == x.float().numpy().tobytes():
            return int(cs[j]), float(rs[j])
        if int(cs[j]) != c and d < float(rs[j]) + r:
            margin = d - float(rs[j])
            if best is None or margin < best[0]:
                best = (margin, int(cs[j]))
    if best is None:
        return c, r
    if best[0] < 0:
        return best[1], -best[0]
    return c, best[0]
