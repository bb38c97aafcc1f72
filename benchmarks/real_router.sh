#!/usr/bin/env bash
# A router for the real pair from more labelled problems than real_pair.sh's first one: labels
# are kept per problem in one label cache per dataset, so the run resumes after an interruption
# and a larger TRAIN_N labels only the problems the caches lack (about 73 s a problem on a 2-core
# CPU; the seeded subsets of different sizes overlap only in part, so TRAIN_N at or above a
# split's size, which takes all of it in file order, is the one that resumes exactly).
# TRAIN_N problems of each of DATASETS' train splits (333 GSM8K and 121 MATH500 exist); BATCH
# problems are labelled at once. Trains into OUT_ROUTER and reports held-out Spearman/AUROC on
# EVAL_N test problems of each dataset (whose labels the same caches keep). The preset's router is
# left alone unless OUT_ROUTER points at it.
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN_N=${TRAIN_N:-48}
EVAL_N=${EVAL_N:-8}
TOKENS=${TOKENS:-400}
DATASETS=${DATASETS:-gsm8k,math500}
BATCH=${BATCH:-8}
OUT=benchmarks/results
CLI=(python -m arbitrage_fast.cli)
CACHE=$(python -c "from arbitrage_fast.models.gguf_assets import cache_dir; print(cache_dir())")
LABELS=${LABELS:-$CACHE/labels/qwen2.5-coder-{dataset}-t$TOKENS}
OUT_ROUTER=${OUT_ROUTER:-$CACHE/routers/qwen2.5-coder-n$TRAIN_N}

"${CLI[@]}" train-router --preset qwen2.5-coder --dataset "$DATASETS" --n "$TRAIN_N" \
  --max-new-tokens "$TOKENS" --batch "$BATCH" --label-cache "$LABELS" --out "$OUT_ROUTER" --json "$OUT/qwen_router_n${TRAIN_N}_train.json"
mkdir -p "$OUT/qwen_router_n$TRAIN_N" && cp "$OUT_ROUTER"/* "$OUT/qwen_router_n$TRAIN_N/"
"${CLI[@]}" eval-router --preset qwen2.5-coder --dataset "$DATASETS" --router "$OUT_ROUTER" --n "$EVAL_N" \
  --max-new-tokens "$TOKENS" --batch "$BATCH" --label-cache "$LABELS" --json "$OUT/qwen_router_n${TRAIN_N}_eval.json"
