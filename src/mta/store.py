"""The user store: what each adapted user costs on disk, and nothing else.

    STORE/users/<key>/meta.json      a ``UserRecord``: anchors (bank slots + user ids) and
                                     weights, merge, stack config, training stats, history
                                     hash, bank id
    STORE/users/<key>/stack/         the stacked adapter in PEFT format (absent when
                                     the user was adapted with fusion only)

A user's directory is written whole to a temporary name and renamed into place, so a
reader never sees half a user. ``key`` is a filesystem-safe form of the user id.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

from mta.data.schema import User
from mta.errors import MtaError
from mta.paths import atomic_path
from mta.records import UserRecord, dump, read_user_record

META = "meta.json"


def user_key(user_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", user_id)[:80]
    if safe != user_id:  # keep distinct ids distinct after sanitising
        safe += "-" + hashlib.sha256(user_id.encode()).hexdigest()[:8]
    return safe


def history_hash(user: User, task: str, extra: dict) -> str:
    """Changes when the history, the task or the adaptation settings change."""
    payload = {"task": task, "history": [it.model_dump() for it in user.history], "extra": extra}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class UserStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def user_dir(self, user_id: str) -> Path:
        return self.root / "users" / user_key(user_id)

    def has(self, user_id: str) -> bool:
        return (self.user_dir(user_id) / META).exists()

    def meta(self, user_id: str) -> UserRecord:
        f = self.user_dir(user_id) / META
        if not f.exists():
            raise MtaError(f"user '{user_id}' is not in store {self.root}"
                           + self._known_hint())
        return read_user_record(f)

    def _known_hint(self) -> str:
        ids = self.user_ids()[:5]
        return f" (stored: {', '.join(ids)}{' ...' if len(self.user_ids()) > 5 else ''})" if ids else \
            " (the store is empty)"

    def user_ids(self) -> list[str]:
        base = self.root / "users"
        if not base.is_dir():
            return []
        out = []
        for d in sorted(base.iterdir()):
            f = d / META
            if f.exists():
                try:
                    out.append(json.loads(f.read_text())["user_id"])
                except (json.JSONDecodeError, KeyError):
                    continue
        return out

    def put(self, record: UserRecord, write_stack) -> Path:
        """Write one user atomically; ``write_stack(dir)`` writes the stacked adapter (or None)."""
        dest = self.user_dir(record.user_id)
        with atomic_path(dest) as tmp:
            tmp.mkdir(parents=True)
            if write_stack is not None:
                write_stack(tmp / "stack")
            (tmp / META).write_text(dump(record), encoding="utf-8")
        return dest

    def bytes_of(self, user_id: str) -> int:
        d = self.user_dir(user_id)
        return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())

    def delete(self, user_id: str) -> None:
        d = self.user_dir(user_id)
        if not d.exists():
            raise MtaError(f"user '{user_id}' is not in store {self.root}{self._known_hint()}")
        shutil.rmtree(d)
