"""arm_int4.models: which MODEL strings mean what (a local path always wins); the default model built once.

Run: .venv/bin/python -m pytest tests/test_models.py -q
"""

import json
import os
import subprocess
import sys

import pytest

from arm_int4 import models
from arm_int4.errors import ModelError


def test_a_local_directory_named_default_wins_over_the_packaged_model(tmp_path, monkeypatch):
    local = tmp_path / "default"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"model_type": "llama"}))
    monkeypatch.chdir(tmp_path)

    def packaged(progress=print):
        raise AssertionError("the packaged default model was chosen over ./default")

    monkeypatch.setattr(models, "default_model_dir", packaged)
    said = []
    assert models.resolve("default", progress=said.append).resolve() == local.resolve()
    assert len(said) == 1 and str(local.resolve()) in said[0] and "shadows the packaged" in said[0]
    assert not models.names_packaged_default("default")
    assert models.resolve("./default", progress=said.append).resolve() == local.resolve()


def test_a_local_default_directory_that_is_not_a_model_is_refused_not_replaced(tmp_path, monkeypatch):
    (tmp_path / "default").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=r"default has no config\.json"):
        models.resolve("default", progress=lambda m: None)


def test_the_word_default_means_the_packaged_model_when_no_such_directory_exists(smollm2, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").write_text("a file, not a model directory: it shadows nothing")
    assert models.names_packaged_default("default")
    said = []
    assert models.resolve("default", progress=said.append) == smollm2 and said == []
    assert (smollm2 / "arm-int4-provenance.json").is_file()


def test_missing_paths_and_hub_ids_are_told_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=r"model directory \./absent not found"):
        models.resolve("./absent")
    with pytest.raises(ModelError, match="is a file"):
        (tmp_path / "f").write_text("x")
        models.resolve(str(tmp_path / "f"))


def test_two_commands_at_once_convert_the_default_model_once(tmp_path):
    """A new machine, two commands started together (CI runs the demo beside the tests): one converts,
    the other waits on the lock and reuses the result; both get a complete model."""
    code = (
        "from arm_int4.models import default_model_dir\n"
        "d = default_model_dir(progress=lambda m: print('converting', flush=True))\n"
        "print(sorted(p.name for p in d.iterdir()))"
    )
    env = {**os.environ, "ARM_INT4_HOME": str(tmp_path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()  # no-op for a finished process; a hung one must not outlive the test
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    assert sum(o.count("converting") for o, _ in outs) == 1, outs
    listings = {o.strip().splitlines()[-1] for o, _ in outs}
    assert len(listings) == 1 and "arm-int4-provenance.json" in listings.pop()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        ".SmolLM2-135M-Instruct.lock",
        "SmolLM2-135M-Instruct",
    ]
