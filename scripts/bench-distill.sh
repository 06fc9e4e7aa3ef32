#!/usr/bin/env bash
# The distillation figures of BENCHMARKS.md ("teacher ↔ student"): Qwen2.5-Coder-0.5B (student) against
# Qwen2.5-Coder-1.5B (teacher) on tests/data/distill/prompts.jsonl — on-policy KL, agreement and the
# escalation curve with the registry's student (its source's precision kept: mostly Q5_0/Q8_0), the same
# student re-quantized to sprig's int4 and to q8 (quantization's own share of the gap), and the teacher behind `sprig serve` (top-20 log-probabilities)
# against the teacher loaded locally.
# Usage: scripts/bench-distill.sh [OUT_DIR]   (release build of the CLI; models fetched by the registry)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/sprig-distill}
mkdir -p "$out"
target=${CARGO_TARGET_DIR:-target}
cargo build --release -p sprig-cli
sprig="$target/release/sprig"
prompts=tests/data/distill/prompts.jsonl
student=qwen2.5-coder-0.5b-instruct
teacher=qwen2.5-coder-1.5b-instruct
n=${N:-96}
"$sprig" distill eval --student "$student" --teacher "$teacher" -f "$prompts" -n "$n" -t 2 | tee "$out/keep.txt"
# The student's source (the registry's GGUF, fetched by the run above) re-quantized.
src=${SPRIG_CACHE:-$HOME/.cache/sprig}/src/qwen2.5-coder-0.5b-instruct.gguf
for q in q4 q8; do
  [ -f "$out/student-$q.safetensors" ] || "$sprig" convert "$src" -o "$out/student-$q.safetensors" --quant "$q"
done
for q in q4 q8; do
  "$sprig" distill eval --student "$out/student-$q.safetensors" --teacher "$teacher" -f "$prompts" -n "$n" -t 2 | tee "$out/$q.txt"
done
# The teacher remote: sprig serve on 127.0.0.1, scored through /v1/completions (top 20).
port=${PORT:-18431}
"$sprig" serve -m "$teacher" --port "$port" -t 2 > "$out/serve.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && break; sleep 1; done
head -n "${REMOTE_PROMPTS:-12}" "$prompts" > "$out/remote-prompts.jsonl"
"$sprig" distill eval --student "$student" --teacher-url "http://127.0.0.1:$port" --teacher-model "$teacher" -f "$out/remote-prompts.jsonl" -n "$n" -t 2 | tee "$out/remote.txt"
"$sprig" distill eval --student "$student" --teacher "$teacher" -f "$out/remote-prompts.jsonl" -n "$n" -t 2 | tee "$out/remote-local.txt"
