"""Threshold sweeps against a scripted engine: schema, run plan and arithmetic."""

import json
from types import SimpleNamespace

import pytest

from arbitrage_fast.eval import EvalItem, run_sweep, sweep_plan
from arbitrage_fast.eval import sweep as sweep_module

ITEMS = [EvalItem("a", "What is 1+1?", "2"), EvalItem("b", "What is 2+2?", "4", prompt_text="P: 2+2")]


class ScriptedEngine:
    """Answers by a script keyed on (policy, threshold, prompt); records every call."""

    def __init__(self, script):
        self.script = script
        self.calls = []

    def generate(self, prompt, policy, threshold, sampling):
        self.calls.append((prompt, policy, threshold, sampling))
        text, stats = self.script[(policy, threshold, prompt)]
        return SimpleNamespace(text=text, stats=stats)


def stats(draft, target, escalations, steps, wall_s=0.5):
    return {"draft_tokens": draft, "target_tokens": target, "escalations": escalations,
            "steps": steps, "wall_s": wall_s}


SCRIPT = {
    ("target_only", None, "What is 1+1?"): ("The answer is \\boxed{2}.", stats(0, 40, 4, 4)),
    ("target_only", None, "P: 2+2"): ("The answer is \\boxed{4}.", stats(0, 60, 6, 6)),
    ("rsd", 0.5, "What is 1+1?"): ("The answer is \\boxed{2}.", stats(30, 10, 1, 4)),
    ("rsd", 0.5, "P: 2+2"): ("The answer is \\boxed{5}.", stats(50, 0, 0, 6)),
    ("rsd", 0.9, "What is 1+1?"): ("The answer is \\boxed{3}.", stats(20, 20, 2, 4)),
    ("rsd", 0.9, "P: 2+2"): ("The answer is \\boxed{4}.", stats(10, 50, 5, 6)),
}


def test_plan_runs_thresholdless_policies_once():
    assert sweep_plan(["target_only", "rsd", "draft_only"], {"rsd": [0.5, 0.9]}) == [
        ("target_only", None), ("rsd", 0.5), ("rsd", 0.9), ("draft_only", None)]
    with pytest.raises(ValueError, match="target_only.*no threshold"):
        sweep_plan(["target_only"], {"target_only": [0.5]})


def test_sweep_points_schema_and_arithmetic():
    engine = ScriptedEngine(SCRIPT)
    sampling = object()
    points = run_sweep(engine, ITEMS, ["target_only", "rsd"], {"rsd": [0.5, 0.9]}, sampling, None, progress=False)

    assert [(p["policy"], p["threshold"]) for p in points] == [("target_only", None), ("rsd", 0.5), ("rsd", 0.9)]
    assert all(call[3] is sampling for call in engine.calls)
    assert [c[0] for c in engine.calls[:2]] == ["What is 1+1?", "P: 2+2"]  # item.prompt, not question
    keys = {"policy", "threshold", "n", "accuracy", "latency_s", "escalation_rate",
            "draft_tokens", "target_tokens", "steps", "engine_wall_s"}
    assert all(set(p) == keys for p in points)
    json.dumps(points)  # serialisable as-is

    target, rsd_lo, rsd_hi = points
    assert target["n"] == 2 and target["accuracy"] == 1.0 and target["escalation_rate"] == 1.0
    assert target["target_tokens"] == 50.0 and target["draft_tokens"] == 0.0 and target["steps"] == 5.0
    assert rsd_lo["accuracy"] == 0.5 and rsd_lo["escalation_rate"] == pytest.approx(1 / 10)
    assert rsd_lo["draft_tokens"] == 40.0 and rsd_lo["target_tokens"] == 5.0
    assert rsd_hi["accuracy"] == 0.5 and rsd_hi["escalation_rate"] == pytest.approx(7 / 10)
    assert all(p["latency_s"] >= 0 and p["engine_wall_s"] == 0.5 for p in points)


def test_latency_is_measured_around_generate(monkeypatch):
    clock = iter([0.0, 1.5, 10.0, 12.5])  # two calls: 1.5 s and 2.5 s
    monkeypatch.setattr(sweep_module, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    point, = run_sweep(ScriptedEngine(SCRIPT), ITEMS, ["target_only"], {}, None, None, progress=False)
    assert point["latency_s"] == pytest.approx(2.0)


def test_custom_grader_and_progress_bar(capsys):
    points = run_sweep(ScriptedEngine(SCRIPT), ITEMS, ["rsd"], {"rsd": [0.9]}, None,
                       grader=lambda text, gold: True, progress=True)
    assert points[0]["accuracy"] == 1.0
    assert "rsd@0.9" in capsys.readouterr().err


def test_missing_stats_are_named():
    script = {("draft_only", None, "What is 1+1?"): ("2", {"steps": 1})}
    with pytest.raises(KeyError, match="draft_tokens"):
        run_sweep(ScriptedEngine(script), ITEMS[:1], ["draft_only"], {}, None, None, progress=False)


def test_empty_items_rejected():
    with pytest.raises(ValueError, match="at least one item"):
        run_sweep(ScriptedEngine({}), [], ["target_only"], {}, None, None, progress=False)
