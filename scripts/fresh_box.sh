#!/usr/bin/env bash
# Run: scripts/fresh_box.sh [--continue] [DIR]   (as root on an x86_64 Debian host; DIR default
#                                                /tmp/arm-int4-fresh-box)
#
# A fresh Debian 12 arm64 machine, as far as this host can make one: builds a clean arm64 root file
# system from Debian's archive (debootstrap, minbase + python3 + ca-certificates: what a minimal
# cloud image holds), copies this checkout into /root/arm-int4, and runs README command 1's set-up
# there verbatim (`scripts/setup.sh`), every aarch64 program under qemu-user.
#
# The host's binfmt_misc is shared and never touched: the aarch64 programs run in a private user +
# mount namespace (uids and gids mapped 1:1 onto the host's, so dpkg can chown) that mounts its own
# binfmt_misc instance (per user namespace since Linux 6.7) and registers qemu-aarch64-static there.
# `chroot` into the root file system then runs apt-get, dpkg and setup.sh as on the real machine.
#
# What it checks: on the clean root file system, setup.sh stops before creating anything with one
# line per missing system package (exit 1, the lines in DIR/setup-1.log). With --continue it then
# runs the install command setup.sh printed, makes the documented substitutions (this network's CA
# certificates, a recorded Arm /proc/cpuinfo, a stand-in for PyTorch's CPU index, which is out of
# reach here: scripts/torch_cpu_standin.py), runs setup.sh again to the end (DIR/setup-2.log), then
# info, quantize, serve with one chat completion on 127.0.0.1, and a short bench (DIR/lane.log).
# Measured timings and what each substitution changes: docs/arm.md, "The fresh-box lane".
#
# Host packages installed when missing (apt-get): debootstrap, qemu-user-static, patchelf (the stand-in).
set -euo pipefail
# One { ... } block: bash parses it whole before running it, so editing this file during an
# hour-long run cannot change the run.
{

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
continue=
if [ "${1:-}" = --continue ]; then continue=1; shift; fi
dir=${1:-/tmp/arm-int4-fresh-box}
rootfs=$dir/rootfs
mirror=${ARM_INT4_DEBIAN_MIRROR:-http://deb.debian.org/debian}

log() { printf 'fresh_box: %s\n' "$*" >&2; }
die() { printf 'fresh_box: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (debootstrap's first stage creates device nodes)"
for tool in debootstrap:debootstrap qemu-aarch64-static:qemu-user-static patchelf:patchelf; do
    command -v "${tool%%:*}" >/dev/null || apt-get install -y -q "${tool#*:}" >&2 || die "apt-get install ${tool#*:} failed"
done
qemu=$(command -v qemu-aarch64-static)
mkdir -p "$dir"

# Run "$@" (a shell command) as root of a new user + mount namespace mapped 1:1 onto the host's ids,
# with its own binfmt_misc instance running aarch64 ELF files through qemu (flag F: qemu is opened
# now, so it need not exist inside the chroot).
in_arm_ns() {
    local bfm=$dir/binfmt pid
    mkdir -p "$bfm"
    # The namespace's root waits until the host writes its id maps, then mounts and registers.
    # shellcheck disable=SC2016  # the inner script expands its own positional parameters
    unshare --user --mount --fork --propagation private bash -c '
        for _ in $(seq 100); do grep -q 4294967295 /proc/self/gid_map && break; sleep 0.1; done
        grep -q 4294967295 /proc/self/gid_map || { echo "fresh_box: the id map was not written" >&2; exit 1; }
        mount -t binfmt_misc binfmt_misc "$1"
        printf "%s" ":qemu-aarch64:M::\\x7fELF\\x02\\x01\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x02\\x00\\xb7\\x00:\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\x00\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xfe\\xff\\xff\\xff:$2:F" >"$1/register"
        shift 2
        exec bash -c "$@"
    ' fresh-box-ns "$bfm" "$qemu" "$1" &
    pid=$!
    # The map can be written once unshare has entered its new user namespace.
    for _ in $(seq 100); do [ "$(readlink "/proc/$pid/ns/user")" != "$(readlink /proc/self/ns/user)" ] && break; sleep 0.1; done
    echo "0 0 4294967295" >"/proc/$pid/uid_map"
    echo "0 0 4294967295" >"/proc/$pid/gid_map"
    wait "$pid"
}

# 1. The root file system (cached: delete DIR to start over).
if [ ! -f "$rootfs/.arm-int4-stamp" ]; then
    rm -rf "$rootfs"
    log "debootstrap stage 1 (download + unpack, on the host)"
    t0=$SECONDS
    debootstrap --foreign --arch=arm64 --variant=minbase --include=python3,ca-certificates \
        bookworm "$rootfs" "$mirror" >"$dir/debootstrap-1.log" 2>&1 || die "debootstrap stage 1 failed: $dir/debootstrap-1.log"
    log "  $((SECONDS - t0)) s; stage 2 (configure, aarch64 under qemu in the namespace)"
    t0=$SECONDS
    # container=lxc: debootstrap skips its mknod probe (device nodes cannot be made in a user
    # namespace; stage 1 made them).
    in_arm_ns "mount --rbind /proc '$rootfs/proc' && mount --rbind /sys '$rootfs/sys' && container=lxc chroot '$rootfs' /debootstrap/debootstrap --second-stage" \
        >"$dir/debootstrap-2.log" 2>&1 || die "debootstrap stage 2 failed: $dir/debootstrap-2.log"
    log "  $((SECONDS - t0)) s"
    cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
    date -u +%FT%TZ >"$rootfs/.arm-int4-stamp"
fi

# 2. This checkout (its files, as a clone would have them; no venv, no caches).
log "copying $repo to /root/arm-int4"
rm -rf "$rootfs/root/arm-int4" "$rootfs/root/.cache/arm-int4"
mkdir -p "$rootfs/root/arm-int4"
git -C "$repo" ls-files -z | (cd "$repo" && xargs -0 cp --parents -t "$rootfs/root/arm-int4")

# 3. README command 1's set-up, verbatim, on the clean system: it must stop and name what is missing.
in_rootfs() {  # $1 = a shell command run in the root file system as its root user, from /root/arm-int4
    in_arm_ns "mount --rbind /proc '$rootfs/proc' && mount --rbind /sys '$rootfs/sys' && mount --rbind /dev '$rootfs/dev' && chroot '$rootfs' /usr/bin/env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive bash -c 'cd /root/arm-int4 && $1'"
}
setup_in_rootfs() {  # $1 = log file; runs README command 1's set-up there, sets rc and t0
    t0=$SECONDS
    set +e
    in_rootfs scripts/setup.sh >"$1" 2>&1
    rc=$?
    set -e
}
installed=$rootfs/.arm-int4-installed
if [ -n "$continue" ] && [ -f "$installed" ]; then
    # A resumed --continue run: the root file system is no longer clean, so steps 3-4 keep their logs
    log "steps 3-4 done by an earlier run ($dir/setup-1.log, install.log; packages installed $(cat "$installed")): skipped; delete $dir to start over"
else
log "scripts/setup.sh on the clean root file system"
setup_in_rootfs "$dir/setup-1.log"
log "  exit $rc after $((SECONDS - t0)) s:"
sed 's/^/  | /' "$dir/setup-1.log" >&2
if ! { [ "$rc" = 1 ] && grep -q '^missing ' "$dir/setup-1.log" && grep -q '(nothing was created)$' "$dir/setup-1.log"; }; then
    die "setup.sh on the clean system did not stop with the missing-package lines (exit $rc)"
fi
[ ! -e "$rootfs/root/arm-int4/.venv" ] || die "setup.sh created .venv before stopping"
log "ok: setup.sh stopped before creating anything, naming each missing package"
[ -n "$continue" ] || exit 0

# 4. What setup.sh said to install, as it said it.
install=$(sed -n 's/^all at once: //p' "$dir/setup-1.log")
[ -n "$install" ] || install=$(sed -n 's/^missing .*; fix: //p' "$dir/setup-1.log" | head -n 1)
log "installing: $install"
t0=$SECONDS
in_rootfs "$install" >"$dir/install.log" 2>&1 || die "the install command failed: $dir/install.log"
log "  $((SECONDS - t0)) s"
date -u +%FT%TZ >"$installed"
fi

# 5. The substitutions (see the top of this file).
log "substitutions: this network's CA certificates, a recorded Arm /proc/cpuinfo, the torch+cpu stand-in"
cas=(/usr/local/share/ca-certificates/*.crt)
if [ -e "${cas[0]}" ]; then
    mkdir -p "$rootfs/usr/local/share/ca-certificates"
    cp "${cas[@]}" "$rootfs/usr/local/share/ca-certificates/"
    in_rootfs update-ca-certificates >"$dir/ca.log" 2>&1 || die "update-ca-certificates failed: $dir/ca.log"
fi
"$repo/scripts/arm_emulation.sh" >/dev/null || die "scripts/arm_emulation.sh failed (it provides the CUDA stubs and the recorded cpuinfo)"
arm=${ARM_INT4_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/arm-int4}/arm64
cp "$arm/rootfs/proc/cpuinfo" "$dir/cpuinfo"
standin=$rootfs/root/torch-standin
if [ ! -f "$standin/simple/torch/index.html" ]; then
    rm -rf "$standin" && mkdir -p "$standin"
    wheel=$arm/wheels/torch-2.13.0-cp311-cp311-manylinux_2_28_aarch64.whl
    [ -f "$wheel" ] || die "no torch 2.13.0 aarch64 wheel at $wheel"
    python3 "$repo/scripts/torch_cpu_standin.py" "$wheel" "$arm/site/_cuda_stubs" "$arm/vllm/libsbgemm_shim.so" "$standin" >/dev/null \
        || die "building the torch+cpu stand-in failed"
fi

# 6. README command 1's set-up again, to the end, then a new user's first commands.
in_rootfs_arm() {  # in_rootfs, with the recorded cpuinfo over /proc/cpuinfo and the stand-in index
    in_arm_ns "mount --rbind /proc '$rootfs/proc' && mount --bind '$dir/cpuinfo' '$rootfs/proc/cpuinfo' && mount --rbind /sys '$rootfs/sys' && mount --rbind /dev '$rootfs/dev' && chroot '$rootfs' /usr/bin/env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin ARM_INT4_TORCH_INDEX=file:///root/torch-standin/simple bash -c 'cd /root/arm-int4 && $1'"
}
log "scripts/setup.sh again"
t0=$SECONDS
set +e
in_rootfs_arm scripts/setup.sh >"$dir/setup-2.log" 2>&1
rc=$?
set -e
log "  exit $rc after $((SECONDS - t0)) s; its last lines:"
tail -n 5 "$dir/setup-2.log" | sed 's/^/  | /' >&2
[ "$rc" = 0 ] || exit "$rc"

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
sed "s/@PORT@/$port/g" >"$rootfs/root/lane.sh" <<'EOF'
#!/bin/bash
# Written by scripts/fresh_box.sh: a new user's first commands, each timed.
set -uo pipefail
step() { local t0=$SECONDS rc; echo "=== $*"; "$@"; rc=$?; echo "=== exit $rc after $((SECONDS - t0)) s: $*"; return $rc; }
cd /root/arm-int4
step .venv/bin/arm-int4 info || exit 1
rm -rf /root/default-g32
step .venv/bin/arm-int4 quantize default --scheme groupwise --output /root/default-g32 || exit 1
t0=$SECONDS
echo "=== .venv/bin/arm-int4 serve /root/default-g32 --port @PORT@"
.venv/bin/arm-int4 serve /root/default-g32 --port @PORT@ &
server=$!
up=
for _ in $(seq 720); do  # 2 h at most
    if python3 -c 'import urllib.request; urllib.request.urlopen("http://127.0.0.1:@PORT@/health", timeout=5)' 2>/dev/null; then up=1; break; fi
    kill -0 $server 2>/dev/null || break
    sleep 10
done
if [ -z "$up" ]; then echo "=== the server did not come up after $((SECONDS - t0)) s"; kill -INT $server; wait $server; exit 1; fi
echo "=== server up after $((SECONDS - t0)) s"
t1=$SECONDS
python3 - <<'PY'
import json, urllib.request
models = json.load(urllib.request.urlopen("http://127.0.0.1:@PORT@/v1/models", timeout=60))
name = models["data"][0]["id"]
body = {"model": name, "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16, "temperature": 0}
req = urllib.request.Request("http://127.0.0.1:@PORT@/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
ans = json.load(urllib.request.urlopen(req, timeout=1800))
print("answer:", json.dumps(ans["choices"][0]["message"]["content"]), "model:", name, "usage:", ans["usage"])
PY
rc=$?
echo "=== chat completion: exit $rc after $((SECONDS - t1)) s"
kill -INT $server; wait $server
echo "=== server stopped; serve step $((SECONDS - t0)) s in all"
[ $rc = 0 ] || exit 1
step .venv/bin/arm-int4 bench /root/default-g32 -p 16 -n 8 -b 1 -r 1 --warmup 0 || exit 1
EOF
chmod +x "$rootfs/root/lane.sh"
log "a new user's first commands (info, quantize, serve + one chat completion, bench): $dir/lane.log"
t0=$SECONDS
set +e
in_rootfs_arm /root/lane.sh >"$dir/lane.log" 2>&1
rc=$?
set -e
log "  exit $rc after $((SECONDS - t0)) s; the steps:"
grep -E '^(=== |answer:)' "$dir/lane.log" | sed 's/^/  | /' >&2
exit "$rc"
}
