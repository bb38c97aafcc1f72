"""Threshold sweeps against a scripted engine: schema, run plan and arithmetic."""

import json
from types import SimpleNamespace

import pytest

from arbitrage_fast.engine import Engine
from arbitrage_fast.eval import EvalItem, run_sweep, sweep_plan
from arbitrage_fast.eval import sweep as sweep_module
from arbitrage_fast.eval.intervals import wilson_interval
from arbitrage_fast.eval.provenance import code_revision

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
    # Problem-major order (each problem under every policy before the next); item.prompt, not question.
    assert [(c[0], c[1], c[2]) for c in engine.calls] == [
        ("What is 1+1?", "target_only", None), ("What is 1+1?", "rsd", 0.5), ("What is 1+1?", "rsd", 0.9),
        ("P: 2+2", "target_only", None), ("P: 2+2", "rsd", 0.5), ("P: 2+2", "rsd", 0.9)]
    keys = {"policy", "threshold", "n", "accuracy", "accuracy_ci", "latency_s", "cpu_s", "escalation_rate",
            "draft_tokens", "target_tokens", "steps", "engine_wall_s", "sittings", "mixed_sittings"}
    assert set(points[0]) == keys and all(set(p) == keys | {"vs_target_only"} for p in points[1:])
    json.dumps(points)  # serialisable as-is

    target, rsd_lo, rsd_hi = points
    assert target["accuracy_ci"] == list(wilson_interval(2, 2)) and rsd_lo["accuracy_ci"] == list(wilson_interval(1, 2))
    assert rsd_lo["vs_target_only"]["accuracy_diff"] == -0.5
    assert len({s for p in points for s in p["sittings"]}) == 1 and not any(p["mixed_sittings"] for p in points)
    assert target["n"] == 2 and target["accuracy"] == 1.0 and target["escalation_rate"] == 1.0
    assert target["target_tokens"] == 50.0 and target["draft_tokens"] == 0.0 and target["steps"] == 5.0
    assert rsd_lo["accuracy"] == 0.5 and rsd_lo["escalation_rate"] == pytest.approx(1 / 10)
    assert rsd_lo["draft_tokens"] == 40.0 and rsd_lo["target_tokens"] == 5.0
    assert rsd_hi["accuracy"] == 0.5 and rsd_hi["escalation_rate"] == pytest.approx(7 / 10)
    assert all(p["latency_s"] >= 0 and p["engine_wall_s"] == 0.5 for p in points)


def test_latency_and_cpu_time_are_measured_around_generate(monkeypatch):
    clock = iter([0.0, 1.5, 10.0, 12.5])  # two calls: 1.5 s and 2.5 s
    cpu = iter([0.0, 3.0, 5.0, 6.0])  # 3 s and 1 s of CPU
    monkeypatch.setattr(sweep_module, "time", SimpleNamespace(perf_counter=lambda: next(clock),
                                                              process_time=lambda: next(cpu)))
    point, = run_sweep(ScriptedEngine(SCRIPT), ITEMS, ["target_only"], {}, None, None, progress=False)
    assert point["latency_s"] == pytest.approx(2.0) and point["cpu_s"] == pytest.approx(2.0)


