#!/usr/bin/env bash
# Run: scripts/build_vllm_cpu.sh [--vllm-version V | --source DIR] [--from sdist|git] [--jobs N]
#          [--out build/dist] [--workdir build/work] [--offline-deps DIR] [--dry-run] [--no-test]
#          [--machine-dump DIR]
#
# Builds a vLLM CPU wheel from source on this machine (an Arm server: Graviton2/3/4, Altra, Grace;
# x86_64 works for trials), writes it to --out with a build record beside it, then installs it in
# a scratch venv and smoke-tests it (import, CPU platform, a W4A8 tiny model generating).
# Decisions live in build/lib.sh (unit-tested by tests/test_build_script.py); docs/build.md
# explains them and records a real attempt. Exit codes: 0 ok, 1 a stage failed (one line says
# why), 2 bad arguments. --dry-run prints the plan and exits 0, or 1 if a check would stop the build.
# shellcheck disable=SC2317  # the do_* stage functions are called indirectly, through `stage NAME FUNCTION`
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=build/lib.sh
. "$repo/build/lib.sh"

# The whole script is one { ... } block: bash parses it completely before running it, so editing
# (or `git pull`-ing) this file during an hour-long build cannot change the build that runs.
{

usage() {
    cat <<EOF
usage: scripts/build_vllm_cpu.sh [options]

Build a vLLM CPU wheel from source for this machine, record how, and smoke-test it.

options:
  --vllm-version V    vLLM release to build (default: $PINNED_VLLM_VERSION, the version arm-int4 runs)
  --source DIR        build this vLLM source tree instead (kept as is; its version is its own)
  --from sdist|git    where a release comes from: the sdist on the package index (default),
                      or the git tag vV from github.com
  --jobs N            compile jobs (default: min(usable CPUs, memory / 4 GiB))
  --out DIR           where the wheel and its build record go (default: build/dist)
  --workdir DIR       source tree, venvs and logs; kept after the build (default: build/work)
  --offline-deps DIR  local copies of what CMake would fetch from github.com: DIR/oneDNN,
                      DIR/ComputeLibrary (aarch64); optional DIR/wheels, DIR/vllm-V.tar.gz
  --machine-dump DIR  plan as if on a recorded machine (tests/fixtures/machines/NAME: lscpu.txt,
                      cpuinfo, meminfo or root/); only with --dry-run
  --dry-run           print the plan (facts, decisions, checks, commands) and exit
  --no-test           skip the scratch-venv install and smoke test
  --test-wheel WHL    only stage 5: install WHL (built here or elsewhere) in a scratch venv and
                      smoke-test it
  -h, --help          this help

environment: CC, CXX (compilers), PYTHON (default python3), CMAKE_BUILD_TYPE (default Release),
  ARM_INT4_TORCH_INDEX (extra index for torch +cpu; default on aarch64: PyTorch's CPU index).

examples:
  scripts/build_vllm_cpu.sh --dry-run
  scripts/build_vllm_cpu.sh --dry-run --machine-dump tests/fixtures/machines/graviton2
  scripts/build_vllm_cpu.sh --offline-deps /srv/vllm-deps --jobs 16
  scripts/build_vllm_cpu.sh --source ~/src/vllm --no-test
EOF
}

die() { printf 'build_vllm_cpu: error: %s\n' "$*" >&2; exit 1; }
bad_arg() { printf 'build_vllm_cpu: error: %s (see --help)\n' "$*" >&2; exit 2; }

# ---------------------------------------------------------------- arguments
version="" source_dir="" from=sdist jobs="" out="$repo/build/dist" work="$repo/build/work"
offline="" dump="" dry_run=0 run_test=1 test_only=""
need_value() { if [ $# -lt 2 ] || [ -z "$2" ]; then bad_arg "$1 needs a value"; fi; }
while [ $# -gt 0 ]; do
    case "$1" in
    --vllm-version) need_value "$@"; version=$2; shift 2 ;;
    --source) need_value "$@"; source_dir=$2; shift 2 ;;
    --from) need_value "$@"; from=$2; shift 2 ;;
    --jobs) need_value "$@"; jobs=$2; shift 2 ;;
    --out) need_value "$@"; out=$2; shift 2 ;;
    --workdir) need_value "$@"; work=$2; shift 2 ;;
    --offline-deps) need_value "$@"; offline=$2; shift 2 ;;
    --machine-dump) need_value "$@"; dump=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --no-test) run_test=0; shift ;;
    --test-wheel) need_value "$@"; test_only=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) bad_arg "unknown argument '$1'" ;;
    esac
