#!/usr/bin/env bash
# The quality study of docs/quality.md: does the default SAT configuration give a better model
# per unit of training compute than dense training, on SmolLM2-135M?
#
# CPT (World English Bible, 150 steps of 4 x 256 tokens, held-out loss on all held-out blocks
# every 15 steps, dense evaluation):
#   dense150      dense training, 150 steps
#   sat150        `satrun train` as shipped (the default SAT configuration), 150 steps
#   denseN        dense training with its own full schedule for N = round(150 x SAT's FLOP
#                 fraction) steps (from `satrun plan`): the same training FLOPs as sat150
#                 (evaluated at start and end only)
#   sat150-s7, denseN-s7   the same pair with seed 7 (evaluated at start and end only)
#   paper150      the paper-shaped SAT of earlier releases (maxip, max-normalised sampling,
#                 zero fill, LORS ladder from MLP rate 0.5), 150 steps
# SFT (chatterbot, packed into rows of 256 tokens, 40 steps of 4 rows, held-out answer loss on
# all held-out chats every 10 steps), both with every exact saving (packing, the LM head at
# labelled positions only):
#   sft-dense40   dense training, 40 steps
#   sft-sat40     token-aware SAT at the probe's per-layer rates for an ideal sparse step of 1.45x
#                 (`satrun probe mode=sft ... probe.target_speedup=1.45`), 90% of the steps, 40 steps
#   sft-denseN    dense training with its own full schedule for N = round(40 x sft-sat40's
#                 train_flops / sft-dense40's) steps: the same training FLOPs as sft-sat40
#   the same three with seed 1 (-s1)
#   sft-sat40-u07 token-aware SAT at MLP rate 0.7 in layers 4-29, 90% of the steps, then dense
#                 (what `satrun train mode=sft data=chatterbot` runs now; also with seed 1)
#   sft-sat40-t115 the probe's per-layer rates for an ideal sparse step of 1.15x (mean 0.297)
#   sft-sat40-all every token sparse, at the CPT calibration (SAT before the token split)
#   sft-dense30, sft-dense35  dense training with its own schedule: the frontier's other points
#   sft-bench     `satrun bench mode=sft data=chatterbot bench.rates=[0.7]` (run alone)
# About 60 min.
# Then the probe that calibrated the default (and the same probe under top-k and under the
# paper's max-normalised sampling with zero fill), and the plots/tables (scripts/quality_report.py).
#
# Screens (ONLY="screens"; about 4 min each): 40 steps at a constant rate, evaluated at the end:
# dense, a uniform rate, and per-layer rates from two earlier calibrations, zero and mean fill.
#
# Takes about 2 h on two CPU cores (each 150-step CPT run 15-20 min). The time axis of the plots
# comes from `satrun bench` (dense and sparse steps timed side by side, run alone), so the
# training runs may share the machine; the probe and the bench should not. A finished run
# (summary.json present) is kept.
#
#   scripts/quality_study.sh                 # into outputs/quality-study
#   OUT=elsewhere ONLY="dense150 sat150" scripts/quality_study.sh
#   ONLY=sft scripts/quality_study.sh       # the SFT runs alone
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/quality-study}
# shellcheck source=scripts/study_common.sh
source scripts/study_common.sh

CPT=(trainer.max_steps=150 trainer.eval_every=15 trainer.eval_batches=0 trainer.progress=log)
SFT=(mode=sft data=chatterbot trainer.max_steps=40 trainer.eval_every=10 trainer.eval_batches=0 trainer.progress=log)
PAPER=(metric=maxip metric.token_stride=16 selector.normalize=max selector.fill=zero "~calibration")



SCREEN=(trainer.max_steps=40 trainer.eval_every=0 trainer.eval_batches=0 trainer.progress=log "~calibration"
        metric=contrib metric.token_stride=8 selector.normalize=rank)
