"""`ddrs serve`: the online data-dependent smoothed classifier behind HTTP (FastAPI, uvicorn).

service.py: the classifier, its memory and the micro-batcher; app.py: routes, checks and
refusals; inputs.py: a query's input, read strictly and made canonical; security.py: hosts,
origins, the token, response headers; api.py: the contract; metrics.py: Prometheus;
page.py and static/: the page; server.py: `ddrs serve` from its spec, with uvicorn.
"""

from ddrs.serve.api import RequestError
from ddrs.serve.app import create_app
from ddrs.serve.inputs import parse_image, parse_input
from ddrs.serve.security import read_token
from ddrs.serve.service import CertificationService

__all__ = ["CertificationService", "RequestError", "create_app", "parse_image", "parse_input",
           "read_token"]
