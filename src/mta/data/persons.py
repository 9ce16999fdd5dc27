"""Persons: which users of a data set are one person.

LaMP builds its "users" from questions: every question of one LaMP user becomes a record
whose profile is that user's other items. Two records of one person share almost all
their profile items (the 72 LaMP-2 users of ``../shared/data``: 24 people, three records
each, sharing 9 of 10 items), and each record's query item sits in its siblings'
profiles. A split over records then puts a target's answer into other methods' training
data; every split and bootstrap must draw persons.

The rule (``infer_persons``): two users are one person when their histories share at
least half of the smaller history's items, and at least ``MIN_SHARED`` of them; persons
are the connected groups of that relation. An item is compared by its content (every
field but its ``id``, which LaMP renumbers per record). Users of different persons can
share an item (two people tag the same film alike): across the 24 persons of the LaMP-2
file no pair shares more than 3 of 10 items, while siblings share 9. Persons are named
``p01``, ``p02``... in the order of their first user in the file.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from mta.data.schema import HistoryItem, User
from mta.errors import DataError

MIN_SHARED = 2  # a one-item overlap is never evidence of one person


def item_key(item: HistoryItem) -> str:
    """An item's content without its id: equal for the same record in two profiles."""
    return json.dumps(item.fields, sort_keys=True, ensure_ascii=False, default=str)


def query_item(text: str) -> str:
    """Which item a query's input (or a history item in the query's format,
    ``Task.item_example``) asks about: the text with its white space folded. The leak
    check and ``item-prior`` match queries to history items by it."""
    return " ".join(text.split())


def shared_counts(users: Sequence[User], among: Sequence[User] | None = None) -> dict[tuple[int, int], int]:
    """{(i, j): items shared by ``users[i]`` and ``among[j]``} for every pair that shares
    any (``among`` defaults to ``users``, then only i < j). One inverted index, so the cost
    is the number of shared (item, user) pairs, not users squared."""
    same = among is None
    among = users if among is None else among
    index: dict[str, set[int]] = defaultdict(set)
    for j, u in enumerate(among):
        for it in u.history:
            index[item_key(it)].add(j)
    counts: dict[tuple[int, int], int] = defaultdict(int)
    for i, u in enumerate(users):
        for key in {item_key(it) for it in u.history}:
            for j in index.get(key, ()):
                if not same or j > i:
                    counts[(i, j)] += 1
    return counts


def one_person(shared: int, len_a: int, len_b: int) -> bool:
    """The rule: at least half of the smaller history, and at least ``MIN_SHARED`` items."""
    return shared >= MIN_SHARED and 2 * shared >= min(len_a, len_b)


def infer_persons(users: Sequence[User]) -> dict[str, str]:
    """{user id: person} by the module's rule; every user gets a person."""
    parent = list(range(len(users)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    distinct = [len({item_key(it) for it in u.history}) for u in users]
    for (i, j), n in shared_counts(users).items():
        if one_person(n, distinct[i], distinct[j]):
            a, b = root(i), root(j)
            if a != b:
                parent[max(a, b)] = min(a, b)  # the root is the group's first user
    roots = list(dict.fromkeys(root(i) for i in range(len(users))))
    width = max(2, len(str(len(roots))))
    name = {r: f"p{k + 1:0{width}d}" for k, r in enumerate(roots)}
    return {u.user_id: name[root(i)] for i, u in enumerate(users)}


def with_persons(users: Sequence[User], persons: dict[str, str]) -> list[User]:
    return [u.model_copy(update={"person": persons[u.user_id]}) for u in users]


def read_persons(path: Path, users: Sequence[User]) -> dict[str, str]:
    """A ``--persons`` file: a JSON object {user id: person id} covering every user."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such persons file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a JSON persons file ({e})") from None
    if not isinstance(raw, dict) or not all(isinstance(v, (str, int)) and not isinstance(v, bool)
                                            and str(v).strip() for v in raw.values()):
        raise DataError(f"{path}: expected a JSON object mapping each user id to a person id (a non-empty string)")
    mapping = {str(k).strip(): str(v).strip() for k, v in raw.items()}
    missing = [u.user_id for u in users if u.user_id not in mapping]
    if missing:
        raise DataError(f"{path}: {len(missing)} user(s) have no person, first '{missing[0]}'; the file must "
                        "map every user of the data")
    return mapping


def groups(users: Iterable[User]) -> dict[str, list[User]]:
    """{person: that person's users}, persons in order of their first user."""
    out: dict[str, list[User]] = {}
    for u in users:
        out.setdefault(u.person_id, []).append(u)
    return out