# per-layer profiles from `satrun probe probe.target_speedup=1.13 metric=contrib metric.token_stride=8
# selector.normalize=rank selector.fill=zero` (layers capped at 0.5; sparse-step speed-up 1.11x)
# and the same at 1.16 (1.16x)
CAL111=0.175 PROFILE111=[0,0,0,0,0.571429,0.571429,0.571429,0,0,1.71429,0.571429,0.571429,1.71429,1.71429,1.71429,1.14286,2.85714,1.71429,2.85714,1.71429,1.71429,1.71429,0.571429,1.42857,0.571429,0.571429,1.14286,0.571429,1.71429,0]
CAL116=0.241667 PROFILE116=[0,0,0,0,0.827586,0.827586,0.413793,0.206897,0.413793,1.24138,0.413793,0.827586,2.06897,1.24138,1.24138,1.24138,2.06897,2.06897,2.06897,2.06897,1.24138,2.06897,0.827586,1.24138,0.827586,0.827586,1.24138,0.827586,1.24138,0.413793]
if [[ " $ONLY " == *" screens "* ]]; then
    ONLY="$ONLY s40-dense s40-uniform02 s40-cal111 s40-cal111-mean s40-cal116"
    run s40-dense "${SCREEN[@]}" scheduler=dense
    run s40-uniform02 "${SCREEN[@]}" scheduler=constant scheduler.rate=0.2 selector.fill=zero
    run s40-cal111 "${SCREEN[@]}" scheduler=constant scheduler.rate=$CAL111 scheduler.layer_scale=$PROFILE111 selector.fill=zero
    run s40-cal111-mean "${SCREEN[@]}" scheduler=constant scheduler.rate=$CAL111 scheduler.layer_scale=$PROFILE111 selector.fill=mean
    run s40-cal116 "${SCREEN[@]}" scheduler=constant scheduler.rate=$CAL116 scheduler.layer_scale=$PROFILE116 selector.fill=zero
fi

N=$(dense_steps 150)
run dense150 "${CPT[@]}" scheduler=dense
run sat150 "${CPT[@]}"
run "dense$N" "${CPT[@]}" trainer.eval_every=0 scheduler=dense trainer.max_steps="$N"
run sat150-s7 "${CPT[@]}" trainer.eval_every=0 trainer.seed=7
run "dense$N-s7" "${CPT[@]}" trainer.eval_every=0 trainer.seed=7 scheduler=dense trainer.max_steps="$N"
run paper150 "${CPT[@]}" "${PAPER[@]}"

# the probe's per-layer rates for an ideal sparse step of 1.45x (docs/results/quality/sft-probe), 90% of the steps
T145=("~calibration" scheduler.rate=0.645 scheduler.sparse_fraction=0.9 scheduler.ladder_steps=0 scheduler.dense_fraction=0.1
      "scheduler.layer_scale=[0,0,0,0,0.775194,0.697674,0.775194,1.085271,0,1.395349,1.395349,1.395349,1.395349,1.395349,1.395349,1.395349,1.395349,1.085271,1.395349,1.395349,0,1.395349,1.085271,1.085271,1.395349,1.395349,1.085271,1.395349,1.395349,1.395349]")
for seed in 1234 1; do
    tag=$([ "$seed" = 1234 ] && echo "" || echo "-s$seed")
    run "sft-dense40$tag" "${SFT[@]}" trainer.seed=$seed scheduler=dense
    run "sft-sat40$tag" "${SFT[@]}" trainer.seed=$seed "${T145[@]}"
    if [ -f "$OUT/sft-sat40$tag/summary.json" ] && [ -f "$OUT/sft-dense40$tag/summary.json" ]; then
        NS=$(same_flops "$OUT/sft-sat40$tag" "$OUT/sft-dense40$tag")
        run "sft-dense$NS$tag" "${SFT[@]}" trainer.seed=$seed scheduler=dense trainer.max_steps="$NS"
    fi
done
U07=("~calibration" scheduler.rate=0.606667 scheduler.sparse_fraction=0.9 scheduler.ladder_steps=0 scheduler.dense_fraction=0.1
     "scheduler.layer_scale=[0,0,0,0$(printf ',1.153846%.0s' {1..26})]")