done
[ -z "$version" ] || [ -z "$source_dir" ] || bad_arg "--vllm-version and --source exclude each other"
case "$from" in sdist | git) ;; *) bad_arg "--from must be sdist or git, not '$from'" ;; esac
[ -z "$jobs" ] || [[ $jobs =~ ^[1-9][0-9]*$ ]] || bad_arg "--jobs must be a positive integer, not '$jobs'"
[ -z "$dump" ] || [ "$dry_run" = 1 ] || bad_arg "--machine-dump only plans (--dry-run): CMake reads this host's /proc/cpuinfo when it builds"
[ -z "$dump" ] || [ -d "$dump" ] || bad_arg "--machine-dump $dump is not a directory"
[ -z "$source_dir" ] || [ -d "$source_dir" ] || bad_arg "--source $source_dir is not a directory"
[ -z "$offline" ] || [ -d "$offline" ] || bad_arg "--offline-deps $offline is not a directory"
[ -z "$test_only" ] || [ -f "$test_only" ] || bad_arg "--test-wheel $test_only is not a file"
[ -z "$test_only" ] || [ "$run_test" = 1 ] || bad_arg "--test-wheel and --no-test exclude each other"
[ -z "$test_only" ] || test_only=$(cd "$(dirname "$test_only")" && pwd)/$(basename "$test_only")
abspath() { (mkdir -p "$1" 2>/dev/null || true; cd "$1" 2>/dev/null && pwd) || printf '%s\n' "$1"; }
if [ "$dry_run" = 0 ]; then out=$(abspath "$out"); work=$(abspath "$work"); fi
[ -z "$offline" ] || offline=$(cd "$offline" && pwd)
[ -z "$source_dir" ] || source_dir=$(cd "$source_dir" && pwd)
py=${PYTHON:-python3}

# ---------------------------------------------------------------- facts and decisions
facts=$("$py" "$repo/build/machine_facts.py" ${dump:+"$dump"}) || die "could not read the machine facts${dump:+ from $dump}"
eval "$facts"
if [ -n "$source_dir" ]; then
    PLAN_VERSION=$(sed -n 's/^Version: //p' "$source_dir/PKG-INFO" 2>/dev/null | head -n1)
    [ -n "$PLAN_VERSION" ] || PLAN_VERSION=$(git -C "$source_dir" describe --tags --match 'v[0-9]*' 2>/dev/null | sed 's/^v//') || true
    PLAN_VERSION=${PLAN_VERSION:-unknown}
    PLAN_SOURCE="source tree $source_dir (used as is)"
