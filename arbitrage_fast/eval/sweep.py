"""Threshold sweeps: every policy at every threshold over the same problems, one point each.

The latency of a point is wall-clock time measured here, around
`engine.generate`, so it includes everything a user waits for (tokenisation,
scheduling, host syncs), not only what the engine chooses to time itself; the
engine's own `wall_s` is kept beside it as `engine_wall_s`, and the process CPU
time as `cpu_s` (other jobs on a shared machine sway it less than wall time).

Problems form the outer loop: each problem is solved under every (policy,
threshold) before the next one starts. A slow spell on a shared machine then
touches every policy alike, and a sweep stopped halfway still compares the
policies on the same problems. With a records file every solved (problem,
policy, threshold) is appended as one JSON line the moment it finishes, and a
rerun with the same file skips what is already there: an hours-long sweep on
real models survives an interruption. The file's header names everything that sets
an answer or a latency (models, PRM, caps, split, the (policy, threshold) plan, the
code revision); a rerun under any other header is refused, so one file never mixes
settings: a new point is a new file. Each record carries the sitting (process start)
that measured it, and a point whose records come from more than one sitting, or from
other sittings than its baseline's, is flagged: its latencies were not measured side by side.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from contextlib import closing
from datetime import datetime, timezone
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from .datasets import EvalItem
from .grading import grade
from .intervals import compare_to_baseline, wilson_interval
from .provenance import code_revision

# Policies whose behaviour has no threshold to sweep: they run once, at threshold None.
THRESHOLDLESS_POLICIES = frozenset({"target_only", "draft_only", "spec_decode", "spec_thinking"})
REQUIRED_STATS = ("draft_tokens", "target_tokens", "escalations", "steps", "wall_s")
# Kept when the engine reports them: token-level speculation inside the target's steps.
SPECULATION_STATS = ("spec_proposed", "spec_accepted")
# Every other point is compared with this one, paired by problem, when the sweep runs it.
BASELINE = "target_only"


def sweep_plan(policies: Sequence[str], thresholds: dict[str, list[float]]) -> list[tuple[str, float | None]]:
    """The (policy, threshold) runs of a sweep, in order.

    A policy listed in `thresholds` runs at each of its thresholds; any other
    policy runs once at None. Giving thresholds to a thresholdless policy is a
    mistake worth stopping for, not something to repeat silently.
    """
    plan: list[tuple[str, float | None]] = []
    for policy in policies:
        values = list(thresholds.get(policy) or [])
        if values and policy in THRESHOLDLESS_POLICIES:
            raise ValueError(f"policy {policy!r} has no threshold, but thresholds {values} were given for it")
        plan.extend((policy, t) for t in (values or [None]))
    return plan


def run_sweep(engine, items: Sequence[EvalItem], policies: Sequence[str], thresholds: dict[str, list[float]],
              sampling=None, grader: Callable[[str, str], bool] | None = None,
              progress: bool = True, audit_prm=None, generate_kwargs: dict | None = None,
              records: str | Path | None = None, run_info: dict | None = None,
              runs_out: dict | None = None, batch: int = 1, block: int = 1) -> list[dict]:
    """Run the sweep and return one point per (policy, threshold).

    Each point holds: policy, threshold, n, accuracy, latency_s (mean wall-clock
    seconds per problem), cpu_s (mean process CPU seconds), escalation_rate (total
    escalations / total steps), draft_tokens and target_tokens and steps (means per
    problem), engine_wall_s, and spec_acceptance where the target's steps were speculated
    (accepted / proposed draft tokens). With `audit_prm`, each escalated step's rejected draft and
    committed target step are both scored offline, adding `wasted_escalation_share`
    (escalations whose target step scored no better than the draft step it replaced;
    None when nothing escalated). Every point carries `accuracy_ci` (Wilson, 95%) and the
    `sittings` that measured it; with target_only in the plan every other point also
    carries `vs_target_only` (`compare_with_baseline`). `records` is a JSONL file to append to and resume
    from; its header is `run_info` (what the caller swept: models, dataset, token cap...)
    with the plan and the code revision added, and a file written under a different header is refused.
    `runs_out`, when given, receives each (policy, threshold)'s per-problem records, in problem
    order, for comparisons between points (`report.head_to_head`).

    `batch` > 1 keeps that many runs in flight in the engine at once (continuous batching), for
    sweeps whose choices rest on accuracy and escalations (a calibration on dev): greedy answers
    are those of batch 1 wherever the kernels give a row the same bits whatever the batch
    (`--batch-invariant` guarantees it), but a run's latency is its time in a shared batch and
    its CPU time is not its own, so its records keep `latency_s` as that time, `cpu_s` as None,
    and the header records the batch: a file never mixes the two kinds.

    `block` > 1 measures throughput instead, the figure of a server under load: the problems
    are cut into consecutive blocks of `block`, and each block runs under one (policy,
    threshold) at a time, all its problems in flight together, timed as a whole (wall and
    process CPU seconds, since nothing else runs meanwhile). Each record keeps its block's
    problem ids and its share of the block's times as `latency_s` and `cpu_s` (its own time in
    the batch as `request_s`), so a point's mean latency is its blocks' time per problem and a
    speed-up is a ratio of the same blocks' times, its interval resampling blocks (problems that
    shared a batch did not take their times independently). A block's records are written
    together once it ends; one cut short is run again whole.
    """
    if not items:
        raise ValueError("run_sweep needs at least one item")
    if batch < 1:
        raise ValueError(f"batch must be >= 1 run in flight, got {batch}")
    if block < 1:
        raise ValueError(f"block must be >= 1 problem timed together, got {block}")
    if batch > 1 and block > 1:
        raise ValueError("batch (runs in flight, untimed) and block (problems timed together) are two ways to "
                         "batch a sweep: choose one")
    grader = grade if grader is None else grader
    plan = sweep_plan(policies, thresholds)
    log = RecordLog(records, records_header(_with_batching(run_info or {}, batch, block), plan))
    todo = [(item, policy, threshold) for item in items for policy, threshold in plan
            if (item.id, policy, threshold) not in log.done]

    def record(item, policy, threshold, result, wall, cpu, **extra) -> None:
        log.append({**_record(engine, item, policy, threshold, result, wall, cpu, grader, audit_prm, log.sitting),
                    **extra})
        bar.update(1)

    with tqdm(total=len(plan) * len(items), initial=len(plan) * len(items) - len(todo),
              disable=not progress, unit="run") as bar:
        if block > 1:
            _run_blocks(engine, items, plan, block, log, sampling, generate_kwargs or {}, record, bar)
        elif batch == 1:
            for item, policy, threshold in todo:
                bar.set_description(f"{item.id} {_label(policy, threshold)}")
                wall, cpu = time.perf_counter(), time.process_time()
                result = engine.generate(item.prompt, policy=policy, threshold=threshold, sampling=sampling,
                                         **(generate_kwargs or {}))
                record(item, policy, threshold, result, time.perf_counter() - wall, time.process_time() - cpu)
        else:
            _run_batched(engine, todo, batch, sampling, generate_kwargs or {}, record)
    return _points(log, items, plan, audit_prm is not None, runs_out)


def _run_batched(engine, todo: list, batch: int, sampling, generate_kwargs: dict, record) -> None:
    """`todo`'s runs through the engine's request interface, `batch` in flight at a time, each
    recorded as it ends (in the order runs end)."""
    with closing(engine.completions(_requests(todo, sampling, generate_kwargs), batch)) as ended:
        for (item, policy, threshold), result, seconds in ended:  # a failed record() aborts the rest on close
            record(item, policy, threshold, result, seconds, None)


def _run_blocks(engine, items: Sequence[EvalItem], plan, block: int, log: "RecordLog", sampling,
                generate_kwargs: dict, record, bar) -> None:
    """Each block of `block` consecutive problems under each (policy, threshold) in turn, all in
    flight together and timed as a whole; blocks already recorded whole are skipped."""
    for start in range(0, len(items), block):
        members = list(items[start:start + block])
        ids = [item.id for item in members]
        for policy, threshold in plan:
            if all(log.done.get((i, policy, threshold), {}).get("block") == ids for i in ids):
                continue
            bar.set_description(f"{ids[0]}+{len(ids) - 1} {_label(policy, threshold)}")
            wall, cpu = time.perf_counter(), time.process_time()
            runs = [(item, policy, threshold) for item in members]
            with closing(engine.completions(_requests(runs, sampling, generate_kwargs), len(members))) as flight:
                ended = {run[0].id: (result, seconds) for run, result, seconds in flight}
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            for item in members:  # recorded after the clock stops: grading and audits are not the block's time
                result, seconds = ended[item.id]
                record(item, policy, threshold, result, wall / len(members), cpu / len(members),
                       block=ids, block_wall_s=wall, block_cpu_s=cpu, request_s=seconds)


def _requests(runs: list, sampling, generate_kwargs: dict):
    """(run, `add_request` arguments) of each (item, policy, threshold) run, for `Engine.completions`."""
    for run in runs:
        item, policy, threshold = run
        yield run, {"prompt": item.prompt, "policy": policy, "threshold": threshold, "sampling": sampling,
                    **generate_kwargs}


def points_from_records(items: Sequence[EvalItem], policies: Sequence[str], thresholds: dict[str, list[float]],
                        records: str | Path, run_info: dict, audited: bool = False,
                        runs_out: dict | None = None, batch: int = 1,
                        block: int = 1) -> tuple[list[dict], list[EvalItem]]:
    """The points of a sweep still running or stopped early, from its records file alone: over the
    problems solved under every (policy, threshold) so far, so each point compares the same
    problems. Nothing is run and the file is only read (a sweep may be appending to it).
    Returns the points and the problems they cover."""
    plan = sweep_plan(policies, thresholds)
    log = RecordLog(records, records_header(_with_batching(run_info, batch, block), plan), read_only=True)
    complete = [item for item in items if all((item.id, policy, threshold) in log.done for policy, threshold in plan)]
    if not complete:
        raise ValueError(f"records file {records} holds no problem solved under every policy and threshold of this sweep")
    return _points(log, complete, plan, audited, runs_out), complete


def points_from_record_file(records: str | Path) -> tuple[dict, list[dict]]:
    """(header, points) of a finished records file whatever its header: the plan is the
    (policy, threshold) pairs in the order first seen, over the problems solved under all of
    them. For re-reporting committed evidence; a sweep resumes only through `RecordLog`."""
    header, runs = runs_from_record_file(records)
    return header, points_of_runs(runs)


def points_of_runs(runs: dict) -> list[dict]:
    """The points of `runs_from_record_file`'s runs, with their comparisons."""
    runs = list(runs.values())
    return points_with_comparisons(runs, audited="audited" in runs[0][0])


