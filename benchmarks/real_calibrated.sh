#!/usr/bin/env bash
# The fair protocol on the real pair: thresholds chosen on DATASET's dev split (`calibrate`, a grid
# of GRID points per policy, DEV_BATCH runs in flight: the choices rest on accuracy and
# escalations), then exactly those thresholds on TEST_N test problems, one problem at a time so
# each latency is its own, with intervals (`sweep --thresholds-from`). Both runs keep records and
# resume after an interruption within one code revision (a changed source tree is a new file).
# On a 2-core CPU this is many hours: dev is DEV_N x (1 + 2 x GRID) runs, test TEST_N x (1 + the
# distinct chosen thresholds) runs. TEST_BLOCK=8 times the test problems in blocks of eight instead
# (`sweep --block`): each block under one policy at a time, all in flight, so the speed-ups are
# throughput under load with intervals over blocks, not one problem's latency, for a fraction of
# the time. DENSE_ROWS (4; 0 for none) gives both runs the packed weights' bf16 copy for forwards of
# that many tokens or more (`--dense-rows`), as the serving runs use. STAGES (dev,test) picks which
# runs to make: the dev calibration alone takes hours and resumes from its records. GRID_KIND=quantile
# places each policy's GRID thresholds at the quantiles of its own draft-step scores on PILOT train
# problems instead of evenly over its score range (`calibrate --grid quantile`): the even grid spends
# most of RSD's points where the target-likelihood PRM escalates nothing. PAIR=int4draft runs the
# quantized-draft pair instead of the preset's 0.5B draft: the 1.5B target in bf16 (its GGUF
# dequantised) drafted for by its own int4 copy, with that pair's router head (ROUTER), the settings
# its labels were made with (no 16-bit copy: the bf16 target is dense already). TAG names a
# calibration of other POLICIES beside the pair's first (its files get _TAG after "calibrated").
set -euo pipefail
cd "$(dirname "$0")/.."
DATASET=${DATASET:-gsm8k}
DEV_N=${DEV_N:-60}
TEST_N=${TEST_N:-100}
GRID=${GRID:-21}
TOKENS=${TOKENS:-400}
DEV_BATCH=${DEV_BATCH:-8}
TEST_BLOCK=${TEST_BLOCK:-1}
POLICIES=${POLICIES:-rsd,arbitrage}
DENSE_ROWS=${DENSE_ROWS:-4}
STAGES=${STAGES:-dev,test}
for stage in ${STAGES//,/ }; do
  [[ ",dev,test," == *,$stage,* ]] || { echo "STAGES holds '$stage'; the stages are dev,test" >&2; exit 2; }
done
GRID_KIND=${GRID_KIND:-even}
PILOT=${PILOT:-16}
PAIR=${PAIR:-0.5b}
OUT=benchmarks/results
CLI=(python -m arbitrage_fast.cli)
MODELS=(--preset qwen2.5-coder)
case "$PAIR" in
  0.5b) NAME=qwen_${DATASET}_calibrated${TAG:+_$TAG} ;;
  int4draft)
    NAME=qwen_int4draft_${DATASET}_calibrated${TAG:+_$TAG}
    ROUTER=${ROUTER:-$OUT/qwen_router_int4draft_linear_gsm8k_math500_n454}
    TARGET=$(python -c "from arbitrage_fast.models import gguf_assets; from arbitrage_fast.presets import QWEN_CODER_TARGET as t; print(gguf_assets.assemble(t))")
    MODELS+=(--target "$TARGET" --draft "$TARGET" --dequantize --draft-quant int4 --no-exact-arithmetic --router "$ROUTER")
    DENSE_ROWS=0 ;;
  *) echo "PAIR must be 0.5b or int4draft, not '$PAIR'" >&2; exit 2 ;;
esac
if [[ "$DENSE_ROWS" != 0 ]]; then MODELS+=(--dense-rows "$DENSE_ROWS"); fi

if [[ ",$STAGES," == *,dev,* ]]; then
  "${CLI[@]}" calibrate "${MODELS[@]}" --dataset "$DATASET" --n "$DEV_N" --max-new-tokens "$TOKENS" \
    --policies "$POLICIES" --grid-points "$GRID" --grid "$GRID_KIND" --grid-pilot "$PILOT" --batch "$DEV_BATCH" \
    --records "$OUT/${NAME}_dev_records.jsonl" --out "$OUT/${NAME}_dev.json"
fi
if [[ ",$STAGES," == *,test,* ]]; then
  "${CLI[@]}" sweep "${MODELS[@]}" --dataset "$DATASET" --n "$TEST_N" --max-new-tokens "$TOKENS" \
    --thresholds-from "$OUT/${NAME}_dev.json" --block "$TEST_BLOCK" --records "$OUT/${NAME}_test_records.jsonl" \
    --json "$OUT/${NAME}_test.json" --plot "$OUT/${NAME}_test_pareto.png"
fi
