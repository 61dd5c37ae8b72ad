"""Certify at a radius (`--radius`): a sequential test that stops each input once decided.

Soundness on a closed form: a linear classifier whose smoothed probability is exactly
Phi(margin / sigma), so an input at margin just below R is *not* robust at R and any
"certified at R" is false. The union bound over the looks keeps false answers within alpha;
the same test that re-tests Clopper-Pearson at every look without it fails."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from scipy.stats import norm

import ddrs.core.smooth as smooth_module
from ddrs.cli import main
from ddrs.core.smooth import ABSTAIN, Smooth
from ddrs.core.stats import largest_radius, look_alpha, radius_looks
from ddrs.results import read_table

SIGMA, RADIUS, ALPHA, N = 0.25, 0.25, 0.05, 1000
TRIALS = 2000


def at_margin(model, margin: float) -> torch.Tensor:
    """The point at signed distance `margin` from the model's hyperplane, through the centre
    of [0, 1]^16 (where the margin is 0)."""
    w = model.w / model.w.norm()
    x = 0.5 + margin * w
    assert math.isclose(float(model.margin(x[None])), margin, rel_tol=1e-4)
    return x.view(1, 4, 4)


def false_certificates(model, every: int, peeking: bool, monkeypatch) -> float:
    """The share of TRIALS independent runs that certify, at RADIUS, an input whose exact
    radius is 0.98 RADIUS; looks every `every` samples."""
    monkeypatch.setattr(smooth_module, "radius_looks", lambda n: list(range(every, n + 1, every)))
    if peeking:  # Clopper-Pearson at the full alpha at every look: optional stopping
        monkeypatch.setattr(smooth_module, "look_alpha", lambda alpha, looks: alpha)
    x = at_margin(model, 0.98 * RADIUS).expand(TRIALS, 4, 4)
    smooth = Smooth(model, 2, seed=7)
    found = smooth.certify_batch_at_radius(x, SIGMA, 20, N, ALPHA, RADIUS, batch=4096)
    return sum(c.predict != ABSTAIN for c in found) / TRIALS  # every one of them is false


def test_false_certificates_at_a_radius_stay_within_alpha_and_peeking_breaks_that(
    linear_model, monkeypatch
):
    exact = norm.cdf(0.98 * RADIUS / SIGMA)
    assert exact < norm.cdf(RADIUS / SIGMA)  # not robust at RADIUS: every certificate is false
    slack = 3 * math.sqrt(ALPHA * (1 - ALPHA) / TRIALS)
    sound = false_certificates(linear_model, 20, peeking=False, monkeypatch=monkeypatch)
    assert sound <= ALPHA
    with monkeypatch.context() as patch:
        peeking = false_certificates(linear_model, 20, peeking=True, monkeypatch=patch)
    assert peeking > ALPHA + slack, (sound, peeking)


def test_robust_inputs_are_certified_early_and_the_rest_abstain(linear_model):
    smooth = Smooth(linear_model, 2, seed=1)
    robust = at_margin(linear_model, 2.5 * RADIUS)  # pA = Phi(2.5): decided in few samples
    far_inside = at_margin(linear_model, 0.2 * RADIUS)  # pA = Phi(0.2): refuted early
    x = torch.stack([robust, far_inside])
    found = smooth.certify_batch_at_radius(x, SIGMA, 20, 100_000, 0.001, RADIUS)
    assert (found[0].predict, found[0].radius) == (1, RADIUS)
    assert found[0].n < 100_000 / 10  # a fixed-N CERTIFY would draw all 100,000
    assert (found[1].predict, found[1].radius) == (ABSTAIN, 0.0)
    assert found[1].n <= 400
    # the same answer as CERTIFY where CERTIFY's radius clears RADIUS
    full = smooth.certify_batch(x[:1], SIGMA, 20, 100_000, 0.001)[0]
    assert full.radius > RADIUS


def test_looks_double_and_end_at_n():
    assert radius_looks(1000) == [100, 200, 400, 800, 1000]
    assert radius_looks(50) == [50]
    assert look_alpha(0.001, radius_looks(100_000)) == pytest.approx(0.001 / 11)


def test_the_largest_radius_is_all_votes_for_the_class():
    # every vote for the class: the one-sided Clopper-Pearson bound is alpha^(1/N)
    assert largest_radius(0.25, 100_000, 0.001) == pytest.approx(0.25 * norm.ppf(0.001**1e-5))
    assert largest_radius(0.25, 9, 0.001) == 0.0  # 0.001^(1/9) < 1/2: nothing certifiable


def certify(checkpoint, out, *extra) -> list[str]:
    return ["certify", "--checkpoint", checkpoint, "--dataset", "digits", "--sigma", "0.25",
            "--n0", "20", "--max", "40", "--skip", "4", "--no-progress", "--out", str(out),
            *extra]  # fmt: skip


def test_certify_at_a_radius_writes_each_inputs_samples_and_the_memory_stores_r(
    digits_checkpoint, tmp_path, capsys
):
    out, memory = tmp_path / "r.tsv", tmp_path / "m.sqlite"
    args = certify(digits_checkpoint, out, "--n", "2000", "--radius", "0.25")
    assert main([*args, "--memory", str(memory)]) == 0
    printed = capsys.readouterr().out
    assert "largest certifiable radius" in printed
    table = read_table(out)
    assert set(table["radius"].tolist()) <= {0.0, 0.25} and (table["radius"] == 0.25).any()
    assert (table["n"] <= 2000).all() and (table["n"] < 2000).any()
    assert set(table["mc_radius"].tolist()) <= {0.0, 0.25}
    assert json.loads(Path(f"{out}.settings.json").read_text())["radius"] == 0.25
    full = tmp_path / "full.tsv"
    assert main(certify(digits_checkpoint, full, "--n", "2000")) == 0
    certified = read_table(out)["radius"] == 0.25
    assert (read_table(full)["radius"][certified] > 0.25 * 0.9).all()


def test_unreachable_radii_and_bad_combinations_are_one_line_and_leave_no_file(
    digits_checkpoint, tmp_path, capsys
):
    out, counts = tmp_path / "bad.tsv", str(tmp_path / "c.tsv")
    cases = {
        "radius out of reach": (["--n", "100", "--radius", "0.6"], "at most"),
        "N certifies nothing": (["--n", "8"], "certify nothing"),
        "radius with pilot": (["--radius", "0.2", "--pilot", "100"], "--radius"),
        "radius with counts": (["--radius", "0.2", "--counts", counts], "--radius"),
        "negative radius": (["--radius", "-1"], "--radius"),
    }
    for name, (extra, says) in cases.items():
        capsys.readouterr()
        assert main(certify(digits_checkpoint, out, *extra)) == 2, name
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, (name, err)
        assert not out.exists() and not (tmp_path / "c.tsv").exists()


def test_the_service_answers_at_a_radius_and_refuses_one_out_of_reach(linear_model):
    from ddrs.classifier import DataDependentSmoothClassifier
    from ddrs.errors import InputError
    from ddrs.serve.spec import ServeRun

    classifier = DataDependentSmoothClassifier(
        linear_model, 2, None, sigma0=SIGMA, n0=20, n=10_000, alpha=0.001, selector=None,
        radius=RADIUS,
    )  # fmt: skip
    robust = classifier.certify(at_margin(linear_model, 2.5 * RADIUS), key=1)
    assert (robust.predict, robust.radius) == (1, RADIUS)
    inside = classifier.certify(at_margin(linear_model, 0.2 * RADIUS), key=2)
    assert (inside.predict, inside.radius) == (ABSTAIN, 0.0)
    spec = {"checkpoint": "m.pt", "sigma": 0.25, "input_shape": (1, 4, 4), "num_classes": 2}
    assert ServeRun(**spec, radius=0.5).radius == 0.5
    with pytest.raises(InputError, match="at most"):
        ServeRun(**spec, radius=0.5, n=100)
