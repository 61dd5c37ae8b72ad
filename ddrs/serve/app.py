"""The HTTP layer of `ddrs serve` (FastAPI): routes, checks, refusals.

Requests are checked before they reach the engine: encoded slashes are not routed, the Host
header must be an allowed host (DNS rebinding), cross-origin writes are refused unless a
token is required and given, JSON is read only as application/json and images only as
image/* or multipart (no form of another site can post), bodies and images are bounded
before they are decoded (decoding runs off the event loop), and every refusal is
`{"error": ...}` with a documented status (api.py). Every GET path also answers HEAD, a 405
says which methods are allowed, and every response carries the headers of security.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from torch import Tensor

from ddrs.classifier import Answer
from ddrs.data import DatasetInfo
from ddrs.memory import MemoryUnavailable
from ddrs.options import default_of
from ddrs.serve import inputs
from ddrs.serve.api import (
    PREVIEW_RESPONSE,
    QUERY_BODY,
    QUERY_ERRORS,
    AnswerBody,
    HealthBody,
    MemoryStatsBody,
    RequestError,
    errors,
    input_schema,
)
from ddrs.serve.metrics import CLIENT_GONE
from ddrs.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ddrs.serve.page import FAVICON, render_page
from ddrs.serve.security import (
    authorised,
    cross_origin,
    encoded_slash,
    host_of,
    secure_headers,
)
from ddrs.serve.service import CertificationService, EngineError, Unavailable
from ddrs.serve.spec import ServeRun

OPEN_PATHS = {"/", "/page.js", "/page.css", "/health", "/favicon.ico", "/openapi.json"}
PAGE_PATHS = {"/", "/page.js", "/page.css"}
UNAVAILABLE = "the memory's database is unavailable; retry in a moment"
GET = ["GET", "HEAD"]
log = logging.getLogger("ddrs.serve")


def _response(answer: Answer, info: DatasetInfo) -> dict:
    body = asdict(answer)
    classes = info.classes
    body["class_name"] = (
        classes[answer.predict] if classes and 0 <= answer.predict < len(classes) else None
    )
    return body


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, at most `limit` bytes (413) arriving within `timeout` seconds (408)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise RequestError(
            408, f"the request body did not arrive within {timeout:g} s", Connection="close"
        ) from None


def _too_large(limit: int) -> RequestError:
    return RequestError(
        413, f"the request is over this service's limit of {limit / 1e6:.1f} MB ({limit:,} bytes)"
    )


def create_app(
    service: CertificationService,
    token: str | None = None,
    max_body_bytes: int = default_of(ServeRun, "max_body_bytes"),
    *,
    allowed_hosts: list[str] | None = None,
    max_pixels: int = default_of(ServeRun, "max_pixels"),
    metrics_public: bool = False,
    body_timeout: float = default_of(ServeRun, "body_timeout"),
):
    """The FastAPI application around a service (not yet started: the app's lifespan starts
    and stops it). `allowed_hosts`: Host header names accepted (None: any, for an app behind
    a proxy that checks them); `metrics_public`: /metrics without the token."""
    decoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ddrs-decode")

    @asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.stop()
            decoder.shutdown(wait=False)

    app = FastAPI(
        title="ddrs",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        description="Certified predictions of a data-dependent smoothed classifier; "
        "every answer is stored in the memory before it is sent.",
    )
    info = service.info
    open_paths = OPEN_PATHS | ({"/metrics"} if metrics_public else set())
    hosts = None if allowed_hosts is None else {host_of(h) for h in allowed_hosts}

    async def decode(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(decoder, fn, *args)

    def refuse(status: int, message: str, **headers) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers or None)

    def guard(request: Request) -> JSONResponse | None:
        """The refusal of a request before it is routed, or None."""
        if encoded_slash(request.scope.get("raw_path") or b""):
            return refuse(404, "Not Found")
        if hosts is not None and host_of(request.headers.get("host", "")) not in hosts:
            return refuse(
                400, f"Host {request.headers.get('host', '')!r} is not served here (--allowed-host)"
            )
        path = request.url.path
        if token is not None and path not in open_paths and not authorised(request.headers, token):
            return refuse(
                401,
                "this service needs its token: send Authorization: Bearer <token>",
                **{"WWW-Authenticate": "Bearer"},
            )
        if (
            request.method not in GET
            and cross_origin(request.headers)
            and not (token is not None and authorised(request.headers, token))
        ):
            return refuse(
                403,
                "cross-origin writes are refused (run the service with "
                "--token-file and send the token)",
            )
        return None

    @app.middleware("http")
    async def guard_and_measure(request: Request, call_next):
        start = time.perf_counter()
        response = guard(request)
        if response is None:
            try:
                response = await call_next(request)
            except Exception:
                log.exception("ddrs serve: %s %s failed", request.method, request.url.path)
                response = refuse(500, "internal error (see the server's log)")
        secure_headers(response.headers, request.url.path in PAGE_PATHS)
        service.metrics.observe(
            request.method, request.url.path, response.status_code, time.perf_counter() - start
        )
        return response

    @app.exception_handler(RequestError)
    async def refused(request, error: RequestError):
        return refuse(error.status, str(error), **error.headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request, error: ClientDisconnect):
        log.info("ddrs serve: the client went away during %s %s", request.method, request.url.path)
        return Response(status_code=CLIENT_GONE)

    @app.exception_handler(Unavailable)
    @app.exception_handler(MemoryUnavailable)
    async def unavailable(request, error: Exception):
        log.warning("ddrs serve: %s", error)  # the details stay in the server's log
        return refuse(503, UNAVAILABLE, **{"Retry-After": "1"})

    @app.exception_handler(EngineError)
    async def engine_failed(request, error: EngineError):
        log.error("ddrs serve: the engine failed: %s", error)
        return refuse(500, f"the service failed on this batch: {error}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):
        return refuse(error.status_code, str(error.detail), **(error.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, error: RequestValidationError):
        return refuse(422, f"invalid request: {error.errors()[0].get('msg', 'see the API')}")

    @app.api_route(
        "/health",
        methods=GET,
        response_model=HealthBody,
        response_model_exclude_none=True,
        responses=errors(400),
    )
    async def health(request: Request):
        if token is not None and not authorised(request.headers, token):
            return {"status": "ok"}  # settings and the memory's location only with the token
        return {
            "status": "ok",
            "entries": service.entries if service.memory is not None else None,
            "in_flight": service.in_flight,
            **service.describe,
        }

    async def query_input(request: Request) -> Tensor:
        """The canonical input of a certify / predict / preview request: JSON
        `{"input": ...}`, an image body, or a multipart form with one image; decoded off the
        event loop."""
        content_type = request.headers.get("content-type", "")
        media = content_type.split(";")[0].strip().lower()
        if media not in ("application/json", "multipart/form-data") and not (
            media.startswith("image/")
        ):
            raise RequestError(
                415,
                "send application/json, an image (image/png, image/jpeg) "
                'or a multipart form with the image in a field named "file" '
                f"(got Content-Type {media or 'none'!r})",
            )
        data = await _read_body(request, max_body_bytes, body_timeout)
        if media == "application/json":
            return await decode(inputs.json_input, data, info)
        if media.startswith("image/"):
            return await decode(inputs.parse_image, data, info, max_pixels)
        inputs.check_multipart(data, content_type)

        async def replay():
            return {"type": "http.request", "body": data, "more_body": False}

        try:
            form = await Request(request.scope, replay).form()
        except Exception:
            raise RequestError(400, "malformed multipart form") from None
        try:
            upload = inputs.form_fields(form)
            return await decode(inputs.parse_image, await upload.read(), info, max_pixels)
        finally:
            await form.close()

    async def answer(kind: str, request: Request):
        return _response(await service.submit(kind, await query_input(request)), info)

    @app.post(
        "/v1/certify",
        response_model=AnswerBody,
        responses=errors(*QUERY_ERRORS),
        openapi_extra=QUERY_BODY,
        summary="certify: a class and a certified radius",
    )
    async def certify(request: Request):
        return await answer("certify", request)

    @app.post(
        "/v1/predict",
        response_model=AnswerBody,
        responses=errors(*QUERY_ERRORS),
        openapi_extra=QUERY_BODY,
        summary="predict: a class (stored with radius 0)",
    )
    async def predict(request: Request):
        return await answer("predict", request)

    @app.post(
        "/v1/preview",
        response_class=Response,
        openapi_extra=QUERY_BODY,
        responses={**errors(400, 401, 403, 408, 413, 415, 422), **PREVIEW_RESPONSE},
        summary="the input as the model sees it (a PNG); nothing is stored",
    )
    async def preview(request: Request):
        x = await query_input(request)
        return Response(await decode(inputs.preview_png, x), media_type="image/png")

    @app.api_route(
        "/v1/memory/stats",
        methods=GET,
        response_model=MemoryStatsBody,
        responses=errors(400, 401, 404, 503),
    )
    async def memory_stats():
        stats = await service.memory_stats()
        if stats is None:
            raise RequestError(
                404,
                "this service keeps no memory: its answers are certified "
                "without one (a fixed sigma, a router or a cascade)",
            )
        return stats

    @app.api_route("/metrics", methods=GET, response_class=Response, responses=errors(400, 401))
    async def metrics():
        return Response(
            service.metrics.text(service.entries, service.in_flight),
            media_type=METRICS_CONTENT_TYPE,
        )

    @app.api_route("/", methods=GET, response_class=HTMLResponse, responses=errors(400))
    async def page():
        page = render_page(service.describe, token is not None, service.memory is None)
        return HTMLResponse(page)

    static = resources.files("ddrs.serve") / "static"
    for name, media in (("page.js", "text/javascript"), ("page.css", "text/css")):
        content = (static / name).read_bytes()

        async def asset(content=content, media=media):
            return Response(content, media_type=media)

        app.add_api_route(
            f"/{name}",
            asset,
            methods=GET,
            response_class=Response,
            responses=errors(400),
            include_in_schema=False,
        )

    @app.api_route("/favicon.ico", methods=GET, response_class=Response, responses=errors(400))
    async def favicon():
        return Response(FAVICON, media_type="image/svg+xml")

    def openapi() -> dict:
        if app.openapi_schema is None:
            with warnings.catch_warnings():  # GET and HEAD of one route share an id: renamed
                warnings.simplefilter("ignore", UserWarning)
                schema = get_openapi(
                    title=app.title,
                    version=app.version,
                    routes=app.routes,
                    description=app.description,
                )
            for path, operations in schema["paths"].items():
                for method, operation in operations.items():
                    operation["operationId"] = method + (
                        path.replace("/", "_").replace(".", "_") if path != "/" else "_page"
                    )
            components = schema.setdefault("components", {})
            components.setdefault("schemas", {})["InputBody"] = input_schema(info.input_shape)
            if token is not None:
                components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                for path, operations in schema["paths"].items():
                    if path not in open_paths:
                        for operation in operations.values():
                            operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
