#!/bin/sh
# The what-if goodput sweep of bench/RESULTS.md ("What-if"): the goodput scenario's five workload
# shapes (bench/src/bin/scenario.rs, goodput_preset) on 8 replicas, each config at each rate,
# 75 s of arrivals with the first 15 s uncounted, in virtual time. Prints Markdown.
#
#   bench/whatif-sweep.sh [extra whatif arguments, e.g. --config NAME=PATH]
set -eu
WHATIF=${WHATIF:-target/release/whatif}
RATES=${RATES:-16,20,25,31,39,49,61}
CONFIGS=${CONFIGS:---config reference-default --config balanced --config cost-model}
run() {
    name=$1
    shift
    printf '## `%s`\n\n' "$name"
    # shellcheck disable=SC2086 # CONFIGS is a list of arguments
    "$WHATIF" $CONFIGS --rates "$RATES" --duration 75 --warmup 15 "$@"
}
run shared-prefix --workload shared-prefix --groups 32 --system-tokens 16000 --question-tokens 3000 "$@"
run multi-turn --workload multi-turn --user-system-tokens 8000 --turn-tokens 1000 --reply-tokens 1000 "$@"
run hot-spot --workload hot-spot --groups 64 --system-tokens 8000 --question-tokens 3000 "$@"
run cache-pressure --workload cache-pressure --groups 224 --system-tokens 8000 --question-tokens 400 --kv-blocks 8192 "$@"
run mixed --workload mixed --prompt-median 3000 "$@"
