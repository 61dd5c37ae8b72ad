"""A query's input: JSON `{"input": ...}`, an image body, or a multipart form with one image,
read strictly and made canonical (core.validate) before anything else sees it, so that the
repeat check, the checksum and the memory all see the same bytes for the same pixels."""

from __future__ import annotations

import io
import json
import warnings

import torch
from torch import Tensor

from ddrs.core.validate import canonical_input
from ddrs.data import DatasetInfo
from ddrs.data.transforms import image_to_input
from ddrs.errors import InputError
from ddrs.serve.api import RequestError

MAX_PIXELS = 4096 * 4096
PREVIEW_SIDE = 160  # the preview's smaller side, at least (nearest-neighbour enlargement)


def check_input(x: Tensor, info: DatasetInfo) -> Tensor:
    """The input, canonical, or a 422 naming what is wrong."""
    try:
        return canonical_input(x, tuple(info.input_shape))
    except InputError as error:
        raise RequestError(422, f'"input": {error}') from None


# -- JSON ---------------------------------------------------------------------------------------
def _no_constant(name: str):
    raise RequestError(
        422,
        f'"input" holds {name}: NaN and infinite values are not numbers; send numbers in [0, 1]',
    )


def _unique_keys(pairs: list[tuple]) -> dict:
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise RequestError(422, f"the JSON body repeats the key(s) {repeated}; send each once")
    return dict(pairs)


def read_json(data: bytes) -> object:
    """The body as JSON, strictly: no repeated keys, no NaN or Infinity, and integers read as
    floats (so that 10**400 or an integer of 5,000 digits is a number too large, not an
    error of Python's integer conversion)."""
    try:
        return json.loads(
            data, parse_int=float, parse_constant=_no_constant, object_pairs_hook=_unique_keys
        )
    except RecursionError:
        raise RequestError(
            400, 'the JSON is nested too deeply; send {"input": C x H x W numbers}'
        ) from None
    except (UnicodeDecodeError, ValueError):  # JSONDecodeError is a ValueError
        raise RequestError(
            400, 'the body is not JSON; send {"input": [[[...]]]} or an image upload'
        ) from None


def _numbers(value, depth: int) -> bool:
    """True if `value` is a number (not a bool) or nested lists of them, at most `depth`
    deep."""
    if isinstance(value, list):
        return depth > 0 and all(_numbers(v, depth - 1) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_input(body: object, info: DatasetInfo) -> Tensor:
    """The JSON body's `input` as the service's canonical input, or a RequestError."""
    if not isinstance(body, dict) or "input" not in body:
        raise RequestError(422, 'the JSON body needs a field "input": a C x H x W array of numbers')
    extra = sorted(set(body) - {"input"})
    if extra:
        raise RequestError(422, f'unknown field(s) {extra}; the body holds only "input"')
    shape = " x ".join(map(str, info.input_shape))
    if not _numbers(body["input"], len(info.input_shape)):
        raise RequestError(
            422,
            f'"input" must be a {shape} array of numbers (not strings, booleans or deeper lists)',
        )
    try:
        x = torch.tensor(body["input"], dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise RequestError(422, f'"input" must be a rectangular {shape} array of numbers') from None
    return check_input(x, info)


def json_input(data: bytes, info: DatasetInfo) -> Tensor:
    return parse_input(read_json(data), info)


# -- images -------------------------------------------------------------------------------------
def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f}"


def too_many_pixels(width: int, height: int, max_pixels: int) -> RequestError:
    size = _megapixels(width * height)
    return RequestError(
        413,
        f"the image is {width} x {height} pixels ({size} megapixels); this "
        f"service takes images of up to {_megapixels(max_pixels)} megapixels",
    )


def parse_image(data: bytes, info: DatasetInfo, max_pixels: int = MAX_PIXELS) -> Tensor:
    """An uploaded image as the model's canonical input; its size is checked from the header
    before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # the size is checked here, against --max-pixels
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            width, height = img.size
            if width * height > max_pixels:
                raise too_many_pixels(width, height, max_pixels)
            img.load()
            return check_input(image_to_input(img, info), info)
    except Image.DecompressionBombError:
        raise RequestError(
            413,
            "the image has more pixels than this service takes "
            f"({_megapixels(max_pixels)} megapixels)",
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise RequestError(
            400, "the upload is not an image this service can read (send a PNG or JPEG file)"
        ) from None


def boundary_of(content_type: str) -> bytes:
    """The multipart boundary of a Content-Type header, or a 400."""
    for part in content_type.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.strip().lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode("latin-1")
    raise RequestError(400, "malformed multipart form: its Content-Type names no boundary")


def check_multipart(data: bytes, content_type: str) -> None:
    """A multipart body must end with its closing boundary (`--BOUNDARY--`): a form cut short
    is malformed, not a form without the file."""
    if b"--" + boundary_of(content_type) + b"--" not in data:
        raise RequestError(
            400, "malformed multipart form: it has no closing boundary (the body was cut short?)"
        )


def form_fields(form) -> object:
    """The form's one image upload, or a 422 naming the field it needs."""
    names = sorted(set(form.keys()))
    extra = [name for name in names if name != "file"]
    if extra:
        raise RequestError(
            422, f'unknown form field(s) {extra}; the form holds one image in a field named "file"'
        )
    uploads = form.getlist("file")
    if len(uploads) != 1 or isinstance(uploads[0], str):
        raise RequestError(422, 'the multipart form needs one image file in a field named "file"')
    return uploads[0]


# -- what the model sees --------------------------------------------------------------------------
def preview_png(x: Tensor) -> bytes:
    """A canonical input (C, H, W) as a PNG, enlarged by a whole factor (nearest neighbour) so
    that its smaller side is at least PREVIEW_SIDE: exactly the pixels the model gets."""
    from PIL import Image

    channels, height, width = x.shape
    factor = max(1, -(-PREVIEW_SIDE // min(height, width)))
    pixels = (x.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    img = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels[:, :, :3])
    buffer = io.BytesIO()
    img.resize((width * factor, height * factor), Image.NEAREST).save(buffer, format="PNG")
    return buffer.getvalue()
