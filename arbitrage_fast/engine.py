"""The step loop: draft a step, gather the policy's evidence, keep it or escalate, commit.

The engine tells the story of a request in plain Python. Tensor work lives in the runners,
memory in the paged cache, decisions in the policies.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .config import EngineConfig, SamplingParams
from .kv.paged_cache import KVSpec, PagedKVCache
from .messages import checked_messages, is_conversation, problem_text
from .models.loader import LoadedModel, load_model, resolve_dtype
from .policies import Policy, StepEvidence, make_policy
from .prm.target_likelihood import mean_probability, mean_token_probability
from .router.head import RouterHead
from .runtime.boundary import boundary_token_ids, eos_token_ids
from .runtime.chunked_decoder import decode_step_chunked
from .runtime.model_runner import ForwardOutput, ModelRunner
from .runtime.speculative import speculative_step
from .runtime.step_decoder import DecodedStep, StopRule, decode_step
from .sequence import GenerationResult, Sequence, Step

DRAFT, TARGET = 0, 1
DEFAULT_SPEC_K = 4


class ModelMismatchError(ValueError):
    """Draft and target cannot be paired (different tokenizers or vocabularies)."""


@dataclass
class _Scored:
    """A draft step scored by the target-likelihood PRM, with the target's first-token logits."""

    score: float
    target_first: ForwardOutput


class _Run:
    """One request in flight: an iterator over its committed steps."""

    def __init__(self, engine: "Engine", seq: Sequence, policy: Policy, sampling: SamplingParams,
                 record_features: bool) -> None:
        self.seq, self.policy, self.sampling, self.record_features = seq, policy, sampling, record_features
        self.result: GenerationResult | None = None
        self._it = engine._steps(self)

    def __iter__(self):
        return self

    def __next__(self) -> Step:
        return next(self._it)

    @property
    def prompt_tokens(self) -> int:
        """The prompt's length in the target's tokens."""
        return self.seq.prompt_len[TARGET]

    def close(self) -> None:
        self._it.close()


