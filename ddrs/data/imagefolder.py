"""ImageFolder layout ``<root>/<split dir>/<class>/<image>``, used by imagenet and imagefolder.

The class index is the position of the class folder among the sorted folder names, and the
images of a class are sorted by path, so indices are stable. Images (.jpg .jpeg .png .bmp .webp,
searched recursively inside each class folder) are decoded lazily with PIL and converted to RGB.
Train and test must have the same class folders.

- ``imagenet``: ``train/`` and ``val/`` (the test split reads ``val``) in the data root or in
  ``<root>/imagenet``. num_classes = number of class folders (1000 for ImageNet, not enforced).
  ImageNet mean/std.
  The ImageNet transforms: every image comes out as a (3, 224, 224) tensor; test: resize
  the shorter side to 256 (bilinear) + centre crop 224; train augmentation: RandomResizedCrop
  224 (scale (0.08, 1), ratio (3/4, 4/3)) + random horizontal flip.
- ``imagefolder``: your own images, ``train/`` and ``test/`` (or ``val/`` when there is no
  ``test/``) in the data root, at their own size (`ImageOptions`): H x W is `--image-size`, or
  the images' own when they all share it (else an error naming the flag); channels 1 when
  every image is grey, else 3 (or `--channels`); mean = std = 0.5 per channel unless
  `--normalize`. An image of another size is fitted to H x W (area averaging when it
  shrinks, bilinear when it grows). Small images (under 128 pixels a side) are augmented as
  CIFAR-10 is (pad by an eighth, random crop, flip); larger ones as ImageNet is
  (random resized crop to H x W, flip; test: resize to cover H x W x 256/224, centre crop).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ddrs.data import (
    SPLITS,
    DatasetInfo,
    ImageOptions,
    IndexedDataset,
    check_split,
    not_found,
    require_root,
)
from ddrs.data.transforms import (
    IMAGENET_CROP,
    fit_image,
    image_tensor,
    imagenet_test,
    imagenet_train,
    large_test,
    large_train,
    random_crop_flip,
)
from ddrs.errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SPLIT_DIRS = {
    "imagenet": {"train": ("train",), "test": ("val",)},
    "imagefolder": {"train": ("train",), "test": ("test", "val")},
}
MEAN_STD = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagefolder": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
IMAGENET_CLASSES = 1000
PROGRESS_MIN_FILES = 2000
LARGE_SIDE = 128  # from this many pixels a side, images are augmented as ImageNet is
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
NORMALIZATIONS = {"imagenet": MEAN_STD["imagenet"], "none": ((0.0,), (1.0,))}

Sample = tuple[Path, int]


class ImageFolderDataset(IndexedDataset):
    """Image files decoded on access; ``transform`` maps the RGB PIL image to a tensor."""

    def __init__(
        self,
        samples: Sequence[Sample],
        info: DatasetInfo,
        split: str,
        transform: Callable[[Image.Image], torch.Tensor],
    ) -> None:
        super().__init__(info, split, [label for _, label in samples], transform)
        self.paths = [path for path, _ in samples]

    def _load(self, i: int) -> Image.Image:
        return open_rgb(self.paths[i])


class OwnImages(ImageFolderDataset):
    """Your own images at their own size: decoded in their own mode, converted to the
    dataset's channels by the transform."""

    def _load(self, i: int) -> Image.Image:
        try:
            with Image.open(self.paths[i]) as img:
                img.load()
                return img
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot decode image {self.paths[i]}: {e}") from e


def open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot decode image {path}: {e}") from e


