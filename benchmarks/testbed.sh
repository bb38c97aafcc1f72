#!/usr/bin/env bash
# The testbed evidence recorded in RESULTS.md, under the protocol: choose on dev, report on test.
#
# The testbed's PRM is the shipped neural PRM (testbed/prm_train.py): RSD decides with it and
# the router learns from its advantage, PRM(target step) - PRM(draft step), on train problems.
# The exact checker only audits (wasted escalations) and decides the rows marked as oracles:
# `rsd:exact` (RSD with a perfect, free PRM) and `arbitrage:exact` (a router trained on the
# checker's labels). `rsd:likelihood` is RSD with the target-likelihood PRM of a deployment
# without PRM weights.
#
#   1. router heads: train split, labels from the shipped PRM (-> checkpoints/router) and from
#      the exact checker (-> checkpoints/router_exact)
#   2. held-out router metrics on test problems (the AUROC against advantage > MARGIN, the label
#      the head learned)
#   3. calibrate: every policy over the same grid on dev; thresholds chosen per accuracy target
#   4. sweep --thresholds-from: the chosen thresholds once on test, with a head-to-head table
#
# Labels are cached (LABELS), so a stopped run resumes; the sweeps resume from their records.
# TRAIN_N, DEV_N, TEST_N, GRID and LABELS override the defaults. STAGES (router,eval,dev,test) picks
# the steps to run: the calibration on dev and its test half are separate runs, each in one sitting.
# GRID_KIND=quantile places each policy's GRID thresholds at the quantiles of its own draft-step
# scores on PILOT train problems (`calibrate --grid quantile`) instead of evenly over its score
# range, where the even grid left RSD no point between 2 % and 100 % escalated. TAG names such a
# calibration and its test (its files get _TAG after "calibration" and "protocol"). MARGIN
# (default 0.01, the shipped head's) trains the PRM-labelled head on advantage > MARGIN
# (`train-router --label-margin`): the neural PRM scores a draft step and the target's alike when
# both are sound, so most advantages > 0 are tiny (9 in 10 of them below 0.0015 on the train
# problems) and say nothing about the draft step; 0.01 was chosen over 0 and 0.05 on dev
# (RESULTS.md). ROUTER is the folder the router stage writes that head to and the other stages
# read it from (default: the package's, or ~/.cache/arbitrage_fast/routers/testbed_TAG with a TAG);
# POLICIES the policies calibrated (default: every one); HEAD the head kind (default mlp, the
# kind of the shipped heads). DEV_BATCH is the dev runs in flight at once (`calibrate --batch`,
# default 1): the choices rest on accuracy and escalations, which a batch leaves as they are on
# this fp32 pair (tested); dev latencies are then shares of a batch. TARGET swaps the target (a
# tagged run only: the package's heads were labelled with the shipped one); its router stage
# then also labels an exact-checker head with it (-> ~/.cache/arbitrage_fast/routers/
# testbed_TAG_exact, read by `arbitrage:exact` through `--named-router`), and its PRM labels get
# their own cache folder. The shipped PRM itself comes from
# `python -m arbitrage_fast.testbed.prm_train --out "$CKPT"`. One thread per process
# (OMP_NUM_THREADS=1): on a shared 2-core machine two OpenMP threads stall each other.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
TRAIN_N=${TRAIN_N:-600}
DEV_N=${DEV_N:-80}
TEST_N=${TEST_N:-150}
GRID=${GRID:-6}
GRID_KIND=${GRID_KIND:-even}
PILOT=${PILOT:-16}
STAGES=${STAGES:-router,eval,dev,test}
for stage in ${STAGES//,/ }; do
  [[ ",router,eval,dev,test," == *,$stage,* ]] || { echo "STAGES holds '$stage'; the stages are router,eval,dev,test" >&2; exit 2; }
done
TARGET=${TARGET:-}
if [[ -n "$TARGET" && -z "${TAG:-}" ]]; then
  echo "TARGET needs a TAG: the package's router heads were labelled with the shipped target" >&2; exit 2
fi
LABELS=${LABELS:-$HOME/.cache/arbitrage_fast/labels}
OUT=benchmarks/results
CLI=(python -m arbitrage_fast.cli)
CKPT=$(python -c "from arbitrage_fast.testbed import CHECKPOINTS; print(CHECKPOINTS)")
CALIBRATION=testbed_calibration${TAG:+_$TAG}
PROTOCOL=testbed_protocol${TAG:+_$TAG}
POLICIES=${POLICIES:-draft_only,rsd,rsd:likelihood,rsd:exact,arbitrage,arbitrage:exact,specreason,spec_thinking,lookahead}
MARGIN=${MARGIN:-0.01}
HEAD=${HEAD:-mlp}
if [[ -n "${TAG:-}" ]]; then ROUTER=${ROUTER:-$HOME/.cache/arbitrage_fast/routers/testbed_$TAG}; else ROUTER=${ROUTER:-$CKPT/router}; fi
MODELS=()
ROUTER_EXACT=$CKPT/router_exact
PRM_LABELS=$LABELS/testbed_prm
if [[ -n "$TARGET" ]]; then
  MODELS=(--target "$TARGET")
  ROUTER_EXACT=$HOME/.cache/arbitrage_fast/routers/testbed_${TAG}_exact
  PRM_LABELS=$LABELS/testbed_prm_$TAG
fi
MODELS+=(--named-router "exact=$ROUTER_EXACT")

if [[ ",$STAGES," == *,router,* ]]; then
  # The two labellings are independent, so the exact checker's runs beside the PRM's, one core
  # each. A tagged run on the shipped target leaves the shipped exact-labelled head as it is.
  exact_pid=
  # A failed PRM labelling ends the script; the exact one must not outlive it.
  trap '[[ -z "$exact_pid" ]] || kill "$exact_pid" 2>/dev/null || true' EXIT
  if [[ -z "${TAG:-}" || -n "$TARGET" ]]; then
    EXACT_JSON=testbed_router_exact_train${TARGET:+_$TAG}
    "${CLI[@]}" train-router --preset testbed "${MODELS[@]}" --prm exact --n "$TRAIN_N" --batch 8 --head "$HEAD" \
      --label-cache "$LABELS/testbed_exact${TARGET:+_$TAG}" --out "$ROUTER_EXACT" --json "$OUT/$EXACT_JSON.json" &
    exact_pid=$!
  fi
  "${CLI[@]}" train-router --preset testbed "${MODELS[@]}" --n "$TRAIN_N" --batch 8 --head "$HEAD" --label-margin "$MARGIN" \
    --label-cache "$PRM_LABELS" --out "$ROUTER" --json "$OUT/testbed_router_train${TAG:+_$TAG}.json"
  # Heads are kept without their labels (the package ships the untagged ones); labels stay in the cache.
  rm -f "$ROUTER/labels.safetensors"
  if [[ -n "$exact_pid" ]]; then
    wait "$exact_pid"
    exact_pid=
    rm -f "$ROUTER_EXACT/labels.safetensors"
  fi
fi
if [[ ",$STAGES," == *,eval,* ]]; then
  "${CLI[@]}" eval-router --preset testbed "${MODELS[@]}" --router "$ROUTER" --n 200 --batch 8 --label-margin "$MARGIN" \
    --label-cache "$PRM_LABELS" \
    --json "$OUT/testbed_router_eval${TAG:+_$TAG}.json"
fi
if [[ ",$STAGES," == *,dev,* ]]; then
  "${CLI[@]}" calibrate --preset testbed "${MODELS[@]}" --router "$ROUTER" --n "$DEV_N" --policies "$POLICIES" --grid-points "$GRID" \
    --grid "$GRID_KIND" --grid-pilot "$PILOT" --batch "${DEV_BATCH:-1}" \
    --records "$OUT/${CALIBRATION}_records.jsonl" --out "$OUT/${CALIBRATION}.json"
fi
if [[ ",$STAGES," == *,test,* ]]; then
  "${CLI[@]}" sweep --preset testbed "${MODELS[@]}" --router "$ROUTER" --n "$TEST_N" --thresholds-from "$OUT/${CALIBRATION}.json" \
    --records "$OUT/${PROTOCOL}_records.jsonl" --json "$OUT/${PROTOCOL}.json"
fi
