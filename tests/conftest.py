import os
import tempfile

import pytest
import torch
from helpers import PostgresMissing, PostgresServer
from torch import nn

os.environ.setdefault("OMP_NUM_THREADS", "2")
# the suite runs torch eager unless a test names an engine (auto measures every new model);
# exported and quantized models go to a cache of the suite's own
os.environ.setdefault("DDRS_ENGINE", "eager")
os.environ.setdefault("DDRS_CACHE", tempfile.mkdtemp(prefix="ddrs-cache-"))


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
    config = TrainConfig(
        dataset="digits",
        arch="cnn",
        out=str(out),
        sigma=0.25,
        epochs=1,
        batch=64,
        lr=0.05,
        eval_max=20,
        progress=False,
    )
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


@pytest.fixture(scope="session")
def postgres():
    import shutil
    import tempfile

    pytest.importorskip("psycopg", reason="pip install 'ddrs[postgres]'")
    folder = tempfile.mkdtemp(prefix="ddrs-pg-")  # not under pytest's folders: the server's
    try:  # user must reach it
        try:
            server = PostgresServer(folder)
        except PostgresMissing as missing:
            pytest.skip(str(missing))
        yield server
        server.stop("immediate")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pg_url(postgres, request):
    """A new, empty database on the tests' PostgreSQL server."""
    import re

    return postgres.fresh_database(re.sub(r"\W", "_", request.node.name)[-50:].lower())
