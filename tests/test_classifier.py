"""The online data-dependent classifier equals the offline pipeline (sigma TSV, certify,
memory apply in index order) on the same inputs, seeds and order."""

import pytest
import torch

from ddrs.classifier import DataDependentSmoothClassifier
from ddrs.data import get_dataset
from ddrs.memory import CertificationMemory
from ddrs.models import load_checkpoint
from ddrs.models.identity import memory_fingerprint
from ddrs.results import read_table
from ddrs.runs import CertifyRun, SigmaRun, certify_dataset, sigma_dataset

SEARCH_OPTIONS = {
    "ascent": {"iterations": 4, "lr": 1e-2, "samples": 2},
    "certified": {"grid": 5, "samples": 8, "n": 200, "alpha": 0.01},
}


@pytest.mark.parametrize("selector", ["ascent", "certified"])
def test_online_classifier_matches_offline_resolution(digits_checkpoint, tmp_path, selector):
    model = load_checkpoint(digits_checkpoint).model
    data = get_dataset("digits", "test")
    shape = data.info.input_shape
    search = SEARCH_OPTIONS[selector]
    count, n0, n, alpha = 30, 20, 200, 0.01

    # offline: sigmas for all, Monte Carlo for all, then the memory in index order
    sigmas = tmp_path / "sigmas.tsv"
    sigma_dataset(
        model,
        data,
        SigmaRun(
            out=str(sigmas), sigma0=0.25, search=selector, max=count, progress=False, **search
        ),
    )
    fingerprint = memory_fingerprint(model, "digits", shape)
    offline = tmp_path / "offline.tsv"
    certify_dataset(
        model,
        data,
        CertifyRun(
            out=str(offline),
            n0=n0,
            n=n,
            alpha=alpha,
            sigmas=str(sigmas),
            memory=str(tmp_path / "offline.sqlite"),
            max=count,
            progress=False,
        ),
    )
    rows = read_table(offline)

    # online: one query at a time
    with CertificationMemory(tmp_path / "online.sqlite", fingerprint, shape) as memory:
        clf = DataDependentSmoothClassifier(
            model,
            10,
            memory,
            sigma0=0.25,
            n0=n0,
            n=n,
            alpha=alpha,
            selector=selector,
            search=search,
        )
        answers = [clf.certify(data[i][0], key=i) for i in range(count)]
        assert len(memory) == count

    # Classes and counts are exact. Sigmas (hence radii) agree to float32 rounding only: the
    # CPU kernels round differently for a batch of 30 inputs than for one. The memory rule
    # itself is compared exactly on identical certificates in test_cli.py.
    assert [a.predict for a in answers] == rows["predict"].tolist()
    assert [a.mc_predict for a in answers] == rows["mc_predict"].tolist()
    assert [a.changed or a.shrunk for a in answers] == (
        (rows["predict"] != rows["mc_predict"]) | (rows["radius"] < rows["mc_radius"])
    ).tolist()
    for name, column in (("radius", "radius"), ("mc_radius", "mc_radius"), ("sigma", "sigma")):
        got = torch.tensor([getattr(a, name) for a in answers], dtype=torch.float64)
        assert torch.allclose(got, torch.tensor(rows[column]), rtol=1e-5, atol=1e-7), name


def test_online_predict_is_stored_and_repeat_returns_stored_answer(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with CertificationMemory(tmp_path / "m.sqlite", "fp", (1, 8, 8)) as memory:
        clf = DataDependentSmoothClassifier(
            model,
            10,
            memory,
            sigma0=0.25,
            n0=10,
            n=100,
            selector="ascent",
            search={"iterations": 2, "lr": 1e-3, "samples": 1},
        )
        x = torch.rand(1, 8, 8)
        first = clf.predict(x)
        again = clf.certify(x)  # an exact repeat answers from the memory
        assert first.radius == 0.0 and (again.predict, again.radius) == (first.predict, 0.0)
        assert len(memory) == 1
