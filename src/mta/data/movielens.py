"""MovieLens ratings -> a LaMP-3-style per-user rating task.

Each user's ratings are sorted by time; the last ``queries`` become queries (predict the
score for that movie) and the earlier ones the history (title, genres, score). Half-star
ratings are rounded half up to the 1-5 integer scale LaMP-3 uses; the raw rating is kept
as ``rating`` on history items.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

from mta.data.schema import User
from mta.errors import DataError
from mta.tasks.movielens import TASK


def _score(rating: float) -> int:
    return int(min(5, max(1, math.floor(rating + 0.5))))


def _rows(path: Path, needed: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in needed if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        return list(reader)


def movielens_users(
    ratings: Path, movies: Path, queries: int = 1, min_ratings: int = 2,
    max_users: int | None = None,
) -> list[User]:
    if queries < 1:
        raise DataError(f"--queries must be at least 1, got {queries}")
    titles: dict[str, tuple[str, str]] = {}
    for row in _rows(movies, ("movieId", "title", "genres")):
        titles[row["movieId"]] = (row["title"], row["genres"].replace("|", ", "))
    by_user: dict[str, list[tuple[int, str, float]]] = defaultdict(list)
    for i, row in enumerate(_rows(ratings, ("userId", "movieId", "rating", "timestamp")), 2):
        try:
            by_user[row["userId"]].append((int(row["timestamp"]), row["movieId"], float(row["rating"])))
        except ValueError:
            raise DataError(f"{ratings}: line {i}: rating or timestamp is not a number") from None
        if row["movieId"] not in titles:
            raise DataError(f"{ratings}: line {i}: movieId {row['movieId']} is not in {movies}")
    users = []
    for uid in sorted(by_user, key=int):
        rows = sorted(by_user[uid])
        if len(rows) < max(min_ratings, queries + 1):
            continue
        hist, qs = rows[:-queries], rows[-queries:]
        items = [{"id": mid, "title": titles[mid][0], "genres": titles[mid][1],
                  "score": _score(r), "rating": r, "timestamp": ts} for ts, mid, r in hist]
        qrecs = [{"id": f"{uid}-{mid}", "input": TASK.query_input(*titles[mid]),
                  "gold": str(_score(r))} for ts, mid, r in qs]
        users.append(User.model_validate({
            "user_id": uid, "task": TASK.name, "source": "movielens",
            "history": items, "queries": qrecs,
        }))
        if max_users is not None and len(users) >= max_users:
            break
    if not users:
        raise DataError(f"{ratings}: no user has at least {max(min_ratings, queries + 1)} ratings")
    return users
