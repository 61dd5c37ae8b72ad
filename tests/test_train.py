"""The trainer: learning, exact resume, the per-sample sigma buffer, bad settings."""

import csv

import pytest
import torch

from ddrs.errors import CheckpointError, InputError
from ddrs.models import load_checkpoint
from ddrs.train.loop import TrainConfig, Trainer, spread_indices, train


def config(out, **changes) -> TrainConfig:
    base = dict(
        dataset="digits",
        arch="cnn",
        out=str(out),
        sigma=0.25,
        epochs=2,
        batch=64,
        lr=0.05,
        eval_max=120,
        progress=False,
    )
    return TrainConfig(**(base | changes))


def last_row(out) -> dict:
    with open(out / "log.csv") as f:
        return list(csv.DictReader(f))[-1]


def test_gaussian_training_learns_digits(tmp_path):
    train(config(tmp_path, epochs=4, eval_max=None))
    row = last_row(tmp_path)
    assert float(row["test_clean_acc"]) > 0.6  # chance is 0.1
    assert {
        "loss",
        "ce",
        "train_noisy_acc",
        "test_noisy_acc",
        "lr",
        "epoch_time",
        "sigma_median",
    } <= set(row)
    assert (tmp_path / "best.pt").exists()


def test_resume_continues_exactly(tmp_path):
    dd = dict(data_dependent=True, dd_iterations=1, dd_samples=2, dd_lr=1e-2)
    train(config(tmp_path / "straight", epochs=2, **dd))
    train(config(tmp_path / "split", epochs=1, **dd))
    train(config(tmp_path / "split", epochs=2, resume=True, **dd))
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "last.pt")
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    assert torch.equal(a.payload["sigma_buffer"], b.payload["sigma_buffer"])
    assert b.meta["epoch"] == 1
    with open(tmp_path / "split" / "log.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]


def test_sigma_buffer_updated_only_at_seen_indices(tmp_path):
    trainer = Trainer(
        config(
            tmp_path,
            epochs=1,
            train_subset=50,
            data_dependent=True,
            dd_iterations=2,
            dd_samples=2,
            dd_lr=1e-2,
        )
    )
    trainer.run()
    payload = load_checkpoint(tmp_path / "last.pt").payload
    updated = payload["sigma_updates"] == 1
    assert int(updated.sum()) == 50 and int((payload["sigma_updates"] > 1).sum()) == 0
    buffer = payload["sigma_buffer"]
    assert (buffer[~updated] == 0.25).all()
    assert (buffer[updated] != 0.25).any() and (buffer > 0).all()


def test_data_dependent_phase_starts_at_the_given_epoch(tmp_path):
    train(
        config(
            tmp_path,
            epochs=2,
            data_dependent=True,
            dd_start_epoch=1,
            dd_iterations=1,
            dd_samples=2,
            train_subset=30,
        )
    )
    payload = load_checkpoint(tmp_path / "last.pt").payload
    assert int(payload["sigma_updates"].max()) == 1  # only the second epoch updated


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"sigma": -0.1}, "sigma"),
        ({"sigma": 0.0, "method": "macer"}, "sigma 0 trains on clean images"),
        ({"sigma": 0.0, "data_dependent": True}, "sigma 0 trains on clean images"),
        ({"method": "nope"}, "unknown"),
        ({"epochs": 0}, "epochs"),
        ({"dd_samples": 0}, "dd-samples"),
        ({"lr": -1.0}, "lr"),
    ],
)
def test_bad_settings_rejected_up_front(tmp_path, changes, message):
    with pytest.raises(InputError, match=message):
        Trainer(config(tmp_path, **changes))
    assert not (tmp_path / "last.pt").exists()


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(config(tmp_path, resume=True))


def test_init_fine_tunes_from_a_checkpoint(tmp_path):
    first = train(config(tmp_path / "a", epochs=1))
    trainer = Trainer(config(tmp_path / "b", epochs=1, init=str(first)))
    source = load_checkpoint(first).model.state_dict()
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, source[key])


def test_unknown_method_setting_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="smoothadv has no setting k; its settings are"):
        Trainer(config(tmp_path, method="smoothadv", method_settings={"k": 2}))


