#!/usr/bin/env bash
# The LoRA study of docs/quality.md (section 7): dense LoRA against SAT-LoRA at equal training
# FLOPs on SmolLM2-135M, both with every exact saving (packing, the LM head at labelled
# positions only, no weight gradients for the frozen base). LoRA as adapter=lora sets it (rank 16
# on every projection, its learning rate); SAT-LoRA as `satrun train adapter=lora` runs it.
#
# SFT (chatterbot, packed into rows of 256 tokens, 40 steps of 4 rows, held-out answer loss on
# all held-out chats every 10 steps):
#   lora-sft-dense40      dense LoRA, 40 steps
#   lora-sft-sat40        SAT-LoRA, the default (its SFT calibration: MLP channels omitted for the
#                         unlabelled tokens, rate 0.75 in layers 4-29, 90% of the steps)
#   lora-sft-sat40-u07    full fine-tuning's SFT calibration (rate 0.7 in layers 4-29)
#   lora-sft-denseN       dense LoRA with its own full schedule for N = round(40 x lora-sft-sat40's
#                         train_flops / lora-sft-dense40's) steps: the same training FLOPs
#   the same three with seed 1 (-s1)
# Screens of the learning rate (dense LoRA, 40 steps, only with ONLY=screens): screens-lora-sft-dense40-lrX.
# CPT (World English Bible, 100 steps of 4 x 256 tokens, held-out loss at start and end):
#   lora-cpt-dense100, lora-cpt-sat100 (the CPT calibration), lora-cpt-denseN (its FLOPs)
# Then `satrun bench` (run alone) of dense LoRA and SAT-LoRA, with bench.profile: SFT at the
# default's rate, and CPT at the bench's rates.
#
#   scripts/lora_study.sh                  # into outputs/lora-study (about 80 min)
#   ONLY=sft scripts/lora_study.sh         # the SFT runs alone (groups: sft, cpt, bench, screens)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/lora-study}
# shellcheck source=scripts/study_common.sh
source scripts/study_common.sh

SFT=(mode=sft data=chatterbot adapter=lora trainer.max_steps=40 trainer.eval_every=10 trainer.eval_batches=0 trainer.progress=log)
CPT=(adapter=lora trainer.max_steps=100 trainer.eval_every=0 trainer.eval_batches=0 trainer.progress=log)

for lr in 2e-4 6e-4 1.5e-3 3e-3; do  # selected by ONLY=screens only
    [[ " $ONLY " == *" screens "* ]] && run "screens-lora-sft-dense40-lr$lr" "${SFT[@]}" scheduler=dense optim.lr=$lr
done

for seed in 1234 1; do
    tag=$([ "$seed" = 1234 ] && echo "" || echo "-s$seed")
    run "lora-sft-dense40$tag" "${SFT[@]}" trainer.seed=$seed scheduler=dense
    run "lora-sft-sat40$tag" "${SFT[@]}" trainer.seed=$seed
    run "lora-sft-sat40-u07$tag" "${SFT[@]}" trainer.seed=$seed calibration=smollm2-135m_sft_ladder_none_forward
    if [ -f "$OUT/lora-sft-sat40$tag/summary.json" ] && [ -f "$OUT/lora-sft-dense40$tag/summary.json" ]; then
        NS=$(same_flops "$OUT/lora-sft-sat40$tag" "$OUT/lora-sft-dense40$tag")
        run "lora-sft-dense$NS$tag" "${SFT[@]}" trainer.seed=$seed scheduler=dense trainer.max_steps="$NS"
    fi
done

# another SAT-LoRA schedule of at most 75% of the FLOPs (seed 1234): rate 0.7 for 95% of the steps
run lora-sft-sat40-f095 "${SFT[@]}" calibration=smollm2-135m_sft_ladder_none_forward scheduler.sparse_fraction=0.95 \
    scheduler.dense_fraction=0.05

run lora-cpt-dense100 "${CPT[@]}" scheduler=dense
run lora-cpt-sat100 "${CPT[@]}"
if [ -f "$OUT/lora-cpt-sat100/summary.json" ] && [ -f "$OUT/lora-cpt-dense100/summary.json" ]; then
    NC=$(same_flops "$OUT/lora-cpt-sat100" "$OUT/lora-cpt-dense100")
    run "lora-cpt-dense$NC" "${CPT[@]}" scheduler=dense trainer.max_steps="$NC"
fi

if selected bench; then  # alone: the steps side by side, and where their time goes
    "$SATRUN" bench adapter=lora mode=sft data=chatterbot bench.rates=[0.7] bench.profile=true \
        hydra.run.dir="$OUT/bench-sft" > "$OUT/bench-sft.log" 2>&1
    "$SATRUN" bench adapter=lora bench.profile=true hydra.run.dir="$OUT/bench-cpt" > "$OUT/bench-cpt.log" 2>&1
fi

for tag in "" -s1; do  # dense LoRA 40 first: the FLOPs are fractions of its own
    runs=("dense LoRA 40=$OUT/lora-sft-dense40$tag")
    for d in "$OUT"/lora-sft-dense*"$tag"; do
        name=${d##*/}
        [[ $name =~ ^lora-sft-dense([0-9]+)$tag$ ]] && [ "${BASH_REMATCH[1]}" != 40 ] && runs+=("dense LoRA ${BASH_REMATCH[1]}=$d")
    done
    runs+=("SAT-LoRA default (0.75, layers 4-29)=$OUT/lora-sft-sat40$tag" "SAT-LoRA 0.7, layers 4-29=$OUT/lora-sft-sat40-u07$tag")
    [ -z "$tag" ] && runs+=("SAT-LoRA 0.7, 95% of the steps=$OUT/lora-sft-sat40-f095")
    report "$OUT/sft$tag" --bench bench-sft "${runs[@]}"
done
report "$OUT/cpt" --bench bench-cpt "dense LoRA 100=$OUT/lora-cpt-dense100" "SAT-LoRA default 100=$OUT/lora-cpt-sat100" \
    ${NC:+"dense LoRA $NC=$OUT/lora-cpt-dense$NC"}
