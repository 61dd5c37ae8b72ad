"""The command line's converters for settings that are not plain numbers or words; a spec
names one with `setting(..., type="pair")`."""

from __future__ import annotations

import argparse

from ddrs.data import parse_image_size, parse_normalize
from ddrs.errors import DatasetError


def pair(text: str) -> tuple[float, float]:
    """'LOW,HIGH' -> (low, high)."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected two numbers LOW,HIGH (e.g. 0.5,2), got {text!r}"
        ) from None
    return low, high


def shape(text: str) -> tuple[int, int, int]:
    """'C,H,W' -> (c, h, w)."""
    try:
        channels, height, width = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W (e.g. 3,32,32), got {text!r}") from None
    return channels, height, width


def image_size(text: str) -> tuple[int, int]:
    try:
        return parse_image_size(text)
    except DatasetError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def normalize(text: str):
    try:
        return parse_normalize(text)
    except DatasetError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


CONVERTERS = {"pair": pair, "shape": shape, "image_size": image_size, "normalize": normalize}