run sft-sat40-u07 "${SFT[@]}" "${U07[@]}"
run sft-sat40-u07-s1 "${SFT[@]}" "${U07[@]}" trainer.seed=1
run sft-sat40-t115 "${SFT[@]}" "~calibration" scheduler.rate=0.296667 scheduler.sparse_fraction=0.9 scheduler.ladder_steps=0 \
    scheduler.dense_fraction=0.1 "scheduler.layer_scale=[0,0,0,0,0,0,0,0,0,2.19101,2.19101,2.19101,2.19101,2.19101,2.19101,2.19101,2.19101,0,2.19101,2.19101,0,2.19101,0,0,2.19101,0,0,2.02247,0,1.68539]"
run sft-sat40-all "${SFT[@]}" scheduler.tokens=all calibration=smollm2-135m_cpt_ladder_none_forward
run sft-dense30 "${SFT[@]}" scheduler=dense trainer.max_steps=30
run sft-dense35 "${SFT[@]}" scheduler=dense trainer.max_steps=35
if [ -z "$ONLY" ] || [[ " $ONLY " == *" sft "* ]]; then  # alone: labelled tokens/s of the padded, packed and SAT steps
    "$SATRUN" bench mode=sft data=chatterbot bench.rates=[0.7] hydra.run.dir="$OUT/sft-bench" > "$OUT/sft-bench.log" 2>&1
fi

if [ -z "$ONLY" ] || [[ " $ONLY " == *" bench "* ]]; then  # step times of dense and the default's sparse stage
    "$SATRUN" bench bench.rates=[0.3] bench.steps=3 bench.repeats=2 hydra.run.dir="$OUT/bench" > "$OUT/bench.log" 2>&1
fi
if [ -z "$ONLY" ] || [[ " $ONLY " == *" probe "* ]]; then  # the default's calibration, then other selectors
    "$SATRUN" probe probe.target_speedup=1.16 "~calibration" hydra.run.dir="$OUT/probe" > "$OUT/probe.log" 2>&1
    "$SATRUN" probe selector=topk selector.fill=zero "~calibration" hydra.run.dir="$OUT/probe-topk" > "$OUT/probe-topk.log" 2>&1
    "$SATRUN" probe selector.normalize=max selector.fill=zero "~calibration" hydra.run.dir="$OUT/probe-max" > "$OUT/probe-max.log" 2>&1
fi

report "$OUT/cpt" --bench bench "dense 150=$OUT/dense150" "SAT default 150=$OUT/sat150" "dense $N=$OUT/dense$N" \
    "SAT paper-shaped 150=$OUT/paper150"
report "$OUT/screens" --bench bench "dense=$OUT/s40-dense" "uniform 0.2=$OUT/s40-uniform02" "per-layer 1.11x=$OUT/s40-cal111" \
    "per-layer 1.11x, mean fill=$OUT/s40-cal111-mean" "per-layer 1.16x=$OUT/s40-cal116"
report "$OUT/cpt-seed7" --bench bench "SAT default 150, seed 7=$OUT/sat150-s7" "dense $N, seed 7=$OUT/dense$N-s7"
report "$OUT/sft" --bench sft-bench "dense 40=$OUT/sft-dense40" "dense 35=$OUT/sft-dense35" "dense 30=$OUT/sft-dense30" \
    "dense 29=$OUT/sft-dense29" "SAT default (0.7, layers 4-29)=$OUT/sft-sat40-u07" "SAT calibrated 1.45x=$OUT/sft-sat40" \
    "SAT calibrated 1.15x=$OUT/sft-sat40-t115" "SAT every token (CPT calibration)=$OUT/sft-sat40-all"
report "$OUT/sft-seed1" "dense 40, seed 1=$OUT/sft-dense40-s1" "dense 30, seed 1=$OUT/sft-dense30-s1" \
    "SAT default, seed 1=$OUT/sft-sat40-u07-s1" "SAT calibrated 1.45x, seed 1=$OUT/sft-sat40-s1"
