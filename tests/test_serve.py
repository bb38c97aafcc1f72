"""The HTTP server: OpenAI-shaped answers equal to the engine's, step streaming, clear 400s, no leaks."""
from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from fastapi.testclient import TestClient  # noqa: E402

from arbitrage_fast import Engine, EngineConfig, SamplingParams  # noqa: E402
from arbitrage_fast.policies import default_threshold  # noqa: E402
from arbitrage_fast.serve import create_app  # noqa: E402
from helpers.live_server import serve_on_loopback  # noqa: E402
from helpers.tiny_models import build_tiny_lm  # noqa: E402

PROMPT = "Janet has 16 eggs."
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    draft = build_tiny_lm(root / "draft", "llama", hidden=32, layers=1, seed=1, max_positions=128, boundary_bias=4.0)
    target = build_tiny_lm(root / "target", "llama", hidden=48, layers=2, seed=2, max_positions=128, boundary_bias=4.0)
    return Engine(EngineConfig(draft=str(draft), target=str(target), kv_pages=64, min_block_size=4))


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine, "tiny", policy="rsd", threshold=0.5, max_tokens=24)) as c:
        yield c


def used_pages(engine) -> int:
    return engine.kv_stats()["used_pages"]


def sse(lines) -> list:
    """The data payloads of a server-sent event stream, JSON-decoded except the final [DONE]."""
    out = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    return [p if p == "[DONE]" else json.loads(p) for p in out]


def test_completion_equals_the_engine_and_reports_steps(client, engine):
    body = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 20,
                                                "policy": "rsd", "threshold": 0.7, "max_step_tokens": 4}).json()
    ref = engine.generate(PROMPT, policy="rsd", threshold=0.7,
                          sampling=SamplingParams(max_new_tokens=20, max_step_tokens=4))
    choice, = body["choices"]
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert choice["text"] == ref.text and choice["finish_reason"] == {"eos": "stop", "length": "length"}[ref.finish_reason]
    assert body["usage"]["completion_tokens"] == len(ref.token_ids)
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + len(ref.token_ids)
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}  # nothing else ran beside it
    steps = choice["arbitrage"]["steps"]
    assert [s["text"] for s in steps] == [s.text for s in ref.steps] and len(steps) == 5
    assert [s["source"] for s in steps] == [s.source for s in ref.steps]
    assert body["arbitrage"]["policy"] == "rsd" and body["arbitrage"]["threshold"] == 0.7
    assert used_pages(engine) == 0


def test_server_defaults_apply_when_the_request_names_no_policy(client, engine):
    body = client.post("/v1/completions", json={"prompt": PROMPT}).json()
    ref = engine.generate(PROMPT, policy="rsd", threshold=0.5, sampling=SamplingParams(max_new_tokens=24))
    assert body["choices"][0]["text"] == ref.text
    assert body["arbitrage"]["policy"] == "rsd" and body["arbitrage"]["threshold"] == 0.5


def test_a_policy_named_without_a_threshold_takes_the_servers_threshold_for_it(engine):
    """`policy_thresholds` (a preset's recommended thresholds, as `serve` passes them) applies to a
    request naming that policy but no threshold; a policy without one keeps its own default."""
    app = create_app(engine, "tiny", policy="rsd", threshold=0.5, policy_thresholds={"every_step": 0.3},
                     max_tokens=12)
    with TestClient(app) as c:
        named = c.post("/v1/completions", json={"prompt": PROMPT, "policy": "every_step"}).json()
        other = c.post("/v1/completions", json={"prompt": PROMPT, "policy": "rsd"}).json()
        given = c.post("/v1/completions", json={"prompt": PROMPT, "policy": "every_step", "threshold": 0.9}).json()
    ref = engine.generate(PROMPT, policy="every_step", threshold=0.3, sampling=SamplingParams(max_new_tokens=12))
    assert named["arbitrage"] == {"policy": "every_step", "threshold": 0.3} and named["choices"][0]["text"] == ref.text
    assert other["arbitrage"] == {"policy": "rsd", "threshold": default_threshold("rsd")}  # rsd's own
    ref = engine.generate(PROMPT, policy="rsd", sampling=SamplingParams(max_new_tokens=12))
    assert other["choices"][0]["text"] == ref.text
    assert given["arbitrage"]["threshold"] == 0.9
    assert used_pages(engine) == 0


