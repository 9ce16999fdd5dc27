"""What a server keeps in a store beside the users (uploaded histories, deletion marks,
adapt-job records) goes through UserStore, under its lock; the server's view of a
user's history (mta.serving.service.Histories) sits on it."""

from __future__ import annotations

import pytest

from mta.data.schema import User
from mta.errors import MtaError
from mta.serving.service import Histories
from mta.store import UserStore, user_key


def _user(uid: str, n: int = 2) -> User:
    return User(user_id=uid, history=[{"id": str(i), "description": f"d{i}", "tag": "drama"} for i in range(n)])


def test_histories_uploads_win_deletion_marks_hide_the_users_file(tmp_path):
    store = UserStore(tmp_path / "s", create=True)
    with store.writing():
        pass
    file_user, other = _user("from-file", 3), _user("other", 1)
    h = Histories(None, [file_user, other], store)
    assert h.get("from-file") == file_user and h.get("nobody") is None
    h.put(_user("from-file", 5))  # an upload replaces the users file's copy
    assert len(h.get("from-file").history) == 5 and store.uploaded_history("from-file") is not None
    assert h.delete("from-file") is True and h.get("from-file") is None
    assert store.history_deleted("from-file")  # a mark: other processes on this store stop using their copy
    assert Histories(None, [file_user], store).get("from-file") is None
    h.put(_user("from-file", 1))  # uploading again lifts the mark
    assert not store.history_deleted("from-file") and len(h.get("from-file").history) == 1
    assert h.delete("nobody") is False and not store.history_deleted("nobody")
    names = {p.name for p in (tmp_path / "s" / "histories").iterdir()}
    assert names == {f"{user_key('from-file')}.json"}  # files named by the id's hash only


def test_a_corrupt_stored_history_is_a_one_line_error(tmp_path):
    store = UserStore(tmp_path / "s", create=True)
    store.put_history(_user("u"))
    (tmp_path / "s" / "histories" / f"{user_key('u')}.json").write_text("{not json")
    with pytest.raises(MtaError, match="stored history of user 'u' is corrupt .*upload it again"):
        Histories(None, [], store).get("u")
    (tmp_path / "s" / "histories" / f"{user_key('u')}.json").write_text(_user("v").model_dump_json())
    with pytest.raises(MtaError, match="holds another user"):
        store.uploaded_history("u")


def test_job_records_are_kept_read_and_removed_with_their_user(tmp_path):
    store = UserStore(tmp_path / "s", create=True)
    store.put_job("adapt-1", {"job": "adapt-1", "user": "a", "status": "queued"})
    store.put_job("adapt-2", {"job": "adapt-2", "user": "b", "status": "done"})
    assert store.job("adapt-1")["status"] == "queued" and store.job("adapt-9") is None
    store.delete_jobs_of("a")
    assert store.job("adapt-1") is None and store.job("adapt-2")["user"] == "b"
    (tmp_path / "s" / "jobs" / "adapt-2.json").write_text("{")
    with pytest.raises(MtaError, match="record of job 'adapt-2' is corrupt"):
        store.job("adapt-2")


def test_a_record_is_read_again_only_when_its_file_changed(tmp_path, monkeypatch):
    """A server asks for the same users' records at every admission: the store reads a
    record's file once while it stays the same, and again as soon as it is replaced."""
    import mta.store as store_mod
    from mta.config import AdaptConfig
    from mta.records import UserRecord

    calls = []
    real = store_mod.read_user_record
    monkeypatch.setattr(store_mod, "read_user_record", lambda f: calls.append(f) or real(f))
    store = UserStore(tmp_path / "s", create=True)
    rec = UserRecord(user_id="u", task="synth", bank="b", history_hash="h", adapt=AdaptConfig(), merge="delta",
                     anchors=[], anchor_users=[], weights=[], similarities=[], history_items=3)
    with store.writing():
        store.put(rec, None)
    assert store.meta("u").user_id == "u" and store.meta("u").history_items == 3 and len(calls) == 1
    with store.writing():
        store.put(rec.model_copy(update={"history_items": 9}), None)
    assert store.meta("u").history_items == 9 and len(calls) == 2
    with store.writing():
        store.delete("u")
    with pytest.raises(MtaError, match="not in store"):
        store.meta("u")
