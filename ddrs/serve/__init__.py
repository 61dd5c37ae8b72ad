"""`ddrs serve`: the online data-dependent smoothed classifier behind HTTP (FastAPI, uvicorn).

service.py: the classifier, its memory and the micro-batcher; app.py: routes, checks and
refusals; inputs.py: a query's input, read strictly and made canonical; security.py: hosts,
origins, the token, response headers; api.py: the contract; metrics.py: Prometheus;
page.py and static/: the page; spec.py: `ServeRun`; server.py: `ddrs serve` from its spec,
with uvicorn. The names below load on first use, so that `ddrs.serve.spec` (which the command
line reads) needs no FastAPI.
"""

import importlib

_NAMES = {
    "CertificationService": "ddrs.serve.service",
    "RequestError": "ddrs.serve.api",
    "create_app": "ddrs.serve.app",
    "parse_image": "ddrs.serve.inputs",
    "parse_input": "ddrs.serve.inputs",
    "read_token": "ddrs.serve.security",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'ddrs.serve' has no attribute {name!r}")
