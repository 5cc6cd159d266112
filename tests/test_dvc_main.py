"""DVC run through flows.dvc_main (what `make repro` runs): the same dvc.lock, byte for byte, as
plain DVC, with the lock parsed once per process instead of once per stage, and an edit by
another writer between two stages kept."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows import dvc_main
from flows.server import lock_reusing

ROOT = Path(__file__).resolve().parents[1]

# Floats in several spellings, a list, nested sections, unicode, a multi-line command: what the
# round-trip parser keeps layout for, and where a reused document could be written differently.
PARAMS = """\
lr: 0.0005
tiny: 1.0e-05
ratio: 3.0
name: "modèle"
seeds: [0, 1, 2]
train:
  optim:
    momentum: 0.9
    milestones: []
  methods:
  - dpf
  - rigl
"""
DVC_YAML = """\
stages:
  first:
    cmd: python -c "open('a.txt', 'w').write('a')"
    params:
      - lr
      - tiny
      - name
    outs:
      - a.txt
  second:
    foreach: [1, 2, 3]
    do:
      cmd: >-
        python -c "import sys; open('b${item}.txt', 'w').write(open('a.txt').read() * ${item})"
      deps:
        - a.txt
      params:
        - train
        - seeds
        - ratio
      outs:
        - b${item}.txt
  third:
    cmd: |
      python -c "open('c.txt', 'w').write('c')"
    deps:
      - b1.txt
      - b3.txt
    params:
      - params.yaml:
    metrics:
      - c.txt:
          cache: false
"""


def _repo(path: Path) -> Path:
    path.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=path, check=True)
    (path / "params.yaml").write_text(PARAMS, encoding="utf-8")
    (path / "dvc.yaml").write_text(DVC_YAML, encoding="utf-8")
    return path


def _dvc(cwd: Path, module: str, *args: str) -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_lock_is_the_one_plain_dvc_writes(tmp_path):
    plain, reused = _repo(tmp_path / "plain"), _repo(tmp_path / "reused")
    for args in (["repro"], ["repro", "--force"], ["repro", "--force", "second@2"]):
        _dvc(plain, "dvc", *args)
        _dvc(reused, "flows.dvc_main", *args)
        assert (reused / "dvc.lock").read_bytes() == (plain / "dvc.lock").read_bytes(), args
    assert (plain / "dvc.lock").read_text(encoding="utf-8").count("cmd:") == 5


def test_the_lock_is_parsed_once_per_process(tmp_path, monkeypatch):
    """In process: a forced repro of 5 stages parses an existing dvc.lock once, where plain DVC
    parses it once per stage."""
    import dvc.utils.serialize._yaml as yaml_io
    from dvc.cli import main as dvc_cli

    repo = _repo(tmp_path / "repo")
    monkeypatch.chdir(repo)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    assert dvc_cli(["repro", "-q"]) == 0
    parses = []
    real = yaml_io.parse_yaml_for_update
    monkeypatch.setattr(yaml_io, "parse_yaml_for_update", lambda text, path: parses.append(path) or real(text, path))
    assert dvc_cli(["repro", "-q", "--force"]) == 0
    plain = len([p for p in parses if Path(p).name == "dvc.lock"])
    assert plain == 5
    parses.clear()
    monkeypatch.setattr(dvc_main, "_written", {})
    import dvc.dvcfile

    monkeypatch.setattr(dvc.dvcfile, "modify_yaml", dvc.dvcfile.modify_yaml)  # undone after the test
    assert dvc_main.install()
    before = (repo / "dvc.lock").read_bytes()
    assert dvc_cli(["repro", "-q", "--force"]) == 0
    assert len([p for p in parses if Path(p).name == "dvc.lock"]) == 1
    assert (repo / "dvc.lock").read_bytes() == before  # the same stages, the same hashes


def test_an_edit_by_another_writer_is_parsed_and_kept(tmp_path, monkeypatch):
    import dvc.dvcfile

    monkeypatch.setattr(dvc.dvcfile, "modify_yaml", dvc.dvcfile.modify_yaml)
    monkeypatch.setattr(dvc_main, "_written", {})
    assert dvc_main.install()
    lock = tmp_path / "dvc.lock"
    with dvc_main.modify_lockfile(lock) as data:
        data.update({"schema": "2.0", "stages": {"a": {"cmd": "x"}}})
    first = dvc_main._written[str(lock)][1]
    with dvc_main.modify_lockfile(lock) as data:  # reused: nothing else wrote the file
        assert data is first
        data["stages"]["b"] = {"cmd": "y"}
    lock.write_text(lock.read_text() + "  c:\n    cmd: z\n", encoding="utf-8")  # another writer
    with dvc_main.modify_lockfile(lock) as data:
        assert set(data["stages"]) == {"a", "b", "c"}
        data["stages"]["d"] = {"cmd": "w"}
    text = lock.read_text()
    assert all(f"cmd: {c}" in text for c in "xyzw")
    # a block that raises writes nothing and leaves nothing to reuse
    with pytest.raises(RuntimeError), dvc_main.modify_lockfile(lock) as data:
        data["stages"]["e"] = {"cmd": "v"}
        raise RuntimeError
    assert lock.read_text() == text and str(lock) not in dvc_main._written
    with dvc_main.modify_lockfile(lock) as data:
        assert "e" not in data["stages"]
    # other files go to DVC's own modify_yaml
    other = tmp_path / "dvc.yaml"
    with dvc_main.modify_lockfile(other) as data:
        data["stages"] = {}
    assert other.is_file() and str(other) not in dvc_main._written


def test_with_server_runs_this_environments_dvc_through_it(tmp_path):
    ours = str(Path(sys.executable).parent / "dvc")
    assert lock_reusing([ours, "repro", "-f"]) == [sys.executable, "-m", "flows.dvc_main", "repro", "-f"]
    elsewhere = tmp_path / "dvc"
    elsewhere.write_text("#!/bin/sh\n")
    elsewhere.chmod(0o755)
    assert lock_reusing([str(elsewhere), "repro"]) == [str(elsewhere), "repro"]
    assert lock_reusing(["make", "repro"]) == ["make", "repro"] and lock_reusing([]) == []
    assert shutil.which(ours)
