#!/usr/bin/env bash
# The exact-forward study of docs/quality.md section 9: SAT with the forward dense and only the
# sparse tokens' MLP backward on the kept channels (scheduler.omit=backward), against dense
# training with its own full schedule at equal training FLOPs and at the same steps.
#
# SFT (chatterbot packed into rows of 256 tokens, 40 steps of 4 rows, held-out answer loss on all
# held-out chats every 10 steps; seeds 1234 and 1):
#   bw90-sN    omit=backward, rate 0.9 in every layer (10% of the channels kept for the prompt
#              tokens' backward), 90% of the steps, then dense
#   bw100-sN   the same at rate 1: the prompt tokens' MLP branch passes no gradient
#   dense40-sN, dense30-sN, dense29-sN   dense training, its own schedule (30 and 29 steps: the
#              FLOPs of bw90 and bw100)
#   bench      `satrun bench mode=sft data=chatterbot` (run alone): the padded and the packed dense
#              step, the paper's form at rate 0.7, omit=backward at 0.5, 0.9, 0.95 and 1, and the
#              SFT default (layer rates)
# CPT (World English Bible, 150 steps of 4 x 256 tokens, held-out loss on all held-out blocks at
# the end; seeds 1234 and 7):
#   cpt-bw50-sN    omit=backward, rate 0.5 in every layer for every token, 90% of the steps, then dense
#   cpt-dense150-sN, cpt-denseM-sN   dense training, its own schedule (M: cpt-bw50's FLOPs)
# About 15-20 min per CPT run.
# SFT on a second chat corpus the tuning never used (the Chit-Chat Challenge's conversations, PyPI
# chitchat-dataset, MIT; installed here by the script, written as JSON lines by
# scripts/chitchat_jsonl.py: 2000 chats of up to 4 turns), seed 1234:
#   cc-bw93, cc-bw95, cc-cal95, cc-dense40, cc-denseM (M: cc-bw95's FLOPs)
# About 8 min per SFT run on two CPU cores (runs may share the machine: ONLY= selects runs,
# CPT_SEEDS the CPT seeds, so two runners can go side by side); the bench must run alone
# (ONLY=bench), after the runs: its rows are timed side by side in one process.
#
#   scripts/exact_forward_study.sh               # into outputs/exact-forward-study
#   ONLY="bw90 dense30" scripts/exact_forward_study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/exact-forward-study}
# shellcheck source=scripts/study_common.sh
source scripts/study_common.sh

SFT=(mode=sft data=chatterbot trainer.max_steps=40 trainer.eval_every=10 trainer.eval_batches=0 trainer.progress=log)
BACKWARD=(scheduler.omit=backward scheduler.layer_scale=null)  # the SFT calibration's 90% sparse, then dense

for seed in 1234 1; do
    run "bw90-s$seed" "${SFT[@]}" trainer.seed=$seed "${BACKWARD[@]}" scheduler.rate=0.9
    run "bw100-s$seed" "${SFT[@]}" trainer.seed=$seed "${BACKWARD[@]}" scheduler.rate=1.0
    run "dense40-s$seed" "${SFT[@]}" trainer.seed=$seed scheduler=dense
    run "dense30-s$seed" "${SFT[@]}" trainer.seed=$seed scheduler=dense trainer.max_steps=30
    run "dense29-s$seed" "${SFT[@]}" trainer.seed=$seed scheduler=dense trainer.max_steps=29
done
# At most 75% of dense training's FLOPs on both seeds (rate 0.9 measured 75.5% and 76.2%): rate 0.95 in
# every layer, and the same FLOPs spread by the gradient screen (satrun probe scheduler.omit=backward:
# layers 15-29 change the gradient least) as rate 0.9 in layers 0-14 and 1 in layers 15-29; rate 0.93
# (seed 1234) on the way
CAL95="[$(printf '0.947368,%.0s' {1..15})$(printf '1.052632,%.0s' {1..14})1.052632]"
run bw93-s1234 "${SFT[@]}" trainer.seed=1234 "${BACKWARD[@]}" scheduler.rate=0.93
for seed in 1234 1; do
    run "bw95-s$seed" "${SFT[@]}" trainer.seed=$seed "${BACKWARD[@]}" scheduler.rate=0.95
    run "cal95-s$seed" "${SFT[@]}" trainer.seed=$seed scheduler.omit=backward scheduler.rate=0.95 scheduler.layer_scale="$CAL95"
