"""`ddrs serve`: the online data-dependent smoothed classifier behind HTTP (FastAPI, uvicorn).

Requests are micro-batched: the ones that arrive while the engine is busy (up to
`max_batch`, waiting at most `max_wait` seconds for company) go through the sigma search and
the Monte Carlo sampling in one engine call; then the memory resolves and stores each answer
in arrival order, one at a time, on a single writer thread. A response is sent only after its
entry is committed (SQLite, synchronous=FULL), so an answer once given survives a crash.
Noise is keyed by each query's arrival number, so the answers equal those of the
one-at-a-time `DataDependentSmoothClassifier` for the same arrival order.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from torch import Tensor

from ddrs.classifier import Answer, DataDependentSmoothClassifier
from ddrs.data import DatasetInfo
from ddrs.data.transforms import image_to_input
from ddrs.errors import InputError

MAX_BODY_BYTES = 8 << 20
QUERY_PATHS = ("/v1/certify", "/v1/predict")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class EngineError(Exception):
    """The engine or the memory failed on a batch (a server error, not the client's)."""


class RequestError(Exception):
    """A request the service refuses: HTTP `status` and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_input(body: object, info: DatasetInfo) -> Tensor:
    """The JSON body's `input` as a (C, H, W) float32 tensor in [0, 1], or a RequestError."""
    if not isinstance(body, dict) or "input" not in body:
        raise RequestError(422, 'the JSON body needs a field "input": a C x H x W array of floats')
    try:
        x = torch.tensor(body["input"], dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise RequestError(
            422, '"input" must be a rectangular C x H x W array of numbers'
        ) from None
    return check_input(x, info)


def check_input(x: Tensor, info: DatasetInfo) -> Tensor:
    shape = tuple(info.input_shape)
    if tuple(x.shape) != shape:
        raise RequestError(422, f'"input" has shape {tuple(x.shape)}; this model takes {shape}')
    if not bool(torch.isfinite(x).all()):
        raise RequestError(422, '"input" holds NaN or infinite values')
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise RequestError(
            422,
            f'"input" values must lie in [0, 1] (un-normalised pixels); got [{float(x.min()):g}, '
            f"{float(x.max()):g}]",
        )
    return x


def parse_image(data: bytes, info: DatasetInfo) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return check_input(image_to_input(img, info), info)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise RequestError(
            400, "the upload is not an image PIL can read (PNG, JPEG, ...)"
        ) from None


@dataclass
class Query:
    kind: str
    x: Tensor
    future: asyncio.Future


class Metrics:
    """Prometheus counters and a latency histogram, as text (no client library needed)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.batches: dict[int, int] = defaultdict(int)
        self.changed = self.shrunk = self.repeats = 0

    def observe(self, method: str, path: str, status: int, seconds: float) -> None:
        self.requests[(method, path, status)] += 1
        if path in QUERY_PATHS:
            k = next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b), -1)
            self.latency_counts[k] += 1
            self.latency_sum += seconds

    def answered(self, answer: Answer) -> None:
        self.changed += int(answer.changed)
        self.shrunk += int(answer.shrunk)
        self.repeats += int(answer.repeat)

    def text(self, entries: int, in_flight: int) -> str:
        lines = [
            "# HELP ddrs_requests_total HTTP requests by method, path and status.",
            "# TYPE ddrs_requests_total counter",
        ]
        for (method, path, status), count in sorted(self.requests.items()):
            lines.append(
                f'ddrs_requests_total{{method="{method}",path="{path}",status="{status}"}} {count}'
            )
        lines += [
            "# HELP ddrs_request_seconds Latency of certify and predict requests.",
            "# TYPE ddrs_request_seconds histogram",
        ]
        cumulative = 0
        for bound, count in zip(LATENCY_BUCKETS, self.latency_counts):
            cumulative += count
            lines.append(f'ddrs_request_seconds_bucket{{le="{bound}"}} {cumulative}')
        total = sum(self.latency_counts)
        lines += [
            f'ddrs_request_seconds_bucket{{le="+Inf"}} {total}',
            f"ddrs_request_seconds_sum {self.latency_sum:.6f}",
            f"ddrs_request_seconds_count {total}",
            "# HELP ddrs_batch_queries_total Queries by the size of the engine batch they ran in.",
            "# TYPE ddrs_batch_queries_total counter",
        ]
        for size, count in sorted(self.batches.items()):
            lines.append(f'ddrs_batch_queries_total{{size="{size}"}} {count}')
        lines += [
            "# HELP ddrs_queries_in_flight Queries received and not yet answered.",
            "# TYPE ddrs_queries_in_flight gauge",
            f"ddrs_queries_in_flight {in_flight}",
            "# HELP ddrs_memory_entries Entries in the certification memory.",
            "# TYPE ddrs_memory_entries gauge",
            f"ddrs_memory_entries {entries}",
            "# HELP ddrs_answers_changed_total Answers whose class the memory changed.",
            "# TYPE ddrs_answers_changed_total counter",
            f"ddrs_answers_changed_total {self.changed}",
            "# HELP ddrs_answers_shrunk_total Answers whose radius the memory shrank.",
            "# TYPE ddrs_answers_shrunk_total counter",
            f"ddrs_answers_shrunk_total {self.shrunk}",
            "# HELP ddrs_answers_repeat_total Exact repeats answered from the memory.",
            "# TYPE ddrs_answers_repeat_total counter",
            f"ddrs_answers_repeat_total {self.repeats}",
        ]
        return "\n".join(lines) + "\n"


class CertificationService:
    """The classifier, its memory and the micro-batcher. Every use of the model and the memory
    runs on one writer thread, in arrival order."""

    def __init__(
        self,
        make_classifier,
        info: DatasetInfo,
        *,
        max_batch: int = 32,
        max_wait: float = 0.0,
        describe: dict | None = None,
    ) -> None:
        self.make_classifier, self.info = make_classifier, info
        self.max_batch, self.max_wait = int(max_batch), float(max_wait)
        self.describe = describe or {}
        self.metrics = Metrics()
        self.entries = 0
        self.in_flight = 0  # queries submitted and not yet answered
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ddrs-writer")
        self.classifier: DataDependentSmoothClassifier | None = None
        self.next_key = 0
        self.queue: asyncio.Queue[Query] | None = None
        self.batcher: asyncio.Task | None = None

    # -- on the writer thread
    def _open(self) -> None:
        self.classifier = self.make_classifier()
        memory = self.classifier.memory
        self.next_key = memory.next_idx()
        self.entries = len(memory)

    def _answer(self, queries: list[Query]) -> list[Answer]:
        keys = list(range(self.next_key, self.next_key + len(queries)))
        self.next_key += len(queries)
        x = torch.stack([q.x for q in queries])
        answers = self.classifier.answer_batch(x, [q.kind for q in queries], keys)
        self.entries = len(self.classifier.memory)
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
                failure = EngineError(f"{type(error).__name__}: {error}")
                for q in queries:
                    if not q.future.done():
                        q.future.set_exception(failure)
                continue
            self.metrics.batches[len(queries)] += len(queries)
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


async def _query_input(request, info: DatasetInfo, limit: int) -> Tensor:
    """The input of a certify / predict request: JSON `{"input": ...}` or an image upload."""
    data = await _read_body(request, limit)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":

        async def replay():
            return {"type": "http.request", "body": data, "more_body": False}

        try:
            form = await Request(request.scope, replay).form()
        except Exception:
            raise RequestError(400, "malformed multipart body") from None
        try:
            upload = form.get("file") or form.get("image")
            if upload is None or isinstance(upload, str):
                raise RequestError(
                    422, 'the multipart form needs an image in a field named "file"'
                )
            return parse_image(await upload.read(), info)
        finally:
            await form.close()
    if content_type.startswith("image/"):
        return parse_image(data, info)
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RequestError(
            400, 'the body is not JSON; send {"input": [[[...]]]} or an image upload'
        ) from None
    return parse_input(body, info)


def create_app(
    service: CertificationService,
    token: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
):
    """The FastAPI application around a service (not yet started: the app's lifespan starts
    and stops it)."""

    @asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="ddrs", lifespan=lifespan, docs_url=None, redoc_url=None)
    info = service.info
    open_paths = {"/", "/health"}

    @app.middleware("http")
    async def guard_and_measure(request: Request, call_next):
        start = time.perf_counter()
        path = request.url.path
        if token is not None and path not in open_paths and not _authorised(request, token):
            response = JSONResponse(
                {"error": "missing or wrong token: send Authorization: Bearer <token>"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        else:
            try:
                response = await call_next(request)
            except Exception:
                response = JSONResponse({"error": "internal error"}, status_code=500)
        known = path if path in app.state.paths else "other"
        service.metrics.observe(
            request.method, known, response.status_code, time.perf_counter() - start
        )
        return response

    @app.exception_handler(RequestError)
    async def refused(request, error: RequestError):
        return JSONResponse({"error": str(error)}, status_code=error.status)

    @app.exception_handler(EngineError)
    async def engine_failed(request, error: EngineError):
        return JSONResponse({"error": f"the service failed on this batch: {error}"},
                            status_code=500)

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "entries": service.entries,
            "in_flight": service.in_flight,
            **service.describe,
        }

    async def answer(kind: str, request: Request):
        x = await _query_input(request, info, max_body_bytes)
        return _response(await service.submit(kind, x), info)

    @app.post("/v1/certify")
    async def certify(request: Request):
        return await answer("certify", request)

    @app.post("/v1/predict")
    async def predict(request: Request):
        return await answer("predict", request)

    @app.get("/v1/memory/stats")
    async def memory_stats():
        return await service.memory_stats()

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(
            service.metrics.text(service.entries, service.in_flight),
            media_type="text/plain; version=0.0.4",
        )

    @app.get("/", response_class=HTMLResponse)
    async def page():
        describe = json.dumps(service.describe).replace("<", "\\u003c")  # safe in <script>
        return HTMLResponse(PAGE.replace("{{DESCRIBE}}", describe))

    app.state.paths = {"/", "/health", "/v1/certify", "/v1/predict", "/v1/memory/stats", "/metrics"}
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


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>ddrs serve</title>
<style>body{font-family:sans-serif;max-width:40em;margin:2em auto}td{padding:2px 8px}
pre{background:#f4f4f4;padding:8px}</style></head>
<body><h1>ddrs: certified prediction</h1>
<p>Upload an image; the service answers with its class, the certified L2 radius (pixel
units in [0, 1]), the sigma chosen for it, and whether the memory of earlier answers changed
the answer. Every answer is stored: the same image gets the same answer again.</p>
<p><input type="file" id="file" accept="image/*">
<select id="kind"><option>certify</option><option>predict</option></select>
<input type="password" id="token" placeholder="token (if the service needs one)">
<button onclick="send()">Send</button></p>
<table id="out"></table>
<p>Service: <code id="describe"></code></p>
<script>
document.getElementById('describe').textContent = JSON.stringify({{DESCRIBE}});
async function send() {
  const file = document.getElementById('file').files[0];
  if (!file) { return; }
  const form = new FormData(); form.append('file', file);
  const headers = {}; const token = document.getElementById('token').value;
  if (token) { headers['Authorization'] = 'Bearer ' + token; }
  const kind = document.getElementById('kind').value;
  const response = await fetch('/v1/' + kind, {method: 'POST', body: form, headers});
  const body = await response.json();
  const rows = response.ok ? [
      ['class', body.predict + (body.class_name ? ' (' + body.class_name + ')' : '')],
      ['certified radius', body.radius], ['sigma', body.sigma],
      ['Monte Carlo answer', body.mc_predict + ', radius ' + body.mc_radius],
      ['memory changed the class', body.changed], ['memory shrank the radius', body.shrunk],
      ['repeat of a stored input', body.repeat], ['memory entry', body.entry]]
    : [['error ' + response.status, body.error || JSON.stringify(body)]];
  const table = document.getElementById('out'); table.innerHTML = '';
  for (const [k, v] of rows) {
    const tr = table.insertRow(); tr.insertCell().textContent = k;
    tr.insertCell().textContent = v;
  }
}
</script></body></html>
"""