def runs_from_record_file(records: str | Path) -> tuple[dict, dict]:
    """(header, {(policy, threshold): records in problem order}) of a finished records file, over
    the problems solved under every (policy, threshold) it holds, in the order first seen."""
    lines = Path(records).read_text().splitlines()
    header = json.loads(lines[0]).get("run") or {}
    done = {}
    for line in lines[1:]:
        record = json.loads(line)
        done[(record["item"], record["policy"], record["threshold"])] = record
    plan = list(dict.fromkeys((policy, threshold) for _, policy, threshold in done))
    items = [i for i in dict.fromkeys(item for item, _, _ in done) if all((i, *run) in done for run in plan)]
    if not items:
        raise ValueError(f"records file {records} holds no problem solved under every policy and threshold")
    return header, {run: [done[(item, *run)] for item in items] for run in plan}


def _with_batching(run_info: dict, batch: int, block: int) -> dict:
    """A batched sweep's header names its batch or block; one problem at a time adds nothing, so
    files written before batched sweeps existed still resume."""
    return {**run_info, **({"batch": batch} if batch > 1 else {}), **({"block": block} if block > 1 else {})}


def records_header(run_info: dict, plan: list[tuple[str, float | None]]) -> dict:
    """What a records file must agree on to be resumed: the caller's settings, the plan, the code."""
    return {**run_info, "plan": [[policy, threshold] for policy, threshold in plan], "code": code_revision()}


