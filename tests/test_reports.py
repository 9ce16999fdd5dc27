"""The reports' tables (docs/results.md's eval runs, docs/performance.md's benchmark
records) are generated from the records under results/ (scripts/results-doc.py): the
committed docs match them, and a table edited by hand, or one whose record changed, is
caught."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("results_doc", ROOT / "scripts" / "results-doc.py")
results_doc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results_doc)
RUN = "results/gpu-2026-12-04c/movielens-15b-lr3e-4"


def _main(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["results-doc.py", *args])
    results_doc.main()


def test_the_reports_tables_match_their_records(monkeypatch, capsys):
    for name, marker in (("results.md", f"<!-- table: {RUN} -->"),
                         ("performance.md", "<!-- bench: results/gpu-2026-12-04e/gpu-8b.json -->"),
                         ("serving.md", "<!-- serve: results/gpu-2026-12-05/serve-sat.json -->")):
        doc = (ROOT / "docs" / name).read_text()
        new, changed = results_doc.regenerate(doc)
        assert changed == [] and new == doc and marker in doc
    _main(monkeypatch, "--check")
    out = capsys.readouterr().out
    for name in ("results", "performance", "serving"):
        assert re.search(rf"{name}\.md: [1-9]\d* tables match", out), out
    assert "| new loop: mta engine, 64 users, dense routing | 4,370 | 2.929 | 9.22 | 0.721 |" in \
        (ROOT / "docs" / "performance.md").read_text()
    assert "| compiled-async | `mta` | 1,989 | 10.7 | 14.3 | 10 | 9.8 | 4.8 | 12.0 | 12.6 | 1.6 | 83 | 940 | 0 |" in \
        (ROOT / "docs" / "serving.md").read_text()


def test_a_serve_load_record_that_is_not_open_loop_is_refused(tmp_path):
    import json

    f = tmp_path / "closed.json"
    f.write_text(json.dumps({"model": "m", "device": "cpu", "decoder": "graph", "rows": []}))
    with pytest.raises(SystemExit, match="not an open-loop serve_load record"):
        results_doc.serve_table(f)


def test_a_table_edited_by_hand_is_caught_and_rewritten(tmp_path, monkeypatch, capsys):
    doc = (ROOT / "docs" / "results.md").read_text()
    row = doc.index("| mta | ", doc.index(f"<!-- table: {RUN} -->"))
    tampered = doc[:row] + doc[row:].replace("| mta | 0.969", "| mta | 0.700", 1)
    assert tampered != doc
    f = tmp_path / "results.md"
    f.write_text(tampered)
    with pytest.raises(SystemExit) as e:
        _main(monkeypatch, "--check", str(f))
    err = capsys.readouterr().err
    assert e.value.code == 1 and re.search(rf"1 of \d+ tables differ from their records: {RUN}$", err)
    assert f.read_text() == tampered  # --check changes nothing
    _main(monkeypatch, str(f))
    assert "1 rewritten" in capsys.readouterr().out and f.read_text() == doc


def test_a_marker_without_its_end_and_a_missing_doc_are_errors(tmp_path, monkeypatch):
    f = tmp_path / "doc.md"
    f.write_text("text\n<!-- table: results/lamp2-persons-smollm2 -->\nno end\n")
    with pytest.raises(SystemExit, match="without its end marker"):
        _main(monkeypatch, "--check", str(f))
    with pytest.raises(SystemExit, match="^error: .*absent.md"):
        _main(monkeypatch, "--check", str(tmp_path / "absent.md"))


def test_stop_groups_counts_each_trials_right_answers_by_the_step_kept(tmp_path, monkeypatch, capsys):
    """scripts/stop-groups.py: users grouped by the kept step of a held-out trial's store
    list (step 0, between, the last), each trial's right answers against the data's gold;
    a list without kept steps is a usage error."""
    import json

    spec = importlib.util.spec_from_file_location("stop_groups", ROOT / "scripts" / "stop-groups.py")
    stop_groups = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stop_groups)
    data = tmp_path / "users.jsonl"
    users = [{"user_id": u, "history": [{"id": f"{u}h", "artist": "Duran Duran", "tag": "80s", "date": "2007-03-01"}],
              "queries": [{"id": f"{u}q{i}", "input": "x", "gold": g} for i, g in enumerate(golds)]}
             for u, golds in (("a", ["rock", "pop"]), ("b", ["pop"]), ("c", ["rock"]))]
    data.write_text("".join(json.dumps({**u, "task": "lastfm"}) + "\n" for u in users))
    kept = tmp_path / "list.txt"
    kept.write_text("│ a    │ 1 (0.5) │ delta │ 2 │ kept 0 of 4   │ 10 │\n"
                    "│ b    │ 1 (0.5) │ delta │ 2 │ kept 2 of 4   │ 10 │\n"
                    "│ c    │ 1 (0.5) │ delta │ 2 │ kept 4 of 4   │ 10 │\n")
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"user_id": u, "parsed": p}) + "\n"
                             for u, p in (("a", ["rock", "rock"]), ("b", ["pop"]), ("c", ["pop"]))))
    argv = ["stop-groups.py", "--data", str(data), "--kept", str(kept), f"t={preds}"]
    monkeypatch.setattr(sys, "argv", argv)
    stop_groups.main()
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]  # group, users, queries, right
    assert rows == [["step", "0", "1", "2", "1"], ["1-3", "1", "1", "1"], ["all", "4", "1", "1", "0"]]
    kept.write_text("nothing\n")
    with pytest.raises(SystemExit) as bad:
        stop_groups.main()
    assert bad.value.code == 2 and "no 'kept N of M' rows" in capsys.readouterr().err
