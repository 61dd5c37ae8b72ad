"""A service without a memory: a cascade or a router certifies the route, so nothing is stored,
answers do not depend on the order of queries, and replicas share nothing. Its answers equal
the offline ones for the same noise keys (drawn from each input's own bytes)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from helpers import as_json  # noqa: E402

from ddrs.classifier import DataDependentSmoothClassifier  # noqa: E402
from ddrs.core.cascade import Cascade  # noqa: E402
from ddrs.core.experts import Expert, Experts  # noqa: E402
from ddrs.core.noise import content_key  # noqa: E402
from ddrs.data import dataset_info, get_dataset  # noqa: E402
from ddrs.models import load_checkpoint  # noqa: E402
from ddrs.serve import CertificationService, create_app  # noqa: E402

N0, N, ALPHA = 20, 300, 0.01


@pytest.fixture(scope="module")
def experts(digits_checkpoint):
    model = load_checkpoint(digits_checkpoint).model
    return Experts(tuple(Expert(f"at{s:g}", digits_checkpoint, s, model) for s in (0.12, 0.5)))


def stateless_app(experts, **classifier):
    info = dataset_info("digits")

    def make_classifier():
        return DataDependentSmoothClassifier(
            experts, 10, None, n0=N0, n=N, alpha=ALPHA, **classifier
        )

    return create_app(CertificationService(make_classifier, info))


def test_a_cascade_service_answers_as_the_offline_cascade_and_stores_nothing(experts, tmp_path):
    test = get_dataset("digits", "test")
    xs = [test[i][0] for i in range(6)]
    app = stateless_app(experts, cascade=0.6)
    with TestClient(app) as client:
        served = [client.post("/v1/certify", json=as_json(x)).json() for x in xs]
        again = [client.post("/v1/certify", json=as_json(x)).json() for x in reversed(xs)]
        assert client.get("/v1/memory/stats").status_code == 404
        assert "entries" not in client.get("/health").json()
        assert '"stateless": true' in client.get("/").text  # the page says none is kept
    offline = Cascade(experts, 10, 0.6).certify_batch(
        torch.stack(xs), n0=N0, n=N, alpha=ALPHA, keys=[content_key(x) for x in xs]
    )
    assert [(a["predict"], a["radius"], a["expert"]) for a in served] == [
        (c.predict, c.radius, experts[c.expert].name if c.expert >= 0 else "") for c in offline
    ]
    assert list(reversed(again)) == served  # the same image, the same answer, in any order
    assert all(a["entry"] == -1 and not a["repeat"] for a in served)
    assert not list(tmp_path.iterdir())  # nothing written anywhere


def test_a_router_service_answers_as_offline_dual_smoothing(experts, tmp_path):
    from ddrs.core.route import DualSmoothing, Router
    from ddrs.models import build_model

    torch.manual_seed(0)
    router = Router(build_model("cnn", 2, (1, 8, 8), (0.3,), (0.4,)).eval(), 0.5, experts.names)
    test = get_dataset("digits", "test")
    xs = [test[i][0] for i in range(4)]
    with TestClient(stateless_app(experts, router=router)) as client:
        served = [client.post("/v1/certify", json=as_json(x)).json() for x in xs]
    offline = DualSmoothing(router, experts, 10).certify_batch(
        torch.stack(xs), n0=N0, n=N, router_n=N, alpha=ALPHA, keys=[content_key(x) for x in xs]
    )
    assert [(a["predict"], a["radius"]) for a in served] == [(c.predict, c.radius) for c in offline]


def test_only_a_stateless_service_may_go_without_a_memory(digits_checkpoint, tmp_path, capsys):
    from ddrs.cli import main

    base = ["serve", "--dataset", "digits", "--port", "1"]
    assert main([*base, "--checkpoint", digits_checkpoint, "--sigma0", "0.25"]) == 2
    assert "give --memory" in capsys.readouterr().err
    experts = ["--expert", f"{digits_checkpoint}:0.12", "--expert", f"{digits_checkpoint}:0.5"]
    assert main([*base, *experts]) == 2  # the selector over experts needs the memory
    assert "give --memory" in capsys.readouterr().err
    assert main([*base, *experts, "--cascade", "0.3"]) == 2
    assert "--cascade P0 must be a probability in [0.5, 1)" in capsys.readouterr().err
    classifier = DataDependentSmoothClassifier
    with pytest.raises(Exception, match="needs a memory"):
        classifier(load_checkpoint(digits_checkpoint).model, 10, None, sigma0=0.25)
    assert not list(tmp_path.iterdir())
