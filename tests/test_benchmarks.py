"""Every script in ``benchmarks/`` runs: each has a ``--smoke`` mode (seconds, tiny sizes) that
this module runs in a subprocess, asserting that it exits 0, prints its ``ratio:`` lines (finite,
non-negative) and writes them to ``--json`` (and a Markdown table beside it). The numbers of a smoke
run mean nothing and are never asserted; the full runs stay manual (README / docs, "Speed").

A new script is picked up by the glob below: it fails here until it has a smoke mode.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_"))
#: Scripts whose smoke run another test already makes (and asserts on its own outputs).
SMOKE_ELSEWHERE = {"parity.py": "tests/test_parity.py::test_smoke_run_writes_json_and_markdown_with_expected_keys"}
RATIO_LINE = re.compile(r"^ratio: (?P<name>.+): (?P<median>[0-9.e+-]+)x \[(?P<lo>[0-9.e+-]+)\.\.(?P<hi>[0-9.e+-]+)\]")
SMOKE_TIMEOUT_S = 420


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # a smoke run times nothing; it must not oversubscribe the workers' cores
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_the_glob_finds_the_benchmarks():
    assert {"step_time.py", "inference.py", "local_parallel.py"} <= set(BENCHMARKS)


@pytest.mark.parametrize("script", BENCHMARKS)
def test_every_benchmark_offers_a_smoke_mode(script):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--help"], capture_output=True, text=True,
                         env=_env(), cwd=REPO, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--smoke" in out.stdout, f"benchmarks/{script} has no --smoke mode"


@pytest.mark.slow
@pytest.mark.parametrize("script", [s for s in BENCHMARKS if s not in SMOKE_ELSEWHERE])
def test_smoke_run_prints_and_records_its_ratio_lines(script, tmp_path, mirror):
    record = tmp_path / "out" / f"{Path(script).stem}.json"
    env = _env() | {"SPARSEFLOW_DATA_MIRROR": str(mirror)}
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--smoke", "--json", str(record)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=SMOKE_TIMEOUT_S)  # fmt: skip
    assert out.returncode == 0, f"benchmarks/{script} --smoke exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    lines = [m for m in map(RATIO_LINE.match, out.stdout.splitlines()) if m]
    assert lines, f"benchmarks/{script} --smoke printed no ratio line:\n{out.stdout[-3000:]}"
    for m in lines:
        assert all(math.isfinite(float(m[k])) and float(m[k]) >= 0 for k in ("median", "lo", "hi")), m[0]
    doc = json.loads(record.read_text())
    assert doc["smoke"] is True and doc["benchmark"] == Path(script).stem
    assert [r["name"] for r in doc["ratios"]] == [m["name"] for m in lines]
    assert record.with_suffix(".md").read_text().count("\n") == len(lines) + 2
