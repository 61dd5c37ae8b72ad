"""Who may ask what: the Host check (against DNS rebinding), cross-origin writes, the Bearer
token, and the headers every response carries (no sniffing, no framing)."""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from ddrs.errors import InputError

# the page loads its own script and style and shows uploads (blob:) and previews (blob:)
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
API_POLICY = "default-src 'none'; frame-ancestors 'none'"


def host_of(value: str) -> str:
    """The host name of a Host header, an origin or a listening address (no port, no
    brackets): 'example.org:80' -> 'example.org', '[::1]:8000' -> '::1', '::1' -> '::1'."""
    netloc = urlsplit(value).netloc if "://" in value else value
    host = netloc.rsplit("@", 1)[-1]
    if host.startswith("["):
        return host[1 : host.find("]")].lower()
    if host.count(":") > 1:  # a bare IPv6 address, as --host takes it
        return host.lower()
    return host.split(":", 1)[0].lower()


def url_host(host: str) -> str:
    """A listening address as it is written in a URL ('::1' -> '[::1]')."""
    return f"[{host}]" if ":" in host else host


def cross_origin(headers) -> bool:
    """A browser request from a page of another origin (Origin, or Sec-Fetch-Site)."""
    origin = headers.get("origin")
    if origin is not None and origin != "null":
        return urlsplit(origin).netloc.lower() != headers.get("host", "").lower()
    return origin == "null" or headers.get("sec-fetch-site") == "cross-site"


def authorised(headers, token: str) -> bool:
    scheme, _, given = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


def encoded_slash(raw_path: bytes) -> bool:
    """A path that spells a slash as %2F: not routed (it would reach another endpoint than
    the one a proxy's rules saw)."""
    return b"%2f" in raw_path.lower()


def secure_headers(headers, is_page: bool) -> None:
    """What every response carries: no MIME sniffing, no framing by any page."""
    headers["X-Content-Type-Options"] = "nosniff"
    headers["X-Frame-Options"] = "DENY"
    headers["Referrer-Policy"] = "no-referrer"
    headers["Content-Security-Policy"] = PAGE_POLICY if is_page else API_POLICY


def read_token(path: str) -> str:
    try:
        with open(path) as f:
            token = f.read().strip()
    except OSError as error:
        raise InputError(f"--token-file {path}: {error.strerror}") from None
    if len(token) < 16:
        raise InputError(
            f"--token-file {path} holds {len(token)} characters; use at least 16 (e.g. "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))' > token`)"
        )
    return token
