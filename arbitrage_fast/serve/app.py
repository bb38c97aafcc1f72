"""OpenAI-compatible HTTP server: /v1/completions and /v1/chat/completions, streamed step by step.

Concurrent requests are batched by the engine's scheduler (worker.py). A streamed answer
arrives one reasoning step per event, as soon as the policy has decided it (the draft's step
kept, or the target's rewrite), each marked with its source. Bad requests get a 400 naming
what is wrong before any memory is taken; a full waiting queue a 503 with Retry-After; a
client that goes away mid-answer cancels its request and its KV pages return to the pool.
"""
from __future__ import annotations

import asyncio
import json
from contextlib import aclosing, asynccontextmanager

from fastapi import FastAPI, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from arbitrage_fast.backends.openai_client import RemoteBackendError
from arbitrage_fast.config import SamplingParams
from arbitrage_fast.kv import KVCacheExhausted
from arbitrage_fast.policies import default_threshold

from . import protocol
from .limits import ApiKey, BodySizeLimit
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import ChatRequest, CompletionRequest
from .worker import EngineWorker, ServerBusy

RETRY_AFTER_S = 1
# What the answers say besides 200, so the OpenAPI schema matches the server.
_ERRORS = {code: {"model": protocol.ErrorResponse, "description": text} for code, text in (
    (400, "invalid request: the message names the field or value"),
    (401, "missing or wrong API key (only when the server has one)"),
    (404, "the model named is not served here"),
    (413, "request body too large"),
    (502, "a model server behind this one failed"),
    (503, "the waiting queue is full: retry after the Retry-After header's seconds"),
)}