done

CHITCHAT="$OUT/chitchat.jsonl"
if [[ -z "$ONLY" || " $ONLY " == *" cc"* ]] && [ ! -f "$CHITCHAT" ]; then
    "$PYTHON" -m pip install --quiet --no-deps chitchat-dataset==0.9.0
    "$PYTHON" scripts/chitchat_jsonl.py "$CHITCHAT"
fi
CC=(mode=sft data=jsonl data.path="$CHITCHAT" data.schema=messages trainer.max_steps=40 trainer.eval_every=10
    trainer.eval_batches=0 trainer.progress=log)
run cc-bw93 "${CC[@]}" "${BACKWARD[@]}" scheduler.rate=0.93
run cc-bw95 "${CC[@]}" "${BACKWARD[@]}" scheduler.rate=0.95
run cc-cal95 "${CC[@]}" scheduler.omit=backward scheduler.rate=0.95 scheduler.layer_scale="$CAL95"
run cc-dense40 "${CC[@]}" scheduler=dense
if [ -f "$OUT/cc-bw95/summary.json" ] && [ -f "$OUT/cc-dense40/summary.json" ]; then
    M=$(same_flops "$OUT/cc-bw95" "$OUT/cc-dense40")
    run "cc-dense$M" "${CC[@]}" scheduler=dense trainer.max_steps="$M"
fi

CPT=(trainer.max_steps=150 trainer.eval_every=0 trainer.eval_batches=0 trainer.progress=log "~calibration")
BW50=(scheduler.omit=backward scheduler.rate=0.5 scheduler.sparse_fraction=0.9 scheduler.ladder_steps=0 scheduler.dense_fraction=0.1)
for seed in ${CPT_SEEDS:-1234 7}; do  # CPT_SEEDS=7: one seed's runs (two runners side by side)
    run "cpt-bw50-s$seed" "${CPT[@]}" trainer.seed=$seed "${BW50[@]}"
    run "cpt-dense150-s$seed" "${CPT[@]}" trainer.seed=$seed scheduler=dense
    # CPT's FLOPs do not depend on the data (every token labelled): the plan gives the same-FLOPs steps
    M=$(dense_steps 150 "${CPT[@]}" "${BW50[@]}" trainer.device=cpu)
    run "cpt-dense$M-s$seed" "${CPT[@]}" trainer.seed=$seed scheduler=dense trainer.max_steps="$M"
done
if selected bench && [ ! -f "$OUT/bench/bench.json" ]; then
    "$SATRUN" bench mode=sft data=chatterbot bench.rates=[0.7] bench.backward_rates=[0.5,0.9,0.95,1.0] \
        hydra.run.dir="$OUT/bench" > "$OUT/bench.log" 2>&1
fi
for seed in 1234 1; do
    report "$OUT/sft-s$seed" --bench bench "dense 40=$OUT/dense40-s$seed" "dense 30=$OUT/dense30-s$seed" \
        "dense 29=$OUT/dense29-s$seed" "exact forward, rate 0.9=$OUT/bw90-s$seed" \
        "exact forward, rate 0.95=$OUT/bw95-s$seed" "exact forward, the default split=$OUT/cal95-s$seed" \
        "exact forward, rate 1=$OUT/bw100-s$seed"
done
report "$OUT/chitchat" "dense 40=$OUT/cc-dense40" "dense 30=$OUT/cc-dense30" "exact forward, rate 0.93=$OUT/cc-bw93" \
    "exact forward, rate 0.95=$OUT/cc-bw95"
report "$OUT/cpt" "dense 124=$OUT/cpt-dense124-s1234" "exact forward, rate 0.5=$OUT/cpt-bw50-s1234"
