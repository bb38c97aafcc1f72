"""The step-level policies over remote OpenAI-compatible servers (backends/remote.py), against
scripted servers that answer the way vLLM and SGLang do."""
from __future__ import annotations

import math

import httpx
import pytest

from arbitrage_fast import SamplingParams
from arbitrage_fast.backends import RemoteBackendError, RemoteEngine, RemoteModel
from arbitrage_fast.prm.base import ProcessRewardModel
from tests.helpers.fake_openai_server import ScriptedServer, tokens_of

PROBLEM = "Q: Ann has 2 apples and buys 3 more. How many?\nA: "
TARGET_STEPS = ["Ann starts with 2 apples.\n\n", "She buys 3 more, so 2 + 3 = 5.\n\n", "The answer is 5."]
DRAFT_STEPS = ["Ann starts with 2 apples.\n\n", "She buys 3 more, so 2 + 3 = 6.\n\n", "The answer is 5."]


def make_engine(style="vllm", draft_steps=DRAFT_STEPS, target_steps=TARGET_STEPS, prm=None, **target_kw):
    draft = ScriptedServer(PROBLEM, draft_steps, style=style)
    target = ScriptedServer(PROBLEM, target_steps, style=style, **target_kw)
    engine = RemoteEngine(RemoteModel("http://draft:8000", "draft"), RemoteModel("http://target:8001", "target"),
                          prm=prm, transports={"draft": draft.transport(), "target": target.transport()})
    return engine, draft, target


@pytest.mark.parametrize("style", ["vllm", "vllm-trim", "sglang"])
def test_draft_only_and_target_only_each_ask_one_server_only(style):
    engine, draft, target = make_engine(style)
    res = engine.generate(PROBLEM, policy="draft_only")
    assert res.text == "".join(DRAFT_STEPS)
    assert [s.source for s in res.steps] == ["draft"] * 3
    assert [s.ended_by for s in res.steps] == ["boundary", "boundary", "eos"] and res.finish_reason == "eos"
    assert target.bodies == [] and res.stats["target_requests"] == 0
    assert res.stats["draft_tokens"] == sum(len(tokens_of(s)) for s in DRAFT_STEPS)

    res = engine.generate(PROBLEM, policy="target_only")
    assert res.text == "".join(TARGET_STEPS)
    assert len(draft.bodies) == 3 and res.stats["draft_requests"] == 0 and res.stats["escalations"] == 0
    # every request asks the server to keep the boundary and stop there
    body = target.bodies[0]
    assert body["stop"] == ["\n\n"] and body["include_stop_str_in_output"] and body["no_stop_trim"]
    assert body["model"] == "target" and body["prompt"] == PROBLEM


def test_rsd_escalates_only_the_step_the_target_finds_unlikely():
    engine, draft, target = make_engine()
    res = engine.generate(PROBLEM, policy="rsd", threshold=0.5)
    assert res.text == "".join(TARGET_STEPS)
    assert [s.source for s in res.steps] == ["draft", "target", "draft"]
    assert res.steps[1].rejected_draft == DRAFT_STEPS[1]
    assert [round(s.draft_prm, 6) for s in res.steps] == [0.9, 0.3, 0.9]
    assert res.stats["escalations"] == 1
    # one echo request scores each draft step; the target writes only the escalated step
    assert target.echo_requests == 3 and target.step_requests == 1
    written = [b for b in target.bodies if not b.get("echo")]
    assert written[0]["prompt"] == PROBLEM + DRAFT_STEPS[0]  # the committed context the target continues


def test_rsd_thresholds_at_the_ends_equal_draft_only_and_target_only():
    engine, _, _ = make_engine()
    assert engine.generate(PROBLEM, policy="rsd", threshold=0.0).text == engine.generate(PROBLEM, policy="draft_only").text
    every = engine.generate(PROBLEM, policy="rsd", threshold=1.5)
    assert every.text == engine.generate(PROBLEM, policy="target_only").text
    assert every.stats["escalations"] == 3


