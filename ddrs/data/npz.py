"""Arrays of your own: one NumPy ``.npz`` file with ``x_train``, ``y_train``, ``x_test`` and
``y_test`` (``--dataset npz --data-root FILE.npz``).

Inputs are float in [0, 1], or uint8 (scaled by 1/255), of any shape per input: C x H x W
images or a flat vector; both splits share it. Labels are integers 0..K-1 (K: the largest
label + 1). Everything is checked when the file is read, with one line naming what is wrong.
The arrays are used as they are: no normalisation (mean 0, std 1 per channel: the values the
model sees are the file's) and no augmentation.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from ddrs.data import DatasetInfo, IndexedDataset, check_split, require_root
from ddrs.errors import DatasetError

KEYS = ("x_train", "y_train", "x_test", "y_test")


class ArrayDataset(IndexedDataset):
    """In-memory inputs (N, *shape) as float32 in [0, 1]."""

    def __init__(self, x: torch.Tensor, y: list[int], info: DatasetInfo, split: str):
        super().__init__(info, split, y)
        self.x = x

    def _load(self, i: int) -> torch.Tensor:
        return self.x[i]


def _read(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DatasetError(
            f"npz: {path} is not a file; pass --data-root FILE.npz (arrays x_train, y_train, "
            "x_test, y_test)"
        )
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = [k for k in KEYS if k not in arrays.files]
            if missing:
                raise DatasetError(
                    f"{path} lacks {', '.join(missing)}; it needs x_train, y_train, x_test, y_test"
                )
            return {k: arrays[k] for k in KEYS}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise DatasetError(f"cannot read {path} as a NumPy .npz file: {error}") from None


def _inputs(name: str, x: np.ndarray, path: Path) -> np.ndarray:
    """The inputs as float32 in [0, 1] (uint8 / 255), checked."""
    if x.ndim < 2:
        raise DatasetError(f"{path}: {name} has shape {x.shape}; expected (N, ...) inputs")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise DatasetError(
            f"{path}: {name} has dtype {x.dtype}; expected float in [0, 1] or uint8 0..255"
        )
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DatasetError(f"{path}: {name} holds NaN or infinite values")
    if x.size and (x.min() < 0 or x.max() > 1):
        raise DatasetError(
            f"{path}: {name} has values in [{x.min():.3g}, {x.max():.3g}]; inputs must lie in "
            "[0, 1] (scale them, or store uint8 0..255)"
        )
    return x


def _labels(name: str, y: np.ndarray, count: int, path: Path) -> np.ndarray:
    if y.ndim != 1 or len(y) != count:
        raise DatasetError(
            f"{path}: {name} has shape {y.shape}; expected ({count},), a label per input"
        )
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0)):
            raise DatasetError(f"{path}: {name} must hold integer labels, got dtype {y.dtype}")
    if len(y) and y.min() < 0:
        raise DatasetError(f"{path}: {name} has label {int(y.min())}; labels are 0..K-1")
    return y.astype(np.int64)


def _load_checked(root: Path) -> tuple[dict[str, np.ndarray], DatasetInfo]:
    arrays = _read(root)
    x = {s: _inputs(f"x_{s}", arrays[f"x_{s}"], root) for s in ("train", "test")}
    if x["train"].shape[1:] != x["test"].shape[1:]:
        raise DatasetError(
            f"{root}: x_train inputs have shape {x['train'].shape[1:]} and x_test inputs "
            f"{x['test'].shape[1:]}; both splits need the same shape"
        )
    y = {s: _labels(f"y_{s}", arrays[f"y_{s}"], len(x[s]), root) for s in ("train", "test")}
    num_classes = int(max(y["train"].max(initial=-1), y["test"].max(initial=-1))) + 1
    if num_classes < 2:
        raise DatasetError(f"{root}: the labels name {num_classes} class(es); need at least 2")
    shape = tuple(int(s) for s in x["train"].shape[1:])
    channels = shape[0] if len(shape) == 3 else 1
    info = DatasetInfo("npz", num_classes, shape, (0.0,) * channels, (1.0,) * channels)
    return {**{f"x_{s}": x[s] for s in x}, **{f"y_{s}": y[s] for s in y}}, info


def info(name: str, root: Path | None) -> DatasetInfo:
    return _load_checked(require_root(root, name))[1]


def load(name: str, split: str, root: Path | None, augment: bool) -> ArrayDataset:
    arrays, described = _load_checked(require_root(root, name))
    split = check_split(split)
    return ArrayDataset(
        torch.from_numpy(arrays[f"x_{split}"]), arrays[f"y_{split}"].tolist(), described, split
    )
