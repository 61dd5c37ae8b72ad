"""The sampling engine and the Smooth API: exact counting, batching, seeds, input checks."""

import pytest
import torch
from torch import nn

from ddrs.core.noise import NOISE_BLOCK, STREAM_ESTIMATION, noise_for
from ddrs.core.sampling import sample_counts
from ddrs.core.smooth import ABSTAIN, Smooth
from ddrs.errors import InputError
from ddrs.models import build_model


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return build_model("cnn", 10, (1, 8, 8), (0.3,), (0.4,)).eval()


def test_counts_do_not_depend_on_batch_size_or_grouping(cnn):
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    keys = [10, 11, 12, 13, 14]
    reference = sample_counts(cnn, x, 0.3, 150, 10, batch=1000, seed=4, keys=keys)
    assert (reference.sum(1) == 150).all()
    for batch in (1, 7, NOISE_BLOCK, 100, 149):
        assert torch.equal(
            sample_counts(cnn, x, 0.3, 150, 10, batch=batch, seed=4, keys=keys), reference
        )
    alone = sample_counts(cnn, x[2:3], 0.3, 150, 10, batch=33, seed=4, keys=[12])
    assert torch.equal(alone[0], reference[2])


def test_counts_match_a_plain_loop_over_the_same_noise(cnn):
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.1, 0.5, 1.0])
    noise = noise_for([0, 1, 2], 90, (1, 8, 8), seed=9, stream=STREAM_ESTIMATION, device="cpu")
    with torch.no_grad():
        expected = torch.stack(
            [
                torch.bincount(cnn(x[i] + sigma[i] * noise[i]).argmax(1), minlength=10)
                for i in range(3)
            ]
        )
    got = sample_counts(cnn, x, sigma, 90, 10, batch=40, seed=9, keys=[0, 1, 2])
    assert torch.equal(got, expected)


def test_seed_and_streams_give_independent_noise():
    a = noise_for([0], 64, (4,), seed=1, stream=0, device="cpu")
    assert torch.equal(a, noise_for([0], 64, (4,), seed=1, stream=0, device="cpu"))
    for other in (
        noise_for([0], 64, (4,), 2, 0, "cpu"),
        noise_for([0], 64, (4,), 1, 1, "cpu"),
        noise_for([1], 64, (4,), 1, 0, "cpu"),
    ):
        assert not torch.allclose(a, other)
        assert abs(torch.corrcoef(torch.stack([a.flatten(), other.flatten()]))[0, 1]) < 0.2


def test_noise_is_standard_normal():
    e = noise_for(list(range(20)), 200, (8,), seed=0, stream=1, device="cpu")
    assert abs(e.mean()) < 0.02 and abs(e.std() - 1) < 0.02


def test_per_input_sigma_is_used(cnn):
    x = torch.full((2, 1, 8, 8), 0.5)
    counts = sample_counts(cnn, x, torch.tensor([1e-6, 5.0]), 200, 10, seed=0)
    assert counts[0].max() == 200  # no noise: one class
    assert (counts[1] > 0).sum() > 1  # huge noise: several classes


def test_model_mode_is_restored(cnn):
    cnn.train()
    sample_counts(cnn, torch.rand(1, 1, 8, 8), 0.25, 10, 10)
    assert cnn.training


def test_certify_is_reproducible_and_key_addressed(cnn):
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    first = Smooth(cnn, 10, seed=5).certify_batch(x, 0.25, 20, 200, 0.01, keys=[1, 2, 3, 4])
    again = Smooth(cnn, 10, seed=5).certify_batch(x, 0.25, 20, 200, 0.01, keys=[1, 2, 3, 4])
    single = Smooth(cnn, 10, seed=5).certify(x[1], 0.25, 20, 200, 0.01, key=2)
    assert first == again and single == first[1]


def test_certify_abstains_below_one_half():
    class Coin(nn.Module):  # votes class 0 or 1 depending on the noise: pA ~ 1/2
        def forward(self, x):
            return torch.stack([x.flatten(1)[:, 0], 1 - x.flatten(1)[:, 0]], dim=1)

    cert = Smooth(Coin(), 2).certify(torch.full((1, 2, 2), 0.5), 1.0, 10, 100, 0.001)
    assert cert.predict == ABSTAIN and cert.radius == 0.0


@pytest.mark.parametrize(
    "x,sigma,message",
    [
        (torch.full((2, 1, 8, 8), float("nan")), 0.25, "NaN"),
        (torch.full((2, 1, 8, 8), 2.0), 0.25, r"\[0, 1\]"),
        (torch.rand(2, 1, 8, 8), 0.0, "sigma"),
        (torch.rand(2, 1, 8, 8), -1.0, "sigma"),
        (torch.rand(2, 1, 8, 8), torch.tensor([0.1, 0.2, 0.3]), "3 sigmas for 2 inputs"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.long), 0.25, "floating-point"),
    ],
)
def test_bad_inputs_get_clear_errors(cnn, x, sigma, message):
    with pytest.raises(InputError, match=message):
        Smooth(cnn, 10).certify_batch(x, sigma, 10, 100, 0.01)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"n": 0}, "n must"),
        ({"n0": -1}, "n0"),
        ({"batch": 0}, "batch"),
    ],
)
def test_bad_settings_get_clear_errors(cnn, kwargs, message):
    args = {"n0": 10, "n": 100, "alpha": 0.01, "batch": 64} | kwargs
    with pytest.raises(InputError, match=message):
        Smooth(cnn, 10).certify_batch(torch.rand(1, 1, 8, 8), 0.25, **args)


def test_automatic_batch_on_cpu_and_amp_needs_cuda(cnn):
    x = torch.rand(2, 1, 8, 8)
    smooth = Smooth(cnn, 10, seed=1)
    auto = smooth.certify_batch(x, 0.25, 10, 300, 0.01, keys=[0, 1])
    assert auto == Smooth(cnn, 10, seed=1).certify_batch(
        x, 0.25, 10, 300, 0.01, batch=7, keys=[0, 1]
    )
    with pytest.raises(InputError, match="CUDA"):
        Smooth(cnn, 10, amp="bf16").certify_batch(x, 0.25, 10, 100, 0.01)


def test_mixed_train_eval_modes_are_restored_exactly(cnn):
    cnn.train()
    cnn[1].eval()
    modes = [m.training for m in cnn.modules()]
    sample_counts(cnn, torch.rand(1, 1, 8, 8), 0.25, 10, 10)
    assert [m.training for m in cnn.modules()] == modes
