#!/usr/bin/env bash
# INT4 against INT4 on one CPU (docs/benchmarks.md, "BF16 vs W4A8 vs W4A16 vs llama.cpp Q4_0").
# Run: flock /tmp/arm-int4-cpu.lock benchmarks/int4_vs_int4.sh OUT_DIR   (~30 min on a 2-core x86 box;
# needs the llama.cpp env: ARM_INT4_LLAMACPP=1 scripts/setup.sh, and perf for llama.cpp's profile)
# 1. A random Llama of 470M parameters (hidden 2048, 8 layers, SmolLM2's tokenizer and vocabulary, so that
#    llama.cpp's converter knows it; random weights: speed only, no accuracy).
# 2. Its W4A8 (groupwise g32 minmax, the learning path's) and W4A16 (g128, the vLLM INT4 page's) checkpoints.
# 3. One `arm-int4 bench` over BF16, W4A8, W4A16 and llama.cpp Q4_0 (llama.cpp's own conversion of the
#    BF16 model, chosen by --vs-llamacpp because INT4 MODELs are in the run), batch 1 and 4.
# 4. One decode step per path: vLLM's three with torch.profiler (benchmarks/profile_decode_step.py),
#    llama.cpp's with perf (benchmarks/profile_llamacpp_step.sh).
set -euo pipefail
out=${1:?usage: benchmarks/int4_vs_int4.sh OUT_DIR}
a4=${ARM_INT4:-.venv/bin/arm-int4}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
log() { echo "int4_vs_int4: $* ($(date -u +%H:%M:%S))" >&2; }
m=$out/rand-470m
if [ ! -f "$m/config.json" ]; then
  log "build $m"
  "$py" - "$m" <<'PY'
import shutil, sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from arm_int4 import models

out, src = Path(sys.argv[1]), models.resolve("default", progress=lambda m: None)
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
model = LlamaForCausalLM(cfg).to(torch.bfloat16)
tmp = out.with_name(out.name + ".tmp")
model.save_pretrained(tmp, safe_serialization=True)
for f in src.iterdir():
    if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
        shutil.copy(f, tmp / f.name)
tmp.rename(out)
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
PY
fi
[ -d "$m-w4a8" ] || "$a4" quantize "$m" --scheme groupwise --groupsize 32 --method minmax --output "$m-w4a8"
[ -d "$m-w4a16" ] || "$a4" quantize "$m" --preset w4a16 --scheme groupwise --output "$m-w4a16"
log "bench"
# Short prompts and eager mode for every vLLM model: on x86, vLLM's W4A8 reference fallback prefills at
# ~2 tok/s on this model and its compiled engine took 17 min to start (pp128 at b4 would be ~20 min alone).
"$a4" bench "$m" "$m-w4a8" "$m-w4a16" --vs-llamacpp -p 32 -n 32 -b 1 4 -r 3 --json "$out/bench.json" \
  --log-dir "$out/logs" -- --enforce-eager | tee "$out/bench.md"
for v in "$m" "$m-w4a8" "$m-w4a16"; do
  log "profile $(basename "$v")"
  "$py" benchmarks/profile_decode_step.py "$v" --eager -p 32 -n 16 >"$out/profile-$(basename "$v").txt"
done
log "profile llama.cpp"
gguf=$("$py" -c 'import json,sys; print(next(r["model"] for r in json.load(open(sys.argv[1])) if r["mode"] == "llamacpp"))' "$out/bench.json")
benchmarks/profile_llamacpp_step.sh "$gguf" >"$out/profile-llamacpp-q4_0.txt"
log "done"
