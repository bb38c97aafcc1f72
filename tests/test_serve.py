"""The HTTP server: OpenAI-shaped answers equal to the engine's, step streaming, clear 400s, no leaks."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from fastapi.testclient import TestClient  # noqa: E402

from arbitrage_fast import Engine, EngineConfig, SamplingParams  # noqa: E402
from arbitrage_fast.serve import create_app  # noqa: E402
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
    steps = body["arbitrage"]["steps"]
    assert [s["text"] for s in steps] == [s.text for s in ref.steps] and len(steps) == 5
    assert [s["source"] for s in steps] == [s.source for s in ref.steps]
    assert body["arbitrage"]["policy"] == "rsd" and body["arbitrage"]["threshold"] == 0.7
    assert used_pages(engine) == 0


def test_server_defaults_apply_when_the_request_names_no_policy(client, engine):
    body = client.post("/v1/completions", json={"prompt": PROMPT}).json()
    ref = engine.generate(PROMPT, policy="rsd", threshold=0.5, sampling=SamplingParams(max_new_tokens=24))
    assert body["choices"][0]["text"] == ref.text
    assert body["arbitrage"]["policy"] == "rsd" and body["arbitrage"]["threshold"] == 0.5


def test_stream_sends_one_event_per_step_and_the_same_text(client, engine):
    request = {"prompt": PROMPT, "max_tokens": 20, "policy": "rsd", "threshold": 0.7, "max_step_tokens": 4}
    whole = client.post("/v1/completions", json=request).json()
    with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    steps, final = events[:-2], events[-2]
    assert "".join(e["choices"][0]["text"] for e in steps) == whole["choices"][0]["text"]
    assert [e["arbitrage"]["step"]["source"] for e in steps] == [s["source"] for s in whole["arbitrage"]["steps"]]
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


@pytest.mark.parametrize("path, body, status, match", [
    ("/v1/completions", {"prompt": ""}, 400, "prompt is empty"),
    ("/v1/completions", {"prompt": "word " * 300}, 400, "context holds"),
    ("/v1/completions", {"prompt": PROMPT, "threshold": -0.5}, 400, "out of range"),
    ("/v1/completions", {"prompt": PROMPT, "policy": "nonsense"}, 400, "unknown policy"),
    ("/v1/completions", {"prompt": PROMPT, "policy": "arbitrage"}, 400, "router"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": PROMPT, "n": 2}, 400, "n:"),
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
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny"]


# --- a real server: disconnects and concurrent clients ----------------------------------------


@pytest.fixture(scope="module")
def server(engine):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(engine, "tiny", policy="rsd", threshold=0.5, max_tokens=24),
                            host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=30)


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
            assert json.loads(first[len("data: "):])["arbitrage"]["step"]["text"]
        # Gone after one step of a long answer: the server must cancel it and free its KV.
        wait_for(lambda: http.get("/health").json()["requests"]["cancelled"] == before["cancelled"] + 1)
        assert http.get("/health").json()["kv"]["used_pages"] == 0
        assert http.get("/health").json()["requests"]["finished"] == before["finished"]
        after = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8})
        assert after.status_code == 200


def test_concurrent_requests_queue_and_each_gets_its_own_answer(server, engine):
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
