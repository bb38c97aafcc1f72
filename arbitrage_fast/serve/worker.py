"""One engine, one thread, one request at a time, reached from the server's event loop.

The engine decodes at batch 1 and its runners are not thread-safe, so every engine call runs
on a single dedicated thread and a request holds the engine from its start to its close;
waiting requests queue in arrival order. The event loop never blocks on a forward pass, so
health checks and new connections are answered while a request decodes.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

_END = object()


class EngineWorker:
    def __init__(self, engine) -> None:
        self.engine = engine
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._turn = asyncio.Lock()
        self.requests = {"finished": 0, "cancelled": 0, "waiting": 0}

    async def _call(self, fn, *args):
        return await asyncio.wrap_future(self._thread.submit(fn, *args))

    async def start(self, prompt, policy, threshold, sampling, chat) -> "RequestHandle":
        """Wait for the engine, then validate and open the request (raises ValueError on bad input,
        before any KV memory is taken)."""
        self.requests["waiting"] += 1
        try:
            await self._turn.acquire()
        finally:
            self.requests["waiting"] -= 1
        try:
            run = await self._call(self.engine.stream, prompt, policy, threshold, sampling, chat)
        except BaseException:
            self._turn.release()
            raise
        return RequestHandle(self, run)

    def shutdown(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)


class RequestHandle:
    """A running request: its steps one by one, then `close()`, which must always be called.

    Closing returns the request's KV pages (a finished request has already returned them) and
    hands the engine to the next request. It is queued on the engine thread behind any step
    still being decoded, so a client that disconnects mid-step cannot race the decoder.
    """

    def __init__(self, worker: EngineWorker, run) -> None:
        self._worker, self.run, self._open = worker, run, True

    @property
    def prompt_tokens(self) -> int:
        """The prompt's length in the target's tokens (what `usage` reports)."""
        return self.run.prompt_tokens or 0  # 0 where a remote server reported no usage

    async def next_step(self):
        """The next committed step, or None when the request is finished."""
        step = await self._worker._call(next, self.run, _END)
        return None if step is _END else step

    def close(self) -> None:
        if self._open:
            self._open = False
            self._worker._thread.submit(self._close_on_engine_thread)
            self._worker._turn.release()

    def _close_on_engine_thread(self) -> None:
        self.run.close()
        self._worker.requests["finished" if self.run.result is not None else "cancelled"] += 1
