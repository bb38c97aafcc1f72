"""The engine: requests in, committed steps out, many requests in flight at once.

One iteration (`step`) is the story: admit what fits, run one draft forward and one target
forward over every running request's work, let each request's policy decide on the steps
that ended, commit and stream them. The scheduler (scheduler.py) batches; each request's
step logic (request_flow.py) decides; the runners touch the device; the pool holds memory.
`generate`, `stream` and `generate_batch` are this loop run until their requests end: a
single request is simply a batch of one.

One thread should drive the engine (the HTTP server keeps one engine thread); a lock makes
calls from other threads wait their turn rather than corrupt it.
"""
from __future__ import annotations

import functools
import itertools
import threading
import time
from typing import Hashable, Iterable, Iterator, Sequence as SequenceOf

import torch

from .config import EngineConfig, SamplingParams
from .kv.paged_cache import KVSpec, PagedKVCache
from .messages import checked_messages, is_conversation, problem_text
from .models.group_quant import QuantScheme
from .models.batch_invariant import InvariantLayers, make_batch_invariant
from .models.dense_copy import add_dense_copy
from .models.loader import LoadedModel, load_model, resolve_dtype
from .policies import Policy, make_policy
from .prm.build import PolicyPRMs, build_prm
from .prm.target_judge import TargetJudge
from .request import Request, StepOutput
from .roles import Role
from .router.head import RouterHead
from .runtime.boundary import boundary_token_ids, eos_token_ids
from .runtime.model_runner import ModelRunner
from .scheduler import Scheduler
from .sequence import GenerationResult, Sequence, Step


class ModelMismatchError(ValueError):
    """Draft and target cannot be paired (different tokenizers or vocabularies)."""


