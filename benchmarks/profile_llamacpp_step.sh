#!/usr/bin/env bash
# Where one llama.cpp decode step's time goes at batch 1 (the llama.cpp side of docs/benchmarks.md's
# INT4-against-INT4 profiles): perf samples arm_int4's llama.cpp worker (llama-cpp-python's C API,
# the env `ARM_INT4_LLAMACPP=1 scripts/setup.sh` builds) while it prefills 16 random tokens and
# decodes 512 (so decode is ~all of it), pinned to CPU 0 with THREADS threads (default 1, the plan's).
# Run: benchmarks/profile_llamacpp_step.sh FILE.gguf [THREADS]      (needs perf; prints a report)
set -euo pipefail
gguf=${1:?usage: benchmarks/profile_llamacpp_step.sh FILE.gguf [THREADS]}
threads=${2:-1}
env_py=${ARM_INT4_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/arm-int4}/envs/llamacpp/bin/python
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf '{"gguf": "%s", "threads": %d, "tests": [[16, 512, 1]], "warmup": 1, "repetitions": 1, "seed": 0}\n' \
  "$gguf" "$threads" >"$tmp/job.json"
cpus=0-$((threads - 1))
perf record -q -F 1999 -o "$tmp/perf.data" -- taskset -c "$cpus" "$env_py" \
  "$(dirname "$0")/../arm_int4/workers/llamacpp_worker.py" "$tmp/job.json" "$tmp/result.json" >/dev/null 2>&1
"$env_py" - "$tmp/result.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
t = r["tests"][0]
tpot = t["reps"][0]["tpot_s"][0]
print(f"# {r['desc']}, {r['model_bytes'] / 2**20:.0f} MiB of weights in memory; llama-cpp-python {r['llama_cpp_version']}")
print(f"decode step at batch 1 (timed run, under perf): {tpot * 1e3:.2f} ms ({1 / tpot:.1f} tok/s); "
      f"{r['model_bytes'] / tpot / 1e9:.1f} GB/s of weights read")
PY
echo "perf: self time by symbol, every sample of the worker (load, warm-up and prefill included: ~5%)"
perf report -q -i "$tmp/perf.data" --no-children --sort dso,symbol --stdio 2>/dev/null >"$tmp/report.txt"
# The wheel's libraries keep only exported symbols: samples in static functions come as bare addresses;
# they are summed per library and placed between the exported symbols around them (nm -D).
lib=$(dirname "$env_py")/../lib
"$env_py" - "$tmp/report.txt" "$lib" <<'PY'
import collections, glob, re, subprocess, sys
rows = collections.Counter()
unnamed = collections.defaultdict(list)
for line in open(sys.argv[1]):
    m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[.\]\s+(\S+)", line)
    if not m:
        continue
    pct, dso, sym = float(m[1]), m[2], m[3]
    if sym.startswith("0x"):
        unnamed[dso].append((pct, int(sym, 16)))
    else:
        rows[(dso, sym)] += pct
for dso, hits in unnamed.items():
    path = next(iter(glob.glob(f"{sys.argv[2]}/**/{dso}", recursive=True)), None)
    out = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True).stdout if path else ""
    syms = sorted((int(f[0], 16), f[2]) for f in (x.split() for x in out.splitlines()) if len(f) >= 3)
    for pct, addr in hits:  # grouped by the exported symbols around the address
        before = [n for a, n in syms if a <= addr][-1:] or ["?"]
        after = [n for a, n in syms if a > addr][:1] or ["?"]
        rows[(dso, f"<static code between {before[0]} and {after[0]}>")] += pct
for (dso, sym), pct in rows.most_common(12):
    print(f"{pct:6.2f}%  {dso}  {sym}")
PY
