"""The README's results are the committed reports' (`sparseflow results`), never typed by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_core.summary import BENCH_END, BENCH_START, END, START, benchmarks_markdown, results_markdown, splice

REPO = Path(__file__).resolve().parents[1]
SUMMARY = [sys.executable, "-m", "sparse_core.summary"]


def test_the_readme_results_block_is_generated_from_the_committed_reports():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = results_markdown(REPO / "reports").replace(str(REPO / "reports"), "reports")
    assert block in readme, "README's results are stale: run `python -m sparse_core.summary --write README.md`"
    speed = benchmarks_markdown(REPO / "reports" / "benchmarks").replace(str(REPO / "reports"), "reports")
    assert speed in readme, "README's speed figures are stale: run `python -m sparse_core.summary --write README.md`"


def _record(**change) -> dict:
    doc = {"benchmark": "step_time", "command": "python benchmarks/step_time.py --json x.json", "smoke": False,
           "machine": {"cpu": "CPU X", "cpu_flags": ["avx2"], "cores": 2, "torch": "2.x", "threads": 2},
           "ratios": [{"name": "dpf / dense step time", "median": 1.02, "lo": 1.0, "hi": 1.04, "at_most": 1.05, "met": True},
                      {"name": "bf16 / fp32 speed-up", "median": 0.1, "lo": 0.09, "hi": 0.11, "met": None}]}  # fmt: skip
    return doc | change


def test_the_speed_block_renders_each_benchmark_record(tmp_path):
    (tmp_path / "step_time.json").write_text(json.dumps(_record()))
    block = benchmarks_markdown(tmp_path)
    assert block.startswith(BENCH_START) and block.endswith(BENCH_END)
    assert "`python benchmarks/step_time.py --json x.json`" in block and "CPU X, flags avx2" in block
    assert "| dpf / dense step time | 1.020× | 1.000..1.040 | ≤ 1.05× met |" in block
    assert "| bf16 / fp32 speed-up | 0.100× | 0.090..0.110 |  |" in block


@pytest.mark.parametrize(("change", "message"), [
    ({"smoke": True}, "a --smoke record"),
    ({"ratios": {"x": 1}}, "key 'ratios' must be a list"),
    ({"machine": []}, "key 'machine' must be a dict"),
    ({"ratios": [{"name": "x", "median": float("nan"), "lo": 1, "hi": 1}]}, r"ratios\[0\] needs a name and finite"),
    ({"ratios": [{"name": "x", "median": True, "lo": 1, "hi": 1}]}, r"ratios\[0\]"),
])  # fmt: skip
def test_a_record_that_is_not_a_full_benchmark_run_is_refused_naming_the_file(tmp_path, change, message):
    (tmp_path / "bad.json").write_text(json.dumps(_record(**change)))
    with pytest.raises(ValueError, match=rf"bad.json: .*{message}"):
        benchmarks_markdown(tmp_path)


def test_no_record_is_a_clear_error(tmp_path):
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(ValueError, match="x.json: expected a JSON object"):
        benchmarks_markdown(tmp_path)
    with pytest.raises(FileNotFoundError, match="no benchmark record"):
        benchmarks_markdown(tmp_path / "empty")


def _reports(folder: Path, verdict: str = "holds") -> Path:
    folder.mkdir()
    from sparse_core.report import COLUMNS

    names = [h for h, *_ in COLUMNS]
    header = ",".join(["model", *(f"{h},{h} std" for h in names), "n"])
    values = ",".join(["dense", *(["0.9,0.01"] * len(names)), "3"])
    (folder / "summary.csv").write_text(f"{header}\n{values}\n")
    (folder / "claims.json").write_text(json.dumps({"dpf_ge_gmp": {
        "verdict": verdict, "n": 3, "diff_mean": 0.01, "ci_low": -0.02, "ci_high": 0.04, "half_width": 0.03,
        "n_needed": 12, "design_vs_paper": "paper's ratios"}}))
    return folder


def test_the_block_follows_the_reports_and_replaces_only_the_marked_part(tmp_path):
    reports = _reports(tmp_path / "reports")
    block = results_markdown(reports)
    assert block.startswith(START) and block.endswith(END)
    assert "| dense | 3 | 0.9000 ± 0.0100 |" in block
    assert "DPF ≥ GMP" in block and "+0.0100 [-0.0200, +0.0400]" in block and "needs about n = 12" in block
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{START}\nold numbers\n{END}\nafter\n")
    subprocess.run([*SUMMARY, "--reports", str(reports), "--write", str(readme)],
                   cwd=REPO, check=True, capture_output=True)
    text = readme.read_text()
    assert "old numbers" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("\nafter\n")
    assert block in text
    (reports / "claims.json").write_text(json.dumps({"dpf_ge_gmp": {"verdict": "contradicted", "n": 3}}))
    assert "contradicted" in results_markdown(reports) and "holds" not in results_markdown(reports)


@pytest.mark.parametrize("text", ["no markers", f"{START}\n{START}\n{END}", f"{END}\n{START}"])
def test_a_readme_without_one_pair_of_markers_is_refused(text):
    with pytest.raises(ValueError, match="README.md: needs exactly one"):
        splice(text, "block")


def test_missing_reports_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="summary.csv: not found"):
        results_markdown(tmp_path)
    out = subprocess.run([*SUMMARY, "--reports", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode != 0 and "summary.csv: not found" in out.stderr and "Traceback" not in out.stderr