else
    PLAN_VERSION=${version:-$PINNED_VLLM_VERSION}
    PLAN_VERSION=${PLAN_VERSION#v}
    tag=$(vllm_tag_for "$PLAN_VERSION") || bad_arg "--vllm-version '$PLAN_VERSION' is not a vLLM release number (like $PINNED_VLLM_VERSION)"
    if [ "$from" = git ]; then
        PLAN_SOURCE="git tag $tag of https://github.com/vllm-project/vllm.git"
    elif [ -n "$offline" ] && [ -f "$offline/vllm-$PLAN_VERSION.tar.gz" ]; then
        PLAN_SOURCE="sdist $offline/vllm-$PLAN_VERSION.tar.gz"
    else
        PLAN_SOURCE="sdist vllm-$PLAN_VERSION.tar.gz from the package index (${PIP_INDEX_URL:-https://pypi.org/simple})"
    fi
fi
load_version_conf "${PLAN_VERSION%%+*}"
PIN_ONEDNN_AARCH64=$ONEDNN_REF_AARCH64 PIN_ONEDNN_X86=$ONEDNN_REF_X86 PIN_ACL=$ACL_REF
[ -z "$source_dir" ] || read_fetch_pins "$source_dir/cmake/cpu_extension.cmake" || true
pins=$(pins_file_for "${PLAN_VERSION%%+*}")
arch=$FACT_ARCH
plan_isa "$arch" "$FACT_FEATURES"
plan_jobs "${FACT_CPUS:-1}" "$FACT_MEM_AVAIL_MIB" "$FACT_MEM_LIMIT_MIB" "$jobs"
build_type=${CMAKE_BUILD_TYPE:-Release}
torch_index=${ARM_INT4_TORCH_INDEX:-}
if [ -z "$torch_index" ] && [ "$arch" = aarch64 ]; then torch_index=https://download.pytorch.org/whl/cpu; fi
[ "$torch_index" != none ] || torch_index=""
pip_args=()
if [ -n "$offline" ] && [ -d "$offline/wheels" ]; then
    pip_args=(--no-index --find-links "$offline/wheels")
elif [ -n "$torch_index" ]; then
    pip_args=(--extra-index-url "$torch_index")
fi
venv_build="$work/venv-build-${PLAN_VERSION%%+*}"
venv_test="$work/venv-test"
src_tree=${source_dir:-$work/src/vllm-$PLAN_VERSION}
[ -n "$source_dir" ] || [ "$from" != git ] || src_tree=$src_tree-git

# Environment of the wheel build (printed in the plan, recorded, then exported).
build_env=("VLLM_TARGET_DEVICE=cpu" "MAX_JOBS=$PLAN_JOBS" "CMAKE_BUILD_TYPE=$build_type")
for kv in $PLAN_ISA_SET; do build_env+=("$kv"); done
if [ -n "$offline" ]; then
    build_env+=("FETCHCONTENT_SOURCE_DIR_ONEDNN=$offline/oneDNN")
    [ "$arch" != aarch64 ] || build_env+=("ACL_ROOT_DIR=$offline/ComputeLibrary")
fi
build_env+=("ARM_INT4_NINJA_MAX_JOBS=$PLAN_JOBS")

check_tools "$arch" "$([ "$from" = git ] && [ -z "$source_dir" ] && echo 1 || echo 0)"
[ -z "$PLAN_ISA_BLOCKER" ] || CHECK_FAIL+=("cpu: $PLAN_ISA_BLOCKER")
check_disk "$work"
[ -z "$CHECK_DISK_FAIL" ] || CHECK_FAIL+=("$CHECK_DISK_FAIL")
if [ -n "$offline" ]; then
    [ -d "$offline/oneDNN/include" ] || CHECK_FAIL+=("offline deps: $offline/oneDNN is not a oneDNN source tree; fix: $(offline_deps_layout "$arch" | sed -n 1p | sed "s#DIR#$offline#g")")
    if [ "$arch" = aarch64 ] && [ ! -f "$offline/ComputeLibrary/CMakeLists.txt" ]; then
        CHECK_FAIL+=("offline deps: $offline/ComputeLibrary is not an Arm Compute Library source tree; fix: $(offline_deps_layout "$arch" | sed -n 2p | sed "s#DIR#$offline#g")")
    fi
fi

print_plan() {
    local k
    echo "# vLLM CPU wheel build plan"
    echo "machine:     $FACT_SOURCE: $arch${FACT_CPU_NAME:+, $FACT_CPU_NAME}${FACT_PLATFORMS:+ ($FACT_PLATFORMS)}"
    echo "  features:  ${FACT_FEATURES:-none reported}"
    echo "  CPUs:      ${FACT_CPUS:-unknown}, counted from $FACT_CPUS_FROM"
    if [ -n "$FACT_MEM_TOTAL_MIB$FACT_MEM_AVAIL_MIB$FACT_MEM_LIMIT_MIB" ]; then
        echo "  memory:    total ${FACT_MEM_TOTAL_MIB:-?} MiB, available ${FACT_MEM_AVAIL_MIB:-?} MiB, cgroup limit ${FACT_MEM_LIMIT_MIB:-none}"
    else
        echo "  memory:    not in the source"
    fi
    [ -z "$FACT_NOTES" ] || echo "  notes:     $FACT_NOTES"
    echo "vllm:        $PLAN_VERSION from $PLAN_SOURCE"
    echo "  pins:      ${pins:-none of ours for this version: requirements/build/cpu.txt of the source, unpinned}${PLAN_CONF:+; facts $PLAN_CONF}"
    echo "  fetches:   oneDNN $([ "$arch" = aarch64 ] && echo "$PIN_ONEDNN_AARCH64" || echo "$PIN_ONEDNN_X86")$([ "$arch" = aarch64 ] && echo ", Arm Compute Library $PIN_ACL") $([ -n "$offline" ] && echo "from $offline (no network)" || echo "from github.com (CMake FetchContent, at configure time)")"
    echo "decisions:"
    echo "  MAX_JOBS=$PLAN_JOBS  ($PLAN_JOBS_WHY)"
    [ -z "$PLAN_JOBS_WARN" ] || echo "  warning:   $PLAN_JOBS_WARN"
    echo "  isa:       ${PLAN_ISA_WHY}"
    echo "  bf16=$PLAN_BF16 i8mm=$PLAN_I8MM  -march=$PLAN_MARCH"
    for k in $PLAN_ISA_UNSET; do
        if [ -n "${!k:-}" ] && [ "${!k}" != 0 ]; then
            echo "  warning:   ignoring $k=${!k} from the environment: this CPU does not have it (unset for the build)"
        fi
    done
    if [ "$arch" = aarch64 ]; then
        echo "  the wheel runs on Arm CPUs with at least these features$([ "$PLAN_BF16" = 1 ] && echo " (bf16: not on Graviton2 / Altra)")"
    fi
    echo "tools (this host):"
    for k in "${CHECK_OK[@]}"; do echo "  ok    $k"; done
    for k in "${CHECK_FAIL[@]}"; do echo "  FAIL  $k"; done
    for k in "${CHECK_NOTE[@]}"; do echo "  note  $k"; done
    echo "stages:"
    echo "  1 check    the tools above"
    case "$PLAN_SOURCE" in
    "source tree"*) echo "  2 source   $src_tree" ;;
    git*) echo "  2 source   git clone --depth 1 --branch $tag https://github.com/vllm-project/vllm.git $src_tree" ;;
    *) echo "  2 source   $PLAN_SOURCE -> $src_tree (kept after the build)" ;;
    esac
    echo "  3 venv     $py -m venv $venv_build; pip install ${pip_args[*]:+${pip_args[*]} }-r ${pins:-<source>/requirements/build/cpu.txt}"
    echo "  4 wheel    env ${build_env[*]} \\"
    echo "               unset ${PLAN_ISA_UNSET}; PATH=$repo/build/shims:$venv_build/bin:\$PATH \\"
    echo "               pip wheel --no-build-isolation --no-deps -v -w $out $src_tree"
    echo "             -> $out/vllm-$PLAN_VERSION+cpu-*.whl + $out/vllm-$PLAN_VERSION-build-record.json"
    if [ "$run_test" = 1 ]; then
        echo "  5 test     $py -m venv $venv_test; pip install <wheel>; build/smoke_test.py (import, CPU platform, W4A8 tiny model generating)"
    else
        echo "  5 test     skipped (--no-test)"
    fi
    if [ -n "$offline" ] || [ "$dry_run" = 1 ]; then
        echo "offline deps$([ -n "$offline" ] && echo " in $offline" || echo " (for --offline-deps DIR, on a machine with network)"):"
        offline_deps_layout "$arch" | sed "s#DIR#${offline:-DIR}#g; s/^/  /"
    fi
}

