"""A scripted OpenAI-compatible completions server, spoken to through an httpx mock transport.

Each "model" writes a fixed solution, one step per request: after the prompt and k committed
steps it writes its own step k (tokens are whitespace-delimited words). Its logprobs make the
target-likelihood PRM meaningful: a token of a step the model would have written itself gets
probability `agree`, any other `disagree`. `style` reproduces how real servers report stops:
"vllm" (keeps the stop string when asked, `stop_reason`), "vllm-trim" (an older vLLM: trims
it but still reports `stop_reason`), "sglang" (`no_stop_trim`, `matched_stop`) and "plain"
(trims and says nothing: a boundary cannot be told from EOS).
"""
from __future__ import annotations

import json
import math
import re

import httpx

BOUNDARY = "\n\n"
_TOKEN = re.compile(r"\S+\s*|\s+")


def tokens_of(text: str) -> list[str]:
    return _TOKEN.findall(text)


class ScriptedServer:
    def __init__(self, problem: str, steps: list[str], *, style: str = "vllm", agree: float = 0.9,
                 disagree: float = 0.3, fail_with: tuple[int, str] | None = None) -> None:
        self.problem, self.steps, self.style = problem, steps, style
        self.agree, self.disagree, self.fail_with = agree, disagree, fail_with
        self.bodies: list[dict] = []

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self._handle)

    @property
    def echo_requests(self) -> int:
        return sum(bool(b.get("echo")) for b in self.bodies)

    @property
    def step_requests(self) -> int:
        return sum(not b.get("echo") for b in self.bodies)

    # ------------------------------------------------------------------ the model
    def _committed_steps(self, prompt: str) -> list[str]:
        assert prompt.startswith(self.problem), f"prompt does not start with the problem: {prompt!r}"
        rest = prompt[len(self.problem):]
        return [s + BOUNDARY for s in rest.split(BOUNDARY)[:-1]] + ([rest.split(BOUNDARY)[-1]] if rest else [])

    def _token_logprob(self, step_index: int, step_text: str) -> float:
        mine = step_index < len(self.steps) and self.steps[step_index] == step_text
        return math.log(self.agree if mine else self.disagree)

    # ------------------------------------------------------------------ the wire
    def _handle(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/completions"
        body = json.loads(request.content)
        self.bodies.append(body)
        if self.fail_with:
            status, message = self.fail_with
            return httpx.Response(status, json={"error": {"message": message, "type": "BadRequestError"}})
        if body.get("echo"):
            return httpx.Response(200, json=self._echo(body))
        return httpx.Response(200, json=self._write(body))

    def _write(self, body: dict) -> dict:
        prompt = body["prompt"]
        k = prompt[len(self.problem):].count(BOUNDARY) if prompt.startswith(self.problem) else None
        assert k is not None, f"prompt does not start with the problem: {prompt!r}"
        own = self.steps[k] if k < len(self.steps) else ""
        toks = tokens_of(own)
        finish, reason = "stop", None
        if len(toks) > body["max_tokens"]:
            toks, finish = toks[:body["max_tokens"]], "length"
        elif own.endswith(BOUNDARY):
            reason = BOUNDARY
        text = "".join(toks)
        keep = {"vllm": body.get("include_stop_str_in_output"), "sglang": body.get("no_stop_trim")}.get(self.style)
        if reason and not keep:
            text = text[: -len(BOUNDARY)]
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        if body.get("logprobs") is not None:
            lp = self._token_logprob(k, own)
            choice["logprobs"] = {"tokens": toks, "token_logprobs": [lp] * len(toks)}
        if self.style in ("vllm", "vllm-trim"):
            choice["stop_reason"] = reason
        elif self.style == "sglang":
            choice["matched_stop"] = reason if reason else (None if finish == "length" else 2)
        return {"object": "text_completion", "choices": [choice],
                "usage": {"prompt_tokens": len(tokens_of(prompt)), "completion_tokens": len(toks)}}

    def _echo(self, body: dict) -> dict:
        """Prompt logprobs as vLLM lists them: a BOS token the echoed text lacks comes first (so
        its offsets drift by the BOS's length), the problem's tokens get 0.5, each committed
        step's tokens agree/disagree, and the one generated token comes last."""
        prompt = body["prompt"]
        tokens, logprobs = ["<|begin_of_text|>"], [None]
        for tok in tokens_of(self.problem):
            tokens.append(tok)
            logprobs.append(math.log(0.5))
        for i, step in enumerate(self._committed_steps(prompt)):
            for tok in tokens_of(step):
                tokens.append(tok)
                logprobs.append(self._token_logprob(i, step))
        tokens.append("x")
        logprobs.append(math.log(0.5))
        offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        choice = {"index": 0, "text": prompt + "x", "finish_reason": "length",
                  "logprobs": {"tokens": tokens, "token_logprobs": logprobs, "text_offset": offsets}}
        return {"object": "text_completion", "choices": [choice],
                "usage": {"prompt_tokens": len(tokens) - 1, "completion_tokens": 1}}
