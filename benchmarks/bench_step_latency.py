"""End-to-end request latency per policy, with the escalation rate forced.

Draft and target are random-weight models of real shapes (Llama-3.2-1B / Llama-3.1-8B; one
shared stand-in tokenizer, so no token ever ends a step early). Random weights cannot
reason, so escalation is SIMULATED: the PRM is `ForcedEscalationPRM`, whose scores come from
a seeded RNG, exactly round(rate * steps) of each request's steps scoring below 0.5 at
random positions. RSD at threshold 0.5 then escalates exactly those steps, and every_step
(the paper's released code: the target writes every step, the same PRM rule picks which
to keep) makes the same decisions, so the two differ only in wasted target work.

Each request: a random prompt of --prompt-tokens, then --steps steps of exactly
--step-tokens tokens (SamplingParams(max_step_tokens=..., ignore_eos=True), greedy).
Policies: target_only, draft_only, rsd (forced rate), every_step (same forced decisions).

Steps are decoded the engine's GPU way by default: --decode-chunk 0 (adaptive chunks, at
most 2 host reads a step), each chunk replayed from CUDA graphs on a GPU (set
ARBITRAGE_FAST_CUDA_GRAPHS=0 to compare eager launches). The JSON records which decode
iterations were captured, host reads and rolled-back tokens per request.

    python benchmarks/bench_step_latency.py [--rates 0.25,0.5] [--steps 8 --step-tokens 32]
    python benchmarks/bench_step_latency.py --smoke
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _harness as H  # noqa: E402
import shapes  # noqa: E402

from arbitrage_fast import nvtx  # noqa: E402
from arbitrage_fast.config import EngineConfig, SamplingParams  # noqa: E402
from arbitrage_fast.engine import Engine  # noqa: E402
from arbitrage_fast.models.random_init import SyntheticTokenizer, random_model  # noqa: E402
from arbitrage_fast.prm.base import ProcessRewardModel  # noqa: E402
from arbitrage_fast.runtime.graphs import decode_graphs  # noqa: E402

THRESHOLD = 0.5
SIMULATION_NOTE = ("escalation is simulated: random weights cannot reason, so the PRM returns scores from a "
                   "seeded RNG, exactly round(rate*steps) steps per request below the 0.5 threshold")


class ForcedEscalationPRM(ProcessRewardModel):
    """Scores from a seeded RNG that make a threshold-0.5 policy escalate at `rate`.

    Each block of `period` consecutive calls has exactly round(rate * period) scores in
    [0, 0.5) at random positions and the rest in [0.5, 1). `reset()` replays the same
    sequence, so every policy and every repeat sees the same decisions.
    """

    def __init__(self, rate: float, seed: int, period: int) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"escalation rate must be in [0, 1], got {rate}")
        if period < 1:
            raise ValueError(f"period must be >= 1, got {period}")
        self.rate, self.seed, self.period = rate, seed, period
        self.reset()

    def reset(self) -> None:
        self._rng = random.Random(self.seed)
        self._block: list[bool] = []

    def score(self, prompt: str, previous_steps: list[str], step: str) -> float:
        if not self._block:
            k = round(self.rate * self.period)
            low = set(self._rng.sample(range(self.period), k))
            self._block = [i in low for i in reversed(range(self.period))]
        escalate = self._block.pop()
        u = self._rng.random()
        return THRESHOLD * u if escalate else THRESHOLD + (1.0 - THRESHOLD) * u


def build_engine(args, device) -> tuple[Engine, ForcedEscalationPRM]:
    draft_name, target_name = shapes.PAIRS["smoke" if args.smoke else "llama"]
    draft_cfg, target_cfg = shapes.hf_config(draft_name), shapes.hf_config(target_name)
    tokenizer = SyntheticTokenizer(target_cfg.vocab_size, target_cfg.bos_token_id, target_cfg.eos_token_id)
    with nvtx.range("init"):
        draft = random_model(draft_cfg, device, args.dtype, seed=args.seed, tokenizer=tokenizer, name=draft_name)
        target = random_model(target_cfg, device, args.dtype, seed=args.seed + 1, tokenizer=tokenizer,
                              name=target_name)
    prm = ForcedEscalationPRM(0.0, args.seed, args.steps)
    tokens = args.prompt_tokens + args.steps * args.step_tokens + 64
    per_token = sum(m.spec.kv_elems_per_token for m in (draft, target)) * torch.finfo(getattr(torch, args.dtype)).bits // 8
    config = EngineConfig(draft=f"random:{draft_name}", target=f"random:{target_name}", device=str(device),
                          dtype=args.dtype, prm=prm, kv_memory_bytes=max(2 * tokens * per_token, 64 << 20),
                          decode_chunk=args.decode_chunk)
    return Engine(config, draft=draft, target=target), prm


def run(args, device, results: H.ResultFile) -> None:
    """Time the policies group by group (the two baselines, then rsd and every_step per forced
    rate), interleaved within a group, and save each group's rows as soon as they exist."""
    engine, prm = build_engine(args, device)
    vocab = engine.draft_model.spec.vocab_size
    prompt = torch.randint(0, vocab, (args.prompt_tokens,), generator=torch.Generator().manual_seed(args.seed)).tolist()
    sampling = SamplingParams(max_new_tokens=args.steps * args.step_tokens, max_step_tokens=args.step_tokens,
                              ignore_eos=True)
    result = results.payload
    result.update(draft=engine.draft_model.path, target=engine.target_model.path, dtype=args.dtype,
                  device=H.device_name(device), prompt_tokens=args.prompt_tokens, steps=args.steps,
                  step_tokens=args.step_tokens, threshold=THRESHOLD, note=SIMULATION_NOTE,
                  decode_chunk=args.decode_chunk, env=H.environment(device), policies=[])
    last: dict[str, object] = {}

    def request(policy: str, rate: float | None, key: str):
        def fn():
            prm.rate = rate or 0.0
            prm.reset()
            threshold = THRESHOLD if rate is not None else None
            with nvtx.range(f"request.{key}"):
                last[key] = engine.generate(prompt, policy=policy, threshold=threshold, sampling=sampling)
        return fn

    groups = [[("target_only", None), ("draft_only", None)]]
    groups += [[("rsd", rate), ("every_step", rate)] for rate in args.rates]
    for cases in groups:
        try:
            timings = H.time_variants({_key(p, r): request(p, r, _key(p, r)) for p, r in cases}, device,
                                      args.repeats, args.warmup)
            rows = [_row(policy, rate, last[_key(policy, rate)], timings[_key(policy, rate)])
                    for policy, rate in cases]
        except Exception as e:
            rows = [H.error_row(e, policy=policy, forced_escalation_rate=rate) for policy, rate in cases]
        if len(rows) == 2 and rows[0]["policy"] == "rsd" and "error" not in rows[0] and "error" not in rows[1]:
            # What skipping the target's work is worth at the same decisions.
            rsd, every = rows
            rate = rsd["forced_escalation_rate"]
            rsd["speedup_vs_every_step"] = every["request_s"] / rsd["request_s"]
            rsd["same_decisions_as_every_step"] = (
                [s.source for s in last[_key("rsd", rate)].steps] == [s.source for s in last[_key("every_step", rate)].steps])
        result["policies"] += rows
        result["captured_graphs"] = {name: [list(k) for k in decode_graphs(runner).captured]
                                     for name, runner in (("draft", engine.draft), ("target", engine.target))}
        results.save()