def test_records_resume_skips_solved_runs_and_gives_the_same_points(tmp_path):
    path = tmp_path / "runs.jsonl"
    info = {"dataset": "toy", "max_new_tokens": 8}
    full = run_sweep(ScriptedEngine(SCRIPT), ITEMS, ["target_only", "rsd"], {"rsd": [0.5, 0.9]},
                     progress=False, records=path, run_info=info)
    lines = path.read_text().splitlines()
    header = {**info, "plan": [["target_only", None], ["rsd", 0.5], ["rsd", 0.9]], "code": code_revision()}
    assert json.loads(lines[0]) == {"run": header} and len(lines) == 1 + 6
    assert json.loads(lines[1])["text"] == "The answer is \\boxed{2}."

    # An interruption after the fourth record, mid-way through writing the fifth.
    path.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])
    engine = ScriptedEngine(SCRIPT)
    resumed = run_sweep(engine, ITEMS, ["target_only", "rsd"], {"rsd": [0.5, 0.9]},
                        progress=False, records=path, run_info=info)
    assert [(c[0], c[1], c[2]) for c in engine.calls] == [("P: 2+2", "rsd", 0.5), ("P: 2+2", "rsd", 0.9)]
    assert [strip_point(p) for p in full] == [strip_point(p) for p in resumed]
    assert len(path.read_text().splitlines()) == 1 + 6

    # The resumed points join two sittings: each point's latency is flagged as not side by side.
    assert [p["mixed_sittings"] for p in resumed] == [False, True, True] and not any(p["mixed_sittings"] for p in full)
    assert [len(p["sittings"]) for p in resumed] == [1, 2, 2]  # target_only ran wholly in the first

    # Everything solved: a rerun does no work; a subset of the problems summarises only those.
    engine = ScriptedEngine(SCRIPT)
    one = run_sweep(engine, ITEMS[:1], ["target_only", "rsd"], {"rsd": [0.5, 0.9]}, progress=False,
                    records=path, run_info=info)
    assert engine.calls == [] and one[2]["n"] == 1 and one[2]["accuracy"] == 0.0


def strip_point(point):
    """A point without what depends on when it was measured: latencies and their ratios, sittings."""
    timing = ("latency_s", "cpu_s", "sittings", "mixed_sittings")
    out = {k: v for k, v in point.items() if k not in timing}
    if "vs_target_only" in out:
        out["vs_target_only"] = {k: v for k, v in out["vs_target_only"].items() if "speedup" not in k}
    return out


def test_a_report_of_an_unfinished_sweep_covers_the_problems_solved_under_every_policy(tmp_path):
    from arbitrage_fast.eval.sweep import points_from_records

    path = tmp_path / "runs.jsonl"
    info = {"dataset": "toy", "max_new_tokens": 8}
    plan = (["target_only", "rsd"], {"rsd": [0.5, 0.9]})
    run_sweep(ScriptedEngine(SCRIPT), ITEMS, *plan, progress=False, records=path, run_info=info)
    lines = path.read_text().splitlines()
    # Problem "b" solved under two of its three runs, a fourth record being written right now.
    partial = "\n".join(lines[:6]) + "\n" + lines[6][:20]
    path.write_text(partial)
    points, covered = points_from_records(ITEMS, *plan, records=path, run_info=info)
    assert [i.id for i in covered] == ["a"]
    only_a = run_sweep(ScriptedEngine(SCRIPT), ITEMS[:1], *plan, progress=False)
    assert [strip_point(p) for p in points] == [strip_point(p) for p in only_a]
    assert path.read_text() == partial  # read only: the line being written is left alone

    with pytest.raises(ValueError, match="another sweep"):
        points_from_records(ITEMS, *plan, records=path, run_info={**info, "max_new_tokens": 16})
    with pytest.raises(ValueError, match="differs in .'plan'."):
        points_from_records(ITEMS, ["target_only", "rsd"], {"rsd": [0.7]}, records=path, run_info=info)
    path.write_text("\n".join(lines[:3]) + "\n")  # problem "a" under two of its three runs
    with pytest.raises(ValueError, match="no problem solved under every policy"):
        points_from_records(ITEMS, *plan, records=path, run_info=info)
    with pytest.raises(ValueError, match="no records file"):
        points_from_records(ITEMS, *plan, records=tmp_path / "missing.jsonl", run_info=info)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no records file"):
        points_from_records(ITEMS, *plan, records=empty, run_info=info)
    assert empty.read_text() == ""  # a report never writes a header either


