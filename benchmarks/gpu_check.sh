#!/usr/bin/env bash
# One visit to the GPU machine, in under 8 minutes: build, test, benchmark, summarise.
#
#   bash benchmarks/gpu_check.sh            (from anywhere; runs in the repository root)
#
# Parts run in order of importance, each under `timeout`; a failing part is recorded and the
# next one runs. Every part's budget is also clipped to what is left of the overall deadline
# (GPU_CHECK_BUDGET_S, default 465 s: the visit is sized for 8 minutes), so the script ends in
# time even when something hangs. The Triton kernel tests come last: the gpu-marked tests
# already run the kernels inside the engine against its per-token reference.
# The logs (as one file) and this run's benchmarks/results/*.json are copied to $OUT (when
# set) after every part, so a visit cut short still brings back what it got. torch is never
# installed: the extension is built against the torch already there (--no-build-isolation),
# with no dependency resolution and no index (--no-deps --no-index: the machine has no network).
#
# Knobs: GPU_CHECK_BUDGET_S (overall deadline), GPU_CHECK_SKIP_INSTALL=1 (already built),
# GPU_CHECK_SMOKE=1 (benchmarks with --smoke: checks this script itself on a CPU machine).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BUDGET_S="${GPU_CHECK_BUDGET_S:-465}"
START=$(date +%s)
LOGS="$ROOT/benchmarks/results/gpu_check_logs"
mkdir -p "$LOGS"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1
SUMMARY=()
FAILED=0

elapsed() { echo $(( $(date +%s) - START )); }