def list_classes(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_images(split_dir: Path) -> tuple[list[str], list[Sample]]:
    """Sorted class names and (path, label) pairs in deterministic order."""
    classes = list_classes(split_dir)
    samples: list[Sample] = []
    for label, name in enumerate(classes):
        files = (p for p in (split_dir / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        samples.extend((path, label) for path in sorted(files))
    if not samples:
        raise DatasetError(
            f"no images ({' '.join(IMAGE_EXTENSIONS)}) in class folders under {split_dir}"
        )
    return classes, samples


def decode_all(paths: Sequence[Path], size: tuple[int, int], desc: str) -> torch.Tensor:
    """Decode all images into one uint8 (N, 3, H, W) tensor; each must be ``size`` = (W, H)."""
    out = np.empty((len(paths), size[1], size[0], 3), dtype=np.uint8)
    # disable=None: no bar when output is not a terminal (logs, CI)
    progress = tqdm(
        paths,
        desc=desc,
        unit="img",
        leave=False,
        disable=True if len(paths) <= PROGRESS_MIN_FILES else None,
    )
    for k, path in enumerate(progress):
        img = open_rgb(path)
        if img.size != size:
            raise DatasetError(
                f"{path} is {img.size[0]}x{img.size[1]} pixels, expected {size[0]}x{size[1]}"
            )
        out[k] = np.asarray(img)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def candidate_roots(name: str, root: Path) -> list[Path]:
    return [root, root / "imagenet"] if name == "imagenet" else [root]


def split_candidates(name: str, root: Path, split: str) -> list[Path]:
    return [base / d for base in candidate_roots(name, root) for d in SPLIT_DIRS[name][split]]


def find_split_dir(name: str, root: Path, split: str) -> Path | None:
    return next((d for d in split_candidates(name, root, split) if d.is_dir()), None)


def missing(name: str, root: Path, splits: Sequence[str]) -> DatasetError:
    paths = [p for split in splits for p in split_candidates(name, root, split)]
    return not_found(name, {"ImageFolder layout <split dir>/<class>/<image>": paths})


def reference_classes(name: str, root: Path) -> list[str]:
    """Class folders of the train split, or of the test split when there is no train split."""
    for split in SPLITS:
        split_dir = find_split_dir(name, root, split)
        if split_dir is not None:
            return list_classes(split_dir)
    raise missing(name, root, SPLITS)


def make_info(name: str, classes: Sequence[str] | None) -> DatasetInfo:
    mean, std = MEAN_STD[name]
    return DatasetInfo(
        name=name,
        num_classes=IMAGENET_CLASSES if classes is None else len(classes),
        input_shape=(3, IMAGENET_CROP, IMAGENET_CROP),
        mean=mean,
        std=std,
        classes=None if classes is None else tuple(classes),
    )


def info(name: str, root: Path | None, options: ImageOptions | None = None) -> DatasetInfo:
    """imagenet not found under ``root`` is described with its standard 1000 classes."""
    if name == "imagenet" and (root is None or not any_split_dir(name, root)):
        return make_info(name, None)
    root = require_root(root, name)
    if name == "imagenet":
        return make_info(name, reference_classes(name, root))
    return own_info(root, options or ImageOptions())


def any_split_dir(name: str, root: Path) -> bool:
    return any(find_split_dir(name, root, split) is not None for split in SPLITS)


def _samples(name: str, root: Path, split: str) -> tuple[list[str], list[Sample]]:
    split_dir = find_split_dir(name, root, check_split(split))
    if split_dir is None:
        raise missing(name, root, [split])
    classes, samples = list_images(split_dir)
    expected = reference_classes(name, root)
    if classes != expected:
        raise DatasetError(
            f"{name}: the class folders of {split_dir} ({len(classes)}) differ from those of the "
            f"train split ({len(expected)}); labels would not match across splits"
        )
    return classes, samples


def load(
    name: str, split: str, root: Path | None, augment: bool, options: ImageOptions | None = None
) -> ImageFolderDataset:
    root = require_root(root, name)
    classes, samples = _samples(name, root, split)
    if name == "imagenet":
        transform = imagenet_train if augment else imagenet_test
        return ImageFolderDataset(samples, make_info(name, classes), split, transform)
    described = own_info(root, options or ImageOptions())
    channels, height, width = described.input_shape
    large = min(height, width) >= LARGE_SIDE
    if large:
        transform = large_train if augment else large_test
        size = (width, height)

        def convert(img: Image.Image) -> torch.Tensor:
            return image_tensor(transform(img, size), channels)
    else:
        pad = max(1, min(height, width) // 8)

        def convert(img: Image.Image) -> torch.Tensor:
            x = image_tensor(fit_image(img, (width, height)), channels)
            return random_crop_flip(x, pad) if augment else x

    return OwnImages(samples, described, split, convert)


def _scan(paths: Sequence[Path]) -> tuple[set[tuple[int, int]], bool]:
    """The (W, H) sizes found, and whether every image is grey (headers only)."""
    sizes, grey = set(), True
    for path in paths:
        try:
            with Image.open(path) as img:
                sizes.add(img.size)
                grey = grey and img.mode in GREY_MODES
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot decode image {path}: {e}") from e
    return sizes, grey


_OWN_INFO: dict = {}


def own_info(root: Path, options: ImageOptions) -> DatasetInfo:
    """The imagefolder's classes and input shape (C, H, W) under `options`; with "auto"
    normalisation, the training split's per-channel mean and std at that shape. Remembered
    per (root, options) for the life of the process."""
    key = (str(root.resolve()), options)
    if key in _OWN_INFO:
        return _OWN_INFO[key]
    classes = reference_classes("imagefolder", root)
    paths = [
        p
        for split in SPLITS
        if find_split_dir("imagefolder", root, split) is not None
        for p, _ in _samples("imagefolder", root, split)[1]
    ]
    if options.image_size is None or options.channels is None:
        sizes, grey = _scan(paths)
    if options.image_size is not None:
        height, width = options.image_size
    elif len(sizes) == 1:
        width, height = next(iter(sizes))
    else:
        shown = ", ".join(f"{h}x{w}" for w, h in sorted(sizes)[:3])
        raise DatasetError(
            f"imagefolder: the images have {len(sizes)} sizes (H x W: {shown}, ...); give "
            "--image-size H[,W] to fit them all to one"
        )
    channels = options.channels or (1 if grey else 3)
    mean, std = _normalization(options.normalize, channels)
    described = DatasetInfo(
        "imagefolder", len(classes), (channels, height, width), mean, std, tuple(classes)
    )
    if options.normalize == "auto":
        train = load(
            "imagefolder", "train", root, False, ImageOptions((height, width), channels, "none")
        )
        mean, std = channel_statistics(train)
        described = DatasetInfo(
            "imagefolder", len(classes), (channels, height, width), mean, std, tuple(classes)
        )
    _OWN_INFO[key] = described
    return described


def _normalization(normalize, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if normalize in (None, "auto"):
        mean, std = (0.5,), (0.5,)
    elif isinstance(normalize, str):
        mean, std = NORMALIZATIONS[normalize]
    else:
        mean, std = normalize
    if len(mean) == 3 and channels == 1:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    if len(mean) == 1:
        mean, std = mean * channels, std * channels
    if len(mean) != channels:
        raise DatasetError(f"--normalize gives {len(mean)} channels; the images have {channels}")
    return tuple(mean), tuple(std)


def channel_statistics(dataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std over every pixel of a dataset's inputs (std never 0)."""
    total = square = None
    count = 0
    for i in range(len(dataset)):
        x = dataset[i][0].double().flatten(1)
        total = x.sum(1) if total is None else total + x.sum(1)
        square = (x * x).sum(1) if square is None else square + (x * x).sum(1)
        count += x.shape[1]
    mean = total / count
    std = (square / count - mean * mean).clamp_min(1e-12).sqrt().clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())
