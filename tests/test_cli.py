"""The command line: instant --help, one-line errors, docs generated from --help, README ↔ CI."""

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from arm_int4.cli import COMMANDS, build_parser

ARM_INT4 = Path(sys.executable).parent / "arm-int4"


def render_cli_docs() -> str:
    """docs/cli.md: every command's --help, as argparse prints it at 100 columns."""
    os.environ["COLUMNS"] = "100"
    parser = build_parser()
    parts = [
        "# arm-int4 command line\n",
        "Generated from `--help` by tests/test_cli.py "
        "(`ARM_INT4_REGEN_DOCS=1 .venv/bin/python -m pytest tests/test_cli.py` rewrites it).\n",
        "## arm-int4\n",
        "```text\n" + parser.format_help() + "```\n",
    ]
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in COMMANDS:
        parts += [f"## arm-int4 {name}\n", "```text\n" + sub.choices[name].format_help() + "```\n"]
    return "\n".join(parts)


def test_docs_cli_md_is_generated_from_help():
    path = REPO / "docs" / "cli.md"
    text = render_cli_docs()
    if os.environ.get("ARM_INT4_REGEN_DOCS"):
        path.write_text(text)
    assert path.read_text() == text, "docs/cli.md is stale: ARM_INT4_REGEN_DOCS=1 pytest tests/test_cli.py"


@pytest.mark.parametrize("argv", [["--help"]] + [[c, "--help"] for c in COMMANDS])
def test_help_works_and_shows_defaults(argv):
    """Instant --help is checked structurally (test_help_imports_nothing_heavy), not by a timer."""
    r = subprocess.run(
        [str(ARM_INT4), *argv], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}
    )  # no line wrap inside "(default: …)"
    assert r.returncode == 0 and "usage: arm-int4" in r.stdout
    if argv[0] == "quantize":
        assert "(default: mse)" in r.stdout and "(default: 32 for w4a8" in r.stdout


def test_help_imports_nothing_heavy():
    code = (
        "import sys; from arm_int4.cli import build_parser; build_parser(); "
        "print([m for m in ('torch', 'vllm', 'transformers', 'llmcompressor') if m in sys.modules])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["bogus"], "invalid choice: 'bogus'"),
        (["info", "--nope"], "unrecognized arguments: --nope"),
        (["quantize", "m", "--groupsize", "abc"], "--groupsize: invalid int value: 'abc'"),
        (["quantize", "m", "--scheme", "rowwise"], "--scheme: invalid choice: 'rowwise'"),
        (["info", "--", "--x"], "only for commands that start vLLM"),
    ],
)
def test_bad_usage_is_one_line_exit_2(argv, needle):
    r = run_cli(*argv)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_info_table_and_json():
    import json

    r = run_cli("info")
    assert r.returncode == 0 and "INT4 kernel" in r.stdout
    j = run_cli("info", "--json")
    data = json.loads(j.stdout)
    # against sources the detector does not read (it reads /proc/cpuinfo and /sys/.../cpu/online)
    assert data["arch"] == platform.machine() and data["logical_cpus"] == os.sysconf("SC_NPROCESSORS_ONLN")
    assert re.search(rf"^Logical CPUs +{data['logical_cpus']}$", r.stdout, re.M)


def test_ci_runs_readme_command_2():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```bash\n\s*(.+?)\n\s*```", readme)
    assert len(commands) == 2, commands
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert commands[1].strip() in [line.strip() for line in ci]


def test_readme_indexes_every_doc_page_and_each_link_exists():
    readme = (REPO / "README.md").read_text()
    linked = set(re.findall(r"\]\((docs/[^)#]+\.md)\)", readme))
    pages = {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
    assert pages - linked == set(), "README's Documentation list misses these pages"
    assert linked - pages == set(), "README links pages that do not exist"


def test_a_closed_pipe_is_not_a_traceback():
    """`arm-int4 info --json | head -1`: the reader leaves early; exit 141 quietly, as `cat` would."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "arm_int4", "info", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # nobody reads: the write fails with EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == "", err  # nothing on stderr: no traceback, no "ignored"