def _row(policy: str, rate: float | None, res, t: H.Timing) -> dict:
    st = res.stats
    steps = st["steps"]
    return dict(
        policy=policy, forced_escalation_rate=rate,
        realised_escalation_rate=(st["escalations"] / steps) if policy in ("rsd", "every_step") else None,
        request_s=t.median_s, step_latency_s=t.median_s / steps, tok_s=len(res.token_ids) / t.median_s,
        steps=steps, tokens=len(res.token_ids), step_lengths=sorted({len(s.token_ids) for s in res.steps}),
        host_syncs_per_step=st["host_syncs"] / steps,
        stats={k: st[k] for k in ("escalations", "draft_tokens", "target_tokens", "draft_prefill_tokens",
                                  "target_prefill_tokens", "host_syncs", "decode_host_syncs",
                                  "rolled_back_tokens", "draft_s", "target_s", "prm_s")},
        timing=H.timing_dict(t), output_head=res.token_ids[:8])


def _key(policy: str, rate: float | None) -> str:
    return policy if rate is None else f"{policy}@{rate:g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    H.common_args(ap, repeats=3, warmup=1)
    ap.add_argument("--rates", default="0.25", help="forced escalation rates, comma-separated (each in [0, 1])")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="default 256; smoke 16")
    ap.add_argument("--steps", type=int, default=None, help="steps per request (default 8; smoke 4)")
    ap.add_argument("--step-tokens", type=int, default=None, help="tokens per step (default 32; smoke 4)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default bfloat16 (float32 for --smoke)")
    ap.add_argument("--decode-chunk", type=int, default=0,
                    help="EngineConfig.decode_chunk: 0 = adaptive chunks, CUDA graphs on a GPU (default); "
                         "1 = the per-token decoder; N = chunks of N")
    args = ap.parse_args(argv)
    device = H.resolve_device(args.device, args.smoke, args.threads)
    args.rates = [float(r) for r in args.rates.split(",")]
    args.prompt_tokens = args.prompt_tokens or (16 if args.smoke else 256)
    args.steps = args.steps or (4 if args.smoke else 8)
    args.step_tokens = args.step_tokens or (4 if args.smoke else 32)
    args.dtype = args.dtype or ("float32" if args.smoke else "bfloat16")
    results = H.ResultFile({}, args.out_dir, f"step_latency_{H.device_slug(device)}.json")
    with torch.inference_mode():
        run(args, device, results)
    result = results.payload
    parts = []
    for r in result["policies"]:
        key = _key(r["policy"], r["forced_escalation_rate"])
        if "error" in r:
            parts.append(f"{key} FAILED")
            continue
        extra = f" (x{r['speedup_vs_every_step']:.2f} vs every_step)" if "speedup_vs_every_step" in r else ""
        parts.append(f"{key} {r['step_latency_s'] * 1e3:.1f} ms/step{extra}")
    graphs = result["captured_graphs"]
    mode = f"decode_chunk={args.decode_chunk}, graphs " + ("on" if graphs["draft"] and graphs["target"] else "off")
    print(f"step latency ({result['steps']}x{result['step_tokens']} tokens, {result['device']}, {mode}; "
          f"escalation SIMULATED, random weights cannot reason): " + "; ".join(parts) + f" -> {results.path}")
    return 1 if any("error" in r for r in result["policies"]) else 0

if __name__ == "__main__":
    sys.exit(main())
