"""The service behind the HTTP layer: the classifier, its memory and the micro-batcher.

Requests are micro-batched: the ones that arrive while the engine is busy (up to `max_batch`,
waiting at most `max_wait` seconds for company) go through the sigma search and the Monte
Carlo sampling in one engine call; then the memory resolves and stores each answer in arrival
order, one at a time, on a single writer thread. A response is sent only after its entry is
committed, so an answer once given survives a crash. Noise is keyed by each query's number
(handed out by the memory's store, unique across replicas), so the answers equal those of the
one-at-a-time `DataDependentSmoothClassifier` for the same arrival order.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from ddrs.classifier import Answer, DataDependentSmoothClassifier
from ddrs.core.lattice import lattice_levels
from ddrs.core.noise import content_key
from ddrs.data import DatasetInfo
from ddrs.errors import InputError
from ddrs.memory import MemoryUnavailable
from ddrs.options import default_of
from ddrs.serve.api import RequestError
from ddrs.serve.metrics import ServiceMetrics
from ddrs.serve.spec import ServeRun

PATHS = {
    "/",
    "/page.js",
    "/page.css",
    "/health",
    "/favicon.ico",
    "/v1/certify",
    "/v1/predict",
    "/v1/preview",
    "/v1/memory/stats",
    "/metrics",
    "/openapi.json",
}


class EngineError(Exception):
    """The engine or the memory failed on a batch (a server error, not the client's)."""


class Unavailable(Exception):
    """The memory's database cannot be reached now: the client may retry (503)."""


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
    @property
    def memory(self):
        """The classifier's memory, or None for a stateless service."""
        return None if self.classifier is None else self.classifier.memory

    def _open(self) -> None:
        self.classifier = self.make_classifier()
        self.entries = 0 if self.memory is None else len(self.memory)

    def _keys(self, queries: list[Query]) -> list[int]:
        """Noise keys: from the memory, unique across replicas; without one, from each input's
        own bytes (the same input, the same answer, on any replica)."""
        if self.memory is None:
            return [content_key(q.x) for q in queries]
        return self.memory.allocate_keys(len(queries))

    def _answer(self, queries: list[Query]) -> list[Answer]:
        keys = self._keys(queries)
        x = torch.stack([q.x for q in queries])
        answers = self.classifier.answer_batch(x, [q.kind for q in queries], keys)
        if self.memory is not None:
            try:
                self.entries = len(self.memory)
            except MemoryUnavailable:
                pass  # the answers are committed; the count is only for /health
        return answers

    def _close(self) -> None:
        if self.memory is not None:
            self.memory.close()

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

    def admit(self, x: Tensor) -> None:
        """Refuse, before it queues, an input this classifier's noise cannot take (discrete
        noise: 8-bit images only), so that it never fails a batch of others."""
        if self.classifier is not None and self.classifier.family.discrete:
            try:
                lattice_levels(x)
            except InputError as error:
                raise RequestError(422, f'"input": {error}') from None

    async def submit(self, kind: str, x: Tensor) -> Answer:
        self.admit(x)
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
                failure = (
                    Unavailable(str(error))
                    if isinstance(error, MemoryUnavailable)
                    else EngineError(f"{type(error).__name__}: {error}")
                )
                for q in queries:
                    if not q.future.done():
                        q.future.set_exception(failure)
                continue
            self.metrics.batch(len(queries))
            for q, answer in zip(queries, answers):
                self.metrics.answered(answer)
                if not q.future.done():
                    q.future.set_result(answer)

    async def memory_stats(self) -> dict | None:
        """The memory's statistics; None for a stateless service."""
        if self.memory is None:
            return None
        return await self.call(self.memory.stats)
