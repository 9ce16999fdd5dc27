"""Last.fm (HetRec 2011, ``hetrec2011-lastfm-2k``) -> per-user artist tagging.

An item is one (user, artist) pair that the user tagged with exactly ONE of the 15 most
used tags (``mta.tasks.lastfm.LABELS``; pairs with several of them are ambiguous and
dropped), dated by that tag assignment; artists that ``artists.dat`` does not name are left out.
Each user's items are sorted by date (ties by artist id); the latest ``queries`` become
queries and the earlier ones the history. Users with fewer than ``min_items`` items are
left out. The protocol the project uses (docs/evaluation.md): targets keep their first 10
history items (``--target-history 10``), anchor candidates their whole history, and only
users with at least 20 history items can be anchors (``--min-history 20``). Every Last.fm user is one person.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from mta.data.schema import User
from mta.errors import DataError
from mta.tasks.lastfm import LABELS, TASK

FILES = ("user_taggedartists.dat", "tags.dat", "artists.dat")


def _rows(path: Path, needed: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.exists():
        raise DataError(f"{path}: no such file (a Last.fm HetRec 2011 directory holds {', '.join(FILES)})")
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            missing = [c for c in needed if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
            return list(reader)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def lastfm_users(directory: Path, queries: int = 3, min_items: int = 13, max_users: int | None = None) -> list[User]:
    if queries < 1:
        raise DataError(f"--queries must be at least 1, got {queries}")
    if min_items < queries + 1:
        raise DataError(f"--min-items must leave a history item beside {queries} queries, got {min_items}")
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory")
    tag_names = {r["tagID"]: r["tagValue"].strip() for r in _rows(directory / "tags.dat", ("tagID", "tagValue"))}
    artists = {r["id"]: r["name"].strip() for r in _rows(directory / "artists.dat", ("id", "name"))}
    assignments = _rows(directory / "user_taggedartists.dat", ("userID", "artistID", "tagID", "day", "month", "year"))
    ids = {name: t for t, name in tag_names.items()}
    missing = [lb for lb in LABELS if lb not in ids]
    if missing:
        raise DataError(f"{directory / 'tags.dat'}: no tag named {missing[0]!r}; the task's 15 tags must all be "
                        "there (is this hetrec2011-lastfm-2k?)")
    label_of = {ids[lb]: lb for lb in LABELS}
    pairs: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    for r in assignments:
        # the release tags some artists that artists.dat does not name: without a name
        # there is no item to ask about, so those pairs are left out
        if r["tagID"] in label_of and r["artistID"] in artists:
            pairs[(r["userID"], r["artistID"])].append(r)
    by_user: dict[str, list[tuple[str, int, str, str]]] = defaultdict(list)
    for (uid, aid), rs in pairs.items():
        if len(rs) != 1:
            continue
        r = rs[0]
        try:
            date = f"{int(r['year']):04d}-{int(r['month']):02d}-{int(r['day']):02d}"
        except ValueError:
            raise DataError(f"{directory / 'user_taggedartists.dat'}: user {uid} artist {aid}: the date is not "
                            "numbers") from None
        by_user[uid].append((date, int(aid), aid, label_of[r["tagID"]]))
    users = []
    for uid in sorted(by_user, key=int):
        items = sorted(by_user[uid])
        if len(items) < min_items:
            continue
        hist, qs = items[:-queries], items[-queries:]
        users.append(User.model_validate({
            "user_id": uid, "task": TASK.name, "source": "lastfm-hetrec2011",
            "history": [{"id": aid, "artist": artists[aid], "tag": tag, "date": date} for date, _, aid, tag in hist],
            "queries": [{"id": f"{uid}-{aid}", "input": TASK.query_input(artists[aid]), "gold": tag}
                        for date, _, aid, tag in qs],
        }))
        if max_users is not None and len(users) >= max_users:
            break
    if not users:
        raise DataError(f"{directory}: no user has at least {min_items} items with one of the 15 tags")
    return users
