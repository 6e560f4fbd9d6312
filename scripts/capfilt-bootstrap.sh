#!/usr/bin/env bash
# The CapFilt bootstrapping experiment of docs/results-blip-capfilt.md, end to end on the embedded world:
#   1. pretrain a BLIP on world-noisy (30 % wrong web captions)
#   2. capfilt it: synthetic captions + ITM filter -> a new CSV dataset
#   3. pretrain the same BLIP from scratch on the bootstrapped set
#   4. eval suite on both (zero-shot acc@1, retrieval R@1)
# Usage: scripts/capfilt-bootstrap.sh [STEPS] [SIZE]   (defaults: 1000 steps of 64, all 10000 images: ~45 min on 2 cores)
# The BLIP is recipes/pretrain-blip.yaml's (ViT 128x4 + text 128x3, queue 1024) both times.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-1000}
SIZE=${2:-10000}
DMCLIP=${DMCLIP:-.venv/bin/dmclip}
ROOT=${ROOT:-runs/capfilt-bootstrap}
OUT=${OUT:-$ROOT/data-$SIZE}
newest() { ls -d "$ROOT/$1"/*-"$2"-* | tail -1; }

"$DMCLIP" pretrain recipes/pretrain-blip.yaml --name blip-noisy --data "world-noisy:size=$SIZE" --steps "$STEPS" \
    --runs-dir "$ROOT"
NOISY=$(newest pretrain blip-noisy)
"$DMCLIP" capfilt recipes/capfilt-bootstrap.yaml --model "run:$NOISY" --data "world-noisy:size=$SIZE" --out "$OUT" \
    --runs-dir "$ROOT"
"$DMCLIP" pretrain recipes/pretrain-blip.yaml --name blip-bootstrapped --data "csv:$OUT/captions.csv" \
    --steps "$STEPS" --runs-dir "$ROOT"
BOOT=$(newest pretrain blip-bootstrapped)
"$DMCLIP" eval suite --models "run:$NOISY" "run:$BOOT" --zero-shot world-zeroshot \
    --retrieval world-retrieval-a --retrieval world-retrieval-b --runs-dir "$ROOT"