class Engine:
    def __init__(self, config: EngineConfig, *, draft: LoadedModel | None = None,
                 target: LoadedModel | None = None) -> None:
        """Loads config.draft / config.target, unless already-loaded models are passed
        (benchmarks build random-weight models of real shapes without touching disk)."""
        self.config = config
        self.device = torch.device(config.device)
        for role, given, quant in (("draft", draft, config.draft_quant), ("target", target, config.target_quant)):
            if given is not None and quant is not None:
                raise ValueError(f"{role}_quant={quant!r} quantizes a model the engine loads; a {role} passed "
                                 "already loaded is used as it is (quantize it before, or let the engine load it)")
        draft = draft or self._load(config.draft, config.draft_quant)
        target = target or self._load(config.target, config.target_quant)
        self.shared_vocab = _shares_vocabulary(draft, target)
        if not self.shared_vocab and config.spec_k > 0:
            raise ModelMismatchError(
                f"token-level speculation (spec_k={config.spec_k}) needs draft and target to share a "
                f"vocabulary; {draft.path} and {target.path} tokenize differently (set spec_k=0)")
        self.draft_model, self.target_model = draft, target
        models = list({id(lm.model): lm.model for lm in (draft, target)}.values())  # draft and target may be one
        if config.exact_arithmetic is not None:
            for model in models:
                model.set_exact_arithmetic(config.exact_arithmetic)
        if config.dense_rows is not None:  # after the layers' ops are final: the copy sits beside them
            copied = [add_dense_copy(model, config.dense_rows) for model in models]
            if not any(copied):
                raise ValueError(f"dense_rows={config.dense_rows} needs packed weights (a GGUF file loaded packed, "
                                 f"or draft_quant/target_quant) with exact arithmetic off; {draft.path} and "
                                 f"{target.path} have none")
        # Per role, which linear layers kept their kernel and which go row by row (empty unless
        # config.batch_invariant); draft and target may be one model, probed once.
        self.invariant_layers: dict[Role, InvariantLayers] = {}
        if config.batch_invariant:
            probed: dict[int, InvariantLayers] = {}
            for role, lm in ((Role.DRAFT, draft), (Role.TARGET, target)):
                if id(lm.model) not in probed:
                    probed[id(lm.model)] = make_batch_invariant(lm.model, resolve_dtype(config.dtype))
                self.invariant_layers[role] = probed[id(lm.model)]
        self.tokenizer = target.tokenizer
        loaded = {Role.DRAFT: draft, Role.TARGET: target}
        self.tokenizers = {m: lm.tokenizer for m, lm in loaded.items()}
        specs = [KVSpec(m.spec.num_layers, m.spec.num_kv_heads, m.spec.head_dim) for m in (draft, target)]
        dtype = resolve_dtype(config.dtype)
        num_pages = config.kv_pages or PagedKVCache.num_pages_for_budget(
            specs, config.kv_memory_bytes, dtype, config.min_block_size)
        self.cache = PagedKVCache(specs, num_pages, dtype, self.device, config.min_block_size)
        self.runners = {m: ModelRunner(lm.model, self.cache, m, batch_invariant=config.batch_invariant)
                        for m, lm in loaded.items()}
        self.draft, self.target = self.runners[Role.DRAFT], self.runners[Role.TARGET]
        self.max_len = min(draft.spec.max_position_embeddings, target.spec.max_position_embeddings)
        if config.max_model_len is not None:
            self.max_len = min(self.max_len, config.max_model_len)
        # Each model stops on its own vocabulary's boundary and EOS ids.
        self.boundary_ids = {m: frozenset(boundary_token_ids(lm.tokenizer)) for m, lm in loaded.items()}
        self.eos_ids = {m: frozenset(eos_token_ids(lm.tokenizer, lm.hf_config)) for m, lm in loaded.items()}
        self.prm = build_prm(config.prm, self.device)
        self.prms = PolicyPRMs(self.prm, self.device)
        self.router = (RouterHead.load(config.router, expected_hidden_size=draft.spec.hidden_size).to(self.device)
                       if config.router else None)
        self.routers = {name: RouterHead.load(path, expected_hidden_size=draft.spec.hidden_size).to(self.device)
                        for name, path in config.routers.items()}
        self.scheduler = Scheduler(self, config.max_batch, config.max_batch_tokens, config.prefix_cache)
        self._requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self._lock = threading.RLock()

    def _load(self, path: str, quant: str | None) -> LoadedModel:
        scheme = None if quant is None else QuantScheme(quant, self.config.quant_group)
        return load_model(path, self.config.dtype, self.device, dequantize=self.config.dequantize, quant=scheme)

    # ------------------------------------------------------------------ one request
    def generate(self, prompt: "str | list[int] | list[dict]", policy: str = "rsd", threshold: float | None = None,
                 sampling: SamplingParams | None = None, chat: bool = False,
                 record_features: bool = False) -> GenerationResult:
        """Generate step by step. record_features attaches each draft step's router features
        to its Step (router training data)."""
        return self.generate_batch([prompt], policy, threshold, sampling, chat, record_features)[0]

    def stream(self, prompt: "str | list[int] | list[dict]", policy: str = "rsd", threshold: float | None = None,
               sampling: SamplingParams | None = None, chat: bool = False) -> "RequestStream":
        """Iterate over committed steps as they are decided; `.result` holds the full result at
        the end. Closing the iterator early cancels the request and returns its KV pages."""
        return RequestStream(self, self.add_request(prompt, policy, threshold, sampling, chat))

    # ------------------------------------------------------------------ many requests
    def generate_batch(self, prompts: SequenceOf, policy: "str | SequenceOf[str]" = "rsd",
                       threshold: "float | None | SequenceOf[float | None]" = None,
                       sampling: "SamplingParams | SequenceOf[SamplingParams] | None" = None, chat: bool = False,
                       record_features: bool = False) -> list[GenerationResult]:
        """Generate for every prompt at once (continuous batching); `policy`, `threshold` and
        `sampling` are one value for all prompts or one per prompt. Results come in prompt order.
        Every request is validated before any starts; if one fails, the others still finish and
        the first error is raised."""
        prompts = list(prompts)
        if not prompts:
            raise ValueError("generate_batch needs at least one prompt")
        per = {name: _per_prompt(name, value, len(prompts))
               for name, value in (("policy", policy), ("threshold", threshold), ("sampling", sampling))}
        requests = [self._new_request(p, per["policy"][i], per["threshold"][i], per["sampling"][i], chat,
                                      record_features) for i, p in enumerate(prompts)]
        ids = []
        try:
            for req in requests:
                with self._lock:
                    self._submit(req)
                ids.append(req.request_id)
            while any(not self._requests[i].done for i in ids):
                self.step()
        except BaseException:
            for i in ids:
                self.abort(i)
            raise
        with self._lock:
            done = [self._requests.pop(i) for i in ids]
        for req in done:
            if req.error is not None:
                raise req.error
        return [req.result for req in done]

    def completions(self, requests: Iterable[tuple[Hashable, dict]], in_flight: int
                    ) -> Iterator[tuple[Hashable, GenerationResult, float]]:
        """Run (key, `add_request` keyword arguments) pairs with `in_flight` of them in the engine
        at a time, the next added as soon as one ends (no batch waits for its slowest request);
        yields (key, result, seconds since it was added) as each ends, in the order they end. A
        failed request raises its error, and then, as when the caller stops early, the requests
        still in flight are aborted and return their pages."""
        if in_flight < 1:
            raise ValueError(f"in_flight must be >= 1 request, got {in_flight}")
        pending = iter(requests)
        flight: dict[int, tuple[Hashable, float]] = {}  # request id -> (key, when it was added)

        def refill() -> None:
            while len(flight) < in_flight:
                key, kwargs = next(pending, (None, None))
                if kwargs is None:
                    return
                flight[self.add_request(**kwargs)] = (key, time.perf_counter())

        try:
            refill()
            while flight:
                for out in self.step():
                    if not out.finished:
                        continue
                    key, start = flight.pop(out.request_id)
                    self.forget(out.request_id)
                    if out.error is not None:
                        raise out.error
                    yield key, out.result, time.perf_counter() - start
                refill()
        except BaseException:  # GeneratorExit included: the caller stopped
            for rid in flight:  # one that ended in the same iteration is only forgotten
                if not self.abort(rid):
                    self.forget(rid)
            raise

    def add_request(self, prompt: "str | list[int] | list[dict]", policy: str = "rsd", threshold: float | None = None,
                    sampling: SamplingParams | None = None, chat: bool = False,
                    record_features: bool = False) -> int:
        """Queue a request (validated now: bad input raises ValueError before it holds any
        memory); returns its id. `step()` then advances it with every other request."""
        req = self._new_request(prompt, policy, threshold, sampling, chat, record_features)
        with self._lock:
            self._submit(req)
        return req.request_id

    def step(self) -> list[StepOutput]:
        """One iteration over all requests in flight: the steps each committed, and the
        requests that ended (finished, or failed with their error). An ended request is
        forgotten once reported."""
        outputs = []
        with self._lock:
            touched = self.scheduler.step()
        for req in touched:
            new = req.seq.steps[req.reported_steps:]
            req.reported_steps = len(req.seq.steps)
            outputs.append(StepOutput(req.request_id, new, req.state, req.result, req.error,
                                      req.seq.prompt_len[Role.TARGET], req.policy.drafts))
        return outputs

    def abort(self, request_id: int) -> bool:
        """Cancel a request (waiting or running) and return its pages; False if it is unknown
        or already ended."""
        with self._lock:
            req = self._requests.get(request_id)
            if req is None or req.done:
                return False
            self.scheduler.abort(req)
            return True

    def forget(self, request_id: int) -> None:
        """Drop an ended request's record (`step` callers do this once they have its result)."""
        with self._lock:
            req = self._requests.get(request_id)
            if req is not None and req.done:
                del self._requests[request_id]

    def request(self, request_id: int) -> Request:
        return self._requests[request_id]

    def decodes_alone(self) -> bool:
        """Whether at most one request is running, so a step decoded outside the scheduler's
        forwards (the chunked decoder) holds up nobody."""
        return len(self.scheduler.running) <= 1

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work

    def num_requests(self) -> dict[str, int]:
        return {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running)}

    def batch_sizes(self) -> dict[str, int]:
        """Rows in the last iteration's forward of each model (0: it did not run)."""
        return {role.label: n for role, n in self.scheduler.last_batch.items()}

    def graph_buckets(self) -> dict[str, list[int]]:
        """The batch buckets each model's decode forwards replay from CUDA graphs (none on a CPU)."""
        return {role.label: list(runner.buckets.captured) for role, runner in self.runners.items()}

    def kv_stats(self) -> dict:
        """The pool's pages (kept prefixes count as used) and, with the prefix cache on, its entries."""
        stats = self.cache.stats()
        if self.scheduler.prefix_cache is not None:
            stats["prefix_cache"] = self.scheduler.prefix_cache.stats()
        return stats

    def reset_prefix_cache(self) -> None:
        """Drop every kept prefix (their pages return to the pool unless a running request shares them)."""
        with self._lock:
            if self.scheduler.prefix_cache is not None:
                self.scheduler.prefix_cache.clear()

    @functools.cached_property
    def target_judge(self) -> TargetJudge:
        """SpecReason's judge prompt and answer digits in the target's vocabulary."""
        return TargetJudge(self.tokenizers[Role.TARGET], self.target_model.path)

    # ------------------------------------------------------------------ requests
    def policy(self, name: str, threshold: float | None = None) -> Policy:
        """The policy `name` as this engine runs it (its router, reflection cues and k)."""
        return make_policy(name, threshold, have_router=self.router is not None,
                           reflection_cues=self.config.reflection_cues, lookahead_k=self.config.lookahead_k)

    def _new_request(self, prompt, policy, threshold, sampling, chat, record_features) -> Request:
        """Validate everything up front, so a bad request fails before it holds any memory."""
        sampling = sampling or SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        pol = self.policy(policy, threshold)
        if pol.needs_judge:
            self.target_judge  # noqa: B018 - refuses a target whose digits are not single tokens, up front
        if pol.needs_router and self.router is None:
            raise ValueError(f"policy {policy!r} needs a router head: set EngineConfig(router=PATH) "
                             "(train one with `arbitrage-fast train-router`)")
        if pol.needs_router and pol.variant is not None and pol.variant not in self.routers:
            raise ValueError(f"policy {policy!r} asks for the router head {pol.variant!r}, which this engine does not "
                             f"hold (EngineConfig(routers=...) has {sorted(self.routers) or 'none'})")
        if pol.name == "spec_decode" and not self.shared_vocab:
            raise ModelMismatchError("spec_decode needs draft and target to share a vocabulary")
        prompt_ids, prompt_text = self._encode(prompt, chat)
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        return Request(next(self._ids), Sequence(prompt_ids, prompt_text, self.shared_vocab), pol, sampling,
                       record_features, generator)

    def _submit(self, req: Request) -> None:
        self.scheduler.add(req)  # raises KVCacheExhausted for a prompt the pool can never hold
        self._requests[req.request_id] = req

    def result_of(self, req: Request, finish_reason: str) -> GenerationResult:
        seq = req.seq
        out = seq.output_ids(Role.TARGET)
        # A stop string cuts the last step's text inside its ids: the answer is its steps' texts.
        whole = self.shared_vocab and finish_reason != "stop"
        text = self.tokenizer.decode(out, skip_special_tokens=True) if whole else "".join(seq.step_texts())
        return GenerationResult(token_ids=out, text=text, steps=seq.steps, stats=req.stats.as_dict(),
                                finish_reason=finish_reason,
                                stop_reason=seq.steps[-1].matched_stop if finish_reason == "stop" else None)

    # ------------------------------------------------------------------ text
    def router_for(self, policy) -> RouterHead:
        """The router head `policy` reads: its named variant, or the engine's own."""
        return self.router if policy.variant is None else self.routers[policy.variant]

    def text(self, tokens: list[int], model: Role) -> str:
        return self.tokenizers[model].decode(tokens, skip_special_tokens=True)

    def encode_step(self, text: str, model: Role) -> list[int]:
        """A committed step's text in another model's vocabulary (text handoff)."""
        return self.tokenizers[model](text, add_special_tokens=False)["input_ids"]

    def _encode(self, prompt: str | list[int] | list[dict], chat: bool) -> tuple[dict[int, list[int]], str]:
        """The prompt in each model's token ids (each with its own chat template), and as text.

        A prompt is text, token ids, or a conversation (a list of {"role", "content"} messages,
        always chat-templated); a conversation's text, for PRMs, is its last user message."""
        if is_conversation(prompt):
            messages = checked_messages(prompt)
            ids = {m: self._encode_messages(messages, m) for m in Role}
            text = problem_text(messages)
        elif isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("prompt is empty")
            ids = {m: self._encode_prompt(prompt, m, chat) for m in Role}
            text = prompt
        else:
            if not self.shared_vocab:
                raise ModelMismatchError("draft and target tokenize differently: pass the prompt as text")
            ids = list(prompt)
            if not ids:
                raise ValueError("prompt is empty")
            vocab = min(self.draft_model.spec.vocab_size, self.target_model.spec.vocab_size)
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            ids = {Role.DRAFT: ids, Role.TARGET: ids}
        longest = max(len(v) for v in ids.values())
        if longest >= self.max_len:
            raise ValueError(f"prompt has {longest} tokens but the context holds {self.max_len} "
                             "(at least one token must be left to generate)")
        return ids, text

    def _encode_prompt(self, prompt: str, model: int, chat: bool) -> list[int]:
        if chat:
            return self._encode_messages([{"role": "user", "content": prompt}], model)
        return self.tokenizers[model](prompt)["input_ids"]

    def _encode_messages(self, messages: list[dict], model: int) -> list[int]:
        tok = self.tokenizers[model]
        if not getattr(tok, "chat_template", None):
            name = (self.draft_model if model == Role.DRAFT else self.target_model).path
            raise ValueError(f"the tokenizer of {name} has no chat template: send a plain prompt, not chat messages")
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]


