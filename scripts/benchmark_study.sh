#!/usr/bin/env bash
# The quality study's benchmark column (docs/quality.md): satrun eval of the models the study
# trains, at the end of their runs, on satrun's offline tasks (bible_cloze, chatterbot_mc; their
# first 300 questions each: all of them take a quarter of an hour per model on 2 CPU cores), and
# of the packaged model they start from. The CPT runs dense150 and denseN are
# trained first where their folders lack a summary (scripts/quality_study.sh's settings); the
# SFT runs (seed 1234) come from an earlier scripts/quality_study.sh. Each evaluation goes to
# $OUT/eval-NAME; the tables to docs/results/quality/benchmarks/{cpt,sft}.
#
#   scripts/benchmark_study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/quality-study}
# shellcheck source=scripts/study_common.sh
source scripts/study_common.sh
CPT=(trainer.max_steps=150 trainer.eval_every=15 trainer.eval_batches=0 trainer.progress=log)
EVAL=(eval.limit=300 eval.batch_size=16 trainer.device=cpu)
DEST=docs/results/quality/benchmarks

evaluate() {  # evaluate NAME [RUN]: satrun eval of $OUT/RUN (or of the packaged model) into $OUT/eval-NAME
    local name=$1 run=${2:-}
    if [ -f "$OUT/eval-$name/eval.json" ]; then echo "eval-$name: done already"; return; fi
    [ -n "$run" ] && [ ! -f "$OUT/$run/summary.json" ] && { echo "eval-$name: no run $run"; return; }
    echo "eval-$name"
    "$SATRUN" eval "${EVAL[@]}" ${run:+eval.run="$OUT/$run"} hydra.run.dir="$OUT/eval-$name" > "$OUT/eval-$name.log" 2>&1
}

evaluate base
for r in sat150 sft-dense40 sft-dense30 sft-sat40-u07; do evaluate "$r" "$r"; done
N=$(dense_steps 150)
run dense150 "${CPT[@]}" scheduler=dense
run "dense$N" "${CPT[@]}" trainer.eval_every=0 scheduler=dense trainer.max_steps="$N"
for r in dense150 "dense$N"; do evaluate "$r" "$r"; done

table() { local dest=$1; shift; "$PYTHON" scripts/benchmark_table.py "$dest" "$@"; }
table "$DEST/cpt" "dense 150=$OUT/eval-dense150:$OUT/dense150" "SAT default 150=$OUT/eval-sat150:$OUT/sat150" \
    "dense $N (SAT's FLOPs)=$OUT/eval-dense$N:$OUT/dense$N" "SmolLM2-135M before training=$OUT/eval-base"
table "$DEST/sft" "dense 40=$OUT/eval-sft-dense40:$OUT/sft-dense40" "SAT default 40=$OUT/eval-sft-sat40-u07:$OUT/sft-sat40-u07" \
    "dense 30 (SAT's FLOPs)=$OUT/eval-sft-dense30:$OUT/sft-dense30" "SmolLM2-135M before training=$OUT/eval-base"