def test_records_refuse_another_plan_and_another_code_revision(tmp_path, monkeypatch):
    path = tmp_path / "runs.jsonl"
    info = {"dataset": "toy"}
    run_sweep(ScriptedEngine(SCRIPT), ITEMS, ["target_only", "rsd"], {"rsd": [0.5]}, progress=False,
              records=path, run_info=info)
    with pytest.raises(ValueError, match=r"differs in \['plan'\].*file has .*0\.5.*this run has .*0\.9"):
        run_sweep(ScriptedEngine(SCRIPT), ITEMS, ["target_only", "rsd"], {"rsd": [0.5, 0.9]}, progress=False,
                  records=path, run_info=info)
    monkeypatch.setattr(sweep_module, "code_revision", lambda: "0.1.0+src.000000000000")
    with pytest.raises(ValueError, match=r"differs in \['code'\]"):
        run_sweep(ScriptedEngine(SCRIPT), ITEMS, ["target_only", "rsd"], {"rsd": [0.5]}, progress=False,
                  records=path, run_info=info)


def test_records_of_another_sweep_are_refused(tmp_path):
    path = tmp_path / "runs.jsonl"
    run_sweep(ScriptedEngine(SCRIPT), ITEMS, ["target_only"], {}, progress=False, records=path,
              run_info={"dataset": "toy", "max_new_tokens": 8})
    with pytest.raises(ValueError, match=r"another sweep \(differs in \['max_new_tokens'\]: max_new_tokens: file has 8, this run has 16\)"):
        run_sweep(ScriptedEngine(SCRIPT), ITEMS, ["target_only"], {}, progress=False, records=path,
                  run_info={"dataset": "toy", "max_new_tokens": 16})


def test_audit_counts_escalations_that_did_not_improve():
    class PRM:  # scores a step by its length: longer is better
        def score(self, prompt, previous, step):
            return len(step)

    class AuditEngine(ScriptedEngine):
        def generate(self, prompt, policy, threshold, sampling):
            steps = [SimpleNamespace(text="long step", rejected_draft="short"),  # improved
                     SimpleNamespace(text="same", rejected_draft="four"),  # tie: wasted
                     SimpleNamespace(text="kept", rejected_draft=None)]
            return SimpleNamespace(text="\\boxed{2}", stats=stats(1, 1, 2, 3), steps=steps)

    point, = run_sweep(AuditEngine({}), ITEMS[:1], ["rsd"], {"rsd": [0.5]}, progress=False, audit_prm=PRM())
    assert point["wasted_escalation_share"] == 0.5


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


def test_speculation_acceptance_is_pooled_over_problems():
    """Accepted / proposed draft tokens over all problems of a point; absent where nothing was
    speculated, so plain points keep their schema."""
    spec = lambda proposed, accepted: {**stats(30, 10, 1, 4), "spec_proposed": proposed,  # noqa: E731
                                       "spec_accepted": accepted}
    script = {
        ("target_only", None, "What is 1+1?"): ("\\boxed{2}", stats(0, 40, 0, 4)),
        ("target_only", None, "P: 2+2"): ("\\boxed{4}", stats(0, 60, 0, 6)),
        ("rsd", 0.5, "What is 1+1?"): ("\\boxed{2}", spec(8, 6)),
        ("rsd", 0.5, "P: 2+2"): ("\\boxed{4}", spec(12, 3)),
    }
    target, rsd = run_sweep(ScriptedEngine(script), ITEMS, ["target_only", "rsd"], {"rsd": [0.5]}, progress=False)
    assert "spec_acceptance" not in target
    assert rsd["spec_acceptance"] == pytest.approx(9 / 20)  # pooled, not the mean of 0.75 and 0.25


class QueuedEngine:
    """The request interface over a script (SCRIPT by default): each request ends on the `step`
    after it was added, one request a step, oldest first; a prompt in `fail` ends with an error."""

    def __init__(self, fail=(), script=SCRIPT):
        self.fail, self.flight, self.added, self.aborted, self.forgotten = set(fail), {}, [], [], []
        self.script = script
        self.most_in_flight = 0

    def add_request(self, prompt, policy, threshold, sampling):
        rid = len(self.added)
        self.added.append((prompt, policy, threshold))
        self.flight[rid] = (prompt, policy, threshold)
        self.most_in_flight = max(self.most_in_flight, len(self.flight))
        return rid

    def step(self):
        rid = min(self.flight)
        prompt, policy, threshold = self.flight.pop(rid)
        if prompt in self.fail:
            return [SimpleNamespace(request_id=rid, finished=True, result=None, error=RuntimeError("boom"))]
        text, st = self.script[(policy, threshold, prompt)]
        return [SimpleNamespace(request_id=rid, finished=True, result=SimpleNamespace(text=text, stats=st),
                                error=None)]

    def forget(self, rid):
        self.forgotten.append(rid)

    def abort(self, rid):
        self.aborted.append(rid)
        return self.flight.pop(rid, None) is not None

    completions = Engine.completions  # the engine's own windowing over this request interface


