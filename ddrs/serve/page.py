"""The page of `ddrs serve` (`/`): static/index.html, page.js and page.css, with the service's
public facts in a JSON data block (no inline script, so the page's Content-Security-Policy
allows only its own files). No external resources: the service may have no network."""

from __future__ import annotations

import json
from importlib import resources

FAVICON = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    b'<circle cx="8" cy="8" r="7" fill="#2c6e49"/><circle cx="8" cy="8" r="3" fill="#fff"/>'
    b"</svg>"
)
PAGE = (resources.files("ddrs.serve") / "static" / "index.html").read_text()


def render_page(describe: dict, needs_token: bool, stateless: bool = False) -> str:
    """The page: alpha and the norm (part of the guarantee) and whether answers are stored, for
    everyone;
    the other settings only when no token is needed (with a token, `GET /health` with it
    shows them)."""
    facts = {
        "alpha": describe.get("alpha"),
        "norm": describe.get("norm", "l2"),  # what a radius means, for everyone
        "needs_token": needs_token,
        "stateless": stateless,
        "settings": None if needs_token else describe,
    }
    text = json.dumps(facts).replace("<", "\\u003c").replace("&", "\\u0026")
    return PAGE.replace("{{SERVICE}}", text)
