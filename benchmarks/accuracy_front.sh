#!/usr/bin/env bash
# The accuracy/size front on the default model (docs/accuracy.md, "Per-layer schemes under a budget").
# Run: benchmarks/accuracy_front.sh OUT_DIR [TOKENS]     (~1 h on a 2-core x86 box; TOKENS default 1024)
# Quantizes SmolLM2-135M-Instruct (the packaged default model) with: the learning path's two recipes
# (channelwise mse, groupwise g32 minmax), GPTQ W4A8 g32 on the packaged calibration set, and
# `--budget` 5 / 10 / 20 (a scheme per layer, each decided through vLLM on TOKENS tokens of the
# search part, opticks-search, its summary also giving the held-out part's); then scores all of them
# and BF16 with `arm-int4 eval` on TOKENS tokens of eval's default text, the held-out part
# (opticks-heldout): the table, the trade-off table (size, bits/weight, Pareto front) and the PNG,
# into OUT_DIR.
set -euo pipefail
out=${1:?usage: benchmarks/accuracy_front.sh OUT_DIR [TOKENS]}
tokens=${2:-1024}
a4=${ARM_INT4:-.venv/bin/arm-int4}
mkdir -p "$out"
log() { echo "accuracy_front: $* ($(date -u +%H:%M:%S))" >&2; }
q() {  # NAME ARGS...: quantize unless done, timing it
  local name=$1; shift
  [ -d "$out/$name" ] && return 0
  log "quantize $name"
  local t0=$SECONDS
  "$a4" quantize default --output "$out/$name" "$@" | tee "$out/$name.quantize.txt"
  echo "seconds: $((SECONDS - t0))" >>"$out/$name.quantize.txt"
}
q cw-mse --scheme channelwise --method mse
q g32-minmax --scheme groupwise --groupsize 32 --method minmax
q gptq-g32 --algorithm gptq --scheme groupwise --groupsize 32 --method minmax --num-samples 128 --max-seq-len 512
for b in 10 5 20; do
  q "budget$b" --budget "$b" --budget-eval-tokens "$tokens" --keep-best || true  # a miss is recorded, not fatal
done
log "eval"
models=()
for m in cw-mse g32-minmax gptq-g32 budget5 budget10 budget20; do [ -d "$out/$m" ] && models+=("$out/$m"); done
"$a4" eval "${models[@]}" --baseline default --num-tokens "$tokens" --plot "$out/front.png" \
  --output "$out/front.json" | tee "$out/front.md"
log "done"
