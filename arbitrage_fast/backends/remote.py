"""The step-level policies over two remote servers: Arbitrage-style routing for models that are
served elsewhere (tensor-parallel vLLM or SGLang deployments), without this project's KV pool.

Each step is one completion request to the draft server; the policy's evidence is gathered
with as few requests as the policy needs (RSD: one echo request to the target scoring the
draft step; an escalation: one completion request to the target). Steps pass between the
servers as text, so draft and target may tokenize differently; the servers' prefix caches
make re-sending the growing context cheap.

What the wire cannot carry: the draft's hidden states, which the router head reads, so
`arbitrage` runs only in the native engine; token-level speculation, which belongs in the
target server's own configuration; and `specreason`'s judgement, which reads ten digit logits
of the target after a prompt in its own token ids (a server reports at most its top few
log-probs, so the score would change with the server's cap); nor `lookahead`, whose k drafted
steps are judged in one target forward and rolled back in both models' KV, which two servers
would turn into k separate drafting and scoring requests. `spec_thinking` needs only the
steps' text and runs here as natively.
"""
from __future__ import annotations

import itertools
import time

from arbitrage_fast.config import SamplingParams
from arbitrage_fast.decision import decide_step, run_now
from arbitrage_fast.messages import checked_messages, is_conversation, problem_text
from arbitrage_fast.policies import DEFAULT_REFLECTION_CUES, Policy, check_cues, make_policy
from arbitrage_fast.prm.build import PolicyPRMs
from arbitrage_fast.prm.target_likelihood import mean_probability
from arbitrage_fast.request import RequestState, StepOutput
from arbitrage_fast.sequence import GenerationResult, Step
from arbitrage_fast.stop_strings import end_at_stop

from .openai_client import CompletionsClient, RemoteModel, WrittenStep


