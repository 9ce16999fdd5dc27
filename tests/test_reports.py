"""docs/results.md's run tables are generated from the records under results/
(scripts/results-doc.py): the committed doc matches them, and a table edited by hand, or
one whose record changed, is caught."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "results-doc.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_the_results_doc_tables_match_their_records():
    r = _run("--check")
    assert r.returncode == 0, r.stderr
    assert " 0 tables" not in r.stdout and "tables match their runs" in r.stdout


def test_a_table_edited_by_hand_is_caught_and_rewritten(tmp_path):
    doc = (ROOT / "docs" / "results.md").read_text()
    run = "results/gpu-2026-12-04c/movielens-15b-lr3e-4"
    block = f"<!-- table: {run} -->"
    assert block in doc
    start = doc.index(block)
    row = doc.index("| mta | ", start)
    tampered = doc[:row] + doc[row:].replace("| mta | 0.969", "| mta | 0.700", 1)
    assert tampered != doc
    f = tmp_path / "results.md"
    f.write_text(tampered)
    r = _run("--check", str(f))
    assert r.returncode == 1 and run in r.stderr and "1 of" in r.stderr
    r = _run(str(f))
    assert r.returncode == 0 and "1 rewritten" in r.stdout and f.read_text() == doc


def test_a_marker_without_its_end_is_an_error(tmp_path):
    f = tmp_path / "doc.md"
    f.write_text("text\n<!-- table: results/lamp2-persons-smollm2 -->\nno end\n")
    r = _run("--check", str(f))
    assert r.returncode == 1 and "without its end marker" in r.stderr
    r = _run("--check", str(tmp_path / "absent.md"))
    assert r.returncode == 1 and "error:" in r.stderr
