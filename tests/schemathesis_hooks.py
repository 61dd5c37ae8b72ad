"""schemathesis hooks (SCHEMATHESIS_HOOKS=schemathesis_hooks): the image types the contract
names get real images of random sizes and colours, so that schema-valid uploads are valid."""

import io

import schemathesis
from hypothesis import strategies as st
from PIL import Image


@st.composite
def images(draw, kind: str) -> bytes:
    mode = draw(st.sampled_from(["L", "RGB"]))
    size = (draw(st.integers(1, 48)), draw(st.integers(1, 48)))
    colour = (
        draw(st.integers(0, 255))
        if mode == "L"
        else tuple(draw(st.integers(0, 255)) for _ in range(3))
    )
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format=kind)
    return buffer.getvalue()


schemathesis.openapi.media_type("image/png", images("PNG"))
schemathesis.openapi.media_type("image/jpeg", images("JPEG"))