if [ "$dry_run" = 1 ]; then
    print_plan
    if [ ${#CHECK_FAIL[@]} -gt 0 ]; then
        echo "result: a real run would stop at stage 1 (${#CHECK_FAIL[@]} check(s) failed)"
        exit 1
    fi
    echo "result: checks pass"
    exit 0
fi

# ---------------------------------------------------------------- stages
mkdir -p "$out" "$work/logs"
record="$out/vllm-$PLAN_VERSION-build-record.json"
[ -z "$test_only" ] || record="$out/$(basename "$test_only" .whl)-test-record.json"
run_started=$(date +%s)
stage_names=() stage_secs=() stage_status=()
current_stage="" failed_stage="" failed_line="" wheel_path="" smoke_json="" smoke_kernel="" prepare_s="" configure_s="" compile_s=""

write_record() {
    local status=$1
    STATUS=$status VERSION=$PLAN_VERSION SOURCE=$PLAN_SOURCE SRC_TREE=$src_tree ARCH=$arch \
    FACTS="$facts" STAGES="$(paste -d'|' <(printf '%s\n' "${stage_names[@]}") <(printf '%s\n' "${stage_secs[@]}") <(printf '%s\n' "${stage_status[@]}"))" \
    BUILD_ENV="$(printf '%s\n' "${build_env[@]}")" UNSET="$PLAN_ISA_UNSET" MARCH=$PLAN_MARCH JOBS_WHY=$PLAN_JOBS_WHY \
    PINS=$pins SMOKE_KERNEL=$smoke_kernel WHEEL=$wheel_path FAILED_STAGE=$failed_stage FAILED_LINE=$failed_line SMOKE=$smoke_json \
    PREPARE_S=$prepare_s CONFIGURE_S=$configure_s COMPILE_S=$compile_s STARTED=$run_started LOGS="$work/logs" \
    GCC="$(${CXX:-g++} -dumpfullversion 2>/dev/null || true)" CMAKE="$("$venv_build/bin/cmake" --version 2>/dev/null | head -n1 || true)" \
    TORCH="$("$venv_build/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)" \
    PYVER="$("$py" -c 'import platform; print(platform.python_version())')" \
    CCACHE="$(command -v ccache || true)" OFFLINE=$offline \
    "$py" - "$record" <<'PY'
import json, os, shlex, sys, time
e = os.environ
stages = [dict(zip(("stage", "seconds", "status"), line.split("|"))) for line in e["STAGES"].splitlines() if line.strip("|")]
for s in stages:
    s["seconds"] = int(s["seconds"])
facts = {}
for line in e["FACTS"].splitlines():
    k, _, v = line.partition("=")
    facts[k.removeprefix("FACT_").lower()] = " ".join(shlex.split(v)) if v else ""
rec = {
    "status": e["STATUS"], "failed_stage": e["FAILED_STAGE"] or None, "failure": e["FAILED_LINE"] or None,
    "vllm_version": e["VERSION"], "source": e["SOURCE"], "source_tree": e["SRC_TREE"], "wheel": e["WHEEL"] or None,
    "machine": facts,
    "versions": {"gcc": e["GCC"] or None, "cmake": e["CMAKE"] or None, "torch": e["TORCH"] or None,
                 "python": e["PYVER"], "pins": e["PINS"] or None},
    "flags": {"env": [l for l in e["BUILD_ENV"].splitlines() if l], "unset": e["UNSET"].split(),
              "march": e["MARCH"], "max_jobs_rule": e["JOBS_WHY"], "ccache": e["CCACHE"] or None,
              "offline_deps": e["OFFLINE"] or None},
    "durations_s": stages,
    "wheel_parts_s": {k: int(e[k.upper() + "_S"]) if e[k.upper() + "_S"] else None
                      for k in ("prepare", "configure", "compile")},
    "total_s": int(time.time()) - int(e["STARTED"]),
    "smoke_test": json.loads(e["SMOKE"]) | {"w4a8_kernel_log": e["SMOKE_KERNEL"] or None} if e["SMOKE"] else None,
    "logs": e["LOGS"],
    "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
}
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump(rec, f, indent=2)
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
PY
}

# Timestamp each output line (epoch seconds) so configure and compile times can be told apart.
stamp() { local line; while IFS= read -r line; do printf '%(%s)T %s\n' -1 "$line"; done; }

# stage NAME FUNCTION: run FUNCTION in a subshell with `set -e` in force (a function called from
# `if`/`||` would run with -e ignored), time it, log it to $work/logs/NAME.log; on failure write
# the record and stop with one line: what the stage said (stage_error), else the log's diagnosis.
stage_error() { printf '%s\n' "$*" >"$work/logs/$current_stage.error"; }
stage() {
    local name=$1 fn=$2 t0 rc
    current_stage=$name
    rm -f "$work/logs/$name.error"
    log "stage $name: started (log: $work/logs/$name.log)"
    t0=$(date +%s)
    set +e
    (set -e; "$fn") 2>&1 | stamp >"$work/logs/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    stage_names+=("$name") stage_secs+=("$(($(date +%s) - t0))")
    if [ "$rc" = 0 ]; then
        stage_status+=(ok)
        log "stage $name: done in ${stage_secs[-1]} s"
        return 0
    fi
    stage_status+=("failed ($rc)")
    failed_stage=$name
    failed_line=$(cat "$work/logs/$name.error" 2>/dev/null || true)
    failed_line=${failed_line:-$(diagnose_log "$work/logs/$name.log" "$arch" "$PLAN_JOBS")}
    failed_line=${failed_line:-"stage $name failed (exit $rc): see $work/logs/$name.log"}
    [ "$name" != wheel ] || split_wheel_times
    write_record failed
    die "$failed_line"
}

do_check() {
    print_plan
    if [ ${#CHECK_FAIL[@]} -gt 0 ]; then
        stage_error "${CHECK_FAIL[0]}$([ ${#CHECK_FAIL[@]} -gt 1 ] && echo " (and $((${#CHECK_FAIL[@]} - 1)) more: $work/logs/check.log)")"
        return 1
    fi
}

do_source() {
    if [ -n "$source_dir" ]; then
        echo "using $source_dir as is"
    elif [ "$from" = git ]; then
        if [ -d "$src_tree/.git" ]; then
            echo "reusing $src_tree ($(git -C "$src_tree" describe --tags))"
        else
            git clone --depth 1 --branch "$tag" https://github.com/vllm-project/vllm.git "$src_tree" || {
                stage_error "git clone of vLLM $tag from github.com failed (no network?): use --from sdist, or --source DIR with a copy of the tree"
                return 1
            }
        fi
    elif [ -f "$src_tree/setup.py" ]; then
        echo "reusing the kept source tree $src_tree (delete it for a fresh one)"
    else
        local tarball="$work/downloads/vllm-$PLAN_VERSION.tar.gz" got
        if [ -n "$offline" ] && [ -f "$offline/vllm-$PLAN_VERSION.tar.gz" ]; then
            tarball="$offline/vllm-$PLAN_VERSION.tar.gz"
        elif [ ! -f "$tarball" ]; then
            "$py" "$repo/build/fetch_sdist.py" vllm "$PLAN_VERSION" "$work/downloads" ${VLLM_SDIST_SHA256:+--sha256 "$VLLM_SDIST_SHA256"} || {
                stage_error "could not download the vllm $PLAN_VERSION sdist from the package index: put vllm-$PLAN_VERSION.tar.gz in --offline-deps DIR"
                return 1
            }
        fi
        if [ -n "$VLLM_SDIST_SHA256" ]; then
            got=$(sha256sum "$tarball" | awk '{print $1}')
            [ "$got" = "$VLLM_SDIST_SHA256" ] || { stage_error "$tarball has sha256 $got, expected $VLLM_SDIST_SHA256 ($PLAN_CONF)"; return 1; }
        fi
        mkdir -p "$work/src"
        rm -rf "$src_tree.partial" && mkdir "$src_tree.partial"
        tar -xzf "$tarball" -C "$src_tree.partial" --strip-components=1
        mv "$src_tree.partial" "$src_tree"
        echo "extracted $tarball -> $src_tree"
    fi
    # The source's own pins win over our conf: re-read, and say if they differ.
    local a=$PIN_ONEDNN_AARCH64 x=$PIN_ONEDNN_X86 l=$PIN_ACL
    read_fetch_pins "$src_tree/cmake/cpu_extension.cmake" || echo "warning: no FetchContent pins found in $src_tree/cmake/cpu_extension.cmake"
    if [ -n "$a$x$l" ] && [ "$a|$x|$l" != "$PIN_ONEDNN_AARCH64|$PIN_ONEDNN_X86|$PIN_ACL" ]; then
        echo "note: the source pins oneDNN $PIN_ONEDNN_AARCH64 (aarch64) / $PIN_ONEDNN_X86, ACL $PIN_ACL; $PLAN_CONF said $a / $x, $l"
    fi
    if [ -n "$pins" ]; then
        "$py" "$repo/build/check_pins.py" "$pins" "$src_tree" --arch "$arch" || {
            stage_error "$(basename "$pins") does not satisfy $src_tree's build requirements (see $work/logs/source.log)"
            return 1
        }
        echo "pins ok: $pins satisfies the source's build requirements"
    fi
}

do_venv() {
    local reqs=${pins:-$src_tree/requirements/build/cpu.txt} key
    [ -f "$reqs" ] || reqs=$src_tree/requirements/cpu-build.txt
    key=$(cat "$reqs" <(printf '%s\n' "$arch" "$("$py" -V)" "${pip_args[@]}") | sha256sum | cut -c1-16)
    if [ -x "$venv_build/bin/python" ] && [ "$(cat "$venv_build/.arm-int4-key" 2>/dev/null)" = "$key" ]; then
        echo "reusing $venv_build (same requirements)"
        return 0
    fi
    rm -rf "$venv_build"
    "$py" -m venv "$venv_build"
    "$venv_build/bin/python" -m pip install -q --upgrade pip "${pip_args[@]}" || true
    "$venv_build/bin/python" -m pip install "${pip_args[@]}" -r "$reqs" || {
        stage_error "pip could not install the build requirements ($reqs)$([ -n "$offline" ] && echo ": is everything in $offline/wheels?" || echo ": is the package index reachable (torch +cpu: ARM_INT4_TORCH_INDEX)?")"
        return 1
    }
    echo "$key" >"$venv_build/.arm-int4-key"
    "$venv_build/bin/python" -m pip freeze
}

do_wheel() {
    local kv tmp="$work/wheel-tmp"
    rm -rf "$tmp" && mkdir -p "$tmp"
    for kv in $PLAN_ISA_UNSET; do unset "$kv"; done
    for kv in "${build_env[@]}"; do export "${kv?}"; done
    export PATH="$repo/build/shims:$venv_build/bin:$PATH"
    echo "build env: ${build_env[*]}; unset: $PLAN_ISA_UNSET"
    (cd "$src_tree" && "$venv_build/bin/python" -m pip wheel --no-build-isolation --no-deps -v -w "$tmp" .)
    mv "$tmp"/vllm-*.whl "$out"/
}

# The wheel stage in three parts, from its timestamped log: pip's metadata and build_py until
# setup.py's build_ext starts CMake; CMake configure (FetchContent runs here); compile and link.
split_wheel_times() {
    local logf="$work/logs/wheel.log" t_start t_ext t_conf t_end
    [ -f "$logf" ] || return 0
    t_start=$(head -n1 "$logf" | awk '{print $1}')
    t_end=$(tail -n1 "$logf" | awk '{print $1}')
    t_ext=$(grep -m1 -E '^[0-9]+ +running build_ext' "$logf" | awk '{print $1}') || true
    t_conf=$(grep -m1 -E ' -- (Build files have been written|Generating done|Configuring incomplete)' "$logf" | awk '{print $1}') || true
    [ -n "$t_ext" ] || return 0
    prepare_s=$((t_ext - t_start))
    if [ -n "$t_conf" ] && ! grep -q ' -- Configuring incomplete' "$logf"; then
        configure_s=$((t_conf - t_ext)) compile_s=$((t_end - t_conf))
    else
        configure_s=$((${t_conf:-$t_end} - t_ext))   # configure failed: nothing was compiled
    fi
}

do_test() {
    local whl=$1 mod
    rm -rf "$venv_test"
    "$py" -m venv "$venv_test"
    "$venv_test/bin/python" -m pip install "${pip_args[@]}" "$whl" "argparse-dataclass==2.0.0"
    # vllm's CPU requirements pull torchvision/torchaudio/torchcodec; builds of them that do not
    # match torch +cpu fail to import (docs/known-issues.md). Text models run without them.
    for mod in torchvision torchaudio torchcodec; do
        if "$venv_test/bin/python" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('$mod') is None)" 2>/dev/null &&
            ! "$venv_test/bin/python" -c "import $mod" >/dev/null 2>&1; then
            echo "removing $mod: installed but fails to import beside torch +cpu"
            "$venv_test/bin/python" -m pip uninstall -y -q "$mod"
        fi
    done
    (cd "$work" && PYTHONPATH="$repo" "$venv_test/bin/python" "$repo/build/smoke_test.py" "$work/smoke") || {
        stage_error "the smoke test failed in $venv_test: see $work/logs/test.log"
        return 1
    }
}

if [ -n "$test_only" ]; then
    wheel_path=$test_only
    test_wheel() { do_test "$wheel_path"; }
    stage test test_wheel
    smoke_json=$(sed -n 's/^[0-9]* SMOKE //p' "$work/logs/test.log" | tail -n1)
    smoke_kernel=$(grep -Eo 'Using [A-Za-z0-9]+ for CompressedTensorsW4A8Int' "$work/logs/test.log" | head -n1) || true
    write_record ok
    log "smoke test passed: $wheel_path (record: $record)"
    exit 0
fi
stage check do_check
stage source do_source
read_fetch_pins "$src_tree/cmake/cpu_extension.cmake" || true   # the source's pins, for diagnose_log
stage venv do_venv
stage wheel do_wheel
split_wheel_times
wheel_path=$(find "$out" -maxdepth 1 -name "vllm-${PLAN_VERSION%%+*}*.whl" -newer "$work/logs/venv.log" | head -n1)
[ -n "$wheel_path" ] || { failed_stage=wheel failed_line="pip wheel finished but no vllm-*.whl appeared in $out"; write_record failed; die "$failed_line"; }
if [ "$run_test" = 1 ]; then
    test_wheel() { do_test "$wheel_path"; }
    stage test test_wheel
    smoke_json=$(sed -n 's/^[0-9]* SMOKE //p' "$work/logs/test.log" | tail -n1)
    smoke_kernel=$(grep -Eo 'Using [A-Za-z0-9]+ for CompressedTensorsW4A8Int' "$work/logs/test.log" | head -n1) || true
fi
write_record ok
log "wheel: $wheel_path"
log "record: $record"
exit 0
}
