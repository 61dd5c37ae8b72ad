"""`ddrs serve`: the online data-dependent smoothed classifier behind HTTP (FastAPI, uvicorn).

Requests are micro-batched: the ones that arrive while the engine is busy (up to
`max_batch`, waiting at most `max_wait` seconds for company) go through the sigma search and
the Monte Carlo sampling in one engine call; then the memory resolves and stores each answer
in arrival order, one at a time, on a single writer thread. A response is sent only after its
entry is committed (SQLite, synchronous=FULL), so an answer once given survives a crash.
Noise is keyed by each query's arrival number, so the answers equal those of the
one-at-a-time `DataDependentSmoothClassifier` for the same arrival order.

Requests are checked before they reach the engine: the Host header against the allowed
hosts (DNS rebinding), cross-origin writes refused unless a token is required and given,
JSON only as application/json and images only as image/* or multipart (no form of another
site can post), bodies and images bounded before they are decoded (decoding runs off the
event loop), and every refusal is `{"error": ...}` with a documented status
(`serve_api.py`). Metrics: `serve_metrics.py`; the page: `serve_page.py`.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import Tensor

from ddrs.classifier import Answer, DataDependentSmoothClassifier
from ddrs.data import DatasetInfo
from ddrs.data.transforms import image_to_input
from ddrs.errors import InputError
from ddrs.memory import MemoryUnavailable
from ddrs.serve_api import (
    QUERY_BODY,
    AnswerBody,
    HealthBody,
    MemoryStatsBody,
    errors,
    input_schema,
)
from ddrs.serve_metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ddrs.serve_metrics import ServiceMetrics
from ddrs.serve_page import FAVICON, render_page
from ddrs.specs import ServeRun, default_of

MAX_BODY_BYTES = 8 << 20
MAX_PIXELS = 4096 * 4096
OPEN_PATHS = {"/", "/health", "/favicon.ico", "/openapi.json"}  # no token needed
PATHS = {"/", "/health", "/favicon.ico", "/v1/certify", "/v1/predict", "/v1/memory/stats",
         "/metrics", "/openapi.json"}
log = logging.getLogger("ddrs.serve")


class EngineError(Exception):
    """The engine or the memory failed on a batch (a server error, not the client's)."""


class Unavailable(Exception):
    """The memory's database cannot be reached now: the client may retry (503)."""


class RequestError(Exception):
    """A request the service refuses: HTTP `status` and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _numbers(value, depth: int) -> bool:
    """True if `value` is a number (not a bool) or nested lists of them, at most `depth`
    deep."""
    if isinstance(value, list):
        return depth > 0 and all(_numbers(v, depth - 1) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_input(body: object, info: DatasetInfo) -> Tensor:
    """The JSON body's `input` as a float32 tensor of the service's input shape, in [0, 1],
    or a RequestError."""
    if not isinstance(body, dict) or "input" not in body:
        raise RequestError(422, 'the JSON body needs a field "input": a C x H x W array of '
                           "numbers")  # fmt: skip
    extra = sorted(set(body) - {"input"})
    if extra:
        raise RequestError(422, f"unknown field(s) {extra}; the body holds only \"input\"")
    shape = " x ".join(map(str, info.input_shape))
    if not _numbers(body["input"], len(info.input_shape)):
        raise RequestError(422, f'"input" must be a {shape} array of numbers (not strings, '
                           "booleans or deeper lists)")  # fmt: skip
    try:
        x = torch.tensor(body["input"], dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise RequestError(422, f'"input" must be a rectangular {shape} array of numbers'
                           ) from None  # fmt: skip
    return check_input(x, info)


def check_input(x: Tensor, info: DatasetInfo) -> Tensor:
    shape = tuple(info.input_shape)
    if tuple(x.shape) != shape:
        raise RequestError(422, f'"input" has shape {tuple(x.shape)}; this model takes {shape}')
    if not bool(torch.isfinite(x).all()):
        raise RequestError(422, '"input" holds NaN or infinite values (or numbers too large '
                           "for float32)")  # fmt: skip
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise RequestError(
            422,
            f'"input" values must lie in [0, 1] (un-normalised pixels); got [{float(x.min()):g}, '
            f"{float(x.max()):g}]",
        )
    return x


def parse_image(data: bytes, info: DatasetInfo, max_pixels: int = MAX_PIXELS) -> Tensor:
    """An uploaded image as the model's input; its size is checked from the header before
    any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # the size is checked here, against --max-pixels
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            width, height = img.size
            if width * height > max_pixels:
                raise RequestError(413, f"the image is {width} x {height} pixels, more than the "
                                   f"limit of {max_pixels} (--max-pixels)")  # fmt: skip
            img.load()
            return check_input(image_to_input(img, info), info)
    except Image.DecompressionBombError:
        raise RequestError(413, f"the image has more pixels than the limit of {max_pixels} "
                           "(--max-pixels)") from None  # fmt: skip
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise RequestError(400, "the upload is not an image PIL can read (PNG, JPEG, ...)"
                           ) from None  # fmt: skip


@dataclass
class Query:
    kind: str
    x: Tensor
    future: asyncio.Future


class CertificationService:
    """The classifier, its memory and the micro-batcher. Every use of the model and the memory
    runs on one writer thread, in arrival order."""

    def __init__(
        self,
        make_classifier,
        info: DatasetInfo,
        *,
        max_batch: int = default_of(ServeRun, "max_batch"),
        max_wait: float = 0.0,
        describe: dict | None = None,
    ) -> None:
        self.make_classifier, self.info = make_classifier, info
        self.max_batch, self.max_wait = int(max_batch), float(max_wait)
        self.describe = describe or {}
        self.metrics = ServiceMetrics(PATHS)
        self.entries = 0
        self.in_flight = 0  # queries submitted and not yet answered
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ddrs-writer")
        self.classifier: DataDependentSmoothClassifier | None = None
        self.queue: asyncio.Queue[Query] | None = None
        self.batcher: asyncio.Task | None = None

    # -- on the writer thread
    def _open(self) -> None:
        self.classifier = self.make_classifier()
        memory = self.classifier.memory
        self.entries = len(memory)

    def _answer(self, queries: list[Query]) -> list[Answer]:
        keys = self.classifier.memory.allocate_keys(len(queries))  # unique across replicas
        x = torch.stack([q.x for q in queries])
        answers = self.classifier.answer_batch(x, [q.kind for q in queries], keys)
        try:
            self.entries = len(self.classifier.memory)
        except MemoryUnavailable:
            pass  # the answers are committed; the count is only for /health
        return answers

    def _close(self) -> None:
        if self.classifier is not None:
            self.classifier.memory.close()

    async def call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.writer, fn, *args)

    # -- on the event loop
    async def start(self) -> None:
        await self.call(self._open)
        self.queue = asyncio.Queue()
        self.batcher = asyncio.create_task(self._batch_forever())

    async def stop(self) -> None:
        if self.batcher is not None:
            while self.in_flight:  # answer what was received before closing the memory
                await asyncio.sleep(0.01)
            self.batcher.cancel()
            try:
                await self.batcher
            except asyncio.CancelledError:
                pass
        await self.call(self._close)
        self.writer.shutdown(wait=True)

    async def submit(self, kind: str, x: Tensor) -> Answer:
        future = asyncio.get_running_loop().create_future()
        self.in_flight += 1
        try:
            self.queue.put_nowait(Query(kind, x, future))
            return await future
        finally:
            self.in_flight -= 1

    async def _gather(self) -> list[Query]:
        queries = [await self.queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while len(queries) < self.max_batch:
            if not self.queue.empty():
                queries.append(self.queue.get_nowait())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                queries.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return queries

    async def _batch_forever(self) -> None:
        while True:
            queries = await self._gather()
            try:
                answers = await self.call(self._answer, queries)
            except Exception as error:  # the engine failed: every query of the batch fails
                failure = (Unavailable(str(error)) if isinstance(error, MemoryUnavailable)
                           else EngineError(f"{type(error).__name__}: {error}"))
                for q in queries:
                    if not q.future.done():
                        q.future.set_exception(failure)
                continue
            self.metrics.batch(len(queries))
            for q, answer in zip(queries, answers):
                self.metrics.answered(answer)
                if not q.future.done():
                    q.future.set_result(answer)

    async def memory_stats(self) -> dict:
        return await self.call(self.classifier.memory.stats)


def _response(answer: Answer, info: DatasetInfo) -> dict:
    body = asdict(answer)
    classes = info.classes
    body["class_name"] = (
        classes[answer.predict] if classes and 0 <= answer.predict < len(classes) else None
    )
    return body


async def _read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _json_input(data: bytes, info: DatasetInfo) -> Tensor:
    try:
        body = json.loads(data)
    except RecursionError:
        raise RequestError(400, "the JSON is nested too deeply; send {\"input\": C x H x W "
                           "numbers}") from None  # fmt: skip
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RequestError(
            400, 'the body is not JSON; send {"input": [[[...]]]} or an image upload'
        ) from None
    return parse_input(body, info)


async def _query_input(request, info: DatasetInfo, limit: int, max_pixels: int,
                       decode) -> Tensor:  # fmt: skip
    """The input of a certify / predict request: JSON `{"input": ...}` (application/json) or
    an image (image/*, or a multipart field "file"); decoded by `decode`, off the loop."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("application/json", "multipart/form-data") and not (
            content_type.startswith("image/")):  # fmt: skip
        raise RequestError(415, "send application/json, an image/* body, or a multipart form "
                           f"with a file (got Content-Type {content_type or 'none'!r})")
    data = await _read_body(request, limit)
    if content_type == "application/json":
        return await decode(_json_input, data, info)
    if content_type.startswith("image/"):
        return await decode(parse_image, data, info, max_pixels)

    async def replay():
        return {"type": "http.request", "body": data, "more_body": False}

    try:
        form = await Request(request.scope, replay).form()
    except Exception:
        raise RequestError(400, "malformed multipart body") from None
    try:
        upload = form.get("file") or form.get("image")
        if upload is None or isinstance(upload, str):
            raise RequestError(422, 'the multipart form needs an image in a field named "file"')
        return await decode(parse_image, await upload.read(), info, max_pixels)
    finally:
        await form.close()


def _host_of(value: str) -> str:
    """The host name of a Host header or an origin (no port, no brackets)."""
    netloc = urlsplit(value).netloc if "://" in value else value
    host = netloc.rsplit("@", 1)[-1]
    if host.startswith("["):
        return host[1 : host.find("]")].lower()
    return host.split(":", 1)[0].lower()


def _cross_origin(request: Request) -> bool:
    """A browser request from a page of another origin (Origin, or Sec-Fetch-Site)."""
    origin = request.headers.get("origin")
    if origin is not None and origin != "null":
        return urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower()
    return origin == "null" or request.headers.get("sec-fetch-site") == "cross-site"


def create_app(
    service: CertificationService,
    token: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    *,
    allowed_hosts: list[str] | None = None,
    max_pixels: int = MAX_PIXELS,
    metrics_public: bool = False,
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

    app = FastAPI(title="ddrs", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Certified predictions of a data-dependent smoothed classifier; "
                  "every answer is stored in the memory before it is sent.")
    info = service.info
    open_paths = OPEN_PATHS | ({"/metrics"} if metrics_public else set())
    hosts = None if allowed_hosts is None else {_host_of(h) for h in allowed_hosts}

    async def decode(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(decoder, fn, *args)

    def refuse(status: int, message: str, **headers) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers or None)

    @app.middleware("http")
    async def guard_and_measure(request: Request, call_next):
        start = time.perf_counter()
        path = request.url.path
        authorised = token is not None and _authorised(request, token)
        if hosts is not None and _host_of(request.headers.get("host", "")) not in hosts:
            response = refuse(400, f"Host {request.headers.get('host', '')!r} is not served "
                              "here (--allowed-host)")  # fmt: skip
        elif token is not None and path not in open_paths and not authorised:
            response = refuse(401, "missing or wrong token: send Authorization: Bearer <token>",
                              **{"WWW-Authenticate": "Bearer"})  # fmt: skip
        elif request.method not in ("GET", "HEAD") and _cross_origin(request) and not authorised:
            response = refuse(403, "cross-origin writes are refused (run the service with "
                              "--token-file and send the token)")  # fmt: skip
        else:
            try:
                response = await call_next(request)
            except Exception:
                log.exception("ddrs serve: %s %s failed", request.method, path)
                response = refuse(500, "internal error (see the server's log)")
        service.metrics.observe(request.method, path, response.status_code,
                                time.perf_counter() - start)
        return response

    @app.exception_handler(RequestError)
    async def refused(request, error: RequestError):
        return refuse(error.status, str(error))

    @app.exception_handler(Unavailable)
    @app.exception_handler(MemoryUnavailable)
    async def unavailable(request, error: Exception):
        log.warning("ddrs serve: %s", error)
        return refuse(503, str(error), **{"Retry-After": "1"})

    @app.exception_handler(EngineError)
    async def engine_failed(request, error: EngineError):
        log.error("ddrs serve: the engine failed: %s", error)
        return refuse(500, f"the service failed on this batch: {error}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):
        return refuse(error.status_code, str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, error: RequestValidationError):
        return refuse(422, f"invalid request: {error.errors()[0].get('msg', 'see the API')}")

    @app.get("/health", response_model=HealthBody, response_model_exclude_none=True,
             responses=errors(400))
    async def health(request: Request):
        if token is not None and not _authorised(request, token):
            return {"status": "ok"}  # settings and the memory's path only with the token
        return {"status": "ok", "entries": service.entries, "in_flight": service.in_flight,
                **service.describe}

    async def answer(kind: str, request: Request):
        x = await _query_input(request, info, max_body_bytes, max_pixels, decode)
        return _response(await service.submit(kind, x), info)

    query_errors = errors(400, 401, 403, 413, 415, 422, 500, 503)

    @app.post("/v1/certify", response_model=AnswerBody, responses=query_errors,
              openapi_extra=QUERY_BODY, summary="certify: a class and a certified radius")
    async def certify(request: Request):
        return await answer("certify", request)

    @app.post("/v1/predict", response_model=AnswerBody, responses=query_errors,
              openapi_extra=QUERY_BODY, summary="predict: a class (stored with radius 0)")
    async def predict(request: Request):
        return await answer("predict", request)

    @app.get("/v1/memory/stats", response_model=MemoryStatsBody,
             responses=errors(400, 401, 503))
    async def memory_stats():
        return await service.memory_stats()

    @app.get("/metrics", response_class=Response, responses=errors(400, 401))
    async def metrics():
        return Response(service.metrics.text(service.entries, service.in_flight),
                        media_type=METRICS_CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse, responses=errors(400))
    async def page():
        return HTMLResponse(render_page(service.describe, token is not None))

    @app.get("/favicon.ico", response_class=Response, responses=errors(400))
    async def favicon():
        return Response(FAVICON, media_type="image/svg+xml")

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                 description=app.description)
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


def _authorised(request, token: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


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
