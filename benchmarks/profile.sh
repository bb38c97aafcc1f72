#!/usr/bin/env bash
# Profile one benchmark under Nsight Systems, with the engine's NVTX ranges on the timeline.
#
#   benchmarks/profile.sh [BENCH] [ARGS...]
#     BENCH: step_latency (default) | decode | router_overhead, or a path to a script
#     ARGS:  passed to the benchmark (e.g. --steps 4 --step-tokens 16)
#
# Writes benchmarks/results/profile_<BENCH>.nsys-rep (override the folder with PROFILE_DIR)
# and prints the NVTX and kernel summaries. Kernels inside CUDA graphs are traced one by one
# (--cuda-graph-trace=node). Without nsys on PATH it says so and exits 0.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BENCH="${1:-step_latency}"
[[ $# -gt 0 ]] && shift

case "$BENCH" in
  *.py) SCRIPT="$BENCH"; NAME="$(basename "$BENCH" .py)" ;;
  *)    SCRIPT="$HERE/bench_${BENCH}.py"; NAME="$BENCH" ;;
esac
if [[ ! -f "$SCRIPT" ]]; then
  echo "profile.sh: no benchmark $SCRIPT (expected step_latency, decode, router_overhead or a .py path)" >&2
  exit 2
fi

if ! command -v nsys >/dev/null 2>&1; then
  echo "profile.sh: nsys (Nsight Systems) is not on PATH; nothing profiled."
  echo "            run the benchmark directly: python $SCRIPT $*"
  exit 0
fi

OUT_DIR="${PROFILE_DIR:-$HERE/results}"
mkdir -p "$OUT_DIR"
REPORT="$OUT_DIR/profile_${NAME}"
echo "profile.sh: nsys profile -t cuda,nvtx -> ${REPORT}.nsys-rep"
nsys profile -t cuda,nvtx --cuda-graph-trace=node --force-overwrite=true -o "$REPORT" \
  python "$SCRIPT" "$@"
rc=$?
if [[ -f "${REPORT}.nsys-rep" ]]; then
  nsys stats -q --force-export=true -r nvtx_sum,cuda_gpu_kern_sum "${REPORT}.nsys-rep" 2>/dev/null | head -n 60 || true
fi
exit $rc
