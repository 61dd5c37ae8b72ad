"""The router's targets (soft, class-balanced, without the images no expert certifies), its
training from an expert's weights, its held-out summary, and its bad options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ddrs.cli import main
from ddrs.core.experts import Expert, Experts
from ddrs.models import load_checkpoint
from ddrs.results import read_table
from ddrs.train.config import TrainConfig
from ddrs.train.router import (
    RouteLabels,
    RouterOptions,
    soft_targets,
    train_router,
    training_targets,
)

# four images, three experts: radii where each expert is right (0: wrong or abstaining)
RADII = np.array(
    [
        [0.30, 0.60, 0.00],  # two right: mass on both, more on the larger radius
        [0.00, 0.00, 0.00],  # no expert certifies it
        [0.20, 0.00, 0.00],
        [0.00, 0.10, 0.90],
        [0.00, 0.00, 0.80],
    ]
)
LABELS = RouteLabels(list(range(5)), np.array([1, 2, 0, 2, 2]), RADII)


def test_soft_targets_are_the_softmax_of_the_radii_over_the_temperature():
    t = 0.2
    expected = np.exp(RADII[0] / t) / np.exp(RADII[0] / t).sum()
    assert np.allclose(soft_targets(RADII, t)[0], expected)
    assert np.allclose(soft_targets(RADII, 1e-4)[3], [0, 0, 1])  # cold: the largest radius
    assert np.allclose(soft_targets(RADII, 1e4)[3], [1 / 3] * 3, atol=1e-3)  # hot: uniform


def test_images_no_expert_certifies_are_left_out_or_kept_at_their_weight():
    dropped = training_targets(LABELS, temperature=0.1, balance=False)
    assert np.all(dropped[1] == 0) and np.all(dropped[[0, 2, 3, 4]].sum(axis=1) > 0.99)
    kept = training_targets(LABELS, temperature=0.1, uncertified_weight=0.25, balance=False)
    assert np.allclose(kept[1], [0, 0, 0.25])  # its nearest-to-right label, at that weight
    assert np.allclose(kept[0], soft_targets(RADII, 0.1)[0])


def test_class_balance_weighs_each_image_by_one_over_its_routes_share():
    balanced = training_targets(LABELS, temperature=0.05)
    # kept: four images, hard routes 1, 0, 2, 2 -> three routes present; weight 4 / (3 count)
    weights = balanced.sum(axis=1)
    assert np.allclose(weights, [4 / 3, 0, 4 / 3, 2 / 3, 2 / 3], atol=1e-4)
    assert np.allclose(balanced[3] / weights[3], soft_targets(RADII, 0.05)[3], atol=1e-6)


def test_bad_temperature_is_refused():
    from ddrs.errors import InputError

    with pytest.raises(InputError, match="--temperature must be positive"):
        soft_targets(RADII, 0.0)


def _experts(checkpoint: str) -> Experts:
    model = load_checkpoint(checkpoint).model
    return Experts(tuple(Expert(f"s{s:g}", checkpoint, s, model) for s in (0.12, 0.5)))


def test_a_router_trains_on_the_certified_images_from_an_experts_weights(
    digits_checkpoint, tmp_path
):
    experts = _experts(digits_checkpoint)
    config = TrainConfig(
        dataset="digits",
        arch="cnn",
        sigma=0.5,
        epochs=1,
        batch=32,
        eval_max=None,
        progress=False,
        method="consistency",
        init=digits_checkpoint,
        out=str(tmp_path / "router"),
    )
    images = list(range(0, 600, 3))
    path = train_router(
        experts, config, images, samples=16, n=300, alpha=0.01, options=RouterOptions(check_n=100)
    )
    labels = read_table(tmp_path / "router" / "labels.tsv")
    radii = np.stack([labels["radius_0"], labels["radius_1"]], axis=1)
    certified = radii.max(axis=1) > 0
    assert 0 < certified.sum() < len(images)  # a real mix: some images no expert certifies
    about = load_checkpoint(path).meta["router"]
    assert about["certified_images"] == int(certified.sum())
    held = set(range(5, len(images), 10))  # eval_share 0.1: every 10th, from the 5th
    fit_certified = [k for k in range(len(images)) if k not in held and certified[k]]
    assert about["trained_on"] == len(fit_certified)
    summary = json.loads((tmp_path / "router" / "router-summary.json").read_text())
    assert 0 <= summary["route_accuracy"] <= 1 and summary["majority_accuracy"] >= 0.5
    assert set(summary["route_radius_quantiles"]) == {"p10", "p25", "p50", "p75", "p90"}


def test_a_router_starts_from_an_experts_weights_with_a_fresh_output_layer(
    digits_checkpoint, tmp_path, capsys
):
    from ddrs.data import get_dataset
    from ddrs.train.loop import Trainer
    from ddrs.train.router import RoutedImages

    plain = get_dataset("digits", "train", augment=False)
    names = ("a", "b")
    routed = RoutedImages(plain, range(10), names, routes=[0, 1] * 5)
    config = TrainConfig(
        dataset="digits",
        arch="cnn",
        sigma=0.5,
        epochs=1,
        progress=False,
        init=digits_checkpoint,
        out=str(tmp_path / "r"),
    )
    trainer = Trainer(config, train_set=routed, test_set=routed)
    expert = load_checkpoint(digits_checkpoint).model.state_dict()
    own = trainer.model.state_dict()
    same = [k for k in own if own[k].shape == expert[k].shape]
    assert all(torch.equal(own[k], expert[k]) for k in same)
    assert len(same) < len(own)  # the output layer: 2 routes, not 10 classes
    assert "start fresh" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--temperature", "0"], "--temperature"),
        (["--uncertified-weight", "-1"], "--uncertified-weight"),
        (["--sigma", "0"], "--sigma"),
        (["--method", "macer"], "a router trains with --method gaussian or consistency"),
    ],
)
def test_bad_router_options_are_one_line_and_leave_no_file(
    extra, message, digits_checkpoint, tmp_path, capsys
):
    out = tmp_path / "router"
    args = [
        "train-router",
        "--dataset",
        "digits",
        "--arch",
        "cnn",
        "--sigma",
        "0.5",
        "--expert",
        f"{digits_checkpoint}:0.12",
        "--expert",
        f"{digits_checkpoint}:0.5",
        "--epochs",
        "1",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddrs: error:") and err.count("\n") == 1, err
    assert message in err
    assert not out.exists()
