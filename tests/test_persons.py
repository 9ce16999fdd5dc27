"""Persons: inference from profile overlap, --persons, splits and the bootstrap over
persons, the leak check, and item-prior."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mta.cli.main import main
from mta.data.persons import infer_persons, query_item, read_persons, shared_counts
from mta.data.readers import load_dataset
from mta.data.schema import HistoryItem, Query, User
from mta.errors import DataError, MtaError
from mta.evaluation.leaks import check_folds, find_leaks
from mta.evaluation.methods import run_prior
from mta.evaluation.protocol import holdout, make_folds, pooled
from mta.evaluation.stats import _counts, bootstrap_ci, group_sum
from mta.evaluation.tune import dev_split
from mta.tasks import get_task

LAMP2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "lamp2m_movie_tagging_72users"
needs_lamp2 = pytest.mark.skipif(not (LAMP2 / "users.json").exists(), reason="../shared/data is absent")
TASK = get_task("lamp2")
TAGS = TASK.labels


def _item(i: int, desc: str, tag: str) -> HistoryItem:
    return HistoryItem(id=str(i), description=desc, tag=tag)


def _person(name: str, n_users: int, start: int) -> list[User]:
    """LaMP's structure: one person's records share all items but their own query, which
    sits in every sibling's profile (with the sibling's query in its place)."""
    items = [(f"{name} film {k}", TAGS[k % len(TAGS)]) for k in range(6)]
    qs = [(f"{name} question film {k}", TAGS[(k + 3) % len(TAGS)]) for k in range(n_users)]
    users = []
    for k in range(n_users):
        others = [q for j, q in enumerate(qs) if j != k]
        hist = [_item(start * 100 + k * 10 + j, d, t) for j, (d, t) in enumerate(items + others)]
        users.append(User(user_id=f"{name}-{k}", history=hist,
                          queries=[Query(id=f"{name}-q{k}", input=TASK.query_input(qs[k][0]), gold=qs[k][1])]))
    return users


def _people(n: int = 6, per: int = 3) -> list[User]:
    return [u for p in range(n) for u in _person(f"P{p}", per, p)]


def test_inference_groups_records_of_one_person_and_names_them_in_file_order():
    users = _people(4, 3)
    got = infer_persons(users)
    assert got == {u.user_id: f"p{int(u.user_id[1]) + 1:02d}" for u in users}
    # sharing one item, or under half of the smaller history, is not one person
    a = User(user_id="a", history=[_item(1, "x", "comedy"), _item(2, "y", "comedy"), _item(3, "z", "action")])
    b = User(user_id="b", history=[_item(7, "x", "comedy"), _item(8, "w", "comedy"), _item(9, "v", "action"),
                                   _item(10, "u", "action")])
    c = User(user_id="c", history=[_item(4, "x", "comedy"), _item(5, "y", "comedy"), _item(6, "q", "sci-fi")])
    assert infer_persons([a, b]) == {"a": "p01", "b": "p02"}
    assert infer_persons([a, b, c]) == {"a": "p01", "b": "p02", "c": "p01"}  # 2 of 3 shared
    # the same content under another item id is the same item (LaMP renumbers per record)
    assert len(set(infer_persons([a, c.model_copy(update={"user_id": "d"})]).values())) == 1


@needs_lamp2
def test_inference_reproduces_the_shared_persons_file():
    ds = load_dataset(LAMP2 / "users.json")
    expected = json.loads((LAMP2 / "persons.json").read_text())
    assert {u.user_id: u.person for u in ds.users} == expected
    assert len(set(expected.values())) == 24
    # the margin the rule relies on (mta.data.persons): siblings share 9 of 10 items,
    # records of different persons at most 3
    same, other = set(), set()
    for (i, j), n in shared_counts(ds.users).items():
        (same if ds.users[i].person == ds.users[j].person else other).add(n)
    assert same == {9} and max(other) == 3


@needs_lamp2
def test_another_persons_same_answer_is_common_and_not_a_leak():
    """docs/evaluation.md: 20 of the 72 queries have their (item, tag) in the history of
    another person; the leak check does not count those."""
    ds = load_dataset(LAMP2 / "users.json")
    given: dict[tuple[str, str], set[str]] = {}
    for u in ds.users:
        for it in u.history:
            inp, gold = TASK.item_example(it)
            given.setdefault((query_item(inp), gold), set()).add(u.person)
    crowd = [u for u in ds.users for q in u.queries if given.get((query_item(q.input), q.gold), set()) - {u.person}]
    assert len(crowd) == 20
    assert find_leaks(ds.users[:1], [u for u in ds.users if u.person != ds.users[0].person], TASK) == []


def test_official_lamp_files_get_persons_too(tmp_path):
    """The official layout (questions + outputs): one question per record, persons by overlap."""
    users = _people(3, 2)
    questions = [{"id": u.queries[0].id, "input": u.queries[0].input, "profile": [it.model_dump() for it in u.history]}
                 for u in users]
    golds = {"task": "LaMP_2", "golds": [{"id": u.queries[0].id, "output": u.queries[0].gold} for u in users]}
    (tmp_path / "dev_questions.json").write_text(json.dumps(questions))
    (tmp_path / "dev_outputs.json").write_text(json.dumps(golds))
    ds = load_dataset(tmp_path)
    assert ds.layout == "lamp" and [u.person for u in ds.users] == ["p01", "p01", "p02", "p02", "p03", "p03"]


def test_persons_file_overrides_and_must_cover_every_user(tmp_path):
    users = _people(2, 2)
    data = tmp_path / "users.json"
    data.write_text(json.dumps([{"user_id": u.user_id, "profile": [it.model_dump() for it in u.history],
                                 "query": [q.model_dump() for q in u.queries]} for u in users]))
    assert {u.person for u in load_dataset(data).users} == {"p01", "p02"}
    own = tmp_path / "own.json"
    own.write_text(json.dumps({u.user_id: u.user_id for u in users}))
    assert [u.person for u in load_dataset(data, persons=own).users] == [u.user_id for u in users]
    part = tmp_path / "part.json"
    part.write_text(json.dumps({users[0].user_id: "x"}))
    with pytest.raises(DataError, match="3 user\\(s\\) have no person, first 'P0-1'"):
        read_persons(part, users)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(DataError, match="mapping each user id"):
        read_persons(bad, users)


def test_folds_holdout_and_dev_split_keep_a_person_together():
    users = [u.model_copy(update={"person": f"p{u.user_id[1]}"}) for u in _people(6, 3)]
    for fold in make_folds(users, 2, seed=3):
        t = {u.person for u in fold.targets}
        assert len(fold.targets) == 9 and not t & {u.person for u in fold.candidates}
    h = holdout(users, 0.5, seed=1)
    assert len(h.targets) == 9 and not {u.person for u in h.targets} & {u.person for u in h.candidates}
    dev = set(dev_split(users, 1 / 3, seed=0))
    dev_persons = {u.person for u in users if u.user_id in dev}
    assert len(dev_persons) == 4 and dev == {u.user_id for u in users if u.person in dev_persons}  # whole persons
    # without persons a user is a person: the split is the one over users it always was
    singles = [u.model_copy(update={"person": None}) for u in users]
    assert [len(f.targets) for f in make_folds(singles, 3, seed=0)] == [6, 6, 6]
    with pytest.raises(MtaError, match="2 persons \\(6 users\\) cannot fill 3 folds"):
        make_folds(users[:6], 3, seed=0)


def test_pooled_drops_candidates_that_are_a_targets_person():
    users = _people(3, 2)
    fold = pooled(users[:2], users)  # person 0's two records are the targets
    assert {u.user_id for u in fold.candidates} == {u.user_id for u in users[2:]}


def test_leak_check_fires_on_siblings_and_not_on_another_persons_same_answer():
    users = _people(4, 3)
    targets, candidates = users[:1], users[1:]
    leaks = find_leaks(targets, candidates, TASK)
    assert {lk.candidate for lk in leaks} == {"P0-1", "P0-2"} and leaks[0].shared == 7
    with pytest.raises(MtaError, match="leak: 1 of 1 targets"):
        check_folds([(targets, candidates)], TASK)
    # another person who gave the same film the same tag is not a leak
    q = targets[0].queries[0]
    desc = q.input.split("description: ", 1)[1]
    stranger = User(user_id="s", history=[_item(1, desc, q.gold), _item(2, "other", "comedy")])
    assert find_leaks(targets, [stranger, *users[3:]], TASK) == []
    check_folds([(targets, users[3:])], TASK)


@needs_lamp2
def test_leak_check_fires_on_the_72_users_split_by_user_and_not_by_person():
    ds = load_dataset(LAMP2 / "users.json")
    by_person = make_folds(ds.users, 2, seed=0)
    check_folds([(f.targets, f.candidates) for f in by_person], TASK)
    by_user = make_folds([u.model_copy(update={"person": None}) for u in ds.users], 2, seed=0)
    with pytest.raises(MtaError, match="leak: \\d+ of 72 targets"):
        check_folds([(f.targets, f.candidates) for f in by_user], TASK)


def test_person_bootstrap_resamples_a_persons_queries_together():
    # two persons: A has 3 users all right, B has 1 user wrong; user rows [correct, n]
    rows = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    per = group_sum(rows, ["A", "A", "A", "B"])
    assert per.tolist() == [[3.0, 3.0], [0.0, 1.0]]

    def acc(s):
        return s[0] / s[1]

    # a resample of persons can only give accuracies 1, 0, or 3/4 (both once): never 1/2,
    # which resampling users apart from their person would give
    counts = _counts(2, 500, seed=0)
    vals = {round(acc(c @ per), 6) for c in counts}
    assert vals <= {1.0, 0.0, 0.75} and 0.75 in vals
    v, lo, hi = bootstrap_ci(per, acc, n_boot=500, seed=0)
    assert v == 0.75 and lo == 0.0 and hi == 1.0


def test_item_prior_takes_the_crowds_label_for_the_item_else_the_users_own():
    setup = SimpleNamespace(task=TASK)
    crowd = [User(user_id=f"c{i}", history=[_item(i, "film x", tag), _item(10 + i, "film y", "action")])
             for i, tag in enumerate(("comedy", "sci-fi", "comedy"))]
    me = User(user_id="me", history=[_item(1, "film z", "romance")],
              queries=[Query(id="q1", input=TASK.query_input("film x"), gold="comedy"),
                       Query(id="q2", input=TASK.query_input("  film   y "), gold="action"),
                       Query(id="q3", input=TASK.query_input("unseen"), gold="romance")])
    res = run_prior(setup, "item-prior", [me], crowd)
    assert res.outputs == {"me": ["comedy", "action", "romance"]}
    assert run_prior(setup, "user-prior", [me], crowd).outputs == {"me": ["romance"] * 3}
    rating = SimpleNamespace(task=get_task("movielens"))
    rt = rating.task
    raters = [User(user_id=f"r{s}", history=[HistoryItem(id="m", title="T", genres="G", score=s)]) for s in (4, 5, 5)]
    mine = User(user_id="u", history=[HistoryItem(id="n", title="N", genres="G", score=1)],
                queries=[Query(id="q", input=rt.query_input("T", "G"), gold="5")])
    assert run_prior(rating, "item-prior", [mine], raters).outputs == {"u": ["5"]}  # mean 4.67 -> 5


@needs_lamp2
def test_eval_on_the_72_users_splits_by_person_and_lists_persons(tmp_path):
    out = tmp_path / "ev"
    args = ["eval", "--data", str(LAMP2 / "users.json"), "--methods", "user-prior,item-prior", "--n-boot", "100",
            "--model", "tiny-random-llama", "--embedder", "hashing-embedder"]
    assert main([*args, "--out", str(out)]) == 0
    split = json.loads((out / "split.json").read_text())
    persons = [set(f["target_persons"]) for f in split]
    assert sum(map(len, persons)) == 24 and not persons[0] & persons[1]
    rows = {r["method"]: r for r in json.loads((out / "metrics.json").read_text())["results"]}
    assert rows["item-prior"]["persons"] == 24 and rows["item-prior"]["users"] == 72
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps({str(u.user_id): str(u.user_id) for u in load_dataset(LAMP2 / "users.json").users}))
    assert main([*args, "--out", str(tmp_path / "leaky"), "--persons", str(ids)]) == 2
    assert not (tmp_path / "leaky").exists()  # stopped before anything was written
    assert main([*args, "--out", str(tmp_path / "forced"), "--persons", str(ids), "--no-leak-check"]) == 0
