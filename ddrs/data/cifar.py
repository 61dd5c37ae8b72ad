"""CIFAR-10 (10 classes), as (3, 32, 32) tensors in [0, 1]. Nothing is downloaded.

Two on-disk layouts, tried in this order:

(a) the python batches that torchvision downloads: ``cifar-10-batches-py/`` holding
    ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` (pickles with ``data``, uint8
    (N, 3072), and ``labels``), at ``<root>/cifar-10-batches-py``, at ``<root>`` itself or at
    ``<root>/cifar10/cifar-10-batches-py``. The files are unpickled: read only files you trust.
(b) the ImageFolder layout ``train/<class>/<image>`` and ``test/<class>/<image>`` (png or jpg)
    at ``<root>``, ``<root>/cifar10`` or ``<root>/cifar10-jpeg``. The class index is the
    position among the sorted folder names (airplane .. truck gives the standard 0..9). All
    images of the split are decoded into one uint8 tensor when the dataset is created (about
    1.5 s per 10,000 images), so training epochs do not decode JPEGs.

Training augmentation: random 32x32 crop with zero padding 4 + random horizontal flip.
mean/std are those of Cohen et al. (2019).
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddrs.data import DatasetInfo, TensorImageDataset, check_split, not_found, require_root
from ddrs.data.imagefolder import decode_all, list_images
from ddrs.data.transforms import random_crop_flip
from ddrs.errors import DatasetError

CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
BATCHES = {"train": [f"data_batch_{k}" for k in range(1, 6)], "test": ["test_batch"]}
PICKLE_DIR = "cifar-10-batches-py"
SIDE = 32

INFO = DatasetInfo(
    name="cifar10",
    num_classes=10,
    input_shape=(3, SIDE, SIDE),
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2023, 0.1994, 0.2010),
    classes=CLASSES,
)


def info(name: str = "cifar10", root: Path | None = None) -> DatasetInfo:
    return INFO


def pickle_dirs(root: Path) -> list[Path]:
    return [root / PICKLE_DIR, root, root / "cifar10" / PICKLE_DIR]


def folder_roots(root: Path) -> list[Path]:
    return [root, root / "cifar10", root / "cifar10-jpeg"]


def is_pickle_dir(directory: Path) -> bool:
    return any((directory / name).is_file() for name in ("test_batch", "data_batch_1"))


def unpickle(path: Path) -> dict[Any, Any]:
    if not path.is_file():
        raise DatasetError(f"CIFAR-10: missing batch file {path}")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as e:  # unpickling can fail with almost any exception type
        raise DatasetError(f"CIFAR-10: cannot unpickle {path}: {e!r}") from e
    if not isinstance(batch, dict):
        raise DatasetError(f"CIFAR-10: {path} holds a {type(batch).__name__}, expected a dict")
    return batch


def read_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """Images (N, 3, 32, 32) uint8 and labels of one pickled batch."""
    batch = unpickle(path)
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DatasetError(f"CIFAR-10: {path} lacks the 'data' or 'labels' entry")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * SIDE * SIDE:
        raise DatasetError(
            f"CIFAR-10: 'data' in {path} is {data.dtype} {data.shape}, expected uint8 (N, 3072)"
        )
    labels = [int(y) for y in labels]
    if len(labels) != len(data) or any(not 0 <= y < 10 for y in labels):
        raise DatasetError(
            f"CIFAR-10: {path} has {len(labels)} labels for {len(data)} images, "
            "expected one label in 0..9 per image"
        )
    return data.reshape(-1, 3, SIDE, SIDE), labels


def load_pickles(directory: Path, split: str) -> tuple[torch.Tensor, list[int], DatasetInfo]:
    parts = [read_batch(directory / name) for name in BATCHES[split]]
    images = np.concatenate([images for images, _ in parts])
    labels = [y for _, batch_labels in parts for y in batch_labels]
    return torch.from_numpy(images), labels, INFO


def load_folder(split_dir: Path, split: str) -> tuple[torch.Tensor, list[int], DatasetInfo]:
    classes, samples = list_images(split_dir)
    if len(classes) != INFO.num_classes:
        raise DatasetError(f"CIFAR-10: {split_dir} has {len(classes)} class folders, expected 10")
    paths = [path for path, _ in samples]
    images = decode_all(paths, (SIDE, SIDE), desc=f"decoding CIFAR-10 {split}")
    info = dataclasses.replace(INFO, classes=tuple(classes))
    return images, [label for _, label in samples], info


def find_and_read(root: Path, split: str) -> tuple[torch.Tensor, list[int], DatasetInfo]:
    for directory in pickle_dirs(root):
        if is_pickle_dir(directory):
            return load_pickles(directory, split)
    for base in folder_roots(root):
        if (base / split).is_dir():
            return load_folder(base / split, split)
    raise not_found(
        f"CIFAR-10 ({split} split)",
        {
            "python batches (data_batch_1..5, test_batch)": pickle_dirs(root),
            f"ImageFolder layout {split}/<class>/<image>": folder_roots(root),
        },
    )


def load(
    name: str = "cifar10", split: str = "test", root: Path | None = None, augment: bool = False
) -> TensorImageDataset:
    """The CIFAR-10 split held in memory; ``augment`` adds crop + flip."""
    root = require_root(root, "CIFAR-10")
    images, labels, info = find_and_read(root, check_split(split))
    transform = random_crop_flip if augment else None
    return TensorImageDataset(images, labels, info, split, transform=transform)