def test_a_batched_sweep_keeps_its_batch_in_flight_and_gives_the_same_points(tmp_path):
    plan = (["target_only", "rsd"], {"rsd": [0.5, 0.9]})
    alone = run_sweep(ScriptedEngine(SCRIPT), ITEMS, *plan, progress=False)
    engine = QueuedEngine()
    records = tmp_path / "r.jsonl"
    points = run_sweep(engine, ITEMS, *plan, progress=False, records=records, batch=4)
    assert engine.most_in_flight == 4 and len(engine.added) == 6 and sorted(engine.forgotten) == list(range(6))
    keys = ("policy", "threshold", "accuracy", "escalation_rate", "target_tokens", "draft_tokens")
    assert [{k: p[k] for k in keys} for p in points] == [{k: p[k] for k in keys} for p in alone]
    assert all(p["cpu_s"] is None for p in points)
    assert points[1]["vs_target_only"]["cpu_speedup"] is None
    assert json.loads(records.read_text().splitlines()[0])["run"]["batch"] == 4
    with pytest.raises(ValueError, match="differs in \\['batch'\\]"):
        run_sweep(ScriptedEngine(SCRIPT), ITEMS, *plan, progress=False, records=records)
    with pytest.raises(ValueError, match="batch must be >= 1"):
        run_sweep(engine, ITEMS, *plan, progress=False, batch=0)


def test_a_failed_run_in_a_batched_sweep_aborts_the_runs_in_flight(tmp_path):
    engine = QueuedEngine(fail={"P: 2+2"})
    records = tmp_path / "r.jsonl"
    with pytest.raises(RuntimeError, match="boom"):
        run_sweep(engine, ITEMS, ["target_only", "rsd"], {"rsd": [0.5, 0.9]}, progress=False, records=records,
                  batch=4)
    # runs 0-2 (problem a) finished and were recorded; run 3 failed; the rest were aborted
    assert len(records.read_text().splitlines()) == 1 + 3
    assert engine.aborted and not engine.flight


# Five problems, so blocks of two leave a short last block.
FIVE = [EvalItem(f"p{i}", f"What is {i}+{i}?", str(2 * i)) for i in range(5)]
FIVE_SCRIPT = {(policy, threshold, item.prompt): (f"\\boxed{{{2 * i + (policy == 'rsd' and i % 2)}}}",
                                                  stats(10 * i, 5, i % 3, 3))
               for i, item in enumerate(FIVE) for policy, threshold in (("target_only", None), ("rsd", 0.5))}