def _shares_vocabulary(draft: LoadedModel, target: LoadedModel) -> bool:
    """Token ids can pass between the models directly when every id either model can emit
    means the same text in both (tokenizer classes may differ in extra ids no model emits).
    Otherwise the engine hands steps over as text."""
    if draft.spec.vocab_size != target.spec.vocab_size:
        return False
    n = min(draft.spec.vocab_size, len(draft.tokenizer), len(target.tokenizer))
    ids = list(range(n))
    return draft.tokenizer.convert_ids_to_tokens(ids) == target.tokenizer.convert_ids_to_tokens(ids)


class RequestStream:
    """One request's committed steps as an iterator (driving the engine while it waits), then
    `.result`. Closing it before the end cancels the request and returns its KV pages."""

    def __init__(self, engine: Engine, request_id: int) -> None:
        self.engine, self.request_id = engine, request_id
        self._req = engine.request(request_id)
        self._next = 0
        self.result: GenerationResult | None = None

    @property
    def prompt_tokens(self) -> int:
        """The prompt's length in the target's tokens."""
        return self._req.seq.prompt_len[Role.TARGET]

    @property
    def seq(self) -> Sequence:
        """The request's committed context (read only)."""
        return self._req.seq

    def __iter__(self) -> Iterator[Step]:
        return self

    def __next__(self) -> Step:
        req = self._req
        while self._next >= len(req.seq.steps) and not req.done:
            self.engine.step()
        if self._next < len(req.seq.steps):
            self._next += 1
            return req.seq.steps[self._next - 1]
        self.engine.forget(self.request_id)
        if req.error is not None:
            raise req.error
        self.result = req.result
        raise StopIteration

    def close(self) -> None:
        self.engine.abort(self.request_id)
        self.engine.forget(self.request_id)


def _per_prompt(name: str, value, n: int) -> list:
    """One value per prompt from a single value or a sequence of n."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values for {n} prompts")
        return list(value)
    return [value] * n
