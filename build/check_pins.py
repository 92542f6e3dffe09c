"""Check our pinned build requirements against the ones a vLLM source tree asks for.

Run: python3 build/check_pins.py PINS_FILE VLLM_SOURCE_DIR [--arch aarch64|x86_64]
Every requirement in the source's build list (requirements/build/cpu.txt; requirements/cpu-build.txt
in older releases) whose marker applies to --arch must be satisfied by a `name==version` pin in
PINS_FILE, and our torch pin must also satisfy the runtime list (requirements/cpu.txt): a build
torch that differs from the runtime torch gives an extension that fails to load (vLLM's old
cpu-build.txt pinned an older torch than cpu.txt). Prints one line per problem; exit 1 if any.
"""

import argparse
import os
import platform
import re
import sys

try:
    from packaging.markers import default_environment
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:  # the host Python may lack packaging; pip always vendors it
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import Version

__all__ = ["build_list", "read_requirements", "read_pins", "check", "main"]


def build_list(source: str) -> str | None:
    for rel in ("requirements/build/cpu.txt", "requirements/cpu-build.txt"):
        if os.path.isfile(os.path.join(source, rel)):
            return os.path.join(source, rel)
    return None


def read_requirements(path: str, arch: str) -> list[Requirement]:
    """Requirement lines of a pip requirements file (following -r), markers evaluated for arch."""
    env = default_environment() | {"platform_machine": arch, "platform_system": "Linux", "sys_platform": "linux"}
    out = []
    for raw in open(path, encoding="utf-8"):
        line = re.sub(r"\s+#.*$", "", raw).strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-r "):
            out += read_requirements(os.path.join(os.path.dirname(path), line[3:].strip()), arch)
            continue
        if line.startswith("-"):
            continue  # --extra-index-url and friends
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is None or req.marker.evaluate(env):
            out.append(req)
    return out


def read_pins(path: str) -> dict[str, Version]:
    pins = {}
    for raw in open(path, encoding="utf-8"):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if not m:
            raise ValueError(f"{path}: {line!r} is not a name==version pin")
        pins[canonicalize_name(m.group(1))] = Version(m.group(2))
    return pins


def check(pins_file: str, source: str, arch: str) -> list[str]:
    pins = read_pins(pins_file)
    blist = build_list(source)
    if blist is None:
        return [f"{source} has neither requirements/build/cpu.txt nor requirements/cpu-build.txt: is it a vLLM source tree?"]
    problems = []
    wanted = [(r, blist) for r in read_requirements(blist, arch)]
    runtime = os.path.join(source, "requirements/cpu.txt")
    if os.path.isfile(runtime):
        wanted += [(r, runtime) for r in read_requirements(runtime, arch) if canonicalize_name(r.name) == "torch"]
    for req, where in wanted:
        name = canonicalize_name(req.name)
        rel = os.path.relpath(where, source)
        if name not in pins:
            problems.append(f"{rel} asks for {req}; {os.path.basename(pins_file)} has no pin for {req.name}")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{rel} asks for {req}; {os.path.basename(pins_file)} pins {req.name}=={pins[name]}")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pins_file")
    p.add_argument("source")
    p.add_argument("--arch", default=platform.machine())
    a = p.parse_args(argv)
    problems = check(a.pins_file, a.source, a.arch)
    for line in problems:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