class Engine:
    def __init__(self, config: EngineConfig, *, draft: LoadedModel | None = None,
                 target: LoadedModel | None = None) -> None:
        """Loads config.draft / config.target, unless already-loaded models are passed
        (benchmarks build random-weight models of real shapes without touching disk)."""
        self.config = config
        self.device = torch.device(config.device)
        draft = draft or load_model(config.draft, config.dtype, self.device)
        target = target or load_model(config.target, config.dtype, self.device)
        self.shared_vocab = _shares_vocabulary(draft, target)
        if not self.shared_vocab and config.spec_k > 0:
            raise ModelMismatchError(
                f"token-level speculation (spec_k={config.spec_k}) needs draft and target to share a "
                f"vocabulary; {draft.path} and {target.path} tokenize differently (set spec_k=0)")
        self.draft_model, self.target_model = draft, target
        self.tokenizer = target.tokenizer
        self.tokenizers = {DRAFT: draft.tokenizer, TARGET: target.tokenizer}
        specs = [KVSpec(m.spec.num_layers, m.spec.num_kv_heads, m.spec.head_dim) for m in (draft, target)]
        dtype = resolve_dtype(config.dtype)
        num_pages = config.kv_pages or PagedKVCache.num_pages_for_budget(
            specs, config.kv_memory_bytes, dtype, config.min_block_size)
        self.cache = PagedKVCache(specs, num_pages, dtype, self.device, config.min_block_size)
        self.draft = ModelRunner(draft.model, self.cache, DRAFT, "draft")
        self.target = ModelRunner(target.model, self.cache, TARGET, "target")
        self.max_len = min(draft.spec.max_position_embeddings, target.spec.max_position_embeddings)
        if config.max_model_len is not None:
            self.max_len = min(self.max_len, config.max_model_len)
        # Each model stops on its own vocabulary's boundary and EOS ids.
        self.boundary_ids = {m: frozenset(boundary_token_ids(lm.tokenizer)) for m, lm in ((DRAFT, draft), (TARGET, target))}
        self.eos_ids = {m: frozenset(eos_token_ids(lm.tokenizer, lm.hf_config)) for m, lm in ((DRAFT, draft), (TARGET, target))}
        self.prm = _build_prm(config.prm, self.device)
        self.router = (RouterHead.load(config.router, expected_hidden_size=draft.spec.hidden_size).to(self.device)
                       if config.router else None)

    # ------------------------------------------------------------------ public API
    def generate(self, prompt: "str | list[int] | list[dict]", policy: str = "rsd", threshold: float | None = None,
                 sampling: SamplingParams | None = None, chat: bool = False,
                 record_features: bool = False) -> GenerationResult:
        """Generate step by step. record_features attaches each draft step's router features
        to its Step (router training data)."""
        run = self._start(prompt, policy, threshold, sampling, chat, record_features)
        for _ in run:
            pass
        return run.result

    def stream(self, prompt: "str | list[int] | list[dict]", policy: str = "rsd", threshold: float | None = None,
               sampling: SamplingParams | None = None, chat: bool = False) -> "_Run":
        """Iterate over committed steps as they are decided; `.result` holds the full result at
        the end. Closing the iterator early cancels the request and returns its KV pages."""
        return self._start(prompt, policy, threshold, sampling, chat, False)

    def kv_stats(self) -> dict:
        return self.cache.stats()

    # ------------------------------------------------------------------ the step loop
    def _start(self, prompt, policy, threshold, sampling, chat, record_features) -> "_Run":
        """Validate everything up front, so a bad request fails before it holds any memory."""
        sampling = sampling or SamplingParams()
        pol = make_policy(policy, threshold, have_router=self.router is not None)
        if pol.needs_router and self.router is None:
            raise ValueError(f"policy {policy!r} needs a router head: set EngineConfig(router=PATH) "
                             "(train one with `arbitrage-fast train-router`)")
        if pol.name == "spec_decode" and not self.shared_vocab:
            raise ModelMismatchError("spec_decode needs draft and target to share a vocabulary")
        prompt_ids, prompt_text = self._encode(prompt, chat)
        return _Run(self, Sequence(prompt_ids, prompt_text, self.shared_vocab), pol, sampling, record_features)

    def _steps(self, run: "_Run"):
        seq, pol, sampling = run.seq, run.policy, run.sampling
        # host_syncs: every blocking device-to-host read the engine makes (step decoding, router
        # and target-likelihood scores); decode_host_syncs: the decoders' share. Not counted: a
        # PRM model's own reads inside `prm.score`, and the per-proposal reads of speculative
        # verification (spec_decode / spec_k count one read per proposal and per verify only).
        stats = dict(steps=0, escalations=0, draft_tokens=0, target_tokens=0, draft_prefill_tokens=0,
                     target_prefill_tokens=0, host_syncs=0, decode_host_syncs=0, rolled_back_tokens=0,
                     draft_s=0.0, target_s=0.0, prm_s=0.0, router_s=0.0)
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        start = time.perf_counter()
        finish = "length"
        self.cache.add_sequence(seq.seq_id)
        try:
            while True:
                room = self.max_len - max(len(seq.tokens(DRAFT)), len(seq.tokens(TARGET)))
                budget = min(sampling.max_new_tokens - seq.num_generated, room)
                if budget <= 0:
                    break
                stops = {m: StopRule(self.boundary_ids[m], frozenset() if sampling.ignore_eos else self.eos_ids[m],
                                     sampling.max_step_tokens, budget) for m in (DRAFT, TARGET)}
                step = self._next_step(seq, pol, sampling, generator, stops, stats, run.record_features)
                writer = DRAFT if step.source == "draft" else TARGET
                other_ids = None if self.shared_vocab else self._encode_step(step.text, 1 - writer)
                seq.commit(step, writer, other_ids)
                stats["steps"] += 1
                stats["escalations"] += step.source == "target" and pol.drafts
                yield step
                if step.ended_by == "eos":
                    finish = "eos"
                    break
        finally:
            # Success, error or cancellation (generator closed): the request's pages go back.
            self.cache.free_sequence(seq.seq_id)
        stats["wall_s"] = time.perf_counter() - start
        out = seq.output_ids(TARGET)
        text = self.tokenizer.decode(out, skip_special_tokens=True) if self.shared_vocab else "".join(seq.step_texts())
        run.result = GenerationResult(token_ids=out, text=text,
                                      steps=seq.steps, stats=stats, finish_reason=finish)

    def _next_step(self, seq, pol: Policy, sampling, generator, stops, stats, record_features: bool) -> Step:
        stop = stops[TARGET]
        if not pol.drafts:
            if pol.name == "spec_decode":
                written = self._speculative_step(seq, sampling, generator, stop, stats)
            else:
                written = self._write_step(self.target, seq, sampling, generator, stop, stats)
            return self._as_step(written, "target", TARGET)

        drafted = self._write_step(self.draft, seq, sampling, generator, stops[DRAFT], stats,
                                   track_features=self.router is not None or record_features, router=self.router)
        evidence = StepEvidence()
        target_first = None
        if self.router is not None:
            t = time.perf_counter()
            evidence.router_score = drafted.router_score  # the chunked decoder's read brought it back
            if evidence.router_score is None:
                evidence.router_score = float(self.router(drafted.features.features()))
                stats["host_syncs"] += 1
            stats["router_s"] += time.perf_counter() - t
        if pol.needs_draft_prm:
            t = time.perf_counter()
            scored = self._score_draft_step(seq, drafted, stats)
            evidence.draft_prm, target_first = scored.score, scored.target_first
            stats["prm_s"] += time.perf_counter() - t
        candidate = None
        if pol.generates_target_candidate:
            candidate = self._target_step(seq, target_first, sampling, generator, stop, stats)
            if pol.needs_target_prm:
                t = time.perf_counter()
                evidence.target_prm = self._score_target_step(seq, candidate)
                stats["prm_s"] += time.perf_counter() - t
        if pol.escalate(evidence):
            self.draft.truncate(seq.seq_id, len(seq.tokens(DRAFT)))  # roll back the rejected draft step
            if candidate is None:
                candidate = self._target_step(seq, target_first, sampling, generator, stop, stats)
            step = self._as_step(candidate, "target", TARGET)
            step.rejected_draft = self._text(drafted.tokens, DRAFT)
        else:
            if candidate is not None:  # discard the target's losing candidate, keep the context
                self.target.truncate(seq.seq_id, min(self.target.kv_len(seq.seq_id), len(seq.tokens(TARGET))))
            step = self._as_step(drafted, "draft", DRAFT)
        step.draft_prm, step.target_prm, step.router_score = evidence.draft_prm, evidence.target_prm, evidence.router_score
        if record_features:
            step.features = drafted.features.features()
        return step

    # ------------------------------------------------------------------ model work
    def _catch_up(self, runner: ModelRunner, seq: Sequence, extra: list[int] = (), rows: str = "last") -> ForwardOutput:
        """Feed every committed token this model has not seen (plus `extra`) in ONE prefill."""
        seen = runner.kv_len(seq.seq_id)
        tokens = seq.tokens(runner.index)[seen:] + list(extra)
        return runner.forward_one(seq.seq_id, tokens, rows)

    def _write_step(self, runner: ModelRunner, seq: Sequence, sampling, generator, stop, stats,
                    first: ForwardOutput | None = None, track_features: bool = False,
                    router: RouterHead | None = None) -> DecodedStep:
        t = time.perf_counter()
        if first is None:
            seen = runner.kv_len(seq.seq_id)
            stats[f"{runner.name}_prefill_tokens"] += len(seq.tokens(runner.index)) - seen
            first = self._catch_up(runner, seq)
        if self.config.decode_chunk == 1:
            written = decode_step(runner, seq.seq_id, first, sampling, generator, stop, track_features)
        else:
            mean_step_len = seq.num_generated / len(seq.steps) if seq.steps else None
            written = decode_step_chunked(runner, seq.seq_id, first, sampling, generator, stop, track_features,
                                          chunk=self.config.decode_chunk, mean_step_len=mean_step_len,
                                          score=router if track_features else None)
            stats["rolled_back_tokens"] += written.extra["rolled_back"]
        stats[f"{runner.name}_tokens"] += len(written.tokens)
        stats["host_syncs"] += written.host_syncs
        stats["decode_host_syncs"] += written.host_syncs
        stats[f"{runner.name}_s"] += time.perf_counter() - t
        return written

    def _target_step(self, seq, target_first, sampling, generator, stop, stats) -> DecodedStep:
        """The target writes the step from the committed context (its KV rolled back to it),
        speculated by the draft when spec_k > 0."""
        n_committed = len(seq.tokens(TARGET))
        if self.target.kv_len(seq.seq_id) > n_committed:
            self.target.truncate(seq.seq_id, n_committed)
        if self.config.spec_k > 0:
            return self._speculative_step(seq, sampling, generator, stop, stats)
        return self._write_step(self.target, seq, sampling, generator, stop, stats, first=target_first)

    def _speculative_step(self, seq, sampling, generator, stop, stats) -> DecodedStep:
        t = time.perf_counter()
        k = self.config.spec_k or DEFAULT_SPEC_K
        written = speculative_step(self.draft, self.target, seq, k, sampling, generator, stop)
        stats["target_tokens"] += len(written.tokens)
        stats["spec_proposed"] = stats.get("spec_proposed", 0) + written.extra["proposed"]
        stats["spec_accepted"] = stats.get("spec_accepted", 0) + written.extra["accepted"]
        stats["host_syncs"] += written.host_syncs
        stats["decode_host_syncs"] += written.host_syncs
        stats["target_s"] += time.perf_counter() - t
        return written

    def _score_draft_step(self, seq: Sequence, drafted: DecodedStep, stats) -> _Scored:
        if self.prm is not None:
            score = self.prm.score(seq.prompt_text, seq.step_texts(), self._text(drafted.tokens, DRAFT))
            return _Scored(score=score, target_first=None)
        # Target likelihood: one target prefill over the unseen context and the draft step.
        # Row j of the last n rows predicts the step's j-th token; the first of them is also
        # exactly what the target needs to start its own step if this one is rejected.
        t = time.perf_counter()
        step_ids = drafted.tokens if self.shared_vocab else self._encode_step(self._text(drafted.tokens, DRAFT), TARGET)
        if not step_ids:  # the draft step is empty text in the target's vocabulary
            return _Scored(score=0.0, target_first=None)
        n = len(step_ids)
        seen = self.target.kv_len(seq.seq_id)
        stats["target_prefill_tokens"] += len(seq.tokens(TARGET)) - seen + n - 1
        out = self._catch_up(self.target, seq, step_ids[:-1], rows="all")
        step_rows = ForwardOutput(hidden=out.hidden[-n:], logits=out.logits[-n:])
        score = mean_token_probability(step_rows.logits, step_ids)
        stats["host_syncs"] += 1  # the score's read
        first = ForwardOutput(hidden=step_rows.hidden[:1], logits=step_rows.logits[:1])
        stats["target_s"] += time.perf_counter() - t
        return _Scored(score=score, target_first=first)

    def _score_target_step(self, seq: Sequence, written: DecodedStep) -> float:
        if self.prm is not None:
            return self.prm.score(seq.prompt_text, seq.step_texts(), self._text(written.tokens, TARGET))
        return mean_probability(written.logprobs)

    # ------------------------------------------------------------------ helpers
    def _as_step(self, written: DecodedStep, source: str, writer: int) -> Step:
        return Step(text=self._text(written.tokens, writer), token_ids=written.tokens, source=source,
                    ended_by=written.ended_by)

    def _text(self, tokens: list[int], model: int) -> str:
        return self.tokenizers[model].decode(tokens, skip_special_tokens=True)

    def _encode_step(self, text: str, model: int) -> list[int]:
        """A committed step's text in another model's vocabulary (text handoff)."""
        return self.tokenizers[model](text, add_special_tokens=False)["input_ids"]

    def _encode(self, prompt: str | list[int] | list[dict], chat: bool) -> tuple[dict[int, list[int]], str]:
        """The prompt in each model's token ids (each with its own chat template), and as text.

        A prompt is text, token ids, or a conversation (a list of {"role", "content"} messages,
        always chat-templated); a conversation's text, for PRMs, is its last user message."""
        if is_conversation(prompt):
            messages = checked_messages(prompt)
            ids = {m: self._encode_messages(messages, m) for m in (DRAFT, TARGET)}
            text = problem_text(messages)
        elif isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("prompt is empty")
            ids = {m: self._encode_prompt(prompt, m, chat) for m in (DRAFT, TARGET)}
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
            ids = {DRAFT: ids, TARGET: ids}
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
            name = (self.draft_model if model == DRAFT else self.target_model).path
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


def _build_prm(spec, device):
    from .prm.base import ProcessRewardModel

    if spec is None:
        return None  # target likelihood, computed inside the engine
    if isinstance(spec, ProcessRewardModel):
        return spec
    if spec == "exact":
        from .prm.exact import ExactCheckerPRM
        return ExactCheckerPRM()
    from .prm.hf_prm import load_prm
    return load_prm(spec, device=device)
