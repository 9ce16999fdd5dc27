"""Folds over users: every user is a target exactly once and never their own anchor.

With F folds (seeded shuffle), fold f's users are the targets and the users of the other
folds are the anchor candidates. A target's adapters see only that target's history,
never its queries (the training examples are built from ``history`` alone). With a
separate pool of anchor candidates (``pooled``), there is one fold: every user of the
data is a target, the pool (minus any of them) the candidates.

What a target keeps (``prepare_targets``): optionally its last N history items become
extra test queries (LaMP has one query per user; this gives more per user, documented in
docs/evaluation.md), then optionally only its first N history items remain.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mta.data.schema import Query, User
from mta.errors import MtaError


@dataclass(frozen=True)
class Fold:
    index: int
    targets: tuple[User, ...]
    candidates: tuple[User, ...]


def pooled(targets: list[User], candidates: list[User]) -> Fold:
    """One fold: all of ``targets`` evaluated with anchors from ``candidates``."""
    ids = {u.user_id for u in targets}
    pool = tuple(u for u in candidates if u.user_id not in ids)
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


def holdout(users: list[User], targets_fraction: float, seed: int) -> Fold:
    """One seeded split (`mta run`): a share of the users are targets, the rest anchor
    candidates."""
    if not 0 < targets_fraction < 1:
        raise MtaError(f"the targets fraction must be in (0, 1), got {targets_fraction}",
                       ("RunConfig.targets_fraction",))
    order = list(range(len(users)))
    random.Random(seed).shuffle(order)
    n_t = max(1, round(targets_fraction * len(users)))
    if n_t >= len(users):
        raise MtaError(f"{len(users)} users cannot be split into anchor candidates and targets")
    chosen = set(order[:n_t])
    return Fold(0, tuple(users[i] for i in sorted(chosen)),
                tuple(users[i] for i in range(len(users)) if i not in chosen))


def make_folds(users: list[User], folds: int, seed: int) -> list[Fold]:
    if folds < 2:
        raise MtaError(f"folds must be at least 2 (anchors and targets must differ), got {folds}",
                       ("EvalConfig.folds",))
    if len(users) < folds:
        raise MtaError(f"{len(users)} users cannot fill {folds} folds")
    order = list(range(len(users)))
    random.Random(seed).shuffle(order)
    parts = [sorted(order[f::folds]) for f in range(folds)]
    out = []
    for f, part in enumerate(parts):
        inside = set(part)
        out.append(Fold(f, tuple(users[i] for i in part),
                        tuple(users[i] for i in range(len(users)) if i not in inside)))
    return out
