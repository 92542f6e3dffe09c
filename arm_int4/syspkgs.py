"""The system packages arm-int4's environments need, and the install command for each on this
distribution. Standard library only, no package-relative imports: scripts/setup.sh runs this file
with the bare system Python before any environment exists (`python3 arm_int4/syspkgs.py`), and
`arm-int4 doctor` imports it.

Every file is read under an injectable `root` (as arm_int4.hardware does), so a test builds a
machine in a temporary directory: an os-release, a loader's library directory, a compiler on PATH.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

__all__ = ["Missing", "distro", "glibc_version", "install_command", "missing", "main"]

# What each need is called per distribution family: Debian/Ubuntu (apt) and Amazon Linux 2023 /
# Fedora / RHEL (dnf). {v} is the interpreter's "3.11".
_PACKAGES = {
    "venv": {"apt": "python{v}-venv", "dnf": "python{v}"},
    "headers": {"apt": "python{v}-dev", "dnf": "python{v}-devel"},
    "cc": {"apt": "gcc", "dnf": "gcc"},
    "c++": {"apt": "g++", "dnf": "gcc-c++"},
    "libnuma": {"apt": "libnuma1", "dnf": "numactl-libs"},
}
# Why each is needed, in the line that names it.
_WHY = {
    "venv": "creates the two environments (venv + ensurepip)",
    "headers": "Python.h: torch inductor compiles kernels at run time (compiled serving, logprobs)",
    "cc": "a C compiler: torch inductor builds its CPU kernels with it",
    "c++": "a C++ compiler: torch inductor's CPU kernels are C++",
    "libnuma": "libnuma.so.1: vLLM's CPU extension (vllm/_C.abi3.so) links it and does not bundle it",
}
_LIB_DIRS = ("usr/lib/*-linux-gnu", "lib/*-linux-gnu", "usr/lib64", "lib64", "usr/lib", "lib", "usr/local/lib")


@dataclass(frozen=True)
class Missing:
    need: str  # a key of _PACKAGES
    package: str  # the distribution's package name (or a description when unknown)
    why: str
    command: str  # the exact install command, "" when the distribution is unknown

    def line(self) -> str:
        fix = self.command or f"install {self.package} with your distribution's package manager"
        return f"missing {self.package}: {self.why}; fix: {fix}"


def distro(root: str = "/") -> tuple[str, str]:
    """(ID, family) from {root}/etc/os-release; family is "apt", "dnf" or "" (unknown)."""
    fields: dict[str, str] = {}
    for name in ("etc/os-release", "usr/lib/os-release"):
        try:
            with open(os.path.join(root, name), encoding="utf-8") as f:
                for line in f:
                    key, sep, value = line.strip().partition("=")
                    if sep:
                        fields[key] = value.strip().strip('"')
            break
        except OSError:
            continue
    ident = fields.get("ID", "")
    like = {ident, *fields.get("ID_LIKE", "").split()}
    if like & {"debian", "ubuntu"}:
        return ident, "apt"
    if like & {"amzn", "fedora", "rhel", "centos"}:
        return ident, "dnf"
    return ident, ""


def install_command(family: str, packages: list[str], sudo: bool | None = None) -> str:
    """The exact command; `sudo ` unless this process is root (a fresh image's root has no sudo)."""
    su = "sudo " if (os.geteuid() != 0 if sudo is None else sudo) else ""
    if family == "apt":
        return f"{su}apt-get update && {su}apt-get install -y " + " ".join(packages)
    if family == "dnf":
        return f"{su}dnf install -y " + " ".join(packages)
    return ""


def glibc_version() -> tuple[int, int] | None:
    """This process's glibc (None on musl or elsewhere)."""
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):
        return None
    m = re.fullmatch(r"glibc (\d+)\.(\d+)", text.strip())
    return (int(m.group(1)), int(m.group(2))) if m else None


def _has_library(root: str, soname: str) -> bool:
    if root == "/":  # the loader cache knows non-standard prefixes; a test root has none
        try:
            out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        if any(line.strip().startswith(soname + " ") for line in out.splitlines()):
            return True
    return any(glob.glob(os.path.join(root, d, soname)) for d in _LIB_DIRS)


def _which(root: str, names: tuple[str, ...]) -> bool:
    if root == "/":
        return any(shutil.which(n) for n in names)
    path = os.pathsep.join(os.path.join(root, d) for d in ("usr/local/bin", "usr/bin", "bin"))
    return any(shutil.which(n, path=path) for n in names)


def _python_ok(python: str, code: str) -> bool:
    try:
        return subprocess.run([python, "-c", code], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def missing(root: str = "/", python: str = sys.executable, pyver: str | None = None) -> list[Missing]:
    """What this machine (or the one at `root`) lacks of the system packages arm-int4 needs.

    `python` is the interpreter the environments are built from: its venv/ensurepip and its
    Python.h are checked by running it (under a test root, that interpreter's own)."""
    if pyver is None:
        pyver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    _ident, family = distro(root)
    have = {
        "venv": _python_ok(python, "import venv, ensurepip"),
        "headers": _python_ok(
            python,
            "import os, sys, sysconfig; sys.exit(not os.path.isfile(sysconfig.get_paths()['include'] + '/Python.h'))",
        ),
        "cc": _which(root, ("cc", "gcc", "clang")),
        "c++": _which(root, ("c++", "g++", "clang++")),
        "libnuma": _has_library(root, "libnuma.so.1"),
    }
    out = []
    for need, ok in have.items():
        if ok:
            continue
        package = _PACKAGES[need][family].format(v=pyver) if family else _PACKAGES[need]["apt"].format(v=pyver)
        out.append(Missing(need, package, _WHY[need], install_command(family, [package])))
    return out


def main(argv: list[str] | None = None) -> int:
    """`python3 arm_int4/syspkgs.py [--root DIR] [--python PY]`: one line per missing package on
    stderr, then one install command for all of them; exit 1 if any is missing."""
    import argparse

    ap = argparse.ArgumentParser(prog="syspkgs.py", description=main.__doc__)
    ap.add_argument("--root", default="/", help="the machine's file system (default /)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter the environments are built from")
    ap.add_argument("--python-version", help="that interpreter's X.Y, for package names (default: this one's)")
    args = ap.parse_args(argv)
    gaps = missing(args.root, args.python, args.python_version)
    for gap in gaps:
        sys.stderr.write(gap.line() + "\n")  # setup.sh shows these lines as they are
    _ident, family = distro(args.root)
    if len(gaps) > 1 and family:
        sys.stderr.write(f"all at once: {install_command(family, [g.package for g in gaps])}\n")
    return 1 if gaps else 0


if __name__ == "__main__":
    sys.exit(main())