def test_oracle_compares_both_steps_and_every_step_runs_the_target_always():
    engine, _, target = make_engine()
    oracle = engine.generate(PROBLEM, policy="oracle", threshold=0.0)
    assert [s.source for s in oracle.steps] == ["draft", "target", "draft"]
    assert [round(s.target_prm, 6) for s in oracle.steps] == [0.9, 0.9, 0.9]
    assert target.step_requests == 3  # a candidate on every step
    assert all(b.get("logprobs") == 1 for b in target.bodies if not b.get("echo"))

    engine, _, target = make_engine()
    rsd = engine.generate(PROBLEM, policy="rsd", threshold=0.5)
    engine, _, target = make_engine()
    every = engine.generate(PROBLEM, policy="every_step", threshold=0.5)
    assert every.text == rsd.text and [s.source for s in every.steps] == [s.source for s in rsd.steps]
    assert target.step_requests == 3  # the paper's released code: the target writes every step


def test_a_configured_prm_replaces_the_target_likelihood():
    class FlagsSix(ProcessRewardModel):
        def __init__(self):
            self.seen = []

        def score(self, prompt, previous_steps, step):
            self.seen.append((prompt, list(previous_steps), step))
            return 0.0 if "6" in step else 1.0

    prm = FlagsSix()
    engine, _, target = make_engine(prm=prm)
    res = engine.generate(PROBLEM, policy="rsd", threshold=0.5)
    assert res.text == "".join(TARGET_STEPS) and target.echo_requests == 0
    assert prm.seen[1] == (PROBLEM, [DRAFT_STEPS[0]], DRAFT_STEPS[1])


def test_token_budget_and_step_cap():
    engine, _, _ = make_engine()
    res = engine.generate(PROBLEM, policy="draft_only", sampling=SamplingParams(max_new_tokens=7))
    assert res.finish_reason == "length" and res.steps[-1].ended_by == "length"
    assert sum(len(tokens_of(s.text)) for s in res.steps) == 7
    res = engine.generate(PROBLEM, policy="draft_only", sampling=SamplingParams(max_new_tokens=100, max_step_tokens=3))
    assert res.steps[0].ended_by == "step_cap" and res.steps[0].text == "Ann starts with "


def test_stop_strings_cut_the_answer_on_remote_servers_too():
    engine, _, _ = make_engine()
    res = engine.generate(PROBLEM, policy="rsd", threshold=0.5, sampling=SamplingParams(stop=["so 2"]))
    assert res.text == TARGET_STEPS[0] + "She buys 3 more, "
    assert res.finish_reason == "stop" and res.stop_reason == "so 2" and len(res.steps) == 2
    assert res.steps[-1].ended_by == "stop"


def test_streaming_yields_steps_as_decided_and_can_stop_early():
    engine, draft, _ = make_engine()
    run = engine.stream(PROBLEM, policy="draft_only")
    assert next(run).text == DRAFT_STEPS[0]
    run.close()
    assert len(draft.bodies) == 1 and run.result is None
    run = engine.stream(PROBLEM, policy="draft_only")
    assert [s.text for s in run] == DRAFT_STEPS and run.result.text == "".join(DRAFT_STEPS)


def test_a_server_that_cannot_tell_a_boundary_from_eos_is_refused():
    engine, _, _ = make_engine(style="plain")
    with pytest.raises(RemoteBackendError, match="stop_reason"):
        engine.generate(PROBLEM, policy="draft_only")


@pytest.mark.parametrize("prompt,policy,threshold,match", [
    ("", "rsd", None, "prompt is empty"),
    ([1, 2, 3], "rsd", None, "text or chat messages"),
    (PROBLEM, "arbitrage", None, "hidden states"),
    (PROBLEM, "spec_decode", None, "speculat"),
    (PROBLEM, "rsd", math.nan, "NaN"),
    (PROBLEM, "nope", None, "unknown policy"),
    ([{"role": "user", "content": "hi"}], "rsd", None, "tokenizer"),
])
def test_bad_requests_are_named_before_any_request_is_sent(prompt, policy, threshold, match):
    engine, draft, target = make_engine()
    with pytest.raises(ValueError, match=match):
        engine.generate(prompt, policy=policy, threshold=threshold)
    assert draft.bodies == [] and target.bodies == []