def test_stream_sends_one_event_per_step_and_the_same_text(client, engine):
    request = {"prompt": PROMPT, "max_tokens": 20, "policy": "rsd", "threshold": 0.7, "max_step_tokens": 4}
    whole = client.post("/v1/completions", json=request).json()
    with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    steps, final = events[:-2], events[-2]
    assert "".join(e["choices"][0]["text"] for e in steps) == whole["choices"][0]["text"]
    assert [e["choices"][0]["arbitrage"]["step"]["source"] for e in steps] == [
        s["source"] for s in whole["choices"][0]["arbitrage"]["steps"]]
    assert all(e["choices"][0]["finish_reason"] is None for e in steps)
    assert final["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert final["usage"] == whole["usage"]
    assert used_pages(engine) == 0


def test_chat_uses_the_chat_template_and_streams_deltas(client, engine):
    body = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 16,
                                                     "policy": "draft_only", "max_step_tokens": 4}).json()
    ref = engine.generate(MESSAGES, policy="draft_only", sampling=SamplingParams(max_new_tokens=16, max_step_tokens=4))
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ref.text}
    templated = engine.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert templated.count("<|im_start|>") == 3  # system, user, and the assistant's turn
    assert body["usage"]["prompt_tokens"] == len(engine.tokenizer(templated, add_special_tokens=False)["input_ids"])

    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": MESSAGES, "max_tokens": 16, "policy": "draft_only", "max_step_tokens": 4,
                             "stream": True}) as r:
        events = sse(r.iter_lines())
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[0]["role"] == "assistant" and all("role" not in d for d in deltas[1:])
    assert "".join(d.get("content", "") for d in deltas) == ref.text
    assert events[-2]["object"] == "chat.completion.chunk"


def test_n_choices_are_the_seeded_samples_alone_and_share_the_prompt(client, engine):
    """n = 3 seeded samples: choice i is what the engine draws alone with seed + i, the choices
    differ, the prompt is counted once in usage and prefilled once (the others share it)."""
    request = {"prompt": PROMPT, "max_tokens": 20, "policy": "rsd", "threshold": 0.7, "temperature": 1.0,
               "seed": 7, "n": 3}
    body = client.post("/v1/completions", json=request).json()
    refs = [engine.generate(PROMPT, policy="rsd", threshold=0.7,
                            sampling=SamplingParams(max_new_tokens=20, temperature=1.0, seed=7 + i)) for i in range(3)]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == [r.text for r in refs]
    assert len({r.text for r in refs}) > 1  # the seeds differ, so do the samples
    for choice, ref in zip(body["choices"], refs):
        assert [s["source"] for s in choice["arbitrage"]["steps"]] == [s.source for s in ref.steps]
    assert body["usage"]["prompt_tokens"] == len(engine.tokenizer(PROMPT)["input_ids"])
    assert body["usage"]["completion_tokens"] == sum(len(r.token_ids) for r in refs)
    shared = [c["arbitrage"]["stats"]["cached_prompt_tokens"] for c in body["choices"]]
    assert sorted(shared)[0] == 0 and all(x > 0 for x in sorted(shared)[1:])  # one computed it
    assert body["arbitrage"] == {"policy": "rsd", "threshold": 0.7}
    assert used_pages(engine) == 0


@pytest.mark.parametrize("path, extra", [("/v1/completions", {"prompt": PROMPT}),
                                         ("/v1/chat/completions", {"messages": MESSAGES})])
