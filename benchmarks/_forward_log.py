"""Where a batched run's time goes, forward by forward: for each model role, how many rows each
forward carried and how long the forwards with a prefill chunk took beside the decode-only ones.

If forwards mostly carry one or two rows, the scheduler (requests out of step) limits batching;
if they carry the whole batch but cost nearly as many times one row, the kernels do; if the
forwards with prefill chunks take most of the time, the prompts do (a prefill is compute-bound
and costs the same per token alone or batched).
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict


class ForwardLog:
    """Wraps each runner's `run` on the engine while the log is open (`with ForwardLog(engine)`)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.forwards: list[tuple[str, int, int, bool, float]] = []  # role, rows, tokens, has prefill, seconds

    def __enter__(self) -> "ForwardLog":
        for role, runner in self.engine.runners.items():
            original = runner.run

            def run(works, starts, _original=original, _role=role.label):
                t = time.perf_counter()
                out = _original(works, starts)
                self.forwards.append((_role, len(works), sum(len(w.tokens) for w in works),
                                      any(len(w.tokens) > 1 for w in works), time.perf_counter() - t))
                return out

            runner.run = run
        return self

    def __exit__(self, *exc) -> None:
        for runner in self.engine.runners.values():
            del runner.run  # the instance attribute goes; the class's method shows through again

    def summary(self) -> dict:
        """Per role: forwards, rows-per-forward histogram, and seconds and tokens split between
        decode-only forwards and forwards holding a prefill chunk (decode rows ride along)."""
        out = {}
        for role in sorted({f[0] for f in self.forwards}):
            mine = [f for f in self.forwards if f[0] == role]
            split = defaultdict(lambda: {"forwards": 0, "tokens": 0, "seconds": 0.0})
            per_rows = defaultdict(list)
            for _, rows, tokens, prefill, seconds in mine:
                kind = split["with_prefill" if prefill else "decode_only"]
                kind["forwards"] += 1
                kind["tokens"] += tokens
                kind["seconds"] += seconds
                if not prefill:
                    per_rows[rows].append(seconds)
            out[role] = {"forwards": len(mine), "seconds": sum(f[-1] for f in mine),
                         "rows_histogram": dict(sorted(Counter(f[1] for f in mine).items())),
                         **split,
                         "decode_ms_by_rows": {r: 1000 * sum(s) / len(s) for r, s in sorted(per_rows.items())}}
        return out
