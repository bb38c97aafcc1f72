"""The engine loop, reached from the server's event loop: continuous batching.

The engine is not thread-safe, so one thread owns it. That thread takes jobs (add a request,
abort one) from a queue between iterations, runs `engine.step()` while anything is in flight,
and hands each committed step to its request's asyncio queue on the event loop. Requests are
therefore batched by the engine's scheduler however they arrive, and the event loop never
blocks on a forward pass, so health checks and new connections are answered while it decodes.

Which thread: `arbitrage-fast serve` runs the loop on the process's main thread, the one that
loaded the models, and the HTTP server beside it (serve/process.py). OpenMP keeps a pool of
workers per thread that opens parallel regions; a second such thread makes a second pool, and
once pool threads outnumber the cores libgomp stops spinning between regions, so every
parallel region then pays a sleeping worker's wake-up, and a decode iteration opens hundreds
(`benchmarks/bench_engine_thread.py` measures the loss). An app mounted in another ASGI
server (and the tests) lets its start-up give the loop a thread of its own (`launch`).

With `EngineConfig(max_batch=1)` the scheduler admits one request at a time: the old queueing,
kept for comparison.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .metrics import ServerMetrics


IDLE_POLL_S = 0.5  # how often an idle loop looks whether the HTTP server is still up


class ServerBusy(RuntimeError):
    """The waiting queue is full (answered 503 with Retry-After)."""


@dataclass
class _Done:
    result: object
    error: BaseException | None


class EngineWorker:
    def __init__(self, engine, *, max_waiting: int = 256, metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.metrics = metrics or ServerMetrics()
        self.requests = {"finished": 0, "failed": 0, "cancelled": 0, "waiting": 0, "running": 0}
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._handles: dict[int, RequestHandle] = {}
        self._submitting = 0  # accepted by the event loop, not yet seen by the engine thread
        self._count_lock = threading.Lock()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.on_caller = False  # set when the caller runs `run()` on its own thread (serve's main thread)

    # ------------------------------------------------------------------ event-loop side
    async def start(self, prompt, policy, threshold, sampling, chat) -> "RequestHandle":
        """Queue a request; raises ValueError on bad input (before any KV memory is taken) and
        ServerBusy when the waiting queue is full."""
        if self.requests["waiting"] + self._submitting >= self.max_waiting:
            self.metrics.requests.labels("rejected").inc()
            raise ServerBusy(f"{self.max_waiting} requests are already waiting; retry shortly")
        loop = asyncio.get_running_loop()
        handle = RequestHandle(self, loop)
        accepted = loop.create_future()

        def add() -> None:
            with self._count_lock:
                self._submitting -= 1
            try:
                rid = self.engine.add_request(prompt, policy, threshold, sampling, chat)
            except BaseException as e:  # noqa: BLE001 - handed to the caller, who answers 400
                loop.call_soon_threadsafe(_settle, accepted, None, e)
                return
            handle.request_id = rid
            self._handles[rid] = handle
            if handle.closed:  # the client left before its request was queued
                self._abort(rid)
            loop.call_soon_threadsafe(_settle, accepted, rid, None)

        with self._count_lock:
            self._submitting += 1
        self._jobs.put(add)
        try:
            await accepted
        except asyncio.CancelledError:  # the client left while its request was being queued
            handle.close()
            raise
        return handle

    def launch(self) -> None:
        """Give the loop a thread of its own, unless the caller runs it (`on_caller`)."""
        if self._thread is None and not self.on_caller:
            self._thread = threading.Thread(target=self.run, name="engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._jobs.put(self._stop)
        if self._thread is not None:
            self._thread.join(timeout=60)

    # ------------------------------------------------------------------ engine thread
    def run(self, alive: Callable[[], bool] = lambda: True) -> None:
        """The loop, on the calling thread, until `shutdown()`, or until `alive()` is false (the
        HTTP server's thread ended, forced out before the app's shutdown): then every request
        still in flight is aborted, its pages returned, since nobody is left to answer it."""
        # Steps only while requests of this server are in flight: an engine shared with other
        # callers (tests computing references) is stepped by them for their own requests.
        while not self._stopped:
            if not alive():
                self._stop()
                return
            self._take_jobs(block=not self._handles)
            if self._stopped or not self._handles:
                continue
            try:
                outputs = self.engine.step()
            except BaseException as e:  # noqa: BLE001 - an engine bug: fail every request, keep serving
                for rid in list(self._handles):
                    self.engine.abort(rid)
                    self._end(rid, _Done(None, e), "failed", None, ())
                continue
            # Gauges first: a client handed its answer may scrape /metrics at once.
            self._observe()
            for out in outputs:
                self._deliver(out)

    def _take_jobs(self, block: bool) -> None:
        try:
            job = self._jobs.get(block=block, timeout=IDLE_POLL_S if block else None)
            while True:
                job()
                job = self._jobs.get_nowait()
        except queue.Empty:
            pass

    def _stop(self) -> None:
        self._stopped = True
        for rid in list(self._handles):
            self.engine.abort(rid)
            self._end(rid, _Done(None, ServerBusy("the server is shutting down")), "cancelled", None, ())

    def _deliver(self, out) -> None:
        handle = self._handles.get(out.request_id)
        if handle is None:
            return
        handle.prompt_tokens = out.prompt_tokens
        for step in out.steps:
            if handle.first_step_at is None:
                handle.first_step_at = time.perf_counter()
                self.metrics.first_step.observe(handle.first_step_at - handle.arrival)
            handle.put(step)
        if out.finished:
            outcome = "failed" if out.error is not None else "finished"
            stats = out.result.stats if out.result is not None else None
            steps = out.result.steps if out.result is not None else ()
            self._end(out.request_id, _Done(out.result, out.error), outcome, stats, steps, out.drafts)

    def _end(self, rid: int, done: _Done, outcome: str, stats, steps, drafts: bool = False) -> None:
        handle = self._handles.pop(rid, None)
        self.engine.forget(rid)
        self.requests[outcome] += 1
        self.metrics.finished(outcome, stats, steps, drafts)
        if handle is not None:
            handle.put(done)

    def _abort(self, rid: int) -> None:
        if rid in self._handles and self.engine.abort(rid):
            self._end(rid, _Done(None, None), "cancelled", None, ())
        self._observe()

    def _observe(self) -> None:
        counts = self.engine.num_requests()
        self.requests["waiting"], self.requests["running"] = counts["waiting"], counts["running"]
        self.metrics.iteration(counts, self.engine.batch_sizes(), self.engine.kv_stats())


class RequestHandle:
    """A request in flight: its steps one by one (`next_step`), then `close()`, which must always
    be called. Closing an unfinished request aborts it on the engine thread (its KV pages go
    back at once, between two iterations, so it can never race a forward)."""

    def __init__(self, worker: EngineWorker, loop: asyncio.AbstractEventLoop) -> None:
        self._worker, self._loop = worker, loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.request_id: int | None = None
        self.result = None
        self.prompt_tokens = 0  # the prompt's length in the target's tokens (what `usage` reports)
        self.arrival = time.perf_counter()
        self.first_step_at: float | None = None
        self._ended = False
        self.closed = False

    def put(self, item) -> None:
        """From the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed (the HTTP server was forced out): nobody reads it
            pass

    async def next_step(self):
        """The next committed step, or None when the request is finished (raises its error)."""
        if self._ended:
            return None
        item = await self._queue.get()
        if isinstance(item, _Done):
            self._ended = True
            self.result = item.result
            if item.error is not None:
                raise item.error
            return None
        return item

    def close(self) -> None:
        self.closed = True
        if not self._ended:
            self._ended = True
            rid = self.request_id
            if rid is not None:
                self._worker._jobs.put(lambda: self._worker._abort(rid))


def _settle(future: asyncio.Future, value, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