def test_n_choices_stream_interleaved_each_by_its_index(client, engine, path, extra):
    request = {**extra, "max_tokens": 16, "policy": "rsd", "threshold": 0.7, "max_step_tokens": 4,
               "temperature": 1.0, "seed": 3, "n": 3}
    whole = client.post(path, json=request).json()
    with client.stream("POST", path, json={**request, "stream": True}) as r:
        events = sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [e["choices"][0] for e in events[:-1]]
    chat = path.endswith("chat/completions")
    for i, choice in enumerate(whole["choices"]):
        mine = [c for c in chunks if c["index"] == i]
        # Step by step (a random tiny model splits UTF-8 characters between steps, so the whole
        # answer's decode can differ from its steps' texts joined).
        text = [c["delta"].get("content") if chat else c["text"] for c in mine[:-1]]
        assert text == [s["text"] for s in choice["arbitrage"]["steps"]]
        assert [c["finish_reason"] for c in mine[:-1]] == [None] * (len(mine) - 1)
        assert mine[-1]["finish_reason"] == choice["finish_reason"]
        assert mine[-1]["arbitrage"]["stats"]["target_tokens"] == choice["arbitrage"]["stats"]["target_tokens"]
        if chat:
            assert mine[0]["delta"]["role"] == "assistant" and all("role" not in c["delta"] for c in mine[1:])
    assert [("usage" in e) for e in events[:-1]] == [False] * (len(events) - 2) + [True]
    assert events[-2]["usage"] == whole["usage"] and events[-2]["arbitrage"] == whole["arbitrage"]
    assert used_pages(engine) == 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_batch_of_prompts_gets_n_choices_each_in_order(client, engine, stream):
    """OpenAI's prompt list: choice p * n + j is the j-th sample of prompt p (texts and token ids)."""
    prompts = [PROMPT, "We compute 12 + 30", "Tom has 3 apples."]
    request = {"prompt": prompts, "n": 2, "max_tokens": 12, "policy": "rsd", "threshold": 0.7, "temperature": 1.0,
               "seed": 11, "max_step_tokens": 4}
    refs = [engine.generate(p, policy="rsd", threshold=0.7, sampling=SamplingParams(
        max_new_tokens=12, temperature=1.0, seed=11 + j, max_step_tokens=4)) for p in prompts for j in range(2)]
    if stream:
        with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as r:
            events = sse(r.iter_lines())
        chunks = [e["choices"][0] for e in events[:-1]]
        steps = [[c["arbitrage"]["step"]["text"] for c in chunks if c["index"] == i and "step" in c["arbitrage"]]
                 for i in range(len(refs))]
        usage = events[-2]["usage"]
    else:
        body = client.post("/v1/completions", json=request).json()
        assert [c["index"] for c in body["choices"]] == list(range(6))
        steps = [[s["text"] for s in c["arbitrage"]["steps"]] for c in body["choices"]]
        usage = body["usage"]
    assert steps == [[s.text for s in r.steps] for r in refs]
    assert usage["prompt_tokens"] == sum(len(engine.tokenizer(p)["input_ids"]) for p in prompts)
    assert usage["completion_tokens"] == sum(len(r.token_ids) for r in refs)
    assert used_pages(engine) == 0


def test_a_batch_of_token_id_prompts(client, engine):
    prompts = [[5, 9, 14, 3, 27, 8], [40, 2, 19]]
    body = client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 8}).json()
    refs = [engine.generate(p, policy="rsd", threshold=0.5, sampling=SamplingParams(max_new_tokens=8)) for p in prompts]
    assert [c["text"] for c in body["choices"]] == [r.text for r in refs]
    assert body["usage"]["prompt_tokens"] == 9
    mixed = client.post("/v1/completions", json={"prompt": ["text", [1, 2]]})
    assert mixed.status_code == 400  # one kind per batch, as OpenAI's API


