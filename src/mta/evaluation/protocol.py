"""Folds over users: every user is a target exactly once and never their own anchor.

With F folds (seeded shuffle), fold f's users are the targets and the users of the other
folds are the anchor candidates. A target's adapters see only that target's history,
never its queries (the training examples are built from ``history`` alone).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mta.data.schema import User
from mta.errors import MtaError


@dataclass(frozen=True)
class Fold:
    index: int
    targets: tuple[User, ...]
    candidates: tuple[User, ...]


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
