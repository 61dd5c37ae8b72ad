"""Your own data at its own size: image folders, arrays, own models, the shape a checkpoint
records, radii in the user's units (the README's worked example runs in the README's test)."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_folder
from PIL import Image

from ddrs.cli import main
from ddrs.data import ImageOptions, get_dataset
from ddrs.errors import DatasetError, InputError
from ddrs.models import load_checkpoint
from ddrs.results import read_table

ROOT = Path(__file__).resolve().parents[1]


def test_an_image_folder_keeps_its_own_size_and_channels(tmp_path):
    root = write_folder(tmp_path / "one-size", {"train": 4, "test": 2}, sizes=(24,))
    data = get_dataset("imagefolder", "test", root)
    assert data.info.input_shape == (3, 24, 24) and data[0][0].shape == (3, 24, 24)
    grey = write_folder(tmp_path / "grey", {"train": 2, "test": 2}, sizes=(20,))
    for path in grey.rglob("*.jpg"):
        Image.open(path).convert("L").save(path.with_suffix(".png"))
        path.unlink()
    assert get_dataset("imagefolder", "train", grey).info.input_shape == (1, 20, 20)
    two = write_folder(tmp_path / "two", {"train": 4, "test": 2})
    with pytest.raises(DatasetError, match="--image-size"):
        get_dataset("imagefolder", "train", two)
    fitted = get_dataset("imagefolder", "test", two, options=ImageOptions((16, 20), 1))
    assert fitted.info.input_shape == (1, 16, 20) and fitted[1][0].shape == (1, 16, 20)


def test_normalize_auto_takes_the_training_split_statistics(tmp_path):
    root = write_folder(tmp_path / "f", {"train": 4, "test": 2}, sizes=(16,))
    info = get_dataset("imagefolder", "train", root, options=ImageOptions(normalize="auto")).info
    plain = get_dataset("imagefolder", "train", root, augment=False)
    pixels = torch.stack([plain[i][0] for i in range(len(plain))])
    assert np.allclose(info.mean, pixels.mean(dim=(0, 2, 3)).tolist(), atol=1e-5)
    assert np.allclose(info.std, pixels.std(dim=(0, 2, 3), unbiased=False).tolist(), atol=1e-4)


def test_a_checkpoint_refuses_inputs_of_another_shape_in_python_too(tmp_path):
    root = write_folder(tmp_path / "f", {"train": 4, "test": 2}, sizes=(16,))
    assert (
        main(
            [
                "train",
                "--dataset",
                "imagefolder",
                "--data-root",
                str(root),
                "--channels",
                "1",
                "--arch",
                "cnn_small",
                "--sigma",
                "0.25",
                "--epochs",
                "1",
                "--no-progress",
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    model = load_checkpoint(tmp_path / "m" / "last.pt").model
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 3)
    for shape in ((2, 3, 16, 16), (2, 1, 24, 24)):  # broadcast channels, adaptive pooling
        with pytest.raises(InputError, match=r"trained on inputs of shape \(1, 16, 16\)"):
            model(torch.rand(*shape))
    # the command line reuses the recorded size and channels, and refuses other ones
    out = tmp_path / "c.tsv"
    args = [
        "certify",
        "--checkpoint",
        str(tmp_path / "m" / "last.pt"),
        "--dataset",
        "imagefolder",
        "--data-root",
        str(root),
        "--sigma",
        "0.25",
        "--n",
        "50",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(args) == 0 and len(read_table(out)["idx"]) == 6
    assert main([*args[:-1], str(tmp_path / "d.tsv"), "--channels", "3"]) == 2


def _npz(path: Path, **changes) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.random((30, 1, 6, 6)).astype(np.float32),
        "y_train": np.arange(30) % 3,
        "x_test": rng.random((9, 1, 6, 6)).astype(np.float32),
        "y_test": np.arange(9) % 3,
    } | changes
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_arrays_are_a_dataset(tmp_path):
    data = get_dataset("npz", "test", _npz(tmp_path / "a.npz"))
    assert data.info.input_shape == (1, 6, 6) and data.info.num_classes == 3 and len(data) == 9
    x, label, idx = data[4]
    assert x.dtype == torch.float32 and label == 1 and idx == 4
    as_bytes = _npz(tmp_path / "u.npz", x_test=(np.ones((9, 1, 6, 6)) * 255).astype(np.uint8))
    assert float(get_dataset("npz", "test", as_bytes)[0][0].max()) == 1.0
    flat = _npz(
        tmp_path / "f.npz",
        x_train=np.zeros((30, 10), np.float32),
        x_test=np.zeros((9, 10), np.float32),
    )
    assert get_dataset("npz", "train", flat).info.input_shape == (10,)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"x_test": np.full((9, 1, 6, 6), np.nan, np.float32)}, "NaN"),
        ({"x_train": np.full((30, 1, 6, 6), 2.0, np.float32)}, r"\[0, 1\]"),
        ({"y_test": np.arange(9) - 1}, "label -1"),
        ({"y_train": np.arange(29) % 3}, r"expected \(30,\)"),
        ({"x_test": np.zeros((9, 1, 5, 6), np.float32)}, "same shape"),
        ({"y_test": None}, "lacks y_test"),
        ({"x_train": np.zeros((30, 1, 6, 6), np.int32)}, "dtype int32"),
    ],
)
def test_bad_arrays_are_one_line_naming_the_problem(tmp_path, changes, message, capsys):
    path = _npz(tmp_path / "bad.npz", **changes)
    with pytest.raises(DatasetError, match=message):
        get_dataset("npz", "test", path)
    assert (
        main(
            [
                "certify",
                "--model",
                "torch.nn:Identity",
                "--dataset",
                "npz",
                "--data-root",
                str(path),
                "--sigma",
                "0.25",
                "--out",
                str(tmp_path / "r.tsv"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err)
    assert not (tmp_path / "r.tsv").exists()


def test_an_own_model_on_arrays_is_probed_with_the_data_shape(tmp_path, monkeypatch, capsys):
    (tmp_path / "flatmodel.py").write_text(
        "import torch\n"
        "def right():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 3))\n"
        "def wrong():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data = _npz(tmp_path / "a.npz")
    args = [
        "certify",
        "--dataset",
        "npz",
        "--data-root",
        str(data),
        "--sigma",
        "0.25",
        "--n",
        "50",
        "--no-progress",
    ]
    assert main([*args, "--model", "flatmodel:right", "--out", str(tmp_path / "r.tsv")]) == 0
    assert len(read_table(tmp_path / "r.tsv")["idx"]) == 9
    capsys.readouterr()
    assert main([*args, "--model", "flatmodel:wrong", "--out", str(tmp_path / "w.tsv")]) == 2
    err = capsys.readouterr().err
    assert "(1, 6, 6)" in err and err.count("\n") == 1


def test_the_chance_warning_waits_while_accuracy_rises(tmp_path):
    from ddrs.train.config import TrainConfig
    from ddrs.train.loop import Trainer

    trainer = Trainer(
        TrainConfig(
            dataset="digits",
            arch="cnn",
            epochs=1,
            eval_max=None,
            progress=False,
            out=str(tmp_path / "t"),
        )
    )
    for accuracy in (0.11, 0.135):  # at chance (0.1) but rising: a model that learns
        note = trainer._chance_note({"train_noisy_acc": accuracy})
        trainer.log_rows.append({"train_noisy_acc": accuracy})
    assert note == ""
    for accuracy in (0.13, 0.131):  # at chance and flat: two epochs stuck
        note = trainer._chance_note({"train_noisy_acc": accuracy})
        trainer.log_rows.append({"train_noisy_acc": accuracy})
    assert "near chance" in note
