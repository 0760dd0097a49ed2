# Helpers of the study scripts (scripts/quality_study.sh, scripts/lora_study.sh), sourced from the
# repository's root with OUT set: the satrun to run (SATRUN, default the venv's), its Python, the
# runs selected (ONLY, default all), and the functions below.
SATRUN=${SATRUN:-$( [ -x .venv/bin/satrun ] && echo .venv/bin/satrun || echo satrun )}
PYTHON=$(dirname "$(command -v "$SATRUN")")/python
ONLY=${ONLY:-}
mkdir -p "$OUT"

selected() {  # selected NAME: ONLY is empty, names NAME, a group of it (NAME starts with or holds "-group-" or "group-"), or a glob matching it
    [ -z "$ONLY" ] && return 0
    local word
    set -f  # the words of ONLY stay patterns
    for word in $ONLY; do
        # shellcheck disable=SC2053
        if [ "$1" = "$word" ] || [[ $1 == "$word"-* ]] || [[ $1 == *-"$word"-* ]] || [[ $1 == $word ]]; then set +f; return 0; fi
    done
    set +f
    return 1
}

run() {  # run NAME OVERRIDES...: one satrun train into $OUT/NAME, skipped when done or not selected
    local name=$1; shift
    selected "$name" || return 0
    if [ -f "$OUT/$name/summary.json" ]; then echo "$name: done already"; return; fi
    rm -rf "${OUT:?}/$name"
    echo "$name: satrun train $*"
    "$SATRUN" train "$@" hydra.run.dir="$OUT/$name" > "$OUT/$name.log" 2>&1
}

dense_steps() {  # dense_steps STEPS OVERRIDES...: round(STEPS x the default SAT run's FLOP fraction)
    local steps=$1; shift
    "$SATRUN" plan trainer.max_steps="$steps" "$@" hydra.run.dir="$OUT/plan-$steps" > /dev/null
    "$PYTHON" -c "import json,sys; p=json.load(open(sys.argv[1])); print(round($steps * p['run_flop_fraction']))" "$OUT/plan-$steps/plan.json"
}

same_flops() {  # same_flops SAT_RUN DENSE_RUN: the dense steps whose FLOPs match the SAT run's (from summary.json)
    "$PYTHON" -c "import json,sys; s,d=(json.load(open(f+'/summary.json')) for f in sys.argv[1:]); print(round(d['steps'] * s['train_flops'] / d['train_flops']))" "$1" "$2"
}

report() {  # report FOLDER [--bench BENCH_FOLDER] LABEL=RUN...: only the runs that finished; --bench: time axis from it
    local dest=$1; shift
    local have=()
    if [ "$1" = --bench ]; then
        [ -f "$OUT/$2/bench.json" ] && have+=(--bench "$OUT/$2/bench.json")
        shift 2
    fi
    for pair in "$@"; do [ -f "${pair#*=}/summary.json" ] && have+=("$pair"); done
    if [[ " ${have[*]} " == *"="* ]]; then "$PYTHON" scripts/quality_report.py "$dest" "${have[@]}"; fi
}