# Few files: the device machine brings back at most 8, so the logs travel as one.
save_out() {
  [[ -n "${OUT:-}" ]] || return 0
  mkdir -p "$OUT/results"
  cp -f "$ROOT"/benchmarks/results/{decode,router_overhead,step_latency}_*.json "$OUT/results/" 2>/dev/null || true
  for log in "$LOGS"/*.log; do
    [[ -f "$log" ]] && { echo "===== $(basename "$log")"; cat "$log"; }
  done >"$OUT/gpu_check_logs.txt" 2>/dev/null || true
}

# part NAME CAP_S TAIL_LINES CMD...: run CMD under timeout, log to $LOGS/NAME.log, print its tail.
part() {
  local name="$1" cap="$2" tail_n="$3"; shift 3
  local left=$(( BUDGET_S - $(elapsed) - 10 ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 15 )); then
    SUMMARY+=("$(printf '%-18s SKIPPED (no time left, %ss elapsed)' "$name" "$(elapsed)")")
    echo "=== $name: skipped, no time left"
    return 0
  fi
  echo "=== $name (limit ${limit}s, at $(elapsed)s)"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$? dt=$(( $(date +%s) - t0 ))
  tail -n "$tail_n" "$LOGS/$name.log"
  local status="ok"
  if (( rc == 124 || rc == 137 )); then status="TIMEOUT"; FAILED=1
  elif (( rc != 0 )); then status="FAILED (rc $rc)"; FAILED=1; fi
  SUMMARY+=("$(printf '%-18s %-16s %4ss' "$name" "$status" "$dt")")
  echo "--- $name: $status in ${dt}s (total $(elapsed)s)"
  save_out
}

echo "=== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv,noheader 2>&1 | head -n 4
python - <<'EOF'
import torch
print(f"python ok: torch {torch.__version__} cuda {torch.version.cuda} available={torch.cuda.is_available()}",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton import failed:", e)
EOF
rm -f benchmarks/results/decode_*.json benchmarks/results/router_overhead_*.json benchmarks/results/step_latency_*.json

# 1. Build and install the package with its CUDA extension (compile time dominates: all cores).
if [[ "${GPU_CHECK_SKIP_INSTALL:-0}" == 1 ]]; then
  SUMMARY+=("$(printf '%-18s %-16s' install 'skipped (asked)')")
else
  part install 240 15 python -m pip install --no-build-isolation --no-deps --no-index -e .
fi
part extension 30 5 python -c "import arbitrage_fast._C as C; print('has_cuda', C.has_cuda); assert C.has_cuda"

# 2. The gpu-marked tests. Only the files that hold some are collected: collecting the whole
#    suite imports modules whose packages (math-verify, gguf) the GPU machine lacks.
mapfile -t GPU_TESTS < <(grep -l "pytest.mark.gpu" tests/test_*.py)
part pytest_gpu 120 12 python -m pytest -m gpu -q -p no:cacheprovider "${GPU_TESTS[@]}"

# 3. Benchmarks, modest sizes (each prints one summary line; JSON in benchmarks/results/).
#    bench_step_latency decodes with decode_chunk=0 and CUDA graphs (its default).
if [[ "${GPU_CHECK_SMOKE:-0}" == 1 ]]; then
  part bench_decode 60 6 python benchmarks/bench_decode.py --smoke
  part bench_router 60 4 python benchmarks/bench_router_overhead.py --smoke
  part bench_steps 60 4 python benchmarks/bench_step_latency.py --smoke
else
  part bench_decode 100 6 python benchmarks/bench_decode.py --context 1024 --tokens 64 --repeats 3 --warmup 1
  part bench_router 45 4 python benchmarks/bench_router_overhead.py --context 512 --tokens 32 --repeats 5 --warmup 1
  part bench_steps 90 4 python benchmarks/bench_step_latency.py --steps 6 --step-tokens 24 --prompt-tokens 128 \
    --rates 0.25 --repeats 2 --warmup 1 --decode-chunk 0
fi

# 4. The Triton kernels against their torch references, on the GPU (whatever time is left).
part pytest_triton 90 8 python -m pytest tests/test_triton_*.py -q -p no:cacheprovider

# 5. Summary of what came back.
echo "=== results"
python - <<'EOF'
import json
from pathlib import Path

res = Path("benchmarks/results")
for path in sorted(res.glob("decode_*.json")):
    for r in json.loads(path.read_text()):
        frac = r.get("roofline_fraction")
        kind = "engine" if str(r.get("path", "")).startswith("engine") else "model"
        print(f"decode  {r['shape']:<14} {kind:<6} graphs={str(r.get('graphs')):<5} "
              + (f"{r['tok_s']:8.1f} tok/s  roofline {frac:.1%}" if r.get("tok_s") and frac is not None
                 else f"{r.get('tok_s')} tok/s" if r.get("tok_s") else f"ERROR {r.get('error')}"))
for path in sorted(res.glob("router_overhead_*.json")):
    r = json.loads(path.read_text())
    for mode in ("eager", "graphs"):
        m = r.get(mode)
        if m and "overhead_pct" in m:
            print(f"router  {mode:<6} step {m['draft_step']['median_s'] * 1e6:8.1f} us  "
                  f"+router {m['draft_step_router']['median_s'] * 1e6:8.1f} us  overhead {m['overhead_pct']:+.2f}%")
        elif m:
            print(f"router  {mode:<6} ERROR {m.get('error')}")
    print(f"router  kernels (us/call): {r['kernels']['us_per_call']} [{r['kernels']['impl']}]")
for path in sorted(res.glob("step_latency_*.json")):
    d = json.loads(path.read_text())
    print(f"steps   {d['draft']} -> {d['target']}, {d['steps']}x{d['step_tokens']} tokens, "
          f"decode_chunk={d.get('decode_chunk')}, graphs captured {d.get('captured_graphs')} ({d['note']})")
    for r in d["policies"]:
        key = r["policy"] + (f"@{r['forced_escalation_rate']}" if r["forced_escalation_rate"] is not None else "")
        extra = f"  x{r['speedup_vs_every_step']:.2f} vs every_step" if "speedup_vs_every_step" in r else ""
        print(f"steps   {key:<16} {r['step_latency_s'] * 1e3:8.2f} ms/step  {r['tok_s']:7.1f} tok/s"
              f"  escalated {r['stats']['escalations']}/{r['steps']}"
              f"  host reads/step {r.get('host_syncs_per_step', float('nan')):.2f}{extra}")
EOF

echo "=== parts"
printf '%s\n' "${SUMMARY[@]}"
echo "total $(elapsed)s of ${BUDGET_S}s budget"
save_out
exit $FAILED