def _points(log: "RecordLog", items: Sequence[EvalItem], plan, audited: bool, runs_out: dict | None) -> list[dict]:
    runs = [[log.done[(item.id, policy, threshold)] for item in items] for policy, threshold in plan]
    if runs_out is not None:
        runs_out.update(zip(plan, runs))
    return points_with_comparisons(runs, audited)


def points_with_comparisons(runs: list[list[dict]], audited: bool = False) -> list[dict]:
    """One point per run (the records of one (policy, threshold), in one problem order), each
    compared with the target_only run when there is one."""
    points = [summarise(records, audited) for records in runs]
    baseline = next((i for i, p in enumerate(points) if p["policy"] == BASELINE), None)
    if baseline is None:
        return points
    for point, records in zip(points, runs):
        if point["policy"] == BASELINE:
            continue
        point["vs_target_only"] = compare_to_baseline(records, runs[baseline])
        # Latencies compared across sittings met different machine loads: say so beside the ratio.
        point["mixed_sittings"] = (len(point["sittings"]) > 1
                                   or point["sittings"] != points[baseline]["sittings"])
    points[baseline]["mixed_sittings"] = len(points[baseline]["sittings"]) > 1
    return points


def _label(policy: str, threshold: float | None) -> str:
    return policy if threshold is None else f"{policy}@{threshold:g}"


