import json
from pathlib import Path

import pytest

from mta.data.readers import load_dataset, write_jsonl
from mta.errors import DataError
from tests.conftest import write_json


def test_shared_lamp2_processed(lamp2_users):
    ds = load_dataset(lamp2_users)
    assert ds.layout == "processed" and ds.task == "lamp2" and not ds.synthetic
    assert len(ds.users) == 72
    assert sum(len(u.history) for u in ds.users) == 720
    assert sum(len(u.queries) for u in ds.users) == 72
    assert all(q.gold for u in ds.users for q in u.queries)


def test_official_layout_dir_and_files(lamp_official):
    for p in (lamp_official, lamp_official / "dev_questions.json",
              lamp_official / "dev_outputs.json"):
        ds = load_dataset(p)
        assert ds.layout == "lamp" and ds.task == "lamp2"
        assert [q.gold for u in ds.users for q in u.queries] == ["sci-fi", "comedy", "fantasy"]


def test_official_without_outputs_detects_task(lamp_official):
    (lamp_official / "dev_outputs.json").unlink()
    ds = load_dataset(lamp_official)
    assert ds.task == "lamp2" and all(q.gold is None for u in ds.users for q in u.queries)


def test_jsonl_round_trip(tmp_path, lamp_official):
    ds = load_dataset(lamp_official)
    write_jsonl(ds.users, tmp_path / "users.jsonl")
    again = load_dataset(tmp_path)
    assert again.layout == "jsonl" and again.users == ds.users and again.task == "lamp2"


@pytest.mark.parametrize("task, profile, inp", [
    ("lamp1", {"title": "t", "abstract": "a"},
     'For an author who has written the paper with the title "x", which reference is related?'),
    ("lamp3", {"text": "great", "score": "5"}, "What is the score of ... review: ok"),
    ("lamp4", {"text": "body", "title": "head"}, "Generate a headline for the following article: x"),
    ("lamp5", {"title": "t", "abstract": "a"}, "Generate a title for the following abstract of a paper: x"),
    ("lamp7", {"text": "hello"},
     "Paraphrase the following tweet without any explanation before or after it: x"),
])
def test_task_detection_official(tmp_path, task, profile, inp):
    write_json(tmp_path / "train_questions.json",
               [{"id": "1", "input": inp, "profile": [{"id": "p", **profile}]}])
    assert load_dataset(tmp_path).task == task


def _bad(tmp_path: Path, data, name="users.json") -> str:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(DataError) as e:
        load_dataset(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg
    return msg


USER = {"user_id": 1, "profile": [{"id": "a", "description": "d", "tag": "comedy"}],
        "query": [{"id": "q", "input": "Which tag does this movie relate to? x", "gold": "comedy"}]}


def test_malformed_json(tmp_path):
    assert "not valid JSON" in _bad(tmp_path, '[{"user_id": 1, "profile": [')


def test_missing_field(tmp_path):
    u = {k: v for k, v in USER.items() if k != "profile"}
    assert "record 0 (user 1): missing field 'profile'" in _bad(tmp_path, [u])
    u = json.loads(json.dumps(USER))
    del u["profile"][0]["tag"]
    msg = _bad(tmp_path, [u])
    assert "history item 0 has no field 'tag'" in msg


def test_missing_query_input(tmp_path):
    u = json.loads(json.dumps(USER))
    del u["query"][0]["input"]
    assert "missing field 'queries.0.input'" in _bad(tmp_path, [u])


def test_empty_history(tmp_path):
    u = dict(USER, profile=[])
    assert "history is empty" in _bad(tmp_path, [u])


def test_unknown_task(tmp_path):
    p = write_json(tmp_path / "users.json", [USER])
    with pytest.raises(Exception, match="unknown task 'lamp9'"):
        load_dataset(p, task="lamp9")


def test_undetectable_task(tmp_path):
    u = dict(USER, profile=[{"id": "a", "foo": "bar"}], query=[{"id": "q", "input": "?"}])
    assert "cannot tell the task" in _bad(tmp_path, [u])


def test_duplicate_ids(tmp_path):
    assert "duplicate user id '1'" in _bad(tmp_path, [USER, USER])
    u = dict(USER, profile=USER["profile"] * 2)
    assert "duplicate item id 'a'" in _bad(tmp_path, [u])


def test_bad_gold_label(tmp_path):
    u = dict(USER, query=[{"id": "q", "input": "x", "gold": "cartoon"}])
    assert "not one of the task's labels" in _bad(tmp_path, [u])


def test_golds_without_questions(tmp_path, lamp_official):
    out = json.loads((lamp_official / "dev_outputs.json").read_text())
    out["golds"].append({"id": "999", "output": "comedy"})
    write_json(lamp_official / "dev_outputs.json", out)
    with pytest.raises(DataError, match="gold.*have no question, first id '999'"):
        load_dataset(lamp_official)
    (lamp_official / "dev_questions.json").unlink()
    with pytest.raises(DataError, match="golds without questions"):
        load_dataset(lamp_official / "dev_outputs.json")


def test_jsonl_bad_line(tmp_path):
    p = tmp_path / "u.jsonl"
    p.write_text('{"user_id": "a", "history": [{"id": "1", "text": "x"}]}\n{oops\n')
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        load_dataset(p)


def test_missing_path_lists_nothing_found(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "nope.json")
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(DataError, match=r"found: other.txt"):
        load_dataset(tmp_path)
