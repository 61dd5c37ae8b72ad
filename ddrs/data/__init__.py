"""Datasets for ddrs: one registry, one item format, nothing downloaded.

Every dataset is a ``torch.utils.data.Dataset`` whose ``__getitem__(i)`` returns
``(x, label, i)``: ``x`` a float32 tensor (C, H, W) with values in [0, 1] (not normalised; models
normalise internally with ``info.mean`` / ``info.std``), ``label`` an int and ``i`` the index.
Datasets also carry ``.info``, ``.split`` and ``.targets`` (the list of labels).

Data are read from ``root`` or, if that is None, from the ``DDRS_DATA_ROOT`` environment
variable. ``digits`` ships with scikit-learn and needs no root.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ddrs.errors import DatasetError

DATASET_NAMES: tuple[str, ...] = ("digits", "mnist", "cifar10", "imagenet", "imagefolder", "npz")
SPLITS: tuple[str, ...] = ("train", "test")
ROOT_ENV = "DDRS_DATA_ROOT"


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset; ``mean``/``std`` are for the model's normalize layer."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ImageOptions:
    """How a folder of one's own images becomes inputs (the `imagefolder` dataset):
    `image_size` (H, W) (None: the images' own, when they all share it), `channels` 1 or 3
    (None: 1 when every image is grey), `normalize` the model's normalisation: "imagenet",
    "none", "auto" (per-channel statistics of the training split) or (mean, std) per channel
    (None: 0.5, 0.5). A checkpoint records them, so certify, sigma, predict and serve
    reuse them."""

    image_size: tuple[int, int] | None = None
    channels: int | None = None
    normalize: str | tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def __post_init__(self) -> None:
        if self.image_size is not None and (
            len(self.image_size) != 2 or any(int(v) != v or v < 1 for v in self.image_size)
        ):
            raise DatasetError(f"--image-size must be H[,W] in pixels >= 1, got {self.image_size}")
        if self.channels not in (None, 1, 3):
            raise DatasetError(f"--channels must be 1 or 3, got {self.channels}")
        if isinstance(self.normalize, str) and self.normalize not in ("imagenet", "none", "auto"):
            raise DatasetError(
                f"--normalize must be imagenet, none, auto or MEAN,STD, got {self.normalize!r}"
            )

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.image_size, self.channels, self.normalize))

    def as_meta(self) -> dict:
        """What a checkpoint records (JSON-like)."""
        return {
            "image_size": None if self.image_size is None else list(self.image_size),
            "channels": self.channels,
            "normalize": self.normalize
            if not isinstance(self.normalize, tuple)
            else [list(v) for v in self.normalize],
        }

    @classmethod
    def from_meta(cls, meta: dict | None) -> ImageOptions:
        meta = meta or {}
        normalize = meta.get("normalize")
        if isinstance(normalize, list):
            normalize = tuple(tuple(float(v) for v in part) for part in normalize)
        size = meta.get("image_size")
        return cls(None if size is None else tuple(size), meta.get("channels"), normalize)


def radius_units(input_shape, norm: str = "l2") -> str:
    """What a radius is measured in, for these inputs: e.g. "L2 radius, 32 x 32 x 3 pixels in
    [0, 1]" (a grey image: H x W pixels; a flat vector: D values; `norm` "l1": L1)."""
    shape = tuple(int(v) for v in input_shape)
    name = norm.upper()
    if len(shape) == 3:
        channels, height, width = shape
        size = f"{height} x {width}" + (f" x {channels}" if channels != 1 else "")
        return f"{name} radius, {size} pixels in [0, 1]"
    return f"{name} radius, {' x '.join(map(str, shape))} values in [0, 1]"


def parse_normalize(text: str) -> str | tuple[tuple[float, ...], tuple[float, ...]]:
    """--normalize: imagenet | none | auto | MEAN,STD (one pair, or one per channel:
    M1,M2,M3,S1,S2,S3)."""
    if text in ("imagenet", "none", "auto"):
        return text
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (2, 6) or any(v <= 0 for v in values[len(values) // 2 :]):
        raise DatasetError(
            f"--normalize {text!r}: expected imagenet, none, auto, or MEAN,STD (e.g. 0.5,0.25, "
            "or three means then three stds)"
        )
    half = len(values) // 2
    return tuple(values[:half]), tuple(values[half:])


def parse_image_size(text: str) -> tuple[int, int]:
    """--image-size H or H,W."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise DatasetError(f"--image-size {text!r}: expected H or H,W in pixels (e.g. 32 or 64,48)")
    return (values[0], values[-1])


class IndexedDataset(Dataset):
    """Base class: yields ``(x, label, i)``; subclasses implement ``_load(i)``."""

    def __init__(
        self,
        info: DatasetInfo,
        split: str,
        targets: Sequence[int],
        transform: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        self.info = info
        self.split = split
        self.targets: list[int] = [int(t) for t in targets]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        i = range(len(self))[i]  # normalises negative indices, raises IndexError when out of range
        x = self._load(i)
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets[i], i

    def _load(self, i: int) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.info.name!r}, split={self.split!r}, n={len(self)})"


class TensorImageDataset(IndexedDataset):
    """In-memory images: one (N, C, H, W) tensor; item i is ``images[i] / scale`` as float32."""

    def __init__(
        self,
        images: torch.Tensor,
        targets: Sequence[int],
        info: DatasetInfo,
        split: str,
        scale: float = 255.0,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if len(images) != len(targets):
            raise DatasetError(f"{info.name}: {len(images)} images but {len(targets)} labels")
        super().__init__(info, split, targets, transform)
        self.images = images
        self.scale = scale

    def _load(self, i: int) -> torch.Tensor:
        return self.images[i].to(torch.float32) / self.scale


def resolve_data_root(root: str | os.PathLike | None) -> Path | None:
    """Return ``root`` as a Path, else ``$DDRS_DATA_ROOT``, else None."""
    if root is None or str(root) == "":
        root = os.environ.get(ROOT_ENV) or None
    return None if root is None else Path(root).expanduser()


def check_name(name: str) -> str:
    key = str(name).strip().lower()
    if key not in DATASET_NAMES:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
    return key


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; choose 'train' or 'test'")
    return split


def require_root(root: str | os.PathLike | None, dataset: str) -> Path:
    """The resolved data root, or a DatasetError saying how to provide one."""
    path = resolve_data_root(root)
    if path is None:
        raise DatasetError(
            f"{dataset}: no data root given: pass --data-root DIR (in Python: root=DIR) or set "
            f"{ROOT_ENV}=DIR, the folder holding the data (nothing is downloaded)"
        )
    return path


def not_found(dataset: str, looked_for: dict[str, Sequence[Path]]) -> DatasetError:
    """One error listing every layout and path that was tried."""
    lines = [f"{dataset} not found (nothing is downloaded). Looked for:"]
    for layout, paths in looked_for.items():
        lines.append(f"  {layout} at:")
        lines.extend(f"    {p}" for p in paths)
    lines.append(f"Put the files in one of these places, or pass another root / set {ROOT_ENV}.")
    return DatasetError("\n".join(lines))


# Submodules import the base classes above, so they are imported lazily here.
_MODULES = {
    "digits": "digits",
    "mnist": "mnist",
    "cifar10": "cifar",
    "imagenet": "imagefolder",
    "imagefolder": "imagefolder",
    "npz": "npz",
}


def _module(key: str) -> Any:
    return importlib.import_module(f"ddrs.data.{_MODULES[key]}")


def _check_options(key: str, options: ImageOptions | None) -> ImageOptions | None:
    if options is not None and options.given and key != "imagefolder":
        raise DatasetError(
            f"--image-size, --channels and --normalize apply to imagefolder, not {key} (which "
            "has its own standard transforms)"
        )
    return options if key == "imagefolder" else None


def _with_options(key: str, options: ImageOptions | None) -> dict:
    return {"options": options} if key == "imagefolder" else {}


def dataset_info(
    name: str, root: str | os.PathLike | None = None, options: ImageOptions | None = None
) -> DatasetInfo:
    """Description of dataset ``name``; ``imagefolder`` needs ``root`` to count its classes
    (and to see its images' size)."""
    key = check_name(name)
    options = _check_options(key, options)
    return _module(key).info(key, resolve_data_root(root), **_with_options(key, options))


def get_dataset(
    name: str,
    split: str = "test",
    root: str | os.PathLike | None = None,
    augment: bool | None = None,
    options: ImageOptions | None = None,
) -> IndexedDataset:
    """Load ``split`` ('train' or 'test') of dataset ``name`` from ``root`` / $DDRS_DATA_ROOT.

    ``augment=None`` means augment iff ``split == 'train'`` (digits, mnist and npz never
    augment). ``options``: how an image folder becomes inputs (`ImageOptions`).
    """
    key = check_name(name)
    check_split(split)
    options = _check_options(key, options)
    if augment is None:
        augment = split == "train"
    return _module(key).load(
        key, split, resolve_data_root(root), augment, **_with_options(key, options)
    )


__all__ = [
    "DATASET_NAMES",
    "DatasetError",
    "DatasetInfo",
    "ImageOptions",
    "IndexedDataset",
    "TensorImageDataset",
    "dataset_info",
    "get_dataset",
    "radius_units",
    "resolve_data_root",
]
