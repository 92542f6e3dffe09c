"""Layering gates: no module uses another module's private names, and the quantize library does not
drag in the command layer or unrelated commands (docs/architecture.md).

Run: .venv/bin/python -m pytest tests/test_layering.py -q   (~2 s, no torch/vLLM needed)

There are no known offenders left: any private cross-module use, or a command module loaded by
`import arm_int4.quantize`, fails at once.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "arm_int4"

# Modules that importing arm_int4.quantize must not load (commands and their engines).
NOT_FROM_QUANTIZE = (
    "arm_int4.bench",
    "arm_int4.bench_server",
    "arm_int4.evaluate",
    "arm_int4.lmeval",
    "arm_int4.llamacpp",
    "arm_int4.tune",
    "arm_int4.cli",
    "arm_int4.demo",
)


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _resolve(importer: str, is_package: bool, level: int, module) -> str:
    """The absolute module name of a (possibly relative) `from ... import`."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(path: Path) -> set:
    """("arm_int4/x.py", "mod._name") for every private name of another arm_int4 module that
    `path` imports (`from .mod import _name`) or reads (`mod._name`, mod bound to an arm_int4 module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    me, is_pkg = _module_name(path), path.name == "__init__.py"
    rel, found, bound = str(path.relative_to(REPO)), set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            src = _resolve(me, is_pkg, node.level, node.module)
            if not src.startswith("arm_int4"):
                continue
            for alias in node.names:
                full = f"{src}.{alias.name}"
                if (PACKAGE.parent / (full.replace(".", "/") + ".py")).exists() or (
                    PACKAGE.parent / full.replace(".", "/")
                ).is_dir():
                    bound[alias.asname or alias.name] = full  # `from . import bench`: a module
                elif _private(alias.name) and src != me:
                    found.add((rel, f"{src.rsplit('.', 1)[-1]}.{alias.name}"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("arm_int4"):
                    bound[alias.asname or alias.name] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
            and _private(node.attr)
            and bound[node.value.id] != me
        ):
            found.add((rel, f"{bound[node.value.id].rsplit('.', 1)[-1]}.{node.attr}"))
    return found


def all_private_uses() -> set:
    return set().union(*(private_uses(p) for p in sorted(PACKAGE.rglob("*.py"))))


def test_the_scanner_sees_each_form(tmp_path, monkeypatch):
    """The scanner itself: each form it must catch, and what it must leave alone."""
    pkg = tmp_path / "arm_int4"
    (pkg / "sub").mkdir(parents=True)
    for f in ("__init__.py", "a.py", "b.py", "sub/__init__.py", "sub/c.py"):
        (pkg / f).write_text("")
    (pkg / "b.py").write_text(
        "from .a import _hidden, public\nfrom . import a\nfrom arm_int4 import a as aa\nimport arm_int4.a\n"
        "x = a._x + aa._y + a.__doc__ + a.ok\n_mine = 1\nfrom .b import _mine\n"
    )
    (pkg / "sub" / "c.py").write_text("from ..a import _up\nfrom . import _own_package\nimport os\nos._exit\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    assert private_uses(pkg / "b.py") == {
        ("arm_int4/b.py", "a._hidden"),
        ("arm_int4/b.py", "a._x"),
        ("arm_int4/b.py", "a._y"),
    }
    assert private_uses(pkg / "sub" / "c.py") == {
        ("arm_int4/sub/c.py", "a._up"),
        ("arm_int4/sub/c.py", "sub._own_package"),
    }


def test_no_module_uses_another_modules_private_names_beyond_the_known_list():
    new = all_private_uses()
    assert not new, "make these public (or move them where both modules can import them): " + ", ".join(
        f"{f}: {n}" for f, n in sorted(new)
    )


def _modules_loaded_by(statement: str) -> set:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr
    return set(json.loads(r.stdout))


@pytest.fixture(scope="module")
def quantize_loads():
    return _modules_loaded_by("import arm_int4.quantize")


def test_importing_quantize_loads_no_engine_and_no_command(quantize_loads):
    """The quantizer's settings live in quantize/options.py, so the library never loads the command layer."""
    assert not {"torch", "vllm", "transformers", "llmcompressor"} & quantize_loads  # heavy: inside commands
    assert "arm_int4.options" not in quantize_loads and "arm_int4.cli" not in quantize_loads
    loaded = set(NOT_FROM_QUANTIZE) & quantize_loads
    assert not loaded, f"import arm_int4.quantize loads {sorted(loaded)}"
