"""The labelling benchmark's forward log (benchmarks/_forward_log.py) counts what the engine
really ran: every fed token once, one forward per role per iteration, rows per forward as the
scheduler batched them; and it leaves the engine as it found it."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from arbitrage_fast import SamplingParams
from arbitrage_fast.runtime.model_runner import ModelRunner
from helpers.length_prm import MIXED_PROMPTS, build_policy_folders, policy_engine

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _forward_log():
    spec = importlib.util.spec_from_file_location("forward_log", BENCHMARKS / "_forward_log.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("forward_log", module)
    spec.loader.exec_module(module)
    return module.ForwardLog


def test_the_log_counts_every_fed_token_and_rows_per_forward(tmp_path, monkeypatch):
    engine = policy_engine(build_policy_folders(tmp_path, router_seed=3))
    seen = []  # what the runners ran, recorded beneath the log
    original = ModelRunner.run
    monkeypatch.setattr(ModelRunner, "run", lambda self, works, starts: (
        seen.append((self.role.label, [len(w.tokens) for w in works])), original(self, works, starts))[1])
    sp = SamplingParams(max_new_tokens=12, max_step_tokens=4, ignore_eos=True)
    prompts = MIXED_PROMPTS[:4]
    with _forward_log()(engine) as log:
        results = engine.generate_batch(prompts, policy="oracle", threshold=0.0, sampling=sp)
    summary = log.summary()
    assert set(summary) == {"draft", "target"} and all(r.token_ids for r in results)
    for role, s in summary.items():
        mine = [lens for r, lens in seen if r == role]
        decode = [lens for lens in mine if max(lens) == 1]
        assert s["forwards"] == len(mine) == sum(s["rows_histogram"].values())
        assert s["rows_histogram"] == {n: sum(len(m) == n for m in mine) for n in sorted({len(m) for m in mine})}
        assert s["decode_only"]["forwards"] == len(decode)
        assert s["decode_only"]["tokens"] == sum(map(len, decode))
        assert s["with_prefill"]["tokens"] == sum(map(sum, mine)) - sum(map(len, decode))
        assert s["seconds"] >= s["decode_only"]["seconds"] + s["with_prefill"]["seconds"] - 1e-9
    assert max(summary["draft"]["rows_histogram"]) == len(prompts)  # the batch shared forwards
    for runner in engine.runners.values():
        assert "run" not in vars(runner)  # the engine is left as it was
    assert engine.kv_stats()["used_pages"] == 0
