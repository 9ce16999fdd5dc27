"""The leak check: no target's test answer is in the training data of its fold.

A target LEAKS when one of its queries, as a history item (the query's input with its
gold answer, ``Task.item_example``'s format), is in the history of a training user of its
fold (an anchor candidate: what anchors, the task LoRA and OPPU's task part train on)
who is the target's own person by the rule of ``mta.data.persons`` (their histories
share at least half of the smaller one). That is LaMP's sibling record: the same
person's answer, copied into the other record's profile.

The same item with the same answer in the history of ANOTHER person is not a leak: two
people tagging a film alike is the signal ``item-prior`` and every collaborative method
may use (20 of the 72 LaMP-2 queries have such a match across persons). The check reads
the data, not the person labels: it catches a split by user id, a wrong ``--persons``
file, or a JSONL file whose persons were never set.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from mta.data.persons import item_key, one_person, query_item
from mta.data.schema import User
from mta.errors import MtaError
from mta.evaluation.protocol import prepare_targets


@dataclass(frozen=True)
class Leak:
    target: str
    query: str
    candidate: str
    item: str
    shared: int
    history: int


def find_leaks(targets: Sequence[User], candidates: Sequence[User], task) -> list[Leak]:
    """Every (target query, training user) pair that leaks, by the module's rule."""
    by_example: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
    for j, c in enumerate(candidates):
        for it in c.history:
            inp, gold = task.item_example(it)
            by_example[(query_item(inp), query_item(str(gold)))].append((j, it.id))
    keys = [None] * len(candidates)
    leaks = []
    for t in targets:
        mine = None
        for q in t.queries:
            if q.gold is None:
                continue
            for j, item_id in by_example.get((query_item(q.input), query_item(q.gold)), ()):
                if keys[j] is None:
                    keys[j] = {item_key(it) for it in candidates[j].history}
                if mine is None:
                    mine = {item_key(it) for it in t.history}
                shared = len(mine & keys[j])
                if one_person(shared, len(mine), len(keys[j])):
                    leaks.append(Leak(t.user_id, q.id, candidates[j].user_id, item_id, shared, len(mine)))
    return leaks


def check_split(folds, task, history_queries: int = 0, target_history: int | None = None) -> None:
    """``check_folds`` on ``protocol.Fold``s, their targets shaped as the evaluation will
    shape them (``prepare_targets``): what a command calls before it writes anything."""
    check_folds([(prepare_targets(f.targets, history_queries, target_history, task), f.candidates) for f in folds],
                task)


def check_folds(folds: Sequence[tuple[Sequence[User], Sequence[User]]], task) -> None:
    """Raise one line when any fold's (targets, candidates) leak, before anything trains."""
    leaks = [lk for targets, candidates in folds for lk in find_leaks(targets, candidates, task)]
    if not leaks:
        return
    n = len({lk.target for lk in leaks})
    total = sum(len(t) for t, _ in folds)
    lk = leaks[0]
    raise MtaError(
        f"leak: {n} of {total} targets have a query answer in their fold's training data (user '{lk.target}' "
        f"query '{lk.query}' is item '{lk.item}' of anchor candidate '{lk.candidate}', who shares {lk.shared} of "
        f"{lk.history} history items: one person); split by person (--persons FILE, or data with persons) or "
        "pass --no-leak-check")
