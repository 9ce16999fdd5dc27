"""`user-prior`: the no-model baseline of a user's own history (mean score, most frequent
label), and its place in `mta eval`."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from mta.cli.main import main
from mta.data.schema import HistoryItem, Query, User
from mta.errors import MtaError
from mta.evaluation.methods import expand_methods, run_prior
from mta.tasks import get_task


def _user(uid, items):
    hist = [HistoryItem(id=f"{uid}-{i}", **it) for i, it in enumerate(items)]
    return User(user_id=uid, history=hist, queries=[Query(id=f"{uid}-q", input="q", gold="3")])


def test_prior_of_ratings_and_labels():
    rating = SimpleNamespace(task=get_task("movielens"))
    users = [_user("a", [{"title": "t", "genres": "g", "score": s} for s in (3, 4, 3, 4, 3)]),  # 3.4
             _user("b", [{"title": "t", "genres": "g", "score": s} for s in (3, 4)]),            # 3.5
             _user("c", [])]
    res = run_prior(rating, "user-prior", users)
    assert res.outputs == {"a": ["3"], "b": ["4"], "c": [""]} and res.preds["a"] == [3.0]
    assert res.bytes_per_user == {"a": 0, "b": 0, "c": 0}
    tags = SimpleNamespace(task=get_task("lamp2"))
    u = _user("d", [{"description": "x", "tag": t} for t in ("comedy", "sci-fi", "sci-fi", "comedy", "dystopia")])
    assert run_prior(tags, "user-prior", [u]).outputs == {"d": ["comedy"]}  # a tie: the first seen
    with pytest.raises(MtaError, match="rating or classification"):
        run_prior(SimpleNamespace(task=get_task("lamp5")), "user-prior", [u])


def test_user_prior_is_asked_for_not_in_all():
    assert "user-prior" not in expand_methods("all")
    assert expand_methods("rag-1,user-prior") == ["rag-1", "user-prior"]


def test_eval_reports_user_prior(tmp_path):
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "8", "--queries", "1"]) == 0
    out = tmp_path / "ev"
    assert main(["eval", "--data", str(data), "--out", str(out), "--methods", "rag-1,user-prior", "--n-boot", "100",
                 "--model", "tiny-random-llama", "--embedder", "hashing-embedder", "--max-new-tokens", "2"]) == 0
    rows = {r["method"]: r for r in json.loads((out / "metrics.json").read_text())["results"]}
    assert set(rows) == {"rag-1", "user-prior"} and rows["user-prior"]["users"] == 8
    diff = rows["rag-1"]["metrics"]["accuracy"]["diff_vs_user-prior"]  # a reference, as rag-1 is
    assert diff["ci"][0] <= diff["value"] <= diff["ci"][1]
    assert "Δaccuracy vs user-prior" in (out / "results.md").read_text()
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {p["method"] for p in preds} == {"rag-1", "user-prior"}


@pytest.mark.integration
def test_results_table_script_renders_the_runs_own_table(tmp_path):
    """docs/results.md's tables come from scripts/results-table.py: it prints exactly the
    run's results.md, under a level-3 heading."""
    import subprocess
    import sys
    from pathlib import Path

    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "8", "--queries", "1"]) == 0
    out = tmp_path / "ev"
    assert main(["eval", "--data", str(data), "--out", str(out), "--methods", "rag-1,user-prior,item-prior",
                 "--n-boot", "100", "--model", "tiny-random-llama", "--embedder", "hashing-embedder",
                 "--max-new-tokens", "2"]) == 0
    script = Path(__file__).resolve().parents[1] / "scripts" / "results-table.py"
    got = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, check=True).stdout
    assert got == "##" + (out / "results.md").read_text()
    assert "| item-prior |" in got and "2 folds over persons" in got
