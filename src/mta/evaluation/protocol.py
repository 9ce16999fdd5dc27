"""Folds over persons: every user is a target exactly once and never their own anchor.

Every split here draws PERSONS (``User.person_id``; ``mta.data.persons``), never users
apart from their person: a person's users are all targets of one fold, or all
candidates. With F folds (seeded shuffle of the persons), fold f's persons' users are the
targets and the users of the other folds are the anchor candidates. Where every user is
their own person this is the split over users it always was (the same seeded order).
A target's adapters see only that target's history, never its queries (the training
examples are built from ``history`` alone). With a separate pool of anchor candidates
(``pooled``), there is one fold: every user of the data is a target, the pool (minus any
of them and their persons) the candidates.

What a target keeps (``prepare_targets``): optionally its last N history items become
extra test queries (LaMP has one query per user; this gives more per user, documented in
docs/evaluation.md), then optionally only its first N history items remain.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mta.data.persons import item_key, one_person, shared_counts
from mta.data.schema import Query, User
from mta.errors import MtaError


@dataclass(frozen=True)
class Fold:
    index: int
    targets: tuple[User, ...]
    candidates: tuple[User, ...]


def persons_of(users) -> list[str]:
    """The persons of ``users`` in order of their first user."""
    return list(dict.fromkeys(u.person_id for u in users))


def pooled(targets: list[User], candidates: list[User]) -> Fold:
    """One fold: all of ``targets`` evaluated with anchors from ``candidates``. A candidate
    that is a target (same user id), or the same person as one by the rule of
    ``mta.data.persons`` (profile overlap: person labels of two files are not comparable),
    is left out of the pool."""
    ids = {u.user_id for u in targets}
    distinct = [len({item_key(it) for it in u.history}) for u in (*targets, *candidates)]
    same = {j for (i, j), n in shared_counts(targets, candidates).items()
            if one_person(n, distinct[i], distinct[len(targets) + j])}
    pool = tuple(u for j, u in enumerate(candidates) if u.user_id not in ids and j not in same)
    if not pool:
        raise MtaError("the anchor pool has no user that is not also a target", ("EvalConfig.anchor_data",))
    return Fold(0, tuple(targets), pool)


def history_as_queries(user: User, n: int, task) -> User:
    """The user's last ``n`` history items become queries (input and gold in the task's
    query format) and leave the history; at least one history item must remain."""
    if not n:
        return user
    if len(user.history) <= n:
        raise MtaError(f"user '{user.user_id}' has {len(user.history)} history items; turning {n} into queries "
                       "would leave none", ("EvalConfig.history_queries",))
    taken = user.history[-n:]
    extra = []
    for it in taken:
        inp, gold = task.item_example(it)
        extra.append(Query(id=f"history:{it.id}", input=inp, gold=gold))
    return user.model_copy(update={"history": user.history[:-n], "queries": [*user.queries, *extra]})


def prepare_targets(users, history_queries: int, target_history: int | None, task) -> list[User]:
    out = [history_as_queries(u, history_queries, task) for u in users]
    if target_history:
        out = [u.model_copy(update={"history": u.history[:target_history]}) for u in out]
    return out


def _split(users: list[User], chosen: set[str]) -> tuple[tuple[User, ...], tuple[User, ...]]:
    """(users of the ``chosen`` persons, the others), each in the data's order."""
    return (tuple(u for u in users if u.person_id in chosen), tuple(u for u in users if u.person_id not in chosen))


def holdout(users: list[User], targets_fraction: float, seed: int) -> Fold:
    """One seeded split (`mta run`): a share of the persons are targets (all their users),
    the rest anchor candidates."""
    if not 0 < targets_fraction < 1:
        raise MtaError(f"the targets fraction must be in (0, 1), got {targets_fraction}",
                       ("RunConfig.targets_fraction",))
    persons = persons_of(users)
    order = list(range(len(persons)))
    random.Random(seed).shuffle(order)
    n_t = max(1, round(targets_fraction * len(persons)))
    if n_t >= len(persons):
        raise MtaError(f"{len(persons)} persons cannot be split into anchor candidates and targets")
    return Fold(0, *_split(users, {persons[i] for i in order[:n_t]}))


def make_folds(users: list[User], folds: int, seed: int) -> list[Fold]:
    if folds < 2:
        raise MtaError(f"folds must be at least 2 (anchors and targets must differ), got {folds}",
                       ("EvalConfig.folds",))
    persons = persons_of(users)
    if len(persons) < folds:
        raise MtaError(f"{len(persons)} persons ({len(users)} users) cannot fill {folds} folds")
    order = list(range(len(persons)))
    random.Random(seed).shuffle(order)
    return [Fold(f, *_split(users, {persons[i] for i in order[f::folds]})) for f in range(folds)]
