"""API keys: stored hashed (sha256), never logged; an admin role, and a user role bound to
one user id.

Keys file (JSON), written by `mta keys add`::

    {"keys": [{"name": "ops", "sha256": "...", "role": "admin"},
              {"name": "alice", "sha256": "...", "role": "user", "user": "u42"}]}

A key itself is ``mta-`` followed by 40 random hex digits; it is printed once, at
creation, and only its hash is kept.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from mta.errors import MtaError
from mta.paths import write_json_atomic
from mta.store import check_user_id


@dataclass(frozen=True)
class Principal:
    name: str
    role: str                 # "admin" | "user"
    user: str | None = None   # the one user a user-role key may act as


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Keys:
    def __init__(self, entries: list[dict]):
        self.entries = entries

    @classmethod
    def read(cls, path: Path) -> Keys:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MtaError(f"{path}: no such keys file; create one with: mta keys add --keys {path} --role admin") \
                from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MtaError(f"{path}: not a keys file ({e})") from None
        entries = raw.get("keys") if isinstance(raw, dict) else None
        if not isinstance(entries, list):
            raise MtaError(f"{path}: not a keys file (no \"keys\" list)")
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or e.get("role") not in ("admin", "user") or len(str(e.get("sha256"))) != 64:
                raise MtaError(f"{path}: key {i} needs a role (admin or user) and a sha256")
            if e["role"] == "user":
                check_user_id(e.get("user"))
        return cls(entries)

    def find(self, key: str | None) -> Principal | None:
        """The principal a presented key belongs to (compared in constant time), or None."""
        if not key:
            return None
        h = _hash(key)
        found = None
        for e in self.entries:
            if hmac.compare_digest(e["sha256"], h):
                found = Principal(e.get("name", "?"), e["role"], e.get("user"))
        return found


def add_key(path: Path, role: str, user: str | None, name: str) -> str:
    """Create a key, store its hash in ``path`` (created if missing), return the key."""
    if role not in ("admin", "user"):
        raise MtaError(f"role must be admin or user, got {role!r}")
    if role == "user":
        check_user_id(user)
    elif user:
        raise MtaError("an admin key is not bound to a user")
    entries = Keys.read(path).entries if Path(path).exists() else []
    key = "mta-" + secrets.token_hex(20)
    entries.append({"name": name, "sha256": _hash(key), "role": role, **({"user": user} if user else {})})
    write_json_atomic(Path(path), {"keys": entries}, mode=0o600)  # hashes only, and still its owner's alone
    return key
