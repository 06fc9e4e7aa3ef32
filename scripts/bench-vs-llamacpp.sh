#!/usr/bin/env bash
# Runs llama-bench and `sprig bench` alternately on the same model and prints sprig/llama.cpp ratios per pass
# and their medians (machines here are shared and noisy: compare within a run, never across runs). Both sides
# are medians over their repetitions: sprig's `pp_tok_s`/`tg_tok_s` and the median of llama-bench's per-run
# `samples_ts` (its `avg_ts` is a mean, which one slow repetition drags down).
#
#   scripts/bench-vs-llamacpp.sh LLAMA_CPP_BUILD_BIN MODEL.gguf [PASSES] [THREADS]
#
# LLAMA_CPP_BUILD_BIN is the `build/bin` of a llama.cpp build (e.g. the vendor/llama.cpp of the PyPI sdist
# llama-cpp-python==0.3.36: `cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake --build build -j2`),
# built outside this repository. sprig converts the GGUF in memory (lossless for Q4_0/Q4_1/Q8_0).
set -euo pipefail
bin="${1:?llama.cpp build/bin directory}"
model="${2:?model.gguf}"
passes="${3:-3}"
threads="${4:-2}"
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sprig/target}"
cargo build --release --quiet -p sprig-cli
sprig="$CARGO_TARGET_DIR/release/sprig"
ratios=()
for pass in $(seq 1 "$passes"); do
    l=$("$bin/llama-bench" -m "$model" -p 128 -n 128 -t "$threads" -r 3 -o json 2>/dev/null)
    s=$("$sprig" bench -m "$model" -p 128 -n 128 -t "$threads" -r 3 --json)
    line=$(python3 - "$l" "$s" <<'PY'
import json, sys
l, s = json.loads(sys.argv[1]), json.loads(sys.argv[2])
import statistics
def med(r):
    if "samples_ts" not in r:
        sys.exit("llama-bench JSON has no samples_ts (too old a llama.cpp?): cannot take its median")
    return statistics.median(r["samples_ts"])
lpp = med(next(r for r in l if r["n_prompt"] > 0))
ltg = med(next(r for r in l if r["n_gen"] > 0))
print(f'{s["pp_tok_s"]:.1f} {lpp:.1f} {s["pp_tok_s"]/lpp:.3f} {s["tg_tok_s"]:.1f} {ltg:.1f} {s["tg_tok_s"]/ltg:.3f}')
PY
)
    echo "pass $pass: sprig pp128 / llama.cpp pp128 / ratio / sprig tg128 / llama.cpp tg128 / ratio: $line"
    ratios+=("$line")
done
printf '%s\n' "${ratios[@]}" | python3 -c "
import sys, statistics
rows = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
print(f'median ratios: pp {statistics.median(r[2] for r in rows):.2f}x, tg {statistics.median(r[5] for r in rows):.2f}x')
"