def test_server_errors_and_unreachable_servers_are_named():
    engine, _, _ = make_engine(fail_with=(400, "This model's maximum context length is 32768 tokens"))
    with pytest.raises(RemoteBackendError, match=r"target server at http://target:8001 answered HTTP 400: .*context"):
        engine.generate(PROBLEM, policy="target_only")

    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    engine = RemoteEngine(RemoteModel("http://draft:8000"), RemoteModel("http://target:8001"),
                          transports={"draft": httpx.MockTransport(refuse), "target": httpx.MockTransport(refuse)})
    with pytest.raises(RemoteBackendError, match="cannot reach the draft server at http://draft:8000"):
        engine.generate(PROBLEM, policy="draft_only")
    with pytest.raises(ValueError, match="http://"):
        RemoteEngine(RemoteModel("draft:8000"), RemoteModel("http://target:8001"))


def test_chat_prompts_use_each_models_own_template(tmp_path):
    from tests.helpers.tiny_prm import build_tokenizer

    folder = tmp_path / "tok"
    build_tokenizer().save_pretrained(folder)
    messages = [{"role": "user", "content": "Ann has 2 apples and buys 3 more. How many?"}]
    from transformers import AutoTokenizer

    templated = AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=False,
                                                                          add_generation_prompt=True)
    draft = ScriptedServer(templated, DRAFT_STEPS)
    target = ScriptedServer(templated, TARGET_STEPS)
    engine = RemoteEngine(RemoteModel("http://draft:8000", tokenizer=str(folder)),
                          RemoteModel("http://target:8001", tokenizer=str(folder)),
                          transports={"draft": draft.transport(), "target": target.transport()})
    res = engine.generate(messages, policy="rsd", threshold=0.5)
    assert res.text == "".join(TARGET_STEPS)
    assert draft.bodies[0]["prompt"] == templated and "model" not in draft.bodies[0]
    with pytest.raises(ValueError, match="message 0"):
        engine.generate([{"role": "robot", "content": "hi"}])