def test_stop_strings_end_the_answer_and_are_named(client, engine):
    request = {"prompt": PROMPT, "max_tokens": 20, "policy": "rsd", "threshold": 0.7, "max_step_tokens": 4}
    free = client.post("/v1/completions", json=request).json()["choices"][0]
    steps = [s["text"] for s in free["arbitrage"]["steps"]]
    stop = steps[2][:2]
    ref = engine.generate(PROMPT, policy="rsd", threshold=0.7,
                          sampling=SamplingParams(max_new_tokens=20, max_step_tokens=4, stop=(stop,)))
    body = client.post("/v1/completions", json={**request, "stop": stop}).json()
    choice, = body["choices"]
    assert choice["text"] == ref.text and len(choice["text"]) < len("".join(steps))
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    with client.stream("POST", "/v1/completions", json={**request, "stop": [stop], "stream": True}) as r:
        events = sse(r.iter_lines())
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == ref.text
    assert events[-2]["choices"][0]["stop_reason"] == stop and events[-2]["choices"][0]["finish_reason"] == "stop"
    assert free["stop_reason"] is None
    assert used_pages(engine) == 0


@pytest.mark.parametrize("path, body, status, match", [
    ("/v1/completions", {"prompt": ""}, 400, "prompt.constrained-str: String should have at least 1 character"),
    ("/v1/completions", {"prompt": "  "}, 400, "String should match pattern"),
    ("/v1/completions", {"prompt": []}, 400, "List should have at least 1 item"),
    ("/v1/completions", {"prompt": ["fine", " "]}, 400, "String should match pattern"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, 400, "List should have at least 1 item"),
    ("/v1/completions", {"prompt": [10 ** 9]}, 400, "out of range"),
    ("/v1/completions", {"prompt": "word " * 300}, 400, "context holds"),
    ("/v1/completions", {"prompt": PROMPT, "threshold": -0.5}, 400, "out of range"),
    ("/v1/completions", {"prompt": PROMPT, "policy": "nonsense"}, 400, "unknown policy"),
    ("/v1/completions", {"prompt": PROMPT, "policy": "arbitrage"}, 400, "router"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": PROMPT, "stop": ["ok", ""]}, 400, "stop string must be a non-empty string"),
    ("/v1/completions", {"prompt": PROMPT, "stop": ["x"] * 17}, 400, "stop"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 2}, 400, "logprobs=2 is not supported by this server"),
    ("/v1/chat/completions", {"messages": MESSAGES, "presence_penalty": 0.5}, 400, "presence_penalty=0.5 is not"),
    ("/v1/completions", {"prompt": PROMPT, "top_k": -2}, 400, "top_k"),
    ("/v1/completions", {"prompt": PROMPT, "n": 0}, 400, "n: Input should be greater than or equal to 1"),
    ("/v1/completions", {"prompt": PROMPT, "n": 129}, 400, "n: Input should be less than or equal to 128"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt: Field required"),
    ("/v1/completions", {"prompt": PROMPT, "model": "gpt-4"}, 404, "'gpt-4' is not served here"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "  "}]}, 400, "prompt is empty"),
])
def test_bad_requests_are_named_and_take_no_memory(client, engine, path, body, status, match):
    for stream in (False, True):
        r = client.post(path, json={**body, "stream": stream})
        assert r.status_code == status, r.text
        assert match in r.json()["error"]["message"]
    assert used_pages(engine) == 0
    assert client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200


def test_health_and_models(client):
    health = client.get("/health").json()
    assert health["kv"]["used_pages"] == 0 and health["requests"]["waiting"] == 0
    assert health["requests"]["finished"] > 0
    assert health["graph_buckets"] == {"draft": [], "target": []}  # CUDA graphs only on a GPU
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny"]


# --- a real server: disconnects and concurrent clients ----------------------------------------


@pytest.fixture(scope="module")
def server(engine):
    with serve_on_loopback(create_app(engine, "tiny", policy="rsd", threshold=0.5, max_tokens=24)) as url:
        yield url


def wait_for(predicate, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_client_that_disconnects_mid_answer_returns_its_pages(server, engine):
    request = {"prompt": PROMPT, "max_tokens": 100, "policy": "every_step", "max_step_tokens": 2, "stream": True}
    with httpx.Client(base_url=server, timeout=60) as http:
        before = http.get("/health").json()["requests"]
        with http.stream("POST", "/v1/completions", json=request) as r:
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
            assert json.loads(first[len("data: "):])["choices"][0]["arbitrage"]["step"]["text"]
        # Gone after one step of a long answer: the server must cancel it and free its KV.
        wait_for(lambda: http.get("/health").json()["requests"]["cancelled"] == before["cancelled"] + 1)
        assert http.get("/health").json()["kv"]["used_pages"] == 0
        assert http.get("/health").json()["requests"]["finished"] == before["finished"]
        after = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8})
        assert after.status_code == 200


