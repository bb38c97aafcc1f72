"""One remote model behind an OpenAI-compatible `/v1/completions` endpoint (vLLM, SGLang).

A reasoning step is one completion request that stops at the blank line. Servers trim stop
strings by default and report EOS and a matched stop string alike as finish_reason "stop", so
every request asks to keep the stop string (vLLM's `include_stop_str_in_output`, SGLang's
`no_stop_trim`) and reads which stop matched (vLLM's `stop_reason`, SGLang's `matched_stop`).
A server that reports neither cannot tell a step boundary from EOS; it is refused with an error
rather than silently ending every answer after its first step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from arbitrage_fast.config import SamplingParams
from arbitrage_fast.prm.target_likelihood import mean_probability

STEP_BOUNDARY = "\n\n"


class RemoteBackendError(RuntimeError):
    """A remote server could not be reached or answered something the step loop cannot use."""


@dataclass
class RemoteModel:
    """Where one model is served. `base_url` is the server's root, without `/v1` (e.g.
    "http://gpu-node:8000"); `model` is the served name (vLLM's --served-model-name), or
    None to send none, which single-model servers accept. `tokenizer` (a local folder or hub name)
    is only needed for chat prompts: completions take raw text, so the chat template is
    applied here."""

    base_url: str
    model: str | None = None
    tokenizer: str | None = None
    api_key: str | None = None
    timeout_s: float = 600.0


@dataclass
class WrittenStep:
    text: str
    ended_by: str  # "boundary" | "eos" | "step_cap"
    completion_tokens: int
    prompt_tokens: int | None = None  # as the server counted the prompt it continued
    logprobs: list[float] = field(default_factory=list)  # of the step's tokens, when asked for


class CompletionsClient:
    def __init__(self, spec: RemoteModel, role: str, transport=None) -> None:
        """`transport` replaces the network (an httpx transport), for tests."""
        try:
            import httpx
        except ImportError as e:  # pragma: no cover - httpx comes with transformers' hub client
            raise ImportError("remote backends need httpx: pip install 'arbitrage-fast[remote]'") from e
        if not spec.base_url.startswith(("http://", "https://")):
            raise ValueError(f"{role} server URL must start with http:// or https://, got {spec.base_url!r}")
        self.spec, self.role = spec, role
        headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
        self._http = httpx.Client(base_url=spec.base_url.rstrip("/"), headers=headers, timeout=spec.timeout_s,
                                  transport=transport)
        self._httpx = httpx
        self.requests = 0

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ requests
    def write_step(self, prompt: str, max_tokens: int, sampling: SamplingParams, logprobs: bool = False) -> WrittenStep:
        """Continue `prompt` by one reasoning step of at most `max_tokens` tokens."""
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": sampling.temperature,
                "top_p": sampling.top_p, "stop": [STEP_BOUNDARY],
                "include_stop_str_in_output": True, "no_stop_trim": True}
        if sampling.top_k:
            body["top_k"] = sampling.top_k
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.ignore_eos:
            body["ignore_eos"] = True
        if logprobs:
            body["logprobs"] = 1
        choice, usage = self._complete(body)
        text, finish = choice.get("text") or "", choice.get("finish_reason")
        ended_by = self._ending(choice, text, finish)
        if ended_by == "boundary" and STEP_BOUNDARY not in text:
            text += STEP_BOUNDARY  # the server trimmed the stop string it reported
        lps = []
        if logprobs:
            lps = [lp for lp in ((choice.get("logprobs") or {}).get("token_logprobs") or []) if lp is not None]
        n, p = usage.get("completion_tokens"), usage.get("prompt_tokens")
        return WrittenStep(text=text, ended_by=ended_by, completion_tokens=int(n) if n is not None else len(lps),
                           prompt_tokens=int(p) if p is not None else None, logprobs=lps)

    def mean_token_probability(self, context: str, continuation: str) -> float:
        """The target-likelihood PRM over the wire: the mean probability of `continuation`'s
        tokens after `context`, from the server's echoed prompt logprobs.

        The step's tokens are found by walking back from the end of the prompt until their text
        covers the continuation, not by `text_offset`: offsets are counted over token strings,
        which may include a BOS that the echoed text lacks, while the tail does not move.
        A token straddling context and step counts as the step's."""
        body = {"prompt": context + continuation, "max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": 1}
        choice, usage = self._complete(body)
        lp = choice.get("logprobs") or {}
        tokens, values = lp.get("tokens"), lp.get("token_logprobs")
        if not tokens or values is None or len(tokens) != len(values):
            raise RemoteBackendError(f"the {self.role} server at {self.spec.base_url} returned no prompt logprobs "
                                     "for an echo request; the target-likelihood PRM needs `echo` with `logprobs`")
        generated = int(usage.get("completion_tokens", 1))  # echo lists the generated token(s) last
        prompt = list(zip(tokens, values))[:len(tokens) - generated]
        step_logprobs, uncovered = [], len(continuation)
        for text, value in reversed(prompt):
            if uncovered <= 0:
                break
            if value is not None:
                step_logprobs.append(value)
            uncovered -= len(text)
        return mean_probability(step_logprobs)

    # ------------------------------------------------------------------ wire
    def _complete(self, body: dict) -> tuple[dict, dict]:
        if self.spec.model is not None:
            body = {"model": self.spec.model, **body}
        where = f"the {self.role} server at {self.spec.base_url}"
        self.requests += 1
        try:
            response = self._http.post("/v1/completions", json=body)
        except self._httpx.HTTPError as e:
            raise RemoteBackendError(f"cannot reach {where}: {e}") from e
        if response.status_code != 200:
            raise RemoteBackendError(f"{where} answered HTTP {response.status_code}: {_server_message(response)}")
        try:
            payload = response.json()
            choice = payload["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise RemoteBackendError(f"{where} did not answer with a completion object: {response.text[:200]!r}") from None
        return choice, payload.get("usage") or {}

    def _ending(self, choice: dict, text: str, finish: str | None) -> str:
        if finish == "length":
            return "step_cap"
        if finish != "stop":
            raise RemoteBackendError(f"the {self.role} server at {self.spec.base_url} ended a completion with "
                                     f"finish_reason {finish!r}; expected 'stop' or 'length'")
        matched = choice.get("stop_reason", choice.get("matched_stop", _ABSENT))
        if matched == STEP_BOUNDARY or text.endswith(STEP_BOUNDARY):
            return "boundary"
        if matched is _ABSENT:
            raise RemoteBackendError(
                f"the {self.role} server at {self.spec.base_url} stopped without saying whether the step boundary "
                "or EOS ended the completion (no `stop_reason` or `matched_stop`) and trimmed the stop string; "
                "serve the model with vLLM or SGLang, which report it")
        return "eos"


_ABSENT = object()


def _server_message(response) -> str:
    try:
        err = response.json().get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))
        if err:
            return str(err)
        return str(response.json().get("detail", response.text))[:300]
    except (ValueError, AttributeError):
        return response.text[:300]
