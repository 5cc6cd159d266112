"""The README's results are the committed reports' (`sparseflow results`), never typed by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_core.summary import END, START, results_markdown, splice

REPO = Path(__file__).resolve().parents[1]
SUMMARY = [sys.executable, "-m", "sparse_core.summary"]


def test_the_readme_results_block_is_generated_from_the_committed_reports():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = results_markdown(REPO / "reports").replace(str(REPO / "reports"), "reports")
    assert block in readme, "README's results are stale: run `python -m sparse_core.summary --write README.md`"


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
