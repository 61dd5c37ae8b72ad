"""Image transforms written with torch and PIL (torchvision is not a dependency).

Random choices use torch's global RNG, so ``torch.manual_seed`` makes augmentation reproducible
(DataLoader workers get seeds derived from it).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_RESIZE = 256
IMAGENET_CROP = 224


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> float32 RGB tensor (3, H, W) with values in [0, 1]."""
    arr = np.array(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).to(torch.float32).div_(255.0)


def random_hflip(x: torch.Tensor) -> torch.Tensor:
    """Flip a (C, H, W) tensor left-right with probability 1/2."""
    return x.flip(-1) if float(torch.rand(())) < 0.5 else x


def random_crop_flip(x: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """CIFAR augmentation: zero-pad by ``padding``, random crop back to (H, W), random flip."""
    _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    top, left = (int(v) for v in torch.randint(0, 2 * padding + 1, (2,)))
    return random_hflip(padded[:, top : top + h, left : left + w])


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Resize (bilinear) so that the shorter side is ``size``, keeping the aspect ratio."""
    w, h = img.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return img.resize(new, Image.BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Central ``size`` x ``size`` crop (zero-padded if the image is smaller)."""
    w, h = img.size
    left = int(round((w - size) / 2))
    top = int(round((h - size) / 2))
    return img.crop((left, top, left + size, top + size))


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random crop as in torchvision's RandomResizedCrop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(torch.empty(()).uniform_(*scale))
        aspect = math.exp(float(torch.empty(()).uniform_(*log_ratio)))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, ()))
            left = int(torch.randint(0, width - w + 1, ()))
            return left, top, w, h
    # Fallback after 10 misses: the central crop with the aspect ratio clamped to `ratio`.
    if width / height < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(img: Image.Image, size: int) -> Image.Image:
    """Random area/aspect crop resized (bilinear) to ``size`` x ``size``."""
    left, top, w, h = random_resized_crop_box(*img.size)
    return img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))


def fit_image(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The image at `size` (W, H): area averaging (box) where it shrinks, so that an image
    enlarged by whole factors comes back exactly, bilinear where it grows."""
    if img.size == size:
        return img
    shrinks = img.size[0] >= size[0] and img.size[1] >= size[1]
    return img.resize(size, Image.BOX if shrinks else Image.BILINEAR)


def image_tensor(img: Image.Image, channels: int) -> torch.Tensor:
    """A PIL image as a float32 (channels, H, W) tensor in [0, 1]: grey for 1, RGB for 3."""
    if channels == 1:
        arr = np.array(img.convert("L"), dtype=np.uint8)
        return torch.from_numpy(arr)[None].to(torch.float32).div_(255.0)
    if channels == 3:
        return pil_to_tensor(img)
    raise ValueError(f"images cannot become {channels}-channel inputs")


def large_test(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """ImageNet's test transform at any `size` (W, H): resize to cover W x H x 256/224,
    centre crop W x H."""
    scale = max(size[0] / img.size[0], size[1] / img.size[1]) * IMAGENET_RESIZE / IMAGENET_CROP
    covered = img.resize(
        (max(size[0], round(img.size[0] * scale)), max(size[1], round(img.size[1] * scale))),
        Image.BILINEAR,
    )
    left, top = (covered.size[0] - size[0]) // 2, (covered.size[1] - size[1]) // 2
    return covered.crop((left, top, left + size[0], top + size[1]))


def large_train(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """ImageNet's augmentation at any `size` (W, H): random resized crop, random flip."""
    left, top, w, h = random_resized_crop_box(*img.size)
    img = img.resize(size, Image.BILINEAR, box=(left, top, left + w, top + h))
    return img.transpose(Image.FLIP_LEFT_RIGHT) if float(torch.rand(())) < 0.5 else img


def imagenet_test(img: Image.Image) -> torch.Tensor:
    """Resize the shorter side to 256, centre crop 224."""
    return pil_to_tensor(center_crop(resize_shorter(img, IMAGENET_RESIZE), IMAGENET_CROP))


def imagenet_train(img: Image.Image) -> torch.Tensor:
    """RandomResizedCrop 224 + random horizontal flip."""
    return random_hflip(pil_to_tensor(random_resized_crop(img, IMAGENET_CROP)))


def image_to_input(img: Image.Image, info) -> torch.Tensor:
    """An uploaded image as the model's input (C, H, W) in [0, 1], as the dataset's test
    transform would make it: ImageNet-sized inputs get resize 256 + centre crop 224; smaller
    ones (CIFAR-10, MNIST, digits, own images) are fitted to H x W (area averaging where they
    shrink, so an image enlarged by whole factors comes back exactly); one channel is grey."""
    if len(info.input_shape) != 3:
        raise ValueError(f"inputs of shape {tuple(info.input_shape)} are not images")
    channels, height, width = info.input_shape
    if (height, width) == (IMAGENET_CROP, IMAGENET_CROP) and channels == 3:
        return imagenet_test(img.convert("RGB"))
    if min(height, width) >= 128:
        return image_tensor(large_test(img, (width, height)), channels)
    return image_tensor(fit_image(img, (width, height)), channels)