def test_a_client_that_leaves_an_n_choice_stream_cancels_every_choice(server, engine):
    request = {"prompt": PROMPT, "max_tokens": 100, "policy": "every_step", "max_step_tokens": 2, "stream": True,
               "n": 3, "temperature": 1.0}
    with httpx.Client(base_url=server, timeout=60) as http:
        before = http.get("/health").json()["requests"]
        with http.stream("POST", "/v1/completions", json=request) as r:
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
            assert json.loads(first[len("data: "):])["choices"][0]["arbitrage"]["step"]["text"]
        wait_for(lambda: http.get("/health").json()["requests"]["cancelled"] == before["cancelled"] + 3)
        assert http.get("/health").json()["kv"]["used_pages"] == 0
        assert http.get("/health").json()["requests"]["finished"] == before["finished"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, engine):
    prompts = [PROMPT, "We compute 12 + 30", "Tom has 3 apples."]
    refs = {p: engine.generate(p, policy="rsd", threshold=0.5, sampling=SamplingParams(max_new_tokens=24)).text
            for p in prompts}
    got = {}

    def ask(p):
        with httpx.Client(base_url=server, timeout=120) as http:
            got[p] = http.post("/v1/completions", json={"prompt": p}).json()["choices"][0]["text"]

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == refs
    assert used_pages(engine) == 0


def test_usage_reports_the_prompt_tokens_shared_with_another_request(engine):
    from arbitrage_fast.serve.protocol import usage

    first, copy = engine.generate_batch([PROMPT, PROMPT], policy="rsd", threshold=0.5,
                                        sampling=SamplingParams(max_new_tokens=8))
    n = len(engine.tokenizer(PROMPT)["input_ids"])
    # Whole pages of the prompt, short of its last token (which every request feeds itself).
    cached = max((n - 1) - (n - 1) % engine.cache.block_size(m) for m in (0, 1))
    assert usage(n, [first])["prompt_tokens_details"] == {"cached_tokens": 0}
    assert usage(n, [copy])["prompt_tokens_details"] == {"cached_tokens": cached} and cached > 0
    assert usage(n, [copy])["total_tokens"] == n + copy.completion_tokens
    # Two choices of one request: the prompt counted once, only what both found computed is cached.
    both = usage(n, [first, copy])
    assert both["prompt_tokens_details"] == {"cached_tokens": 0}
    assert both["total_tokens"] == n + first.completion_tokens + copy.completion_tokens
    assert used_pages(engine) == 0


def test_a_denormal_temperature_is_greedy_not_a_500(client, engine):
    """Regression: logits divided by a denormal temperature overflowed and the sampler raised (a 500)."""
    body = {"prompt": PROMPT, "max_tokens": 8, "policy": "rsd", "threshold": 0.5}
    tiny = client.post("/v1/completions", json={**body, "temperature": 1e-40})
    assert tiny.status_code == 200, tiny.text
    greedy = client.post("/v1/completions", json={**body, "temperature": 0.0}).json()
    assert tiny.json()["choices"][0]["text"] == greedy["choices"][0]["text"]


def test_neutral_values_of_unsupported_fields_are_accepted_and_top_k_samples(client):
    body = {"prompt": PROMPT, "max_tokens": 8, "policy": "rsd", "threshold": 0.5}
    neutral = {"logprobs": None, "echo": False, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
               "user": "someone", "best_of": 1}
    greedy = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    r = client.post("/v1/completions", json={**body, **neutral})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy
    # top_k = 1 keeps only the likeliest token: sampling at temperature 1 is then greedy.
    for seed in (1, 2):
        top1 = client.post("/v1/completions", json={**body, "temperature": 1.0, "top_k": 1, "seed": seed}).json()
        assert top1["choices"][0]["text"] == greedy


