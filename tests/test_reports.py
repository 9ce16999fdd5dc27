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
    # a --loop-only record has no transformers-generate row: no column against it, none in the caption
    loop_only = results_doc.bench_table(ROOT / "results" / "gpu-2026-12-06" / "gpu-8b-gen.json")
    assert "first row" not in loop_only and "| decode configuration | tokens/s | ms per step |" in loop_only
    assert "| new loop: mta engine, 64 users, dense routing, stacks in the last 8 blocks | 4,154 | 10.43 | 0.794 |" \
        in loop_only


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


def test_fold_table_scores_the_finished_methods_of_a_stopped_run(tmp_path, monkeypatch, capsys):
    """scripts/fold-table.py: the methods finished on every fold asked for, scored on those
    folds' targets against the data's golds (MAE by hand), a method missing on a fold left
    out and named; its metrics.json renders as docs/results.md's tables do."""
    import json

    spec = importlib.util.spec_from_file_location("fold_table", ROOT / "scripts" / "fold-table.py")
    fold_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fold_table)
    item = {"title": "Heat (1995)", "genres": "Action", "score": 4, "rating": 4.0, "timestamp": 1}
    golds = {"a": ["4", "2"], "b": ["5"], "c": ["3"], "d": ["1"]}
    data = tmp_path / "users.jsonl"
    data.write_text("".join(json.dumps({"user_id": u, "task": "movielens", "history": [{**item, "id": f"{u}h"}],
                                        "queries": [{"id": f"{u}q{i}", "input": "x", "gold": g}
                                                    for i, g in enumerate(gs)]}) + "\n" for u, gs in golds.items()))
    run = tmp_path / "run"
    cfg = {"data": "/elsewhere/users.jsonl", "task": "movielens", "synthetic": False,
           "methods": ["rag-1", "task-lora", "mta"], "backbone": {"model": "tiny"},
           "configs": {"eval": {"folds": 2, "n_boot": 200, "seed": 0, "target_history": None, "history_queries": 0,
                                "persons": None}, "bank": {"anchors": 2}}}
    (run).mkdir()
    (run / "config.json").write_text(json.dumps(cfg))
    fold0 = {"rag-1": {"a": [4.0, 4.0], "b": [4.0]}, "task-lora": {"a": [4.0, 2.0], "b": [5.0]}}
    for m, preds in {**fold0, "mta": {"a": [1.0, 1.0], "b": [1.0]}}.items():
        if m == "mta":  # finished on fold 1 only: not in fold 0's table
            where = run / "fold1" / m
            preds = {"c": [3.0], "d": [1.0]}
        else:
            where = run / "fold0" / m
        where.mkdir(parents=True)
        (where / "result.json").write_text(json.dumps({"identity": "x", "result": {
            "preds": preds, "outputs": {u: [str(p) for p in v] for u, v in preds.items()},
            "bytes_per_user": {u: 0 for u in preds}}}))
    out = tmp_path / "table"
    monkeypatch.setattr(sys, "argv", ["fold-table.py", str(run), "--folds", "0", "--data", str(data),
                                      "--out", str(out)])
    fold_table.main()
    text = capsys.readouterr().out
    rows = {r["method"]: r for r in json.loads((out / "metrics.json").read_text())["results"]}
    assert set(rows) == {"rag-1", "task-lora"} and "Not run on these folds: mta." in text
    assert rows["rag-1"]["metrics"]["mae"]["value"] == pytest.approx((0 + 2 + 1) / 3)
    assert rows["task-lora"]["metrics"]["mae"]["value"] == 0.0 and rows["rag-1"]["persons"] == 2
    assert results_doc.results_table.table(out).splitlines()[0].startswith("### mta eval, fold 0 of 2 only")
    answers = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted((p["method"], p["user_id"]) for p in answers) == [("rag-1", "a"), ("rag-1", "b"),
                                                                   ("task-lora", "a"), ("task-lora", "b")]
    fold_table.main()  # again into its own table: rewritten
    (out / "metrics.json").write_text(json.dumps({"title": "a finished run's"}))
    with pytest.raises(SystemExit) as kept:
        fold_table.main()
    assert "a finished run's table" in str(kept.value.code)
    monkeypatch.setattr(sys, "argv", ["fold-table.py", str(run), "--folds", "1,2", "--data", str(data)])
    with pytest.raises(SystemExit) as bad:
        fold_table.main()
    assert "folds 0 to 1" in str(bad.value.code)
    # a run answered from the distribution says so in its protocol
    (run / "config.json").write_text(json.dumps({**cfg, "configs": {**cfg["configs"],
                                                                    "generate": {"rating_answer": "median"}}}))
    monkeypatch.setattr(sys, "argv", ["fold-table.py", str(run), "--folds", "0", "--data", str(data)])
    fold_table.main()
    assert "--rating-answer median" in capsys.readouterr().out


