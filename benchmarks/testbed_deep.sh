#!/usr/bin/env bash
# The protocol of testbed.sh (choose on dev, report on test) with a target three times deeper than
# the shipped one: 48 layers, `target-48l` in testbed/train.py, trained once into the cache (about
# an hour on a 2-core CPU, seed 0). It asks whether Arbitrage's lead over RSD grows with the
# target's cost: this target costs about 17 drafts a problem (a 0.5B/8B pair's ratio), the
# shipped one 6 (RESULTS.md has the answer: not with the target alone; with ten times the router's
# train problems, yes). Draft and neural PRM stay the shipped ones, so the PRM costs RSD a
# sixteenth of this target per token rather than the fifth it was sized at (a 1.5B PRM beside an
# 8B target): cheaper scoring than a deployment's, which favours RSD.
#
# Both router heads are relabelled with this target (PRM advantage with MARGIN, and the exact
# checker's for `arbitrage:exact`), into ~/.cache/arbitrage_fast/routers/testbed_TAG{,_exact}, from
# 6,000 train problems: from testbed.sh's 600 the PRM-labelled head saw 56 positive steps and
# escalated 15 % of dev steps where the exact-labelled one escalated 11 % (RESULTS.md; TRAIN_N=600
# TAG=deep48 repeats that run). Every setting of testbed.sh applies (STAGES, TAG, DEV_BATCH, ...);
# the defaults here are the shipped protocol's grid (11 quantile points over 16 pilot problems),
# TRAIN_N=6000 and TAG=deep48_6k.
set -euo pipefail
cd "$(dirname "$0")/.."
PAIR=$(python -c "from arbitrage_fast.models.gguf_assets import cache_dir; print(cache_dir())")/testbed-48l
export TAG=${TAG:-deep48_6k} TRAIN_N=${TRAIN_N:-6000} TARGET=$PAIR/target-48l GRID=${GRID:-11} GRID_KIND=${GRID_KIND:-quantile}

[ -f "$TARGET/config.json" ] || python -m arbitrage_fast.testbed.train --out "$PAIR" --roles target-48l
cp "$PAIR/manifest.json" "benchmarks/results/testbed_${TAG}_target_manifest.json"
exec bash benchmarks/testbed.sh
