#!/usr/bin/env bash
# What a CPU cannot tell about satrun on a GPU, in one run of at most 8 minutes on one
# H100/H200: kept-count alignment at 7B width (1k and 8k tokens), a per-layer breakdown of SAT's
# work by CUDA events, host syncs of a SAT step (set_sync_debug_mode), memory dense vs SAT and
# mean vs zero fill, activation checkpointing on and off, determinism of two identical steps,
# one NCCL FSDP2 step (world size 1, bf16 MixedPrecisionPolicy), and satrun bench at 4 layers
# of 7B width with and without aligned kept counts. Writes gpu_check.json and prints a table.
#
#   scripts/gpu_check.sh [--out DIR]     # on a CUDA machine, torch with CUDA installed
#   scripts/gpu_check.sh --smoke         # tiny sizes on the CPU (the tests run this)
#
# PYTHON picks the interpreter (default: the project's .venv, else python3 on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
exec "$PYTHON" scripts/gpu_check.py "$@"