def test_answers_by_fold_counts_each_folds_targets_apart(tmp_path, monkeypatch, capsys):
    """scripts/answers.py --by-fold: each method's parsed answers counted per fold of the
    run's split.json (one fold's collapsed adapter shows as that fold's None answers); a
    run without split.json is a one-line error, and so is --by-fold with --against-run.
    --against-run: each method's answers against the same method's in another run."""
    import json

    spec = importlib.util.spec_from_file_location("answers", ROOT / "scripts" / "answers.py")
    answers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(answers)
    run = tmp_path / "run"
    run.mkdir()
    rows = [("task-lora", "a", ["rock", "pop"]), ("task-lora", "b", [None]), ("task-lora", "c", [None]),
            ("rag-1", "a", ["pop", "pop"]), ("rag-1", "b", ["rock"]), ("rag-1", "c", ["pop"])]
    (run / "predictions.jsonl").write_text("".join(
        json.dumps({"method": m, "user_id": u, "outputs": [str(x) for x in ps], "parsed": ps}) + "\n"
        for m, u, ps in rows))
    (run / "split.json").write_text(json.dumps([{"fold": 0, "targets": ["a"]}, {"fold": 1, "targets": ["b", "c"]}]))
    monkeypatch.setattr(sys, "argv", ["answers.py", str(run), "--by-fold"])
    answers.main()
    assert capsys.readouterr().out.splitlines() == [
        "task-lora fold 0: rock x1, pop x1", "task-lora fold 1: None x2",
        "rag-1 fold 0: pop x2", "rag-1 fold 1: rock x1, pop x1"]
    # against the same methods of another run: task-lora answered one query otherwise there
    other = tmp_path / "other"
    other.mkdir()
    (other / "predictions.jsonl").write_text("".join(
        json.dumps({"method": m, "user_id": u, "outputs": [str(x) for x in ps], "parsed": ps}) + "\n"
        for m, u, ps in [("task-lora", "b", ["pop"]) if (m, u) == ("task-lora", "b") else (m, u, ps)
                         for m, u, ps in rows]))
    monkeypatch.setattr(sys, "argv", ["answers.py", str(run), "--against-run", str(other)])
    answers.main()
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith(f"vs task-lora of {other}: 1 of 4 raw answers differ, 1 parsed")
    assert out[1].endswith(f"vs rag-1 of {other}: 0 of 4 raw answers differ, 0 parsed")
    (run / "split.json").unlink()
    monkeypatch.setattr(sys, "argv", ["answers.py", str(run), "--by-fold"])
    with pytest.raises(SystemExit) as bad:
        answers.main()
    assert "no readable split.json" in str(bad.value.code)
    # the two modes together: a usage error (exit 2), not one of them silently dropped
    monkeypatch.setattr(sys, "argv", ["answers.py", str(run), "--by-fold", "--against-run", str(other)])
    with pytest.raises(SystemExit) as both:
        answers.main()
    assert both.value.code == 2
    assert "does not compare with --against-run" in capsys.readouterr().err