def create_app(engine, model_name: str, *, policy: str = "rsd", threshold: float | None = None,
               policy_thresholds: dict[str, float] | None = None,
               max_tokens: int = 256, chat_by_default: bool = False, max_waiting: int = 256,
               api_key: str | None = None, max_body_bytes: int = 1 << 20) -> FastAPI:
    """An app serving `engine` as `model_name`; `policy`/`threshold` apply to requests naming
    none, `policy_thresholds` (policy -> threshold) to requests naming a policy but no threshold
    (else the policy's own default). `chat_by_default` wraps plain /v1/completions prompts in the
    chat template (instruct models)."""
    policy_thresholds = dict(policy_thresholds or {})
    metrics = ServerMetrics()
    worker = EngineWorker(engine, max_waiting=max_waiting, metrics=metrics)

    @asynccontextmanager
    async def lifespan(app):
        worker.launch()
        yield
        worker.shutdown()

    app = FastAPI(title="arbitrage-fast", lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(ApiKey, key=api_key)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        metrics.requests.labels("invalid").inc()
        return JSONResponse(protocol.error(problems), status_code=400)

    @app.get("/health")
    async def health():
        return {"status": "ok", "kv": engine.kv_stats(), "requests": dict(worker.requests),
                "graph_buckets": engine.graph_buckets()}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "arbitrage-fast"}]}

    @app.post("/v1/completions", responses=_ERRORS)
    async def completions(body: CompletionRequest):
        return await _serve("completion", body, [(p, chat_by_default and isinstance(p, str)) for p in body.prompts()])

    @app.post("/v1/chat/completions", responses=_ERRORS)
    async def chat_completions(body: ChatRequest):
        return await _serve("chat", body, [([m.model_dump() for m in body.messages], True)])

    async def _serve(kind, body, prompts):
        """Answer `prompts` ((prompt, chat template or not) pairs) with n choices each, in order."""
        if body.model and body.model != model_name:  # none or "" means the served model, as in vLLM
            return JSONResponse(protocol.error(f"model {body.model!r} is not served here; this server serves "
                                               f"{model_name!r}", "not_found_error", "model"), status_code=404)
        chosen = {"policy": body.policy or policy, "threshold": body.threshold}
        if body.threshold is None:
            chosen["threshold"] = policy_thresholds.get(body.policy) if body.policy else threshold
        handles = []
        try:
            if chosen["threshold"] is None:  # the answer names the threshold the policy runs at
                chosen["threshold"] = default_threshold(chosen["policy"])
            step_cap = {"max_step_tokens": body.max_step_tokens} if body.max_step_tokens else {}
            sampling = SamplingParams(max_new_tokens=body.token_cap(max_tokens), temperature=body.temperature,
                                      top_p=body.top_p, top_k=max(0, body.top_k), seed=body.seed,
                                      ignore_eos=body.ignore_eos,
                                      stop=body.stop or (), **step_cap)
            # n choices are n requests of the engine, admitted together: the first prefills the
            # prompt and the others share its pages.
            for prompt, chat in prompts:
                for index in range(body.n):
                    handles.append(await worker.start(prompt, chosen["policy"], chosen["threshold"],
                                                      sampling.for_choice(index), chat))
        except ServerBusy as e:
            _close(handles)
            return JSONResponse(protocol.error(str(e), "server_busy"), status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        except (ValueError, KVCacheExhausted) as e:  # KV: a prompt the pool can never hold
            _close(handles)
            metrics.requests.labels("invalid").inc()
            return JSONResponse(protocol.error(str(e)), status_code=400)
        except BaseException:  # the client left while its choices were being queued
            _close(handles)
            raise
        request_id = protocol.new_id("chatcmpl" if kind == "chat" else "cmpl")
        def prompt_tokens() -> int:  # each prompt counted once, however many choices it has
            return sum(h.prompt_tokens for h in handles[::body.n])

        if body.stream:
            return StreamingResponse(_events(kind, request_id, handles, chosen, prompt_tokens),
                                     media_type="text/event-stream")
        try:
            await asyncio.gather(*(_drain(h) for h in handles))
        except KVCacheExhausted as e:  # the request outgrew the pool even alone
            return JSONResponse(protocol.error(f"KV cache exhausted: {e}"), status_code=400)
        except RemoteBackendError as e:  # a model server behind this one failed
            return JSONResponse(protocol.error(str(e), "upstream_error"), status_code=502)
        finally:
            _close(handles)
        return protocol.completion(kind, request_id, model_name, [h.result for h in handles], prompt_tokens(), chosen)

    async def _events(kind, request_id, handles, chosen, prompt_tokens):
        def event(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        try:
            first = [True] * len(handles)
            unfinished = len(handles)
            async with aclosing(_merged(handles)) as steps:
                async for index, step in steps:
                    if step is not None:
                        yield event(protocol.chunk(kind, request_id, model_name, index, step=step, first=first[index]))
                        first[index] = False
                        continue
                    unfinished -= 1
                    # The last choice to finish carries the request's usage and its policy.
                    extra = None if unfinished else {"usage": protocol.usage(prompt_tokens(),
                                                                             [h.result for h in handles]),
                                                     "arbitrage": chosen}
                    yield event(protocol.chunk(kind, request_id, model_name, index, result=handles[index].result,
                                               first=first[index], extra=extra))
        except KVCacheExhausted as e:
            yield event(protocol.error(f"KV cache exhausted: {e}"))
        except RemoteBackendError as e:
            yield event(protocol.error(str(e), "upstream_error"))
        finally:
            _close(handles)
        yield "data: [DONE]\n\n"

    app.state.worker = worker
    app.state.metrics = metrics
    return app


async def _drain(handle) -> None:
    while await handle.next_step() is not None:
        pass


async def _merged(handles):
    """Each choice's steps as they are committed, tagged by its index, and (index, None) when that
    choice has finished; a choice's error is raised here."""
    events: asyncio.Queue = asyncio.Queue()

    async def pump(index, handle):
        try:
            while (step := await handle.next_step()) is not None:
                events.put_nowait((index, step, None))
            events.put_nowait((index, None, None))
        except Exception as e:  # noqa: BLE001 - raised in the consumer
            events.put_nowait((index, None, e))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        unfinished = len(handles)
        while unfinished:
            index, step, error = await events.get()
            if error is not None:
                raise error
            unfinished -= step is None
            yield index, step
    finally:
        for task in tasks:
            task.cancel()


def _close(handles) -> None:
    for handle in handles:
        handle.close()
