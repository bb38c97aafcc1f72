"""The OpenAI-compatible wire format: request bodies in, completion objects and stream chunks out.

Requests may carry fields OpenAI's API lacks: `policy` and `threshold` choose the step-level
policy per request, `max_step_tokens` caps a step for models that seldom write a blank line,
`ignore_eos` (as in vLLM) generates to max_tokens. Responses carry an `arbitrage` object beside the usual fields:
the committed steps, each marked draft or target, and the engine's accounting. Clients that
ignore unknown fields see a plain completion.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

FINISH_REASONS = {"eos": "stop", "length": "length"}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields this engine has no use for

    model: str | None = None
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2 ** 63)
    n: int = Field(1, ge=1, le=1, description="one completion per request")
    stream: bool = False
    policy: str | None = None
    threshold: float | None = None
    max_step_tokens: int | None = Field(None, gt=0, description="a step also ends after this many tokens")
    ignore_eos: bool = Field(False, description="keep generating past EOS, to max_tokens (as vLLM's)")

    def token_cap(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class CompletionRequest(_Request):
    # Text with something in it, or token ids (the engine checks their range).
    prompt: Annotated[str, Field(min_length=1, pattern=r"\S")] | Annotated[list[int], Field(min_length=1)]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def step_json(step) -> dict:
    return {"text": step.text, "source": step.source, "ended_by": step.ended_by, "draft_prm": step.draft_prm,
            "target_prm": step.target_prm, "router_score": step.router_score}


def usage(prompt_tokens: int, result) -> dict:
    """OpenAI usage; `prompt_tokens_details.cached_tokens` (as vLLM reports it) where the engine
    counted the prompt tokens it shared from another request (remote backends do not)."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": result.completion_tokens,
           "total_tokens": prompt_tokens + result.completion_tokens}
    cached = result.stats.get("cached_prompt_tokens")
    if cached is not None:
        out["prompt_tokens_details"] = {"cached_tokens": min(cached, prompt_tokens)}
    return out


def completion(kind: str, request_id: str, model: str, result, prompt_tokens: int, policy: dict) -> dict:
    """The whole answer as a `text_completion` or `chat.completion` object."""
    finish = FINISH_REASONS[result.finish_reason]
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish}
    return {
        "id": request_id, "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()), "model": model, "choices": [choice],
        "usage": usage(prompt_tokens, result),
        "arbitrage": {**policy, "steps": [step_json(s) for s in result.steps], "stats": result.stats},
    }


def chunk(kind: str, request_id: str, model: str, *, text: str | None = None, step=None,
          finish_reason: str | None = None, first: bool = False, extra: dict | None = None) -> dict:
    """One server-sent event: a committed step (its text is the delta), or the closing chunk."""
    if kind == "chat":
        delta = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    out = {"id": request_id, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
           "created": int(time.time()), "model": model, "choices": [choice]}
    if step is not None:
        out["arbitrage"] = {"step": step_json(step)}
    if extra:
        out.update(extra)
    return out


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every non-200 answer: OpenAI's error shape."""

    error: ErrorBody


def error(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
