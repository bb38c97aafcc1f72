"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis): whatever a
client sends that the schema admits (and much that it does not), the server answers without a
5xx, only with status codes the schema documents, and leaks no KV page.

Bounded: a fixed number of generated requests per operation and short generations, against a
real uvicorn server on loopback.
"""
from __future__ import annotations

import time

import pytest

schemathesis = pytest.importorskip("schemathesis")
uvicorn = pytest.importorskip("uvicorn")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import status_code_conformance  # noqa: E402

from arbitrage_fast import Engine, EngineConfig  # noqa: E402
from arbitrage_fast.serve import create_app  # noqa: E402
from helpers.live_server import serve_on_loopback  # noqa: E402
from helpers.tiny_models import build_tiny_lm  # noqa: E402

EXAMPLES_PER_OPERATION = 60


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    draft = build_tiny_lm(root / "draft", "llama", hidden=32, layers=1, seed=1, max_positions=64, boundary_bias=4.0)
    target = build_tiny_lm(root / "target", "llama", hidden=48, layers=1, seed=2, max_positions=64, boundary_bias=4.0)
    engine = Engine(EngineConfig(draft=str(draft), target=str(target), kv_pages=64, min_block_size=4))
    # A small token cap keeps each generated request cheap; clients may still ask for more.
    app = create_app(engine, "tiny", policy="rsd", threshold=0.5, max_tokens=4, max_body_bytes=4096)
    with serve_on_loopback(app) as url:
        yield engine, url


def test_no_generated_request_gets_a_5xx_or_leaks_a_page(served):
    engine, url = served
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/health", "/metrics"}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def call(case):
            if case.body is not None and isinstance(case.body, dict):
                # Bound the work of one example: the schema allows any token cap.
                for key in ("max_tokens", "max_completion_tokens"):
                    if isinstance(case.body.get(key), int):
                        case.body[key] = min(case.body[key], 8)
            case.call_and_validate(base_url=url, checks=[not_a_server_error, status_code_conformance],
                                   timeout=60)

        call()
    deadline = time.monotonic() + 30
    while engine.kv_stats()["used_pages"] and time.monotonic() < deadline:
        time.sleep(0.1)  # streamed answers finish on the engine thread
    assert engine.kv_stats()["used_pages"] == 0
