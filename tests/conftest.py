import os

import pytest
import torch
from torch import nn

os.environ.setdefault("OMP_NUM_THREADS", "2")


class LinearBinary(nn.Module):
    """f(x) = 1 if w.x + b > 0 else 0: P(f(x + s e) = 1) = Phi((w.x + b) / (s ||w||)) exactly.

    The smoothed classifier's exact L2 robustness radius at x is |w.x + b| / ||w||.
    """

    def __init__(self, w: torch.Tensor, b: float, scale: float = 1.0):
        super().__init__()
        self.w, self.b, self.scale = w.flatten(), float(b), scale

    def margin(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) @ self.w + self.b) / self.w.norm()

    def forward(self, x):
        z = (x.flatten(1) @ self.w + self.b) * self.scale
        return torch.stack([torch.zeros_like(z), z], dim=1)


@pytest.fixture
def linear_model():
    g = torch.Generator().manual_seed(123)
    w = torch.randn(16, generator=g)
    b = -float(w.sum()) / 2  # hyperplane through the centre of [0, 1]^16
    return LinearBinary(w, b)


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory) -> str:
    """A digits CNN trained for one epoch (seconds): a real model for end-to-end runs."""
    from ddrs.train.loop import TrainConfig, train

    out = tmp_path_factory.mktemp("digits-cnn")
    config = TrainConfig(dataset="digits", arch="cnn", out=str(out), sigma=0.25, epochs=1,
                         batch=64, lr=0.05, eval_max=20, progress=False)
    return str(train(config))


@pytest.fixture(scope="session")
def other_digits_checkpoint(digits_checkpoint, tmp_path_factory) -> str:
    """The session's digits CNN with one weight changed: another model (another fingerprint)
    for the same inputs, without training one."""
    from ddrs.models import load_checkpoint, save_checkpoint

    loaded = load_checkpoint(digits_checkpoint)
    with torch.no_grad():
        next(loaded.model.parameters()).view(-1)[0] += 0.01
    path = tmp_path_factory.mktemp("other-digits-cnn") / "other.pt"
    save_checkpoint(path, loaded.model, loaded.meta)
    return str(path)


class PostgresServer:
    """A PostgreSQL server of the tests' own: initdb into a temporary folder, on a free port,
    run as the `postgres` user when the tests run as root (PostgreSQL refuses root)."""

    def __init__(self, folder):
        import getpass
        import glob
        import shutil
        import socket

        found = shutil.which("initdb") or next(iter(sorted(glob.glob(
            "/usr/lib/postgresql/*/bin/initdb"), reverse=True)), None)
        if found is None:
            pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
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
        self._run("pg_ctl", "-D", self.data, "-w", "-l", os.path.join(self.folder, "log"), "-o",
                  f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder}", "start")

    def stop(self, mode="fast"):
        self._run("pg_ctl", "-D", self.data, "-w", "-m", mode, "stop")

    def fresh_database(self, name):
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="session")
def postgres():
    import shutil
    import tempfile

    pytest.importorskip("psycopg", reason="pip install 'ddrs[postgres]'")
    folder = tempfile.mkdtemp(prefix="ddrs-pg-")  # not under pytest's folders: the server's
    try:                                          # user must reach it
        server = PostgresServer(folder)
        yield server
        server.stop("immediate")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pg_url(postgres, request):
    """A new, empty database on the tests' PostgreSQL server."""
    import re

    return postgres.fresh_database(re.sub(r"\W", "_", request.node.name)[-50:].lower())
