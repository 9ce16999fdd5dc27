"""The user store: what each adapted user costs on disk, and nothing else.

    STORE/store.json                 marks the directory as a store (kind, schema version)
    STORE/.lock                      the one-writer lock (adapt, delete, the server)
    STORE/users/<key>/meta.json      a ``UserRecord``: anchors (bank slots + user ids) and
                                     weights, merge, stack config and its file's sha256,
                                     training stats, history hash, bank id
    STORE/users/<key>/stack/         the stacked adapter in PEFT format (absent when
                                     the user was adapted with fusion only)
    STORE/histories/<key>.json       a history uploaded to the server (``put_history``);
                  <key>.deleted      a user deleted over HTTP: the server's users file no
                                     longer speaks for them (no data of the user)
    STORE/jobs/<id>.json             the state of a server's adapt job (``put_job``)

User ids are data, never paths: ``key`` is the sha256 of the id (32 hex digits), and the
record holds the id itself, checked on every read. Any id of 1 to 1024 characters works
(dots, separators, control characters, unicode); two ids never share a directory.
A user's directory is written whole to a temporary name and renamed into place, so a
reader never sees half a user; a writer first finishes or undoes what a crashed writer
left (``paths.recover``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mta.data.schema import User
from mta.errors import MtaError
from mta.paths import (
    atomic_path,
    check_output_dir,
    dir_bytes,
    fault,
    recover,
    sha256_file,
    write_json_atomic,
    write_text_atomic,
    writer,
)
from mta.records import UserRecord, dump, read_user_record

log = logging.getLogger(__name__)
META = "meta.json"
RECORDS_KEPT = 4096  # user records kept parsed (by their file's path and bytes)
MARKER = "store.json"
STACK_WEIGHTS = "stack/adapter_model.safetensors"
MAX_ID = 1024


def check_user_id(user_id: object) -> str:
    if not isinstance(user_id, str) or not user_id:
        raise MtaError(f"a user id must be a non-empty string, got {user_id!r}")
    try:
        user_id.encode("utf-8")
    except UnicodeEncodeError:
        raise MtaError(f"a user id must be text that UTF-8 can encode; {user_id!r} holds a lone surrogate") from None
    if len(user_id) > MAX_ID:
        raise MtaError(f"user id of {len(user_id)} characters is longer than {MAX_ID}: {user_id[:40]!r}...")
    return user_id


def user_key(user_id: str) -> str:
    """The directory name of a user: a hash of the id, so no id is ever a path."""
    return hashlib.sha256(check_user_id(user_id).encode("utf-8", "surrogatepass")).hexdigest()[:32]


def history_hash(user: User, task: str, extra: dict) -> str:
    """Changes when the history, the task or the adaptation settings change."""
    payload = {"task": task, "history": [it.model_dump() for it in user.history], "extra": extra}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Entry:
    """One user directory as found on disk: its record, or why it cannot be read."""

    key: str
    record: UserRecord | None
    problem: str | None = None


class UserStore:
    """A store directory. ``create=True`` (writers) accepts a directory that does not exist
    yet or is empty; otherwise the directory must already be a store."""

    def __init__(self, root: Path, create: bool = False):
        self.root = Path(root)
        self._files = threading.Lock()  # histories and jobs: one thread at a time in this process
        self._records: OrderedDict[str, tuple] = OrderedDict()  # user -> (its file's stamp, record)
        if self.root.exists() and not self.root.is_dir():
            raise MtaError(f"{self.root}: exists and is not a directory")
        if (self.root / MARKER).is_file():
            return
        if not create:
            what = "does not exist" if not self.root.exists() else "is not a user store (no store.json)"
            raise MtaError(f"{self.root} {what}; give the directory `mta adapt` wrote")
        check_output_dir(self.root, lambda d: (d / MARKER).is_file(), "a user store")

    @contextmanager
    def writing(self) -> Iterator[None]:
        """The one writer: takes the lock, repairs what a crashed writer left, marks the store."""
        with writer(self.root, "user store"):
            if not (self.root / MARKER).is_file():
                write_json_atomic(self.root / MARKER, {"kind": "mta-user-store", "schema_version": 2})
            recover(self.root / "users")
            yield

    def user_dir(self, user_id: str) -> Path:
        return self.root / "users" / user_key(user_id)

    def _read_dir(self, user_id: str) -> Path:
        """Where a reader finds the user: their directory, or, while a writer that crashed
        between the two renames of replacing them has not been followed by the next writer
        (which completes it, ``paths.recover``), the previous version kept beside it."""
        d = self.user_dir(user_id)
        old = d.with_name(f".{d.name}.old")
        return old if not d.exists() and (old / META).is_file() else d

    def has(self, user_id: str) -> bool:
        return (self._read_dir(user_id) / META).exists()

    def meta(self, user_id: str) -> UserRecord:
        """The user's record. Parsed and validated again only when its file's bytes changed
        (a server asks for the same users' records at every admission)."""
        f = self._read_dir(user_id) / META
        try:
            raw = f.read_bytes()
        except FileNotFoundError:
            raise MtaError(f"user {user_id!r} is not in store {self.root}" + self._known_hint()) from None
        stamp = (str(f), hashlib.sha1(raw).hexdigest())
        hit = self._records.get(user_id)
        if hit is not None and hit[0] == stamp:
            self._records.move_to_end(user_id)
            return hit[1]
        rec = read_user_record(f)
        if rec.user_id != user_id:
            raise MtaError(f"{f}: corrupt user record (it holds user {rec.user_id!r}, not {user_id!r})")
        self._records[user_id] = (stamp, rec)
        while len(self._records) > RECORDS_KEPT:
            self._records.popitem(last=False)
        return rec

    def stack_path(self, user_id: str, rec: UserRecord) -> Path:
        """The user's stack directory, its file checked against the record's sha256."""
        d = self._read_dir(user_id) / "stack"
        f = self._read_dir(user_id) / STACK_WEIGHTS
        if not f.is_file():
            raise MtaError(f"user {user_id!r} in {self.root}: the stacked adapter is missing ({f})")
        if rec.stack and rec.stack.sha256 and sha256_file(f) != rec.stack.sha256:
            raise MtaError(f"user {user_id!r} in {self.root}: {f} does not match its checksum (corrupt); adapt "
                           "the user again (mta adapt --users ID --force)")
        return d

    def _known_hint(self) -> str:
        ids = self.user_ids()
        return f" (stored: {', '.join(map(repr, ids[:5]))}{' ...' if len(ids) > 5 else ''})" if ids else \
            " (the store is empty)"

    def entries(self) -> list[Entry]:
        """Every user directory, readable or not (corrupt ones carry their problem)."""
        base = self.root / "users"
        if not base.is_dir():
            return []
        out = []
        names = {d.name for d in base.iterdir()}
        for d in sorted(base.iterdir()):
            key = d.name
            if d.name.startswith("."):  # a temporary of a writer, live or crashed; or the previous
                key = d.name[1:-4] if d.name.endswith(".old") else ""  # version of a user whose
                if not key or key in names:  # replacement a crash cut between its renames
                    continue
            try:
                rec = read_user_record(d / META)
                if user_key(rec.user_id) != key:
                    raise MtaError(f"it holds user {rec.user_id!r}, whose key is not {key}")
                if rec.stack is not None and not (d / STACK_WEIGHTS).is_file():
                    raise MtaError(f"its stacked adapter {STACK_WEIGHTS} is missing or not a file")
                out.append(Entry(key, rec))
            except (MtaError, OSError) as e:
                out.append(Entry(key, None, str(e).split(": ", 1)[-1] if isinstance(e, MtaError) else str(e)))
        return out

    def user_ids(self) -> list[str]:
        return sorted(e.record.user_id for e in self.entries() if e.record)

    def put(self, record: UserRecord, write_stack: Callable[[Path], object] | None) -> Path:
        """Write one user atomically; ``write_stack(dir)`` writes the stacked adapter (or
        None). The stack file's sha256 goes into the record. Call inside ``writing()``."""
        dest = self.user_dir(record.user_id)
        with atomic_path(dest) as tmp:
            tmp.mkdir(parents=True)
            if write_stack is not None:
                write_stack(tmp / "stack")
                if record.stack is not None:
                    record = record.model_copy(update={"stack": record.stack.model_copy(
                        update={"sha256": sha256_file(tmp / STACK_WEIGHTS)})})
            (tmp / META).write_text(dump(record), encoding="utf-8")
            fault("store:user-written")
        return dest

    def unchanged(self, user_id: str, hist: str) -> bool:
        """Whether a user stored with this history hash can stay as they are: their record
        reads, says the same hash, and their stack file is there. A user whose record does
        not read or whose stack is missing is adapted again, not skipped. Stack checksums
        are not hashed here (a rerun over a large store would read every stack); a stack
        that fails its checksum when loaded says to adapt that user with --force."""
        if not self.has(user_id):
            return False
        try:
            rec = self.meta(user_id)
        except MtaError as e:
            log.warning("%s; adapting the user again", e)
            return False
        if rec.stack is not None and not (self._read_dir(user_id) / STACK_WEIGHTS).is_file():
            log.warning("user %r: the stacked adapter is missing; adapting the user again", user_id)
            return False
        return rec.history_hash == hist

    def bytes_of(self, user_id: str) -> int:
        return dir_bytes(self._read_dir(user_id))

    def delete(self, user_id: str) -> None:
        """Remove everything of one user (call inside ``writing()``)."""
        d = self.user_dir(user_id)
        if not d.exists():
            raise MtaError(f"user {user_id!r} is not in store {self.root}{self._known_hint()}")
        trash = d.with_name(f".{d.name}.deleted.tmp")  # one rename: gone whole, or not at all
        d.rename(trash)
        fault("store:user-unlinked")
        shutil.rmtree(trash)

    # -- what a server keeps beside the users: uploaded histories and adapt jobs --------------------
    def _history_file(self, user_id: str) -> Path:
        return self.root / "histories" / f"{user_key(user_id)}.json"

    def uploaded_history(self, user_id: str) -> User | None:
        """The history uploaded for ``user_id`` (None when there is none); a file that does
        not read as one is refused in one line."""
        f = self._history_file(user_id)
        with self._files:
            if not f.is_file():
                return None
            try:
                user = User.model_validate_json(f.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise MtaError(f"the stored history of user {user_id!r} is corrupt ({type(e).__name__}); "
                               "upload it again") from None
        if user.user_id != user_id:
            raise MtaError(f"the stored history of user {user_id!r} is corrupt (it holds another user); "
                           "upload it again")
        return user

    def history_deleted(self, user_id: str) -> bool:
        """Whether ``user_id`` was deleted here since their history was last uploaded."""
        return self._history_file(user_id).with_suffix(".deleted").exists()

    def put_history(self, user: User) -> None:
        """Keep an uploaded history (atomically), replacing any earlier one and any deletion mark."""
        f = self._history_file(user.user_id)
        with self._files:
            write_text_atomic(f, user.model_dump_json())
            f.with_suffix(".deleted").unlink(missing_ok=True)

    def delete_history(self, user_id: str, mark: bool) -> bool:
        """Forget an uploaded history; ``mark``: leave a deletion mark (an empty file named by
        the id's hash), so that every process serving this store stops using another copy
        (a users file). Returns whether an uploaded history was removed."""
        f = self._history_file(user_id)
        with self._files:
            had = f.is_file()
            f.unlink(missing_ok=True)
            if mark:
                write_text_atomic(f.with_suffix(".deleted"), "")
        return had

    def put_job(self, job_id: str, state: dict) -> None:
        """An adapt job's state (atomically), so that any process serving the store answers for it."""
        with self._files:
            write_json_atomic(self.root / "jobs" / f"{job_id}.json", state)

    def job(self, job_id: str) -> dict | None:
        f = self.root / "jobs" / f"{job_id}.json"
        with self._files:
            try:
                return json.loads(f.read_text(encoding="utf-8"))
            except FileNotFoundError:
                return None
            except (OSError, UnicodeDecodeError, ValueError):
                raise MtaError(f"the record of job {job_id!r} is corrupt") from None

    def delete_jobs_of(self, user_id: str) -> None:
        """Remove the job records about ``user_id`` (nothing of a deleted user remains)."""
        with self._files:
            for f in (self.root / "jobs").glob("*.json"):
                try:
                    if json.loads(f.read_text(encoding="utf-8")).get("user") == user_id:
                        f.unlink()
                except (OSError, ValueError):
                    continue