def _record(engine, item, policy, threshold, result, wall: float, cpu: float | None, grader, audit_prm,
            sitting: str) -> dict:
    """One problem's result under one (policy, threshold), as a JSON-able record."""
    missing = [key for key in REQUIRED_STATS if key not in result.stats]
    if missing:
        raise KeyError(f"engine result stats lack {missing[0]!r} (have {sorted(result.stats)}); "
                       f"a sweep needs {list(REQUIRED_STATS)}")
    record = {"item": item.id, "policy": policy, "threshold": threshold,
              "correct": bool(grader(result.text, item.answer)), "latency_s": wall, "cpu_s": cpu, "sitting": sitting,
              **{key: result.stats[key] for key in REQUIRED_STATS},
              **{key: result.stats[key] for key in SPECULATION_STATS if key in result.stats}, "text": result.text}
    if audit_prm is not None:
        record["audited"], record["wasted"] = audit_escalations(engine, item.prompt, result, audit_prm)
    return record


def summarise(records: list[dict], audited: bool = False) -> dict:
    """One sweep point from the records of one (policy, threshold) over the sweep's problems."""
    n = len(records)
    total = {key: sum(r[key] for r in records) for key in (*REQUIRED_STATS, "latency_s")}
    # A batched sweep's runs share the process's CPU: no record has a CPU time of its own.
    total["cpu_s"] = None if any(r["cpu_s"] is None for r in records) else sum(r["cpu_s"] for r in records)
    correct = sum(bool(r["correct"]) for r in records)
    point = {
        "policy": records[0]["policy"],
        "threshold": records[0]["threshold"],
        "n": n,
        "accuracy": correct / n,
        "accuracy_ci": list(wilson_interval(correct, n)),
        "latency_s": total["latency_s"] / n,
        "cpu_s": None if total["cpu_s"] is None else total["cpu_s"] / n,
        "escalation_rate": total["escalations"] / total["steps"] if total["steps"] else 0.0,
        "draft_tokens": total["draft_tokens"] / n,
        "target_tokens": total["target_tokens"] / n,
        "steps": total["steps"] / n,
        "engine_wall_s": total["wall_s"] / n,
        # Records written before sittings were kept share one unnamed sitting.
        "sittings": sorted({r.get("sitting") or "unrecorded" for r in records}),
    }
    proposed = sum(r.get("spec_proposed", 0) for r in records)
    if proposed:  # the share of the draft's proposed tokens the target kept
        point["spec_acceptance"] = sum(r.get("spec_accepted", 0) for r in records) / proposed
    if audited:
        escalations = sum(r["audited"] for r in records)
        point["wasted_escalation_share"] = sum(r["wasted"] for r in records) / escalations if escalations else None
    return point


class RecordLog:
    """Solved runs keyed by (problem id, policy, threshold), mirrored to a JSONL file when given.

    The file's first line is {"run": run_info}; every further line is one record. A `read_only`
    log never writes: a last line cut short (a sweep writing it now) is skipped, not repaired.
    `sitting` names this log's sitting: its start time (UTC), process id and a random tag (two
    sittings of one process may start within the same second).
    """

    def __init__(self, path: str | Path | None, run_info: dict, read_only: bool = False):
        self.path = None if path is None else Path(path)
        self.read_only = read_only
        self.sitting = f"{datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.done: dict[tuple, dict] = {}
        if self.path is None:
            return
        if self.path.is_file() and self.path.stat().st_size:
            self._resume(run_info)
        elif read_only:
            raise ValueError(f"no records file at {self.path}: a report needs the --records file of a sweep")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"run": run_info}) + "\n")

    def _resume(self, run_info: dict) -> None:
        lines = self.path.read_text().splitlines()
        header = json.loads(lines[0]).get("run")
        if header != run_info:
            header = header or {}
            differ = sorted(k for k in set(header) | set(run_info) if header.get(k) != run_info.get(k))
            detail = "; ".join(f"{k}: file has {header.get(k)!r}, this run has {run_info.get(k)!r}" for k in differ)
            raise ValueError(f"records file {self.path} belongs to another sweep (differs in {differ}: {detail}); "
                             "a new setting is a new file: pass a new --records path")
        for number, line in enumerate(lines[1:], start=2):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # a record cut short by the interruption: solve it again
                    if not self.read_only:
                        self.path.write_text("\n".join(lines[:-1]) + "\n")
                    break
                raise ValueError(f"{self.path}:{number} is not a JSON record") from None
            self.done[(record["item"], record["policy"], record["threshold"])] = record

    def append(self, record: dict) -> None:
        self.done[(record["item"], record["policy"], record["threshold"])] = record
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def audit_escalations(engine, prompt: str, result, prm) -> tuple[int, int]:
    """(escalations audited, escalations that did not improve the PRM score) for one result."""
    audited = wasted = 0
    previous: list[str] = []
    for step in result.steps:
        if step.rejected_draft is not None:
            d = prm.score(prompt, previous, step.rejected_draft)
            t = prm.score(prompt, previous, step.text)
            audited += 1
            wasted += t <= d
        previous.append(step.text)
    return audited, wasted