class RemoteEngine:
    """`generate`/`stream` as the native `Engine` has them, over a draft and a target server.

    Results carry text: token ids stay on the servers, so `GenerationResult.token_ids` and
    each `Step.token_ids` are empty and token counts come from the servers' usage reports.
    `prm` is a `ProcessRewardModel` to score draft steps with, or None for the target
    likelihood computed by the target server.
    """

    def __init__(self, draft: RemoteModel, target: RemoteModel, *, prm=None, transports: dict | None = None,
                 reflection_cues=DEFAULT_REFLECTION_CUES) -> None:
        transports = transports or {}
        self.reflection_cues = check_cues(reflection_cues)
        self.draft = CompletionsClient(draft, "draft", transports.get("draft"))
        self.target = CompletionsClient(target, "target", transports.get("target"))
        self.prm = prm
        self.prms = PolicyPRMs(prm)
        self._tokenizers: dict[str, object] = {}
        self._runs: dict[int, RemoteRun] = {}
        self._ids = itertools.count()

    def close(self) -> None:
        self.draft.close()
        self.target.close()

    def __enter__(self) -> "RemoteEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ public API
    def generate(self, prompt: "str | list[dict]", policy: str = "rsd", threshold: float | None = None,
                 sampling: SamplingParams | None = None, chat: bool = False) -> GenerationResult:
        run = self.stream(prompt, policy, threshold, sampling, chat)
        for _ in run:
            pass
        return run.result

    def stream(self, prompt: "str | list[dict]", policy: str = "rsd", threshold: float | None = None,
               sampling: SamplingParams | None = None, chat: bool = False) -> "RemoteRun":
        """Iterate over committed steps as they are decided; `.result` holds the whole answer."""
        sampling = sampling or SamplingParams()
        pol = make_policy(policy, threshold, reflection_cues=self.reflection_cues)
        if pol.needs_judge:
            raise ValueError(f"policy {policy!r} reads the target's logits over the ten digit tokens after its judge "
                             "prompt, which OpenAI-compatible servers do not return in full: run it with the native "
                             "Engine, or use rsd, oracle or spec_thinking remotely")
        if pol.needs_router:
            raise ValueError(f"policy {policy!r} reads the draft's hidden states, which OpenAI-compatible servers "
                             "do not return: run it with the native Engine, or use rsd or oracle remotely")
        if pol.drafts_ahead:
            raise ValueError(f"policy {policy!r} judges its k drafted steps in ONE target forward and rolls both "
                             "models' KV back to the accepted prefix, which two OpenAI-compatible servers cannot "
                             "do (each drafted step would be its own request and its own echo scoring): run it "
                             "with the native Engine, or use rsd remotely")
        if pol.name == "spec_decode":
            raise ValueError("token-level speculation runs inside the target server (vLLM's --speculative-config, "
                             "SGLang's --speculative-algorithm); remotely, use target_only against such a server")
        prompts, text = self._prompts(prompt, chat)
        run = RemoteRun(pol.drafts)
        run._it = self._steps(run, prompts, text, pol, sampling)
        return run

    def kv_stats(self) -> dict:
        """Nothing is held here: the KV caches live on the servers."""
        return {}

    # ------------------------------------------------------------------ the engine's step interface
    # What the HTTP server drives. Each iteration advances every request by one step, in turn:
    # the servers' requests are blocking calls, so requests interleave step by step here and
    # batch on the model servers, which see one request per step from each.
    def add_request(self, prompt, policy: str = "rsd", threshold: float | None = None,
                    sampling: SamplingParams | None = None, chat: bool = False) -> int:
        run = self.stream(prompt, policy, threshold, sampling, chat)
        rid = next(self._ids)
        self._runs[rid] = run
        return rid

    def step(self) -> list[StepOutput]:
        outputs = []
        for rid, run in list(self._runs.items()):
            try:
                step = next(run)
            except StopIteration:
                del self._runs[rid]
                outputs.append(StepOutput(rid, [], RequestState.FINISHED, run.result, None, run.prompt_tokens or 0,
                                          run.drafts))
                continue
            except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                del self._runs[rid]
                outputs.append(StepOutput(rid, [], RequestState.FAILED, None, e, run.prompt_tokens or 0, run.drafts))
                continue
            outputs.append(StepOutput(rid, [step], RequestState.RUNNING, prompt_tokens=run.prompt_tokens or 0,
                                      drafts=run.drafts))
        return outputs

    def abort(self, request_id: int) -> bool:
        run = self._runs.pop(request_id, None)
        if run is None:
            return False
        run.close()
        return True

    def forget(self, request_id: int) -> None:
        """Nothing is kept once a request has ended."""

    def has_unfinished_requests(self) -> bool:
        return bool(self._runs)

    def num_requests(self) -> dict[str, int]:
        return {"waiting": 0, "running": len(self._runs)}

    def batch_sizes(self) -> dict[str, int]:
        return {}

    def graph_buckets(self) -> dict[str, list[int]]:
        """No local forwards, so no graphs: the servers decide how they batch."""
        return {}

    # ------------------------------------------------------------------ the step loop
    def _steps(self, run: "RemoteRun", prompts: dict[str, str], problem: str, pol: Policy, sampling: SamplingParams):
        stats = dict(steps=0, escalations=0, draft_tokens=0, target_tokens=0, draft_requests=0, target_requests=0,
                     draft_s=0.0, target_s=0.0, prm_s=0.0)
        start = time.perf_counter()
        requests_before = {c.role: c.requests for c in (self.draft, self.target)}
        steps: list[Step] = []
        committed, generated, finish = "", 0, "length"
        while generated < sampling.max_new_tokens:
            budget = min(sampling.max_step_tokens, sampling.max_new_tokens - generated)
            cap = "length" if budget < sampling.max_step_tokens else "step_cap"
            step, written = self._decide(pol, prompts, problem, steps, committed, budget, cap, sampling, stats)
            end_at_stop(step, committed, sampling.stop)
            if run.prompt_tokens is None:
                run.prompt_tokens = written.prompt_tokens
            generated += written.completion_tokens
            committed += step.text
            steps.append(step)
            stats["steps"] += 1
            stats["escalations"] += step.source == "target" and pol.drafts
            yield step
            if step.ended_by in ("eos", "stop"):
                finish = step.ended_by
                break
            if written.completion_tokens == 0 and not step.text:
                break  # nothing written and no EOS reported: another request would loop forever
        stats["draft_requests"] = self.draft.requests - requests_before["draft"]
        stats["target_requests"] = self.target.requests - requests_before["target"]
        stats["wall_s"] = time.perf_counter() - start
        return GenerationResult(token_ids=[], text=committed, steps=steps, stats=stats, finish_reason=finish,
                                num_completion_tokens=generated,
                                stop_reason=steps[-1].matched_stop if finish == "stop" else None)

    def _decide(self, pol, prompts, problem, steps, committed, budget, cap, sampling, stats) -> tuple[Step, WrittenStep]:
        source = _RemoteSource(self, pol, prompts, problem, steps, committed, budget, sampling, stats)
        decision = run_now(decide_step(pol, source))
        if decision.escalated:
            step = _as_step(decision.kept, "target", cap)
            if decision.drafted is not None:
                step.rejected_draft = decision.drafted.text
        else:
            step = _as_step(decision.kept, "draft", cap)
        step.draft_prm, step.target_prm = decision.evidence.draft_prm, decision.evidence.target_prm
        return step, decision.kept

    def _write(self, client: CompletionsClient, prompt: str, budget: int, sampling, stats, logprobs=False) -> WrittenStep:
        t = time.perf_counter()
        written = client.write_step(prompt, budget, sampling, logprobs=logprobs)
        stats[f"{client.role}_tokens"] += written.completion_tokens
        stats[f"{client.role}_s"] += time.perf_counter() - t
        return written


    # ------------------------------------------------------------------ prompts
    def _prompts(self, prompt, chat: bool) -> tuple[dict[str, str], str]:
        """Each server's prompt text (chat-templated by its own tokenizer) and the problem text."""
        if is_conversation(prompt):
            messages = checked_messages(prompt)
        elif isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("prompt is empty")
            if not chat:
                return {"draft": prompt, "target": prompt}, prompt
            messages = [{"role": "user", "content": prompt}]
        else:
            raise ValueError("remote servers take the prompt as text or chat messages: steps pass between them "
                             "as text, so token ids would mean nothing to the other server")
        return {c.role: self._template(c, messages) for c in (self.draft, self.target)}, problem_text(messages)

    def _template(self, client: CompletionsClient, messages: list[dict]) -> str:
        name = client.spec.tokenizer
        if name is None:
            raise ValueError(f"chat prompts need the {client.role} model's tokenizer: completions take raw text, so "
                             f"the chat template is applied here (RemoteModel(..., tokenizer=PATH))")
        if name not in self._tokenizers:
            from transformers import AutoTokenizer

            self._tokenizers[name] = AutoTokenizer.from_pretrained(name)
        tok = self._tokenizers[name]
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"the tokenizer {name} has no chat template: send a plain prompt, not chat messages")
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class _RemoteSource:
    """The evidence of one step from the two servers (decision.StepSource): every answer is
    one HTTP request, made at once."""

    def __init__(self, eng: RemoteEngine, pol: Policy, prompts, problem, steps, committed, budget, sampling,
                 stats) -> None:
        self.eng, self.pol, self.prompts, self.problem, self.steps = eng, pol, prompts, problem, steps
        self.committed, self.budget, self.sampling, self.stats = committed, budget, sampling, stats

    def draft_step(self) -> WrittenStep:
        return self.eng._write(self.eng.draft, self.prompts["draft"] + self.committed, self.budget, self.sampling,
                               self.stats)

    def router_score(self, drafted: WrittenStep) -> float:
        raise AssertionError("refused in RemoteEngine.stream: the router needs the draft's hidden states")

    def judge_score(self, drafted: WrittenStep) -> float:
        raise AssertionError("refused in RemoteEngine.stream: the judge needs the target's digit logits")

    def draft_ahead(self, k: int) -> list[WrittenStep]:
        raise AssertionError("refused in RemoteEngine.stream: lookahead judges its steps in one target forward")

    def judge_ahead(self, drafted: list[WrittenStep]) -> list[float]:
        raise AssertionError("refused in RemoteEngine.stream: lookahead judges its steps in one target forward")

    def keep_ahead(self, drafted: list[WrittenStep], kept: int) -> None:
        raise AssertionError("refused in RemoteEngine.stream: lookahead judges its steps in one target forward")

    def previous_draft_step(self) -> str | None:
        return self.steps[-1].text if self.steps and self.steps[-1].source == "draft" else None

    def draft_prm(self, drafted: WrittenStep) -> float:
        t = time.perf_counter()
        prm = self.eng.prms.for_policy(self.pol.prm)
        if prm is not None:
            score = prm.score(self.problem, [s.text for s in self.steps], drafted.text)
        else:
            score = self.eng.target.mean_token_probability(self.prompts["target"] + self.committed, drafted.text)
        self.stats["prm_s"] += time.perf_counter() - t
        return score

    def target_step(self) -> WrittenStep:
        # The target's own log-probs are its likelihood PRM score when the policy compares the two.
        logprobs = self.pol.needs_target_prm and self.eng.prms.for_policy(self.pol.prm) is None
        return self.eng._write(self.eng.target, self.prompts["target"] + self.committed, self.budget, self.sampling,
                               self.stats, logprobs=logprobs)

    def target_prm(self, candidate: WrittenStep) -> float:
        prm = self.eng.prms.for_policy(self.pol.prm)
        if prm is not None:
            return prm.score(self.problem, [s.text for s in self.steps], candidate.text)
        return mean_probability(candidate.logprobs)

    def reject_draft(self, drafted: WrittenStep) -> None:
        """Nothing to roll back: the servers hold no state of ours between requests."""

    def discard_candidate(self, candidate: WrittenStep) -> None:
        """Nothing to roll back (see reject_draft)."""


class RemoteRun:
    """One remote request in flight: an iterator over committed steps, then `.result`.
    `prompt_tokens` is the prompt's length as the first server to answer counted it."""

    def __init__(self, drafts: bool) -> None:
        self._it = None
        self.drafts = drafts  # its policy drafts steps
        self.result: GenerationResult | None = None
        self.prompt_tokens: int | None = None

    def __iter__(self):
        return self

    def __next__(self) -> Step:
        try:
            return next(self._it)
        except StopIteration as done:
            self.result = done.value
            raise

    def close(self) -> None:
        self._it.close()


def _as_step(written: WrittenStep, source: str, cap: str) -> Step:
    ended_by = cap if written.ended_by == "step_cap" else written.ended_by
    return Step(text=written.text, token_ids=[], source=source, ended_by=ended_by)