def test_evaluation_subset_is_spread_over_the_split():
    assert spread_indices(10, None) == list(range(10))
    chosen = spread_indices(10_000, 200)  # CIFAR test folders: 1,000 per class, sorted
    assert len(chosen) == 200 and len(set(chosen)) == 200
    assert {i // 1000 for i in chosen} == set(range(10))


class Killed(BaseException):
    """Stands for kill -9 at a chosen point: nothing after it runs."""


def _rows(out) -> list[dict]:
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in r.items() if k not in ("epoch_time", "throughput")} for r in rows]


@pytest.mark.parametrize("point", ["before last.pt", "after last.pt", "after log row"])
def test_a_kill_at_any_point_of_an_epoch_end_resumes_to_the_same_run(tmp_path, monkeypatch, point):
    import ddrs.train.loop as loop

    dd = dict(data_dependent=True, dd_iterations=1, dd_samples=2, dd_lr=1e-2, epochs=3)
    train(config(tmp_path / "straight", **dd))

    real_save, real_write = loop.save_checkpoint, loop.EpochLog.write
    calls = {"n": 0}

    def save(path, *a, **k):  # epoch 2 (the 2nd last.pt save) is where the kill lands
        if path.name == "last.pt":
            calls["n"] += 1
            if calls["n"] == 2 and point == "before last.pt":
                raise Killed
        real_save(path, *a, **k)
        if path.name == "last.pt" and calls["n"] == 2 and point == "after last.pt":
            raise Killed

    def write(self, row):
        real_write(self, row)
        if row["epoch"] == 2 and point == "after log row":
            raise Killed

    monkeypatch.setattr(loop, "save_checkpoint", save)
    monkeypatch.setattr(loop.EpochLog, "write", write)
    with pytest.raises(Killed):
        train(config(tmp_path / "killed", **dd))
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    monkeypatch.setattr(loop.EpochLog, "write", real_write)
    stale = tmp_path / "killed" / ".best.pt.4242.deadbeef.tmp"  # what kill -9 mid-write leaves
    stale.write_bytes(b"partial")
    train(config(tmp_path / "killed", resume=True, **dd))

    assert _rows(tmp_path / "killed") == _rows(tmp_path / "straight")
    for name in ("last.pt", "best.pt"):
        a = load_checkpoint(tmp_path / "straight" / name)
        b = load_checkpoint(tmp_path / "killed" / name)
        assert a.meta["epoch"] == b.meta["epoch"], name
        assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())
    assert not list((tmp_path / "killed").glob("*.tmp")) and not stale.exists()


def test_training_into_an_existing_run_needs_resume(tmp_path):
    train(config(tmp_path, epochs=1))
    with pytest.raises(InputError, match="--resume"):
        train(config(tmp_path, epochs=2))


@pytest.mark.parametrize("name", ["lr", "momentum", "weight_decay", "dd_lr", "sigma"])
def test_non_finite_settings_are_rejected(tmp_path, name):
    with pytest.raises(InputError, match=name.replace("_", "-")):
        train(config(tmp_path, **{name: float("nan")}))
    assert not (tmp_path / "last.pt").exists()


def test_a_non_finite_loss_stops_training_with_a_clear_error(tmp_path, monkeypatch):
    from ddrs.errors import TrainingError
    from ddrs.train.methods import gaussian

    real = gaussian.GaussianAugmentation.loss

    def poisoned(self, *args):
        result = real(self, *args)
        return type(result)(result.loss * float("nan"), result.noisy_logits, result.terms)

    monkeypatch.setattr(gaussian.GaussianAugmentation, "loss", poisoned)
    with pytest.raises(TrainingError, match="lower --lr"):
        train(config(tmp_path, epochs=1))


def test_chance_accuracy_for_two_epochs_is_flagged_in_the_log(tmp_path, capsys):
    train(config(tmp_path, epochs=2, lr=0.0))  # a model that cannot learn
    rows = _rows(tmp_path)
    assert rows[0]["note"] == "" and "near chance" in rows[1]["note"]
    assert "warning: training accuracy has stayed near chance" in capsys.readouterr().out
