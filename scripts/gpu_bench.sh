#!/usr/bin/env bash
# satrun bench on one CUDA GPU, bf16: a model with Llama-2-7B's layer sizes (hidden 4096,
# intermediate 11008, 32 heads) and random weights, LAYERS of its 32 layers, seq 2048 x 4.
# The vocabulary is the packaged tokenizer's (49152), since the data is tokenized with it.
# About 3 minutes on one H100/H200 with the defaults. Results: $OUT/bench.json and bench.png.
#
#   make install            # on a CUDA machine: pip pulls the CUDA build of torch
#   scripts/gpu_bench.sh    # or: LAYERS=8 RATES='[0.5]' scripts/gpu_bench.sh trainer.micro_batch_size=2
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu runs the same path on the CPU (the tests do, on a shrunk model)
LAYERS=${LAYERS:-16}
RATES=${RATES:-[0.3,0.5,0.7]}
BACKWARD_RATES=${BACKWARD_RATES:-[0.5,1.0]}  # scheduler.omit=backward rows (dense forward)
OUT=${OUT:-outputs/gpu-bench/$(date +%Y-%m-%d_%H-%M-%S)}
SATRUN=${SATRUN:-$( [ -x .venv/bin/satrun ] && echo .venv/bin/satrun || echo satrun )}

if [ "$DEVICE" = cuda ]; then
    python_of_satrun=$(dirname "$(command -v "$SATRUN")")/python
    "$python_of_satrun" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_bench.sh: error: torch sees no CUDA device")'
    "$python_of_satrun" -c 'import torch; print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))'
fi

"$SATRUN" bench \
    model=llama2-7b model.source=random model.num_layers="$LAYERS" model.vocab_size=null \
    trainer.device="$DEVICE" trainer.precision=bf16 trainer.seq_len=2048 trainer.micro_batch_size=4 \
    bench.rates="$RATES" bench.backward_rates="$BACKWARD_RATES" bench.steps=5 bench.repeats=3 \
    hydra.run.dir="$OUT" "$@"