def test_an_empty_or_missing_model_name_means_the_served_model(client):
    for body in ({"model": ""}, {}, {"model": "tiny"}):
        r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, **body})
        assert r.status_code == 200, (body, r.text)


def test_openapi_documents_the_errors_and_the_prompt_rules(client):
    schema = client.get("/openapi.json").json()
    responses = schema["paths"]["/v1/completions"]["post"]["responses"]
    assert {"200", "400", "413", "503"} <= set(responses)
    prompt = schema["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]
    assert {"minLength": 1, "pattern": "\\S"}.items() <= prompt["anyOf"][0].items()


def _app_client(engine, **options):
    return TestClient(create_app(engine, "tiny", policy="rsd", threshold=0.5, max_tokens=8, **options))


def test_api_key_guards_the_api_but_not_health(engine):
    with _app_client(engine, api_key="sesame") as c:
        assert c.post("/v1/completions", json={"prompt": PROMPT}).status_code == 401
        wrong = c.post("/v1/completions", json={"prompt": PROMPT}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "API key" in wrong.json()["error"]["message"]
        ok = c.post("/v1/completions", json={"prompt": PROMPT}, headers={"Authorization": "Bearer sesame"})
        assert ok.status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200


def test_an_oversized_body_is_refused_with_413(engine):
    with _app_client(engine, max_body_bytes=256) as c:
        r = c.post("/v1/completions", json={"prompt": "x" * 1000})
        assert r.status_code == 413 and "limit of 256" in r.json()["error"]["message"]
        chunked = c.post("/v1/completions", content=iter([b'{"prompt": "', b"y" * 600, b'"}']),
                         headers={"content-type": "application/json"})
        assert chunked.status_code == 413
        assert c.post("/v1/completions", json={"prompt": PROMPT}).status_code == 200
    assert used_pages(engine) == 0


def test_a_full_waiting_queue_answers_503_with_retry_after(engine):
    with _app_client(engine, max_waiting=0) as c:
        r = c.post("/v1/completions", json={"prompt": PROMPT})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert 'arbitrage_requests_total{outcome="rejected"} 1.0' in c.get("/metrics").text


def test_metrics_count_requests_tokens_batches_and_pages(engine):
    with _app_client(engine) as c:
        for policy in ("rsd", "target_only"):
            assert c.post("/v1/completions", json={"prompt": PROMPT, "policy": policy}).status_code == 200
        text = c.get("/metrics").text
    assert 'arbitrage_requests_total{outcome="finished"} 2.0' in text
    assert "arbitrage_kv_used_pages 0.0" in text and "arbitrage_kv_free_pages 64.0" in text
    assert 'arbitrage_batch_size_count{role="draft"}' in text
    assert 'arbitrage_generated_tokens_total{role="target"}' in text
    assert "arbitrage_request_latency_seconds_count 2.0" in text
    assert "arbitrage_escalation_rate" in text and "arbitrage_requests_waiting 0.0" in text


def test_concurrent_streaming_clients_each_receive_exactly_their_own_answer(server, engine):
    """Same prompt under different policies and caps: an answer delivered to the wrong client
    (or two clients' steps interleaved) differs from that client's batch-1 reference."""
    asks = [{"prompt": PROMPT, "policy": pol, "max_tokens": cap, "threshold": thr}
            for pol, cap, thr in (("rsd", 24, 0.5), ("rsd", 24, 0.9), ("draft_only", 20, None),
                                  ("target_only", 24, None), ("oracle", 16, 0.0), ("every_step", 24, 0.5))]
    refs = [engine.generate(a["prompt"], policy=a["policy"], threshold=a["threshold"],
                            sampling=SamplingParams(max_new_tokens=a["max_tokens"])) for a in asks]
    got: dict[int, tuple] = {}

    def ask(i):
        with httpx.Client(base_url=server, timeout=120) as http:
            with http.stream("POST", "/v1/completions", json={**asks[i], "stream": True}) as r:
                events = sse(r.iter_lines())
        marks = [e["choices"][0]["arbitrage"] for e in events if isinstance(e, dict)]
        steps = [(m["step"]["text"], m["step"]["source"]) for m in marks if "step" in m]
        got[i] = (steps, events[-2]["choices"][0]["finish_reason"])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, ref in enumerate(refs):
        assert got[i][0] == [(s.text, s.source) for s in ref.steps], asks[i]
        assert got[i][1] == {"eos": "stop", "length": "length"}[ref.finish_reason]
    assert used_pages(engine) == 0
    with httpx.Client(base_url=server, timeout=30) as http:
        metrics = http.get("/metrics").text
    # Some forward ran more than one request's rows: the clients really were batched.
    le1 = next(float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith('arbitrage_batch_size_bucket{le="1.0",role="draft"}'))
    count = next(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith('arbitrage_batch_size_count{role="draft"}'))
    assert count > le1


# --- the server process: the engine loop on the main thread -----------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_server_steps_the_engine_on_the_calling_thread_and_stops_on_sigterm(engine, monkeypatch):
    """`arbitrage-fast serve`'s process shape: uvicorn on a thread, the engine loop on the thread
    that loaded the models (one OpenMP pool); SIGTERM ends it cleanly with nothing leaked."""
    import os
    import signal

    from arbitrage_fast.serve import run_server

    stepped_on = set()
    step = engine.step

    def recording_step():
        stepped_on.add(threading.current_thread().name)
        return step()

    monkeypatch.setattr(engine, "step", recording_step)
    port = _free_port()
    seen = {}

    def client():
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
                wait_for(lambda: _up(http))
                seen["body"] = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12}).json()
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    caller, handler = threading.current_thread().name, signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=client)
    thread.start()
    app = create_app(engine, "tiny", policy="rsd", threshold=0.5, max_tokens=24)
    assert run_server(app, "127.0.0.1", port, log_level="warning") == 0
    thread.join(timeout=30)
    ref = engine.generate(PROMPT, policy="rsd", threshold=0.5, sampling=SamplingParams(max_new_tokens=12))
    assert seen["body"]["choices"][0]["text"] == ref.text
    assert stepped_on == {caller}  # never the HTTP thread, never a thread of the worker's own
    assert app.state.worker._thread is None
    assert signal.getsignal(signal.SIGTERM) is handler and used_pages(engine) == 0  # restored; no leak


