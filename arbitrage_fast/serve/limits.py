"""What a deployed server guards at its door: a request body size limit and an API key.

Both are plain ASGI middleware, so they answer before FastAPI parses anything: an oversized
body is refused from its Content-Length, or as soon as a chunked upload passes the limit.
"""
from __future__ import annotations

import hmac
import json

_GUARDED_PREFIX = "/v1/"  # /health and /metrics stay open, as vLLM keeps them


def _error(status: int, message: str, kind: str) -> tuple[dict, bytes]:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    return start, body


async def _send_error(send, status: int, message: str, kind: str, extra_headers=()) -> None:
    start, body = _error(status, message, kind)
    start["headers"] += list(extra_headers)
    await send(start)
    await send({"type": "http.response.body", "body": body})


class BodySizeLimit:
    """413 for a request body over `max_bytes`. A chunked body (no Content-Length) is read here,
    up to the limit, before the app sees it: the app's own parser would turn an error raised
    mid-read into a 400."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > self.max_bytes:
                return await _send_error(send, 413, f"request body of {int(declared)} bytes exceeds the server's "
                                         f"limit of {self.max_bytes}", "invalid_request_error")
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await _send_error(send, 413, f"request body exceeds the server's limit of {self.max_bytes} "
                                         "bytes", "invalid_request_error")
            more = message.get("more_body", False)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        return await self.app(scope, _replay([body], receive), send)


def _replay(messages: list[dict], receive):
    """A receive channel that hands out `messages` first, then the connection's own (disconnects)."""
    queued = list(messages)

    async def replayed():
        return queued.pop(0) if queued else await receive()

    return replayed


class ApiKey:
    """401 for /v1/ requests without `Authorization: Bearer <key>`."""

    def __init__(self, app, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(_GUARDED_PREFIX):
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                return await _send_error(send, 401, "missing or wrong API key: send Authorization: Bearer <key>",
                                         "authentication_error", [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)
