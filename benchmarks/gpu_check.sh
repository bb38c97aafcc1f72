#!/usr/bin/env bash
# One visit to the GPU machine, in under 8 minutes: build, test, benchmark, summarise.
#
#   bash benchmarks/gpu_check.sh            (from anywhere; runs in the repository root)
#
# Parts run in order of importance, each under `timeout`; a failing part is recorded and the
# next one runs. Every part's budget is also clipped to what is left of the overall deadline
# (GPU_CHECK_BUDGET_S, default 465 s: the visit is sized for 8 minutes), so the script ends in
# time even when something hangs. The Triton kernel tests run right after the build, in a
# fixed slot: they are the cheapest evidence that the kernels are right on the device, and a
# slow benchmark must not crowd them out.
# Every benchmark rewrites its JSON after each row, so a part cut short by its timeout keeps
# the rows it finished. The logs (as one file) and this run's benchmarks/results/*.json are
# copied to $OUT (when set) after every part, and the summary prints however the script ends
# (a trap), so a visit cut short still brings back what it got. torch is never installed: the
# extension is built against the torch already there (--no-build-isolation), with no
# dependency resolution and no index (--no-deps, PIP_NO_INDEX: the machine has no network;
# the Hugging Face libraries are told so too).
#
# Knobs: PY (the interpreter that has torch; default python3), GPU_CHECK_BUDGET_S (overall
# deadline), GPU_CHECK_SKIP_INSTALL=1 (already built), GPU_CHECK_SMOKE=1 (benchmarks with
# --smoke and no CUDA extension required: checks this script itself on a CPU machine, e.g.
# `GPU_CHECK_SMOKE=1 GPU_CHECK_SKIP_INSTALL=1 bash benchmarks/gpu_check.sh`),
# TORCH_CUDA_ARCH_LIST (default: the visible GPU's, "9.0a" on an H200; see CMakeLists.txt),
# WHEELS (default benchmarks/wheels, ignored by git): pure-Python wheels the GPU image lacks,
# installed before the build with no index and no dependencies. The engine imports without
# `gguf`, but loading a GGUF file (repacked for the GPU) and its tests need it, so bring it along:
#   pip download --no-deps -d benchmarks/wheels gguf==$(python -c 'import gguf, importlib.metadata as m; print(m.version("gguf"))')
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-465}"
START=$(date +%s)
LOGS="$ROOT/benchmarks/results/gpu_check_logs"
mkdir -p "$LOGS"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1
# The architectures the build compiles for, decided here so the log shows them up front.
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')"
  if [[ "$cap" =~ ^[0-9]+\.[0-9]+$ ]]; then
    (( ${cap%%.*} >= 9 )) && cap="${cap}a"  # Hopper and newer: their arch-specific features
    TORCH_CUDA_ARCH_LIST="$cap"
  else
    TORCH_CUDA_ARCH_LIST="9.0a"
  fi
fi
export TORCH_CUDA_ARCH_LIST
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
  # In the background and waited for: bash runs a signal's trap only between commands, and
  # `wait` is one it interrupts, so a caller's kill prints the summary at once.
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1 &
  CHILD=$!
  wait "$CHILD"
  local rc=$? dt=$(( $(date +%s) - t0 ))
  CHILD=""
  tail -n "$tail_n" "$LOGS/$name.log"
  local status="ok"
  if (( rc == 124 || rc == 137 )); then status="TIMEOUT"; FAILED=1
  elif (( rc != 0 )); then status="FAILED (rc $rc)"; FAILED=1; fi
  SUMMARY+=("$(printf '%-18s %-16s %4ss' "$name" "$status" "$dt")")
  echo "--- $name: $status in ${dt}s (total $(elapsed)s)"
  save_out
}

# The summary of what came back prints however the script ends (done, or killed by the
# caller's timeout): the rows already on disk are worth reading either way.
summary() {
  trap - EXIT
  echo "=== results"
  "$PY" benchmarks/summarize_results.py benchmarks/results
  echo "=== parts"
  printf '%s\n' "${SUMMARY[@]}"
  echo "total $(elapsed)s of ${BUDGET_S}s budget"
  save_out
}
CHILD=""
trap summary EXIT
# Stop the running part (timeout passes the signal on), then exit, which runs the EXIT trap.
trap '[[ -n "$CHILD" ]] && kill -TERM "$CHILD" 2>/dev/null; FAILED=1; exit 143' TERM INT

echo "=== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv,noheader 2>&1 | head -n 4
echo "PY=$PY TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
"$PY" - <<'EOF'
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
  WHEELS="${WHEELS:-benchmarks/wheels}"
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    part wheels 30 5 "$PY" -m pip install --no-deps --no-index "$WHEELS"/*.whl
  fi
  part install 240 15 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
fi
if [[ "${GPU_CHECK_SMOKE:-0}" == 1 ]]; then
  part extension 30 5 "$PY" -c "import arbitrage_fast._C as C; print('has_cuda', C.has_cuda)"
else
  part extension 30 5 "$PY" -c "import arbitrage_fast._C as C; print('has_cuda', C.has_cuda); assert C.has_cuda"
fi

# 2. The Triton kernels against their torch references, on the device, in a fixed slot.
part pytest_triton 75 8 "$PY" -m pytest tests/test_triton_*.py -q -p no:cacheprovider

# 3. The gpu-marked tests. Only the files that hold some are collected: collecting the whole
#    suite imports modules whose packages (math-verify, gguf) the GPU machine lacks; a file
#    that still fails to import (no wheels brought) is reported and the others run.
mapfile -t GPU_TESTS < <(grep -l "pytest.mark.gpu" tests/test_*.py)
part pytest_gpu 110 12 "$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors "${GPU_TESTS[@]}"

# 4. Benchmarks, modest sizes (each prints one summary line; JSON in benchmarks/results/).
#    bench_step_latency decodes with decode_chunk=0 and CUDA graphs (its default).
if [[ "${GPU_CHECK_SMOKE:-0}" == 1 ]]; then
  part bench_decode 60 6 "$PY" benchmarks/bench_decode.py --smoke
  part bench_router 60 4 "$PY" benchmarks/bench_router_overhead.py --smoke
  part bench_steps 60 4 "$PY" benchmarks/bench_step_latency.py --smoke
else
  part bench_decode 100 6 "$PY" benchmarks/bench_decode.py --context 1024 --tokens 64 --repeats 3 --warmup 1
  # The hand-fused layers against torch.compile's fusions of the same model, both graph-captured,
  # on the 1B shape (compiling takes most of the slot).
  part bench_compile 75 4 "$PY" benchmarks/bench_decode.py --compile --shapes llama-3.2-1b --context 1024 \
    --tokens 64 --repeats 3 --warmup 1
  part bench_router 45 4 "$PY" benchmarks/bench_router_overhead.py --context 512 --tokens 32 --repeats 5 --warmup 1
  part bench_steps 75 4 "$PY" benchmarks/bench_step_latency.py --steps 6 --step-tokens 24 --prompt-tokens 128 \
    --rates 0.25 --repeats 2 --warmup 1 --decode-chunk 0
fi

summary
exit $FAILED