def test_a_block_sweep_times_each_block_under_one_policy_as_a_whole(tmp_path, monkeypatch):
    """--block 2: the problems run in blocks of two consecutive problems, each block under one
    (policy, threshold) at a time with both in flight; each record's latency and CPU time are its
    block's share, and the speed-up is the ratio of the same blocks' times."""
    plan = (["target_only", "rsd"], {"rsd": [0.5]})
    alone = run_sweep(ScriptedEngine(FIVE_SCRIPT), FIVE, *plan, progress=False)
    ticks = iter(range(1000))  # each clock read one second (wall) and half a second (CPU) later
    monkeypatch.setattr(sweep_module, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks)),
                                                              process_time=lambda: next(ticks) / 2))
    engine, records = QueuedEngine(script=FIVE_SCRIPT), tmp_path / "r.jsonl"
    points = run_sweep(engine, FIVE, *plan, progress=False, records=records, block=2)
    # block-major, one (policy, threshold) per block, the block's problems added together
    assert [(p, pol) for p, pol, _ in engine.added] == [
        (FIVE[i].prompt, pol) for block in ([0, 1], [2, 3], [4]) for pol in ("target_only", "rsd") for i in block]
    assert engine.most_in_flight == 2
    keys = ("policy", "threshold", "n", "accuracy", "escalation_rate", "target_tokens", "draft_tokens")
    assert [{k: p[k] for k in keys} for p in points] == [{k: p[k] for k in keys} for p in alone]
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert lines[0]["run"]["block"] == 2 and "batch" not in lines[0]["run"]
    for r in lines[1:]:
        ids = r["block"]
        assert r["item"] in ids and ids in (["p0", "p1"], ["p2", "p3"], ["p4"])
        assert r["latency_s"] == pytest.approx(r["block_wall_s"] / len(ids))
        assert r["cpu_s"] == pytest.approx(r["block_cpu_s"] / len(ids))
        assert 0 < r["request_s"] <= r["block_wall_s"]
    # the speed-up is a ratio of summed block times; its interval resamples the three blocks
    target, rsd = ([r for r in lines[1:] if r["policy"] == pol] for pol in ("target_only", "rsd"))
    assert rsd and points[1]["vs_target_only"]["speedup"] == pytest.approx(
        sum(r["latency_s"] for r in target) / sum(r["latency_s"] for r in rsd))
    from arbitrage_fast.eval.intervals import paired_bootstrap

    sums = lambda rs: [sum(r["latency_s"] for r in rs if r["block"] == ids)  # noqa: E731
                       for ids in (["p0", "p1"], ["p2", "p3"], ["p4"])]
    _, low, high = paired_bootstrap(sums(rsd), sums(target), "speedup")
    assert points[1]["vs_target_only"]["speedup_ci"] == [low, high]

    # a block cut short while being written is run again whole; one recorded whole is not
    path_lines = records.read_text().splitlines()
    records.write_text("\n".join(path_lines[:-1]) + "\n" + path_lines[-1][:10])
    again = QueuedEngine(script=FIVE_SCRIPT)
    resumed = run_sweep(again, FIVE, *plan, progress=False, records=records, block=2)
    assert again.added == [(FIVE[4].prompt, "rsd", 0.5)]
    assert [strip_point(p) for p in resumed] == [strip_point(p) for p in points]
    with pytest.raises(ValueError, match="differs in \\['block'\\]"):
        run_sweep(QueuedEngine(script=FIVE_SCRIPT), FIVE, *plan, progress=False, records=records, block=3)
    with pytest.raises(ValueError, match="choose one"):
        run_sweep(engine, FIVE, *plan, progress=False, batch=2, block=2)
    with pytest.raises(ValueError, match="block must be >= 1"):
        run_sweep(engine, FIVE, *plan, progress=False, block=0)


def test_a_failed_run_in_a_block_aborts_its_block_and_records_none_of_it(tmp_path):
    engine = QueuedEngine(fail={FIVE[3].prompt}, script=FIVE_SCRIPT)
    records = tmp_path / "r.jsonl"
    with pytest.raises(RuntimeError, match="boom"):
        run_sweep(engine, FIVE, ["target_only"], {}, progress=False, records=records, block=2)
    # block p0+p1 was recorded; p2 ended, p3 failed: nothing of that block is kept
    assert [json.loads(line)["item"] for line in records.read_text().splitlines()[1:]] == ["p0", "p1"]
    assert not engine.flight


def test_a_failure_while_recording_a_batched_run_aborts_the_runs_in_flight():
    """The runs still in the engine are cancelled when recording one that ended fails (here its
    grading), not left running behind the error."""
    def grader(text, answer):
        raise RuntimeError("grader broke")

    engine = QueuedEngine()
    with pytest.raises(RuntimeError, match="grader broke"):
        run_sweep(engine, ITEMS, ["target_only", "rsd"], {"rsd": [0.5, 0.9]}, progress=False, batch=4, grader=grader)
    assert len(engine.aborted) == 3 and not engine.flight
