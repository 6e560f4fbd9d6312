#!/usr/bin/env bash
# BLIP's CapFilt bootstrapping over seeds, end to end from a clean checkout. For each seed:
#   1. pretrain a BLIP (recipes/pretrain-blip.yaml) on world-noisy (30 % of the web captions wrong)
#   2. capfilt with it (recipes/capfilt-bootstrap.yaml: fine-tune on world-train-clean, caption, filter with
#      itm+itc), then re-score the same captions with the fine-tuned model's ITM alone and ITC alone
#   3. pretrain the same BLIP from scratch on the bootstrapped set, and on the clean oracle (the same images
#      with their true captions: world-noisy:noise=0)
# then one eval suite over every model with the three arms compared over seeds (paired intervals), and the
# filters' precision / recall over seeds.
# Usage: scripts/reproduce-blip.sh [STEPS] [SIZE]   (defaults: 1000 steps of 64, all 10,000 images)
#        SEEDS="0 1 2" (default) picks the seeds; PRETRAIN_RECIPE and CAPFILT_RECIPE other recipes.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-1000}
SIZE=${2:-10000}
SEEDS=${SEEDS:-"0 1 2"}
DMCLIP=${DMCLIP:-.venv/bin/dmclip}
ROOT=${ROOT:-runs/reproduce-blip}
PRETRAIN_RECIPE=${PRETRAIN_RECIPE:-recipes/pretrain-blip.yaml}
CAPFILT_RECIPE=${CAPFILT_RECIPE:-recipes/capfilt-bootstrap.yaml}
newest() { ls -d "$ROOT/$1"/*-"$2"-* | tail -1; }
join() { local IFS=,; echo "$*"; }

noisy=() boot=() clean=() filters=()
for seed in $SEEDS; do
    "$DMCLIP" pretrain "$PRETRAIN_RECIPE" --name "blip-noisy-s$seed" --seed "$seed" \
        --data "world-noisy:size=$SIZE" --steps "$STEPS" --runs-dir "$ROOT"
    model=$(newest pretrain "blip-noisy-s$seed")
    out="$ROOT/data-s$seed"
    "$DMCLIP" capfilt "$CAPFILT_RECIPE" --model "run:$model" --data "world-noisy:size=$SIZE" \
        --seed "$seed" --out "$out" --name "capfilt-s$seed" --runs-dir "$ROOT"
    filters+=("$(newest capfilt "capfilt-s$seed")")
    for score in itm itc; do  # the same fine-tuned filter, scoring with one head
        "$DMCLIP" capfilt "$CAPFILT_RECIPE" --model "run:$out/finetuned-model" \
            --data "world-noisy:size=$SIZE" --seed "$seed" --out "$ROOT/data-s$seed-$score" --set finetune.data= \
            --set "filter.score=$score" --name "capfilt-s$seed-$score" --runs-dir "$ROOT"
        filters+=("$(newest capfilt "capfilt-s$seed-$score")")
    done
    "$DMCLIP" pretrain "$PRETRAIN_RECIPE" --name "blip-boot-s$seed" --seed "$seed" \
        --data "csv:$out/captions.csv" --steps "$STEPS" --runs-dir "$ROOT"
    "$DMCLIP" pretrain "$PRETRAIN_RECIPE" --name "blip-clean-s$seed" --seed "$seed" \
        --data "world-noisy:size=$SIZE,noise=0" --steps "$STEPS" --runs-dir "$ROOT"
    noisy+=("run:$model") boot+=("run:$(newest pretrain "blip-boot-s$seed")")
    clean+=("run:$(newest pretrain "blip-clean-s$seed")")
done
"$DMCLIP" eval suite --arm "noisy=$(join "${noisy[@]}")" --arm "bootstrapped=$(join "${boot[@]}")" \
    --arm "clean=$(join "${clean[@]}")" --zero-shot world-zeroshot --retrieval world-retrieval-a \
    --retrieval world-retrieval-b --name capfilt-arms --runs-dir "$ROOT"
"$DMCLIP" runs report "${filters[@]}" --group-by filter.score \
    --metrics noise_removal.precision,noise_removal.recall,noise_removal.f1 | tee "$ROOT/filters.md"
echo "tables: $(newest eval capfilt-arms)/summary.md and $ROOT/filters.md"
