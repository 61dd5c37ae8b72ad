"""L1 certificates end to end: the memory's rule and index with L1 balls (against an oracle
written entry by entry), a memory records its norm and refuses the other, and the command
line's runs (norm column, report axis, serve) and its refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import rule_oracle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddrs.cli import main
from ddrs.errors import MemoryStoreError
from ddrs.memory import TOLERANCE, CertificationMemory
from ddrs.memory.rule import find_repeat, resolve
from ddrs.report.metrics import load_runs
from ddrs.report.plots import radius_label
from ddrs.results import read_settings, read_table

SHAPE = (3,)


def l1_memories() -> list[CertificationMemory]:
    """An L1 memory three ways: its index, a scan of the store, an index that overflows."""
    options = {"pixel_range": None, "norm": "l1"}
    return [
        CertificationMemory(":memory:", "fp", SHAPE, chunk_size=2, **options),
        CertificationMemory(":memory:", "fp", SHAPE, chunk_size=3, cache_bytes=0, **options),
        CertificationMemory(":memory:", "fp", SHAPE, chunk_size=1, cache_bytes=200, **options),
    ]


coordinate = st.integers(-8, 8).map(lambda k: k / 2)
step = st.tuples(
    st.lists(coordinate, min_size=3, max_size=3),
    st.integers(-1, 2),
    st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0]),
    st.booleans(),  # or an exact repeat of a stored input
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, min_size=1, max_size=25))
def test_the_l1_memory_follows_the_rule_and_keeps_balls_of_other_classes_apart(steps):
    mems = l1_memories()
    xs = torch.empty(0, *SHAPE)
    cs, rs = torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.float64)
    for coords, c, r, repeat in steps:
        x = xs[len(xs) - 1].clone() if repeat and len(xs) else torch.tensor(coords)
        r = 0.0 if c == -1 else r
        j = find_repeat(x, xs)
        expected = rule_oracle(x, c, r, xs, cs, rs, p=1)  # a repeat: the stored answer
        assert expected[:2] == resolve(x, c, r, xs, cs, rs, norm="l1")[:2] or j is not None
        for mem in mems:
            answer = mem.resolve_and_store(x, c, r, sigma=0.5)
            assert (answer.predict, answer.radius) == expected
        if j is None:
            xs = torch.cat([xs, x[None]])
            cs = torch.cat([cs, torch.tensor([expected[0]])])
            rs = torch.cat([rs, torch.tensor([expected[1]], dtype=torch.float64)])
    for mem in mems:
        assert mem.check(tol=0) == []  # half-integer coordinates and radii: exact arithmetic
    # every query strictly inside an L1 ball is answered with that ball's class
    grid = torch.arange(-5, 5.25, 0.75)
    queries = torch.stack(torch.meshgrid(grid, grid, grid, indexing="ij"), -1).reshape(-1, 3)
    for q in queries:
        d = (xs.double() - q.double()).abs().sum(dim=1)
        inside = torch.nonzero(d < rs - TOLERANCE * (1 + rs)).flatten()
        c, _, _ = resolve(q, 3, 1.0, xs, cs, rs, norm="l1")
        assert all(c == int(cs[j]) for j in inside)
    for mem in mems:
        mem.close()


def test_l1_and_l2_balls_differ_where_the_norms_do():
    """Two certificates of different classes at L1 distance 2 and L2 distance sqrt(2), radius
    0.8 each: L2 balls overlap (the second shrinks), L1 balls do not (it is kept)."""
    first, second = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])
    for norm, kept in (("l2", False), ("l1", True)):
        with CertificationMemory(":memory:", "fp", (2,), pixel_range=None, norm=norm) as mem:
            mem.resolve_and_store(first, 0, 0.8, sigma=0.5)
            answer = mem.resolve_and_store(second, 1, 0.8, sigma=0.5)
            assert (answer.radius == 0.8) == kept
            assert mem.stats()["norm"] == norm


def test_a_memory_records_its_norm_and_refuses_the_other(tmp_path):
    path = tmp_path / "m.sqlite"
    with CertificationMemory(path, "fp", (2,), norm="l1") as mem:
        mem.resolve_and_store(torch.tensor([0.1, 0.2]), 0, 0.3, sigma=0.5)
    with pytest.raises(MemoryStoreError, match="holds L1 balls") as refused:
        CertificationMemory(path, "fp", (2,))
    assert "\n" not in str(refused.value)
    with CertificationMemory.open_existing(path) as mem:  # tools open it in its own norm
        assert mem.norm == "l1" and len(mem) == 1
    with CertificationMemory(tmp_path / "m2.sqlite", "fp", (2,)) as mem:
        mem.resolve_and_store(torch.tensor([0.1, 0.2]), 0, 0.3, sigma=0.5)
    with pytest.raises(MemoryStoreError, match="holds L2 balls"):
        CertificationMemory(tmp_path / "m2.sqlite", "fp", (2,), norm="l1")


def test_a_memory_made_before_norms_were_recorded_holds_l2_balls(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    with CertificationMemory(path, "fp", (2,)) as mem:
        mem.resolve_and_store(torch.tensor([0.1, 0.2]), 0, 0.3, sigma=0.5)
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM meta WHERE key = 'norm'")
    with CertificationMemory(path, "fp", (2,)) as mem:
        assert mem.norm == "l2" and len(mem) == 1
    with pytest.raises(MemoryStoreError, match="--norm l2"):
        CertificationMemory(path, "fp", (2,), norm="l1")


# ------------------------------------------------------------------------ the command line


def certify(checkpoint, out, *extra) -> list[str]:
    return ["certify", "--checkpoint", checkpoint, "--dataset", "digits", "--n0", "20",
            "--n", "500", "--max", "30", "--skip", "3", "--no-progress", "--out", str(out),
            *extra]  # fmt: skip


def test_certify_under_l1_writes_a_norm_column_and_the_report_labels_its_axis(
    digits_checkpoint, tmp_path, capsys
):
    out, memory = tmp_path / "l1.tsv", tmp_path / "m.sqlite"
    counts = tmp_path / "l1.counts.tsv"
    args = certify(digits_checkpoint, out, "--norm", "l1", "--sigma", "0.4")
    args += ["--counts", str(counts)]
    assert main(args) == 0
    assert "largest certifiable radius" in capsys.readouterr().out
    table = read_table(out)
    again = tmp_path / "again.tsv"  # the counts recertified at the same alpha: the same L1 radii
    assert main(["recertify", str(counts), "--alpha", "0.001", "--out", str(again)]) == 0
    assert np.array_equal(read_table(again)["radius"], table["radius"])
    assert set(table["norm"]) == {"l1"}
    certified = table["radius"][table["predict"] >= 0]
    assert len(certified) and (certified <= 2 * 0.4 * 0.5).all()  # at most lambda (pA <= 1)
    recorded = read_settings(out)
    assert (recorded["norm"], recorded["noise"]) == ("l1", "float")
    assert recorded["radius_units"].startswith("L1 radius")
    l2 = tmp_path / "l2.tsv"
    assert main(certify(digits_checkpoint, l2, "--sigma", "0.25")) == 0
    assert "norm" not in read_table(l2)  # L2 rows keep Cohen et al.'s columns
    # per-input lambda through a memory of L1 balls
    sigmas = tmp_path / "lambda.tsv"
    assert main(["sigma", "--checkpoint", digits_checkpoint, "--dataset", "digits", "--max",
                 "30", "--skip", "3", "--sigma0", "0.4", "--norm", "l1", "--n", "500",
                 "--no-progress", "--out", str(sigmas)]) == 0  # fmt: skip
    routed = tmp_path / "dd.tsv"
    args = certify(digits_checkpoint, routed, "--norm", "l1", "--sigmas", str(sigmas))
    assert main([*args, "--memory", str(memory)]) == 0
    with CertificationMemory.open_existing(memory) as mem:
        assert mem.norm == "l1" and len(mem) == 10 and mem.check() == []
    # the same memory refuses L2 certificates, in one line and before writing anything; and
    # lambdas chosen for L1 are not taken as sigmas
    capsys.readouterr()
    refused = tmp_path / "refused.tsv"
    args = certify(digits_checkpoint, refused, "--sigma", "0.25", "--memory", str(memory))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "L1 balls" in err and not refused.exists()
    assert main(certify(digits_checkpoint, refused, "--sigmas", str(sigmas))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "chosen for --norm l1" in err and not refused.exists()
    # resolved offline, the L1 results make a memory of L1 balls
    applied = tmp_path / "applied.sqlite"
    assert main(["memory", "apply", str(out), "--checkpoint", digits_checkpoint, "--dataset",
                 "digits", "--memory", str(applied), "--out", str(tmp_path / "ap.tsv"),
                 "--no-progress"]) == 0  # fmt: skip
    with CertificationMemory.open_existing(applied) as mem:
        assert mem.norm == "l1" and len(mem) == 10
    assert radius_label([load_runs([str(out)])[0]]).startswith("L1 radius")
    assert main(["report", str(out), "--plot", str(tmp_path / "l1.png")]) == 0
    assert main(["report", str(out), str(l2)]) == 2  # radii of two norms are not comparable
    assert "different norms (l1, l2)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--norm", "l1", "--noise", "discrete", "--sigma", "0.25"], "--noise float"),
        (["--noise", "discrete", "--sigma", "0.25"], "8-bit images"),
        (["--noise", "discrete", "--sigma", "5"], "sigma in (0, 4]"),
    ],
)
def test_bad_noise_options_are_one_line_and_leave_no_file(
    digits_checkpoint, tmp_path, capsys, extra, message
):
    out = tmp_path / "run"
    out.mkdir()
    args = certify(digits_checkpoint, out / "r.tsv", *extra, "--memory", str(out / "m.sqlite"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddrs: error:") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
    assert list(out.iterdir()) == []


def test_the_cascade_refuses_l1_in_one_line(digits_checkpoint, tmp_path, capsys):
    out = tmp_path / "r.tsv"
    args = ["certify", "--expert", f"a={digits_checkpoint}:0.12",
            "--expert", f"b={digits_checkpoint}:0.25", "--dataset", "digits", "--cascade",
            "0.7", "--norm", "l1", "--max", "3", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--norm l1" in err and not out.exists()


def test_settings_written_before_norms_existed_still_resume(digits_checkpoint, tmp_path):
    out = tmp_path / "r.tsv"
    args = certify(digits_checkpoint, out, "--sigma", "0.25", "--max", "12")
    assert main(args) == 0
    sidecar = tmp_path / "r.tsv.settings.json"
    recorded = json.loads(sidecar.read_text())
    del recorded["norm"], recorded["noise"]
    sidecar.write_text(json.dumps(recorded))
    assert main(certify(digits_checkpoint, out, "--sigma", "0.25")) == 0
    assert len(read_table(out)["idx"]) == 10
    assert main(certify(digits_checkpoint, out, "--sigma", "0.25", "--norm", "l1")) == 2


# ------------------------------------------------------------------------------ the service


def service_of(checkpoint, memory_path, family: str, sigma0: float):
    from ddrs.classifier import DataDependentSmoothClassifier
    from ddrs.data import dataset_info
    from ddrs.models import load_checkpoint
    from ddrs.models.identity import memory_fingerprint
    from ddrs.serve import CertificationService

    info = dataset_info("digits")
    model = load_checkpoint(checkpoint, device="cpu").model
    fingerprint = memory_fingerprint(model, info.name, info.input_shape)
    norm = "l1" if family == "uniform" else "l2"

    def make_classifier():
        memory = CertificationMemory(memory_path, fingerprint, info.input_shape, norm=norm)
        return DataDependentSmoothClassifier(
            model, 10, memory, sigma0, n0=20, n=300, alpha=0.01,
            search={"grid": 5, "samples": 16}, family=family,
        )  # fmt: skip

    return CertificationService(make_classifier, info, describe={"dataset": "digits"})


def test_the_service_certifies_l1_radii_with_per_input_lambda_and_discrete_noise(
    digits_checkpoint, tmp_path
):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    import io

    from fastapi.testclient import TestClient
    from helpers import as_json
    from PIL import Image

    from ddrs.data import get_dataset
    from ddrs.serve import create_app
    from ddrs.serve.page import render_page

    digits = get_dataset("digits", "test")
    with TestClient(create_app(service_of(digits_checkpoint, tmp_path / "l1.sqlite",
                                          "uniform", 0.4))) as client:  # fmt: skip
        answers = [client.post("/v1/certify", json=as_json(digits[i][0])).json() for i in range(4)]
        assert all(a["radius"] <= a["sigma"] for a in answers)  # L1: at most lambda
        assert len({a["sigma"] for a in answers}) > 1  # a lambda per input
        assert client.get("/v1/memory/stats").json()["norm"] == "l1"
        assert '"norm": "l1"' in render_page({"norm": "l1", "alpha": 0.01}, False)
    with CertificationMemory.open_existing(tmp_path / "l1.sqlite") as memory:
        assert memory.norm == "l1" and len(memory) == 4
    discrete = service_of(digits_checkpoint, tmp_path / "d.sqlite", "discrete", 0.25)
    with TestClient(create_app(discrete)) as client:
        refused = client.post("/v1/certify", json=as_json(digits[0][0]))  # values k/16
        assert refused.status_code == 422 and "8-bit images" in refused.json()["error"]
        png = io.BytesIO()
        pixels = (digits[0][0][0].numpy() * 255).round().astype("uint8")
        Image.fromarray(pixels, mode="L").save(png, format="PNG")
        upload = client.post("/v1/certify", files={"file": ("d.png", png.getvalue(), "image/png")})
        assert upload.status_code == 200, upload.text
        assert client.get("/health").json()["entries"] == 1  # the refused query stored nothing


def test_training_under_uniform_noise_for_l1_certificates(tmp_path, capsys):
    from ddrs.models import load_checkpoint

    out = tmp_path / "u"
    args = ["train", "--dataset", "digits", "--arch", "cnn", "--sigma", "0.4", "--norm", "l1",
            "--epochs", "1", "--batch", "64", "--lr", "0.05", "--eval-max", "20",
            "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    meta = load_checkpoint(str(out / "last.pt"), device="cpu").meta
    assert meta["norm"] == "l1" and meta["train_config"]["norm"] == "l1"
    capsys.readouterr()
    refused = tmp_path / "m"
    assert main([*args[:-1], str(refused), "--method", "macer"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--norm l1 trains" in err and not refused.exists()
