"""Nothing lost, nothing mixed up: hostile user ids, locks, checksums, validation before
writing, environment errors, and a process killed at many points (docs/reliability.md).
Each "Why" case of the reliability issue has a test here, named after it."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mta.bank import build_bank
from mta.cli.main import main
from mta.config import AdaptConfig, BankConfig, GenerateConfig
from mta.data.readers import load_dataset, write_jsonl
from mta.data.synth import synth_users
from mta.errors import MtaError
from mta.loaded_bank import LoadedBank, Request
from mta.paths import writer
from mta.store import UserStore, user_key
from mta.tasks import get_task
from tests.engine_helpers import tiny_backbone

ROOT = Path(__file__).resolve().parents[1]
TASK = get_task("synth")
TINY = ["--model", "tiny-random-llama", "--embedder", "hashing-embedder"]
FAST = dict(batch_size=4, max_length=160)


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    d = tmp_path_factory.mktemp("bank")
    backbone = tiny_backbone()
    build_bank(backbone, synth_users(4, seed=9), TASK, BankConfig.make(anchors=2, min_history=1, **FAST),
               d / "bank")
    return LoadedBank(backbone, d / "bank", TASK), d / "bank"


def _users(ids: list[str], seed: int = 3):
    base = synth_users(len(ids), seed=seed, queries=1)
    return [u.model_copy(update={"user_id": i}) for u, i in zip(base, ids)]


# -- user ids are data, never paths --------------------------------------------------------------
HOSTILE = [".", "..", "a/b", "a_b", "../../etc", "/abs", "\\\\win", "x\x00y", "tab\there", "ünïcødé", "a" * 1024,
           "con", "-rf", "*", "~"]


def test_hostile_ids_round_trip(bank, tmp_path):
    """`.` no longer wipes the store, `a/b` and its old cleaned form stay two users, and
    every id goes through adapt -> list -> answer -> export -> delete alone."""
    loaded, _ = bank
    store = UserStore(tmp_path / "store", create=True)
    users = _users(HOSTILE)
    stats = loaded.adapt(users, AdaptConfig.make(**FAST), store)
    assert stats["adapted"] == len(HOSTILE)
    assert sorted(store.user_ids()) == sorted(HOSTILE)
    assert len({user_key(i) for i in HOSTILE}) == len(HOSTILE)
    assert all(len(user_key(i)) == 32 for i in HOSTILE)
    answers = loaded.answer([Request(u.user_id, u.queries[0].input, u) for u in users],
                            GenerateConfig(max_new_tokens=2), store)
    assert [a.route for a in answers] == ["mta"] * len(HOSTILE)
    loaded.export("..", store, tmp_path / "exp")
    with store.writing():
        store.delete(".")
    assert "." not in store.user_ids() and len(store.user_ids()) == len(HOSTILE) - 1
    assert (tmp_path / "store" / "store.json").is_file()  # the store itself is intact


def test_too_long_or_empty_ids_are_one_line_errors(tmp_path):
    store = UserStore(tmp_path / "s", create=True)
    for bad in ("", "x" * 1025):
        with pytest.raises(MtaError, match="user id"):
            store.user_dir(bad)


def test_store_delete_dot_and_dotdot_touch_nothing(bank, tmp_path, capsys):
    loaded, _ = bank
    store = UserStore(tmp_path / "store", create=True)
    loaded.adapt(_users(["u1", "u2"]), AdaptConfig.make(**FAST), store)
    for bad in (".", ".."):
        assert main(["store", "delete", str(tmp_path / "store"), bad]) == 2
    assert sorted(store.user_ids()) == ["u1", "u2"] and (tmp_path / "store").is_dir()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40)
                    .filter(lambda s: s.strip() == s), min_size=1, max_size=3, unique=True))
@example(ids=["0\x850", "a\u2028b"])  # found by CI: str.splitlines() split JSONL lines inside such ids
def test_any_ids_through_the_whole_life_cycle(bank, tmp_path_factory, ids):
    loaded, _ = bank
    tmp = tmp_path_factory.mktemp("ids")
    data = tmp / "users.jsonl"
    write_jsonl(_users(ids), data)  # through the file format too
    users = load_dataset(data, "synth").users
    assert [u.user_id for u in users] == ids
    store = UserStore(tmp / "store", create=True)
    loaded.adapt(users, AdaptConfig.make(stack_epochs=0, **FAST), store)  # fusion only: fast
    assert sorted(store.user_ids()) == sorted(ids)
    got = loaded.answer([Request(u.user_id, "q", u) for u in users], GenerateConfig(max_new_tokens=1), store)
    assert [a.user_id for a in got] == ids and all(a.route == "fusion" for a in got)
    loaded.export(ids[0], store, tmp / "exp")
    with store.writing():
        for i in ids:
            store.delete(i)
    assert store.user_ids() == [] and not list((tmp / "store" / "users").iterdir())


# -- malformed data files: a DataError, never a traceback ------------------------------------------
@settings(max_examples=60, deadline=None)
@given(blob=st.one_of(
    st.binary(max_size=300),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                 lambda c: st.lists(c, max_size=4) | st.dictionaries(
                     st.sampled_from(["user_id", "history", "queries", "id", "tag", "description", "profile",
                                      "input", "gold", "task", "query"]), c, max_size=5), max_leaves=12)
    .map(lambda v: json.dumps(v).encode())),
    suffix=st.sampled_from([".jsonl", ".json"]))
def test_malformed_data_files_are_data_errors(tmp_path_factory, blob, suffix):
    f = tmp_path_factory.mktemp("bad") / f"users{suffix}"
    f.write_bytes(blob)
    try:
        load_dataset(f, "synth")
    except MtaError:
        pass


def test_non_utf8_jsonl_and_input_file(tmp_path, bank, capsys):
    bad = tmp_path / "u.jsonl"
    bad.write_bytes(b'{"user_id": "\xff"}\n')
    assert main(["data", "inspect", str(bad)]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    _, bank_dir = bank
    reqs = tmp_path / "r.jsonl"
    reqs.write_bytes(b'{"user_id": "u", "input": "\xfe"}\n')
    assert main(["generate", "--bank", str(bank_dir), "--input-file", str(reqs), *TINY]) == 2
    assert main(["generate", "--bank", str(bank_dir), "--input-file", str(tmp_path), *TINY]) == 2  # a directory
    assert main(["generate", "--bank", str(bank_dir), "--user", "u", "--input", "  ", *TINY]) == 2  # empty
    (tmp_path / "empty.jsonl").write_text("\n")
    assert main(["generate", "--bank", str(bank_dir), "--input-file", str(tmp_path / "empty.jsonl"), *TINY]) == 2
    assert main(["generate", "--bank", str(bank_dir), "--store", str(tmp_path / "typo"), "--user", "u",
                 "--input", "q", *TINY]) == 2  # a mistyped store is reported, not taken as empty


# -- validate everything before writing anything ------------------------------------------------
def test_bank_build_with_a_bad_value_writes_nothing(tmp_path):
    data = tmp_path / "d"
    assert main(["data", "synth", "--out", str(data), "--users", "4"]) == 0
    out = tmp_path / "bank"
    assert main(["bank", "build", "--data", str(data), "--out", str(out), "--bank-lr", "inf", *TINY]) == 2
    assert not out.exists()
    assert main(["bank", "build", "--data", str(data), "--out", str(out), "--anchors", "1", "--min-history", "1",
                 *TINY]) == 0  # the corrected run goes through


def test_adapt_checks_bank_model_task_before_writing(tmp_path, bank):
    data = tmp_path / "d"
    assert main(["data", "synth", "--out", str(data), "--users", "3"]) == 0
    for args in (["--bank", str(tmp_path / "nobank")], ["--bank", str(bank[1]), "--top-k", "5"],
                 ["--bank", str(bank[1]), "--task", "lamp3"], ["--bank", str(bank[1]), "--model", "nope"]):
        out = tmp_path / "store"
        assert main(["adapt", *args, "--data", str(data), "--out", str(out), *TINY[2:]]) == 2, args
        assert not out.exists(), args


def test_outputs_never_replace_what_is_not_ours(tmp_path, bank):
    loaded, bank_dir = bank
    store = UserStore(tmp_path / "store", create=True)
    loaded.adapt(_users(["u"]), AdaptConfig.make(**FAST), store)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    for out in (foreign, a_file, tmp_path / "store"):
        assert main(["export", "--bank", str(bank_dir), "--store", str(tmp_path / "store"), "--user", "u", "--out",
                     str(out), *TINY]) == 2, out
    assert (foreign / "thesis.tex").read_text() == "years of work" and a_file.read_text() == "x"
    exp = tmp_path / "exp"
    for _ in range(2):  # our own export is replaced
        assert main(["export", "--bank", str(bank_dir), "--store", str(tmp_path / "store"), "--user", "u",
                     "--out", str(exp), *TINY]) == 0
    data = tmp_path / "d"
    assert main(["data", "synth", "--out", str(data), "--users", "3", "--queries", "1"]) == 0
    for cmd in (["adapt", "--bank", str(bank_dir)], ["bank", "build"], ["eval"]):
        assert main([*cmd, "--data", str(data), "--out", str(foreign), *TINY]) == 2, cmd
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]


def test_export_refuses_a_user_of_another_bank(tmp_path, bank):
    loaded, bank_dir = bank
    other = tmp_path / "other"
    build_bank(loaded.backbone, synth_users(4, seed=11), TASK, BankConfig.make(anchors=2, min_history=1, **FAST),
               other)
    store = UserStore(tmp_path / "store", create=True)
    LoadedBank(loaded.backbone, other, TASK).adapt(_users(["u"]), AdaptConfig.make(**FAST), store)
    with pytest.raises(MtaError, match="adapted against another bank"):
        loaded.export("u", store, tmp_path / "exp")
    assert not (tmp_path / "exp").exists()


# -- integrity ---------------------------------------------------------------------------------------
@pytest.mark.integration
def test_corrupt_users_are_listed_and_refused(tmp_path, bank, capsys):
    loaded, _ = bank
    store = UserStore(tmp_path / "store", create=True)
    loaded.adapt(_users(["good", "bad", "worse"]), AdaptConfig.make(**FAST), store)
    (store.user_dir("bad") / "meta.json").write_text("{not json")
    stack = store.user_dir("worse") / "stack" / "adapter_model.safetensors"
    data = bytearray(stack.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # bytes overwritten inside a tensor
    stack.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["store", "list", str(tmp_path / "store")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "2 users, 1 corrupt" in out and "good" in out and out.count("corrupt") >= 2
    with pytest.raises(MtaError, match="does not match its checksum"):
        loaded.answer([Request("worse", "q")], GenerateConfig(max_new_tokens=1), store)


def test_mixed_stack_ranks_in_one_batch_equal_each_alone(tmp_path, bank):
    loaded, _ = bank
    store = UserStore(tmp_path / "store", create=True)
    loaded.adapt(_users(["r2"], seed=1), AdaptConfig.make(stack_rank=2, **FAST), store)
    loaded.adapt(_users(["r4"], seed=2), AdaptConfig.make(stack_rank=4, stack_layers=0, **FAST), store)
    gen = GenerateConfig(max_new_tokens=6)
    reqs = [Request("r2", "which tag? a film"), Request("r4", "which tag? a film")]
    together = [a.output for a in loaded.answer(reqs, gen, store)]
    alone = [loaded.answer([r], gen, store)[0].output for r in reqs]
    assert together == alone


# -- one writer ---------------------------------------------------------------------------------------
@pytest.mark.integration
def test_a_second_writer_is_turned_away(tmp_path, bank):
    loaded, bank_dir = bank
    store = UserStore(tmp_path / "store", create=True)
    data = tmp_path / "d"
    write_jsonl(_users(["u"]), data / "users.jsonl")
    held = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                             f"l = FileLock({str(tmp_path / 'store' / '.lock')!r}); l.acquire(); "
                             "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout.readline().strip() == "held"
        with pytest.raises(MtaError, match="being written by another process"):
            loaded.adapt(_users(["u"]), AdaptConfig.make(**FAST), store)
        r = subprocess.run([sys.executable, "-m", "mta", "adapt", "--bank", str(bank_dir), "--data", str(data),
                            "--out", str(tmp_path / "store"), *TINY[2:]], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2 and "being written by another process" in r.stderr
        with pytest.raises(MtaError, match="being written"), writer(bank_dir, "bank"), writer(bank_dir, "bank"):
            pass
    finally:
        held.kill()
        held.wait()  # the lock goes with the process: kill() alone returns before it has gone
    assert loaded.adapt(_users(["u"]), AdaptConfig.make(**FAST), store)["adapted"] == 1


# -- environment errors: one line, exit 3, nothing half-written --------------------------------------
def test_full_disk_and_permissions_are_one_line(tmp_path, monkeypatch, capsys):
    data = tmp_path / "d"
    assert main(["data", "synth", "--out", str(data), "--users", "3"]) == 0
    import mta.paths

    real = mta.paths.tempfile.mkdtemp

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(k.get("dir", "")))

    monkeypatch.setattr(mta.paths.tempfile, "mkdtemp", full)
    capsys.readouterr()
    assert main(["data", "synth", "--out", str(tmp_path / "d2"), "--users", "3"]) == 3
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "No space left on device" in err[0]
    assert not (tmp_path / "d2" / "users.jsonl").exists()
    monkeypatch.setattr(mta.paths.tempfile, "mkdtemp", real)
    monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied", str(self))))
    assert main(["data", "inspect", str(data / "users.jsonl")]) == 3
    assert "Permission denied" in capsys.readouterr().err


# -- progress ------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_progress_lines_without_a_terminal_and_quiet(tmp_path):
    data = tmp_path / "d"
    assert main(["data", "synth", "--out", str(data), "--users", "4", "--queries", "1"]) == 0
    args = ["eval", "--data", str(data), "--methods", "mta", "--anchors", "2", "--n-boot", "100",
            "--max-new-tokens", "2", *TINY]
    r = subprocess.run([sys.executable, "-m", "mta", *args, "--out", str(tmp_path / "e1")], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0
    for line in ("fold 0 bank anchors: 2/2 (100%)", "fold 1 mta users: 2/2 (100%)", "fold 0 mta: 2/2 (100%)"):
        assert line in r.stderr, line  # totals per fold, never "4/2"
    q = subprocess.run([sys.executable, "-m", "mta", "--quiet", "bank", "build", "--data", str(data), "--anchors", "2",
                        "--min-history", "1", "--out", str(tmp_path / "b2"), *TINY], capture_output=True, text=True,
                       cwd=ROOT)
    assert q.returncode == 0 and (tmp_path / "b2" / "index.json").exists() and "(100%)" not in q.stderr


# -- a process killed at many points ---------------------------------------------------------------
def _cli(*args, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MTA_FAULT": fault} if fault else {k: v for k, v in os.environ.items() if k != "MTA_FAULT"}
    return subprocess.run([sys.executable, "-m", "mta", "--quiet", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def _consistent(store: Path, expect: set[str]) -> None:
    """Every user is either whole or absent, and nothing half-written is visible."""
    st = UserStore(store)
    assert all(e.record is not None for e in st.entries()), [e.problem for e in st.entries()]
    assert set(st.user_ids()) <= expect
    for uid in st.user_ids():
        rec = st.meta(uid)
        if rec.stack:
            st.stack_path(uid, rec)  # checksum holds


@pytest.mark.integration
@pytest.mark.parametrize("fault", ["store:user-written:2", "atomic:before-rename:3", "atomic:after-rename:2",
                                   "atomic:between-renames:1"])
def test_adapt_killed_then_rerun(tmp_path, bank, fault):
    _, bank_dir = bank
    data = tmp_path / "users.jsonl"
    write_jsonl(_users(["a", "b", "c"]), data)
    store = tmp_path / "store"
    args = ["adapt", "--bank", str(bank_dir), "--data", str(data), "--out", str(store), *TINY[2:]]
    if fault.startswith("atomic:between"):  # the window only exists when a user is REPLACED
        assert _cli(*args).returncode == 0
        write_jsonl(_users(["a", "b", "c"], seed=4), data)  # new histories: every user is replaced
    r = _cli(*args, fault=fault)
    assert r.returncode == 99, r.stderr[-500:]
    _consistent(store, {"a", "b", "c"})
    if fault.startswith("atomic:between"):  # readers see the previous version until the next writer repairs
        assert sorted(UserStore(store).user_ids()) == ["a", "b", "c"]
    again = _cli(*args)
    assert again.returncode == 0, again.stderr[-500:]
    st = UserStore(store)
    assert sorted(st.user_ids()) == ["a", "b", "c"]
    assert not [p for p in (store / "users").iterdir() if p.name.startswith(".")]  # no stale temporaries
    assert _cli(*args).stdout.count("0 user(s)") == 1  # a third run trains nobody


@pytest.mark.integration
@pytest.mark.parametrize("fault", ["bank:group-written:1", "atomic:before-rename:2", "atomic:between-renames:1"])
def test_bank_build_killed_then_resumed(tmp_path, fault):
    data = tmp_path / "users.jsonl"
    write_jsonl(synth_users(4, seed=5), data)
    out = tmp_path / "bank"
    args = ["bank", "build", "--data", str(data), "--out", str(out), "--anchors", "2", "--min-history", "1",
            "--group-size", "1", *TINY]
    if fault.startswith("atomic:between"):  # replace a finished anchor: build, then drop its "done" mark
        assert _cli(*args).returncode == 0
        idx = json.loads((out / "index.json").read_text())
        idx["anchors"][0]["done"] = False
        (out / "index.json").write_text(json.dumps(idx))
    r = _cli(*args, fault=fault)
    assert r.returncode == 99, r.stderr[-500:]
    again = _cli(*args)
    assert again.returncode == 0, again.stderr[-500:]
    from mta.bank import read_index

    rec = read_index(out)
    assert rec.complete and all(a.sha256 for a in rec.anchors)
    assert not [p for p in (out / "anchors").iterdir() if p.name.startswith(".")]
    LoadedBank(tiny_backbone(), out, TASK)  # every checksum holds


@pytest.mark.integration
def test_delete_killed_then_rerun(tmp_path, bank):
    loaded, _ = bank
    store = UserStore(tmp_path / "store", create=True)
    loaded.adapt(_users(["a", "b"]), AdaptConfig.make(**FAST), store)
    r = _cli("store", "delete", str(tmp_path / "store"), "a", fault="store:user-unlinked:1")
    assert r.returncode == 99
    _consistent(tmp_path / "store", {"b"})
    assert UserStore(tmp_path / "store").user_ids() == ["b"]
    with store.writing():  # the next writer sweeps the half-deleted leftovers
        pass
    assert not [p for p in (tmp_path / "store" / "users").iterdir() if p.name.startswith(".")]