def _up(http) -> bool:
    try:
        return http.get("/health").status_code == 200
    except httpx.TransportError:
        return False


def test_run_server_returns_uvicorns_startup_failure_when_its_port_is_taken(engine):
    import socket

    from arbitrage_fast.serve import run_server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = create_app(engine, "tiny", policy="rsd", threshold=0.5, max_tokens=24)
        t = time.monotonic()
        assert run_server(app, "127.0.0.1", port, log_level="critical") == 3  # uvicorn's STARTUP_FAILURE
        assert time.monotonic() - t < 10


def test_a_loop_whose_http_server_is_gone_aborts_what_is_in_flight_and_returns(engine):
    """Forced out, uvicorn's thread ends with a stream still open and its event loop closed: the
    engine loop must not step the orphan on, nor fail delivering to a closed loop; the request's
    pages go back and `run` returns."""
    import asyncio

    app = create_app(engine, "tiny", policy="rsd", threshold=0.5, max_tokens=24)
    worker = app.state.worker
    worker.on_caller = True
    loop = asyncio.new_event_loop()
    http = threading.Thread(target=loop.run_forever, daemon=True)
    http.start()
    asyncio.run_coroutine_threadsafe(
        worker.start(PROMPT, "every_step", None, SamplingParams(max_new_tokens=200, max_step_tokens=2), False), loop)
    checks = []

    def alive() -> bool:
        checks.append(used_pages(engine))
        if len(checks) == 4:  # the request is decoding by now: the HTTP side goes away
            loop.call_soon_threadsafe(loop.stop)
            http.join()
            loop.close()
        return len(checks) < 6

    worker.run(alive=alive)
    assert max(checks) > 0 and used_pages(engine) == 0  # it held pages, and gave them all back
    assert worker.requests["cancelled"] == 1 and not worker._handles
