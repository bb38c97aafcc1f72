#!/usr/bin/env bash
# The real-pair runs recorded in RESULTS.md: router labels on GSM8K's router-training split,
# the router's held-out GSM8K metrics, then one sweep (problem-major, resumable) of every
# policy on DATASET (gsm8k or math500; the router is the GSM8K one either way).
# CPU hours on a 2-core machine; DATASET, N, TOKENS, RSD and ESCALATE override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
DATASET=${DATASET:-gsm8k}
N=${N:-50}
RSD=${RSD:-0.9,0.95}
TOKENS=${TOKENS:-400}
ESCALATE=${ESCALATE:-0.3}  # arbitrage's threshold: the one that escalated this share of the head's validation steps
OUT=benchmarks/results
CLI=(python -m arbitrage_fast.cli)
ROUTER=$(python -c "from arbitrage_fast.presets import qwen_coder_router_dir as d; print(d())")

if [ ! -f "$ROUTER/router_config.json" ]; then
  "${CLI[@]}" train-router --preset qwen2.5-coder --n "${TRAIN_N:-16}" --max-new-tokens "$TOKENS" \
    --out "$ROUTER" --json "$OUT/qwen_router_train.json"
  mkdir -p "$OUT/qwen_router" && cp "$ROUTER"/* "$OUT/qwen_router/"
fi
[ -f "$OUT/qwen_router_eval.json" ] || "${CLI[@]}" eval-router --preset qwen2.5-coder --n "${EVAL_N:-8}" \
  --max-new-tokens "$TOKENS" --json "$OUT/qwen_router_eval.json"
# From the head's own validation problems (train split), never from the test problems swept below.
TAU=$(python -c "from arbitrage_fast.router.head import RouterHead as H; print(H.validation_threshold('$ROUTER', $ESCALATE))")
[ "$TAU" != None ] || { echo "$ROUTER records no validation threshold: retrain it with train-router" >&2; exit 1; }
echo "arbitrage threshold $TAU (escalated $ESCALATE of the head's validation steps)"
"${CLI[@]}" sweep --preset qwen2.5-coder --dataset "$DATASET" --n "$N" --max-new-tokens "$TOKENS" \
  --policies target_only,draft_only,rsd,arbitrage --thresholds "rsd=$RSD;arbitrage=$TAU" \
  --records "$OUT/qwen_${DATASET}_n${N}_records.jsonl" --json "$OUT/qwen_${DATASET}_n${N}.json" \
  --plot "$OUT/qwen_${DATASET}_n${N}_pareto.png"
