"""The OpenAI-compatible wire format: request bodies in, completion objects and stream chunks out.

Requests may carry fields OpenAI's API lacks: `policy` and `threshold` choose the step-level
policy per request, `max_step_tokens` caps a step for models that seldom write a blank line,
`ignore_eos` (as in vLLM) generates to max_tokens. Responses carry `arbitrage` objects beside the
usual fields: at the top the policy that decided, and in each choice its committed steps, each
marked draft or target, and the engine's accounting (in a stream, each step's chunk carries that
step). Clients that ignore unknown fields see a plain completion.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from arbitrage_fast.stop_strings import MAX_STOP_STRINGS

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
MAX_CHOICES = 128  # OpenAI's own cap on n
# Fields of OpenAI's (and vLLM's) API that would change the answer and that this server does not
# implement, with the values that leave the answer as it is. Anything else in them is refused by
# name rather than ignored: a client asking for penalties or log-probs must not get a plain answer.
UNSUPPORTED = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "logit_bias": (None, {}),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "repetition_penalty": (None, 1),
    "min_p": (None, 0), "min_tokens": (None, 0), "suffix": (None, ""), "best_of": (None, 1),
    "response_format": (None, {"type": "text"}), "tools": (None, []), "guided_json": (None,),
    "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields with no effect on the answer

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        if isinstance(data, dict):
            for name, neutral in UNSUPPORTED.items():
                if name in data and data[name] not in neutral:
                    raise ValueError(f"{name}={data[name]!r} is not supported by this server (it would change "
                                     f"the answer; leave it out)")
        return data

    model: str | None = None
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="sample from the k likeliest tokens; -1 or 0: all (as vLLM's)")
    seed: int | None = Field(None, ge=0, lt=2 ** 63)
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="completions of the one prompt; each is its own "
                   "request in the batch, and the prompt is prefilled once for all of them")
    stream: bool = False
    policy: str | None = None
    threshold: float | None = None
    max_step_tokens: int | None = Field(None, gt=0, description="a step also ends after this many tokens")
    ignore_eos: bool = Field(False, description="keep generating past EOS, to max_tokens (as vLLM's)")
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = Field(
        None, description="the answer ends before the first of these strings (checked as each step commits; "
        "`stop_reason` names the one matched)")

    def token_cap(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


_Text = Annotated[str, Field(min_length=1, pattern=r"\S")]  # text with something in it
_Ids = Annotated[list[int], Field(min_length=1)]  # token ids (the engine checks their range)


class CompletionRequest(_Request):
    # One prompt, or a batch of them (as OpenAI's API and vLLM take): n choices for each, in order.
    prompt: (_Text | _Ids | Annotated[list[_Text], Field(min_length=1, max_length=MAX_CHOICES)]
             | Annotated[list[_Ids], Field(min_length=1, max_length=MAX_CHOICES)])

    def prompts(self) -> list[str | list[int]]:
        batch = isinstance(self.prompt, list) and not isinstance(self.prompt[0], int)
        return list(self.prompt) if batch else [self.prompt]


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


def usage(prompt_tokens: int, results: list) -> dict:
    """OpenAI usage over a request's choices: the prompt counted once, the completions summed.
    `prompt_tokens_details.cached_tokens` (as vLLM reports it) where the engine counted the
    prompt tokens it shared from another request (remote backends do not): the tokens every
    choice found computed, so n samples of a prompt nothing else had computed report 0 (the
    first computes it; the others share it, and their own stats say so)."""
    completion_tokens = sum(r.completion_tokens for r in results)
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    cached = [r.stats.get("cached_prompt_tokens") for r in results]
    if None not in cached:
        out["prompt_tokens_details"] = {"cached_tokens": min(min(cached), prompt_tokens)}
    return out


def completion(kind: str, request_id: str, model: str, results: list, prompt_tokens: int, policy: dict) -> dict:
    """The whole answer as a `text_completion` or `chat.completion` object, one choice per result."""
    choices = []
    for index, result in enumerate(results):
        finish = FINISH_REASONS[result.finish_reason]
        if kind == "chat":
            choice = {"index": index, "message": {"role": "assistant", "content": result.text}, "finish_reason": finish}
        else:
            choice = {"index": index, "text": result.text, "logprobs": None, "finish_reason": finish}
        choice["stop_reason"] = result.stop_reason
        choice["arbitrage"] = {"steps": [step_json(s) for s in result.steps], "stats": result.stats}
        choices.append(choice)
    return {
        "id": request_id, "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()), "model": model, "choices": choices,
        "usage": usage(prompt_tokens, results), "arbitrage": policy,
    }


def chunk(kind: str, request_id: str, model: str, index: int, *, step=None, result=None, first: bool = False,
          extra: dict | None = None) -> dict:
    """One server-sent event of choice `index`: a committed step (its text is the delta), or,
    given the choice's result, its closing chunk (finish reason and accounting)."""
    text = step.text if step is not None else None
    finish_reason = FINISH_REASONS[result.finish_reason] if result is not None else None
    if kind == "chat":
        delta = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    if step is not None:
        choice["arbitrage"] = {"step": step_json(step)}
    elif result is not None:
        choice["stop_reason"] = result.stop_reason
        choice["arbitrage"] = {"stats": result.stats}
    out = {"id": request_id, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
           "created": int(time.time()), "model": model, "choices": [choice]}
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