def test_cli_generate_drives_remote_servers(monkeypatch, capsys):
    import json

    from arbitrage_fast import backends
    from arbitrage_fast.cli import main

    draft = ScriptedServer(PROBLEM, DRAFT_STEPS)
    target = ScriptedServer(PROBLEM, TARGET_STEPS)

    class Wired(RemoteEngine):
        def __init__(self, d, t, **kw):
            assert (d.base_url, d.model, t.base_url, t.model) == ("http://d:1", "small", "http://t:2", None)
            super().__init__(d, t, transports={"draft": draft.transport(), "target": target.transport()}, **kw)

    monkeypatch.setattr(backends, "RemoteEngine", Wired)
    code = main(["generate", PROBLEM, "--draft-url", "http://d:1", "--draft-name", "small", "--target-url",
                 "http://t:2", "--policy", "rsd", "--threshold", "0.5", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["text"] == "".join(TARGET_STEPS)
    assert [s["source"] for s in out["steps"]] == ["draft", "target", "draft"]

    assert main(["generate", PROBLEM, "--draft-url", "http://d:1"]) == 2
    assert "both --draft-url and --target-url" in capsys.readouterr().err


def test_cli_names_an_unreachable_server(capsys):
    from arbitrage_fast.cli import main

    # port 9 (discard) on loopback: nothing listens, the connection is refused at once
    code = main(["generate", "2+3?", "--policy", "draft_only", "--draft-url", "http://127.0.0.1:9",
                 "--target-url", "http://127.0.0.1:9"])
    assert code == 1 and "cannot reach the draft server at http://127.0.0.1:9" in capsys.readouterr().err


def test_the_sweep_harness_measures_remote_policies_side_by_side():
    from arbitrage_fast.eval.datasets import EvalItem
    from arbitrage_fast.eval.sweep import run_sweep

    engine, _, _ = make_engine()
    items = [EvalItem(id="apples", question=PROBLEM, answer="5")]
    points = run_sweep(engine, items, ["draft_only", "rsd"], {"rsd": [0.5]}, progress=False,
                       grader=lambda text, gold: "= " + gold in text)
    by_policy = {p["policy"]: p for p in points}
    assert by_policy["draft_only"]["accuracy"] == 0.0 and by_policy["rsd"]["accuracy"] == 1.0
    assert by_policy["rsd"]["escalation_rate"] == pytest.approx(1 / 3)


def test_the_http_server_routes_steps_between_two_model_servers(monkeypatch, capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from arbitrage_fast import serve
    from fastapi.testclient import TestClient

    from arbitrage_fast import backends
    from arbitrage_fast.cli import main

    draft = ScriptedServer(PROBLEM, DRAFT_STEPS)
    target = ScriptedServer(PROBLEM, TARGET_STEPS)

    class Wired(RemoteEngine):
        def __init__(self, d, t, **kw):
            super().__init__(d, t, transports={"draft": draft.transport(), "target": target.transport()}, **kw)

    monkeypatch.setattr(backends, "RemoteEngine", Wired)
    served = {}
    monkeypatch.setattr(serve, "run_server", lambda app, host, port: served.update(app=app) or 0)
    assert main(["serve", "--draft-url", "http://d:1", "--target-url", "http://t:2", "--threshold", "0.5"]) == 0
    assert "http://d:1 -> http://t:2" in capsys.readouterr().out
    with TestClient(served["app"]) as client:
        body = client.post("/v1/completions", json={"prompt": PROBLEM}).json()
        assert body["choices"][0]["text"] == "".join(TARGET_STEPS)
        assert body["arbitrage"]["policy"] == "rsd"
        assert [s["source"] for s in body["choices"][0]["arbitrage"]["steps"]] == ["draft", "target", "draft"]
        assert body["usage"]["completion_tokens"] == sum(len(tokens_of(s)) for s in TARGET_STEPS)
        assert body["usage"]["prompt_tokens"] == len(tokens_of(PROBLEM))
        with client.stream("POST", "/v1/completions", json={"prompt": PROBLEM, "stream": True}) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: {")]
        assert len(events) == 4  # three steps and the closing chunk
        bad = client.post("/v1/completions", json={"prompt": PROBLEM, "policy": "arbitrage"})
        assert bad.status_code == 400 and "hidden states" in bad.json()["error"]["message"]
        target.fail_with = (500, "CUDA out of memory")
        failed = client.post("/v1/completions", json={"prompt": PROBLEM, "policy": "target_only"})
        assert failed.status_code == 502 and "CUDA out of memory" in failed.json()["error"]["message"]
        assert client.get("/health").json()["requests"]["finished"] >= 2


def test_spec_thinking_runs_remotely_and_specreason_and_lookahead_are_refused():
    draft_steps = ["Ann starts with 2 apples.\n\n", "Wait, she buys 3 more.\n\n", "The answer is 6."]
    engine, draft, target = make_engine(draft_steps=draft_steps)
    res = engine.generate(PROBLEM, policy="spec_thinking")
    assert [s.source for s in res.steps] == ["draft", "draft", "target"]  # the step after "Wait" is the target's
    assert res.text == "".join(draft_steps[:2]) + TARGET_STEPS[2]
    assert res.stats["escalations"] == 1 and target.step_requests == 1 and target.echo_requests == 0
    with pytest.raises(ValueError, match="digit tokens"):
        engine.generate(PROBLEM, policy="specreason", threshold=7.0)
    with pytest.raises(ValueError, match="'lookahead'.*ONE target forward"):
        engine.generate(PROBLEM, policy="lookahead", threshold=0.5)
