"""Hostile inputs that once ended in a traceback or were used as they came: each is now
refused in one line (or written safely)."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest

from mta.cli.main import main
from mta.config import AdaptConfig, BankConfig
from mta.errors import ConfigError, MtaError
from mta.serving.security import add_key
from mta.store import UserStore, check_user_id, user_key


def test_a_seed_beyond_what_the_generators_take_is_a_config_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="seed"):
        BankConfig.make(seed=2**70)
    with pytest.raises(ConfigError, match="seed"):
        AdaptConfig.make(seed=-1)
    assert main(["run", "--data", str(tmp_path / "x"), "--out", str(tmp_path / "y"), "--seed", str(2**70)]) == 2
    assert not (tmp_path / "y").exists()
    assert "seed" in capsys.readouterr().err


def test_a_lone_surrogate_user_id_is_refused_in_one_line():
    with pytest.raises(MtaError, match="lone surrogate"):
        check_user_id("user-\udc80")
    with pytest.raises(MtaError, match="lone surrogate"):
        user_key("\ud800")


def test_the_keys_file_is_its_owners_alone(tmp_path):
    keys = tmp_path / "keys.json"
    add_key(keys, "admin", None, "k")
    add_key(keys, "user", "alice", "k2")
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600


def _record(tmp_path, stack: bool = False, **changes):
    """A stored user's record edited by hand (the store read it back); ``stack``: with a
    trained stack (one epoch), else fusion only."""
    from mta.bank import build_bank
    from mta.data.synth import synth_users
    from mta.loaded_bank import LoadedBank
    from mta.tasks import get_task
    from tests.engine_helpers import tiny_backbone

    backbone = tiny_backbone()
    build_bank(backbone, synth_users(4, seed=9), get_task("synth"),
               BankConfig.make(anchors=2, min_history=1, batch_size=4, max_length=160), tmp_path / "bank")
    bank = LoadedBank(backbone, tmp_path / "bank")
    store = UserStore(tmp_path / "store", create=True)
    user = synth_users(1, seed=3)[0]
    bank.adapt([user], AdaptConfig.make(batch_size=4, max_length=160, stack_epochs=int(stack)), store)
    meta = store.user_dir(user.user_id) / "meta.json"
    raw = json.loads(meta.read_text())
    raw.update(changes)
    meta.write_text(json.dumps(raw))
    return bank, store, user.user_id


@pytest.mark.parametrize("changes, message", [
    ({"weights": [1e30, 0.5]}, "fusion weight is not a number in"),
    ({"weights": [float("nan"), 0.5]}, "corrupt user record"),
    ({"anchors": [0]}, "differ in length"),
])
def test_a_hand_edited_record_is_refused_not_used(tmp_path, changes, message):
    bank, store, uid = _record(tmp_path, **changes)
    with pytest.raises(MtaError, match=message):
        store.meta(uid)


def test_an_anchor_slot_out_of_range_is_refused_in_one_line(tmp_path):
    from mta.loaded_bank import Request

    bank, store, uid = _record(tmp_path, anchors=[0, 7])
    with pytest.raises(MtaError, match="anchor slot 7 of a bank with 2 anchors .*adapt the user again"):
        bank.plans([Request(uid, "q")], store)


def test_one_bad_request_in_a_batch_fails_alone_and_the_others_answer_as_they_would_alone(tmp_path):
    """Four requests admitted in one scheduler step, one of them for a user whose record
    is unreadable: that one gets its error; the others' answers equal each one run alone
    (before, every request admitted with it failed with its error)."""
    import threading

    from mta.config import GenerateConfig
    from mta.serving.scheduler import Job, Scheduler

    bank, store, uid = _record(tmp_path)
    store.user_dir("someone").mkdir(parents=True)
    (store.user_dir("someone") / "meta.json").write_text("{not json")  # a record the store cannot read back

    def run(specs):
        sched = Scheduler(bank, store, GenerateConfig(max_new_tokens=4), max_batch=8)
        done = {i: threading.Event() for i in range(len(specs))}
        got: dict[int, tuple] = {}
        for i, (user, base_only) in enumerate(specs):
            def emit(kind, payload, i=i):
                if kind == "delta":
                    got[i] = ("text", got.get(i, ("text", ""))[1] + payload)
                elif kind == "done":
                    got.setdefault(i, ("text", ""))
                    done[i].set()
                elif kind == "error":
                    got[i] = ("error", str(payload))
                    done[i].set()
            sched.submit(Job(user, [{"role": "user", "content": "a film about space"}], None, 4,
                             base_only=base_only, emit=emit))
        sched.start()  # everything queued is admitted in the first step
        for e in done.values():
            assert e.wait(60)
        sched.shutdown(5)
        return [got[i] for i in range(len(specs))]

    specs = [(uid, False), ("someone", False), ("base-user", True), (uid, False)]
    together = run(specs)
    assert together[1][0] == "error" and "corrupt user record" in together[1][1]
    for i in (0, 2, 3):
        assert together[i][0] == "text" and together[i] == run([specs[i]])[0]


def test_model_mta_without_a_user_says_what_to_fix(tmp_path):
    from mta.config import GenerateConfig, ServeConfig
    from mta.serving.security import Keys
    from mta.serving.service import ApiError, Service

    bank, store, _ = _record(tmp_path)
    svc = Service(bank, store, Keys([]), ServeConfig(), GenerateConfig())
    with pytest.raises(ApiError, match="model mta answers as one user: name them in OpenAI's `user` field") as e:
        svc.submit(None, [{"role": "user", "content": "q"}], "mta", 4, 0.0, 1.0, None, [], 1, lambda k, p: None)
    assert e.value.status == 400 and e.value.param == "user"


def test_openai_fields_are_honoured_or_refused_by_name(tmp_path):
    """In process, through the app: fields the server does not honour are a 400 naming the
    field (not silently ignored); array content and the developer role are accepted and
    read as their text; /health and /version answer."""
    from fastapi.testclient import TestClient

    from mta import __version__
    from mta.config import GenerateConfig, ServeConfig
    from mta.serving.app import build_app
    from mta.serving.security import Keys

    bank, store, uid = _record(tmp_path)
    key = add_key(tmp_path / "keys.json", "admin", None, "k")
    app = build_app(bank, store, Keys.read(tmp_path / "keys.json"), ServeConfig(), GenerateConfig(max_new_tokens=3))
    h = {"Authorization": f"Bearer {key}"}
    plain = {"model": "mta", "user": uid, "max_tokens": 3, "messages": [{"role": "user", "content": "a space film"}]}
    with TestClient(app) as c:
        assert c.get("/health").json() == {"status": "ok"} and c.get("/version").json() == {"version": __version__}
        want = c.post("/v1/chat/completions", json=plain, headers=h).json()["choices"][0]["message"]["content"]
        parts = {**plain, "messages": [{"role": "developer", "content": "answer with a tag"},
                                       {"role": "user", "content": [{"type": "text", "text": "a space "},
                                                                    {"type": "text", "text": "film"}]}]}
        r = c.post("/v1/chat/completions", json=parts, headers=h)
        assert r.status_code == 200, r.text
        arr = {**plain, "messages": [{"role": "user", "content": [{"type": "text", "text": "a space film"}]}]}
        assert c.post("/v1/chat/completions", json=arr, headers=h).json()["choices"][0]["message"]["content"] == want
        for field, value in (("logprobs", True), ("tools", [{"type": "function"}]),
                             ("response_format", {"type": "json_object"}), ("frequency_penalty", 0.5)):
            r = c.post("/v1/chat/completions", json={**plain, field: value}, headers=h)
            assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
        assert c.post("/v1/chat/completions", json={**plain, "logprobs": False, "tools": []}, headers=h).status_code \
            == 200  # asking for nothing is fine
        img = {**plain, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
        r = c.post("/v1/chat/completions", json=img, headers=h)
        assert r.status_code == 400 and "image_url" in r.json()["error"]["message"]


def test_progress_lines_estimate_from_the_observed_rate_and_not_before_it_settles(monkeypatch, capsys):
    """Without a terminal: a line when a stage starts (no estimate), then estimates from
    the rate seen since the first report (5 steps in 10 s, 85 left: about 170 s; counting
    the 10 steps done before the first report as instant gave 57 s, a third of the truth);
    the end line has none."""
    import mta.cli.common as common

    clock = iter([100.0, 101.0, 110.0, 120.0, 190.0])
    monkeypatch.setattr(common.time, "monotonic", lambda: next(clock))
    bars = common.Bars(None)
    for done in (10, 11, 15, 20, 100):  # the stage's first report comes after 10 steps already done
        bars("bank steps", done, 100)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "bank steps: 10/100 (10%), 0 s"
    assert lines[1] == "bank steps: 15/100 (15%), 10 s, about 170 s left"
    assert lines[2] == "bank steps: 20/100 (20%), 20 s, about 160 s left"
    assert lines[3] == "bank steps: 100/100 (100%), 90 s" and len(lines) == 4
    bars.close()


def test_a_stage_without_reports_still_prints_that_it_is_working_until_the_command_ends(monkeypatch, capsys):
    """Without a terminal, a long step with no report (an 18-minute bank build printed 5
    lines) gets a line every EVERY seconds with its time so far; none once the stage is
    done or the command's progress has ended."""
    import mta.cli.common as common

    monkeypatch.setattr(common.Bars, "EVERY", 0.2)
    with common.progress() as bar:
        assert bar is None  # not a terminal here
        bars = common.Bars(bar)
        bars("steps", 1, 2)
        time.sleep(1.0)
        beats = capsys.readouterr().err.strip().splitlines()
        assert beats[0] == "steps: 1/2 (50%), 0 s" and len(beats) >= 3, beats
        assert all(b.startswith("steps: 1/2 (50%), ") and b.endswith(" (working)") for b in beats[1:]), beats
        bars("steps", 2, 2)
        time.sleep(0.5)
        done = capsys.readouterr().err.strip().splitlines()
        assert len(done) == 1 and done[0].startswith("steps: 2/2 (100%)"), done  # no beat for a finished stage
        bars("save", 0, 1)
    capsys.readouterr()
    time.sleep(0.5)
    assert not capsys.readouterr().err and bars.stopped.is_set()  # progress() ended: the heartbeat stopped


def test_a_parts_stages_are_named_after_it_and_leave_with_the_next_part(capsys):
    """``Bars.part``: a long job's parts (a tune's trials) report their stages under the
    part's name; the next part drops the last one's bars, the job's own stay (a terminal's
    rich bars, or plain lines without a terminal)."""
    from rich.progress import Progress

    import mta.cli.common as common

    bar = Progress(console=common.err_console)
    bars = common.Bars(bar)
    bars("tune trials", 0, 3)
    first = bars.part("trial 00")
    first("bank steps", 2, 4)
    first("prompts", 1, 8)
    assert sorted(t.description for t in bar.tasks) == ["trial 00: bank steps", "trial 00: prompts", "tune trials"]
    second = bars.part("trial 01")
    second("bank steps", 1, 4)
    assert sorted(t.description for t in bar.tasks) == ["trial 01: bank steps", "tune trials"]
    assert next(t for t in bar.tasks if t.description == "trial 01: bank steps").completed == 1
    plain = common.Bars(None)
    plain.part("trial 00")("prompts", 3, 8)
    plain.part("trial 01")("prompts", 2, 8)  # counted afresh, not 3 + 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["trial 00: prompts: 3/8 (38%), 0 s", "trial 01: prompts: 2/8 (25%), 0 s"]
    assert list(plain.plain) == ["trial 01: prompts"]
    plain.close()


def test_a_body_over_the_limit_is_refused_with_or_without_its_length(tmp_path):
    """--max-body-bytes holds for a chunked body too (it was checked against
    Content-Length only, so a long chunked body was read whole)."""
    from fastapi.testclient import TestClient

    from mta.config import GenerateConfig, ServeConfig
    from mta.serving.app import build_app
    from mta.serving.security import Keys

    bank, store, uid = _record(tmp_path)
    key = add_key(tmp_path / "keys.json", "user", uid, "k")
    app = build_app(bank, store, Keys.read(tmp_path / "keys.json"), ServeConfig(max_body_bytes=4096),
                    GenerateConfig(max_new_tokens=2))
    h = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    big = json.dumps({"model": "mta", "messages": [{"role": "user", "content": "x" * 10_000}]}).encode()
    sent = []

    def chunks():
        for i in range(0, len(big), 1000):
            sent.append(i)
            yield big[i:i + 1000]

    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", content=big, headers=h)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        r = c.post("/v1/chat/completions", content=chunks(), headers=h)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text
        small = {"model": "mta", "max_tokens": 2, "messages": [{"role": "user", "content": "a film"}]}
        assert c.post("/v1/chat/completions", content=json.dumps(small).encode(), headers=h).status_code == 200


def test_a_user_deleted_while_their_adapt_job_waits_does_not_come_back(tmp_path):
    """An adapt job queued behind other work, and the user deleted meanwhile (by another
    server on the store: its deletion mark): the job ends cancelled and writes nothing."""
    from mta.config import GenerateConfig, ServeConfig
    from mta.data.synth import synth_users
    from mta.serving.security import Keys
    from mta.serving.service import Service

    bank, store, _ = _record(tmp_path)
    newcomer = synth_users(3, seed=11)[2]
    svc = Service(bank, store, Keys([]), ServeConfig(), GenerateConfig(), users=[newcomer])
    job = svc.start_adapt(newcomer.user_id)  # queued: the scheduler has not started
    store.delete_history(newcomer.user_id, mark=True)  # what a delete on another replica leaves
    svc.scheduler.start()
    deadline = time.monotonic() + 60
    while svc.job(job.id)["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.05)
    svc.scheduler.shutdown(5)
    assert svc.job(job.id)["status"] == "cancelled" and not store.has(newcomer.user_id)
    assert store.job(job.id)["status"] == "cancelled"


def test_error_bodies_keep_store_paths_and_storage_keys_on_the_server(tmp_path):
    from mta.config import GenerateConfig, ServeConfig
    from mta.serving.security import Keys
    from mta.serving.service import Service

    bank, store, uid = _record(tmp_path)
    svc = Service(bank, store, Keys([]), ServeConfig(), GenerateConfig())
    msg = f"user 'u' in {store.root}: {store.user_dir('u') / 'stack'} does not match its checksum"
    out = svc.public(msg)
    assert str(tmp_path) not in out and user_key("u") not in out
    assert out == "user 'u' in the store: the store/users/<key>/stack does not match its checksum"


def test_readers_see_a_user_whose_replacement_a_crash_cut_and_a_bad_stack_is_listed_as_such(tmp_path):
    """Killed between the two renames of replacing a user, the store holds only the previous
    version beside the user's name (the next writer restores it): readers use it meanwhile
    (`store list` left the user out and `generate` answered them fusion-only). A stack that
    is a directory, not a file, is listed as corrupt (it was listed as normal)."""
    from mta.data.synth import synth_users
    from mta.loaded_bank import LoadedBank

    bank, store, _ = _record(tmp_path)
    user = synth_users(2, seed=21)[1]
    LoadedBank.adapt(bank, [user], AdaptConfig.make(batch_size=4, max_length=160), store)
    d = store.user_dir(user.user_id)
    d.rename(d.with_name(f".{d.name}.old"))  # the state a crash between the renames leaves
    reader = UserStore(tmp_path / "store")
    assert reader.has(user.user_id) and user.user_id in reader.user_ids()
    assert reader.meta(user.user_id).stack is not None and reader.stack_path(user.user_id, reader.meta(user.user_id))
    with reader.writing():  # the next writer puts it back
        pass
    assert d.is_dir() and not d.with_name(f".{d.name}.old").exists()
    stack = d / "stack" / "adapter_model.safetensors"
    stack.unlink()
    stack.mkdir()
    (entry,) = [e for e in reader.entries() if e.key == d.name]
    assert entry.record is None and "missing or not a file" in entry.problem


TINY = ["--model", "tiny-random-llama", "--embedder", "hashing-embedder"]


def test_rerunning_as_the_error_advises_repairs_the_damage(tmp_path, capsys):
    """"corrupt; adapt the user again" and "rebuild the bank": rerunning the same command
    now repairs an unreadable record and a damaged anchor (it exited 0 and left them, or
    refused again); a stack failing its checksum is repaired by what its error names
    (--force for that user: a rerun does not hash every stored stack); --force adapts
    every user again."""
    from mta.bank import read_index
    from mta.loaded_bank import LoadedBank
    from tests.engine_helpers import tiny_backbone

    data, bank, store = tmp_path / "data", tmp_path / "bank", tmp_path / "store"
    assert main(["data", "synth", "--out", str(data), "--users", "8", "--queries", "1"]) == 0
    build = ["--quiet", "bank", "build", "--data", str(data), "--out", str(bank), "--anchors", "2", "--min-history",
             "1", *TINY]
    adapt = ["--quiet", "adapt", "--bank", str(bank), "--data", str(data), "--out", str(store),
             "--users", "synth-0000,synth-0001"]
    assert main(build) == 0 and main(adapt) == 0
    st = UserStore(store)
    stack = st.user_dir("synth-0000") / "stack" / "adapter_model.safetensors"
    stack.write_bytes(stack.read_bytes()[:-8] + b"\0" * 8)  # damaged in place
    (st.user_dir("synth-0001") / "meta.json").write_text("{broken")
    capsys.readouterr()
    assert main(adapt) == 0 and "adapted 1 user(s), 1 unchanged" in capsys.readouterr().out  # the unreadable one
    with pytest.raises(MtaError, match=r"checksum .*--force"):
        st.stack_path("synth-0000", st.meta("synth-0000"))
    one = [a if a != "synth-0000,synth-0001" else "synth-0000" for a in adapt]
    assert main([*one, "--force"]) == 0 and "adapted 1 user(s)" in capsys.readouterr().out  # as the error says
    for uid in ("synth-0000", "synth-0001"):
        st.stack_path(uid, st.meta(uid))  # the checksum holds again
    assert main([*adapt, "--force"]) == 0 and "adapted 2 user(s), 0 unchanged" in capsys.readouterr().out
    assert main(adapt) == 0 and "adapted 0 user(s), 2 unchanged" in capsys.readouterr().out
    anchor = bank / "anchors" / "000" / "adapter_model.safetensors"
    if not anchor.exists():  # the layout of anchor directories
        anchor = next(bank.rglob("adapter_model.safetensors"))
    anchor.write_bytes(anchor.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(MtaError, match="checksum"):
        LoadedBank(tiny_backbone(), bank)
    assert main(build) == 0
    LoadedBank(tiny_backbone(), bank)  # every checksum holds again
    assert all(a.done for a in read_index(bank).anchors)


def test_a_bank_build_into_a_bank_of_other_data_is_refused(tmp_path, capsys):
    """It reported success and kept the old bank, ignoring the new data."""
    a, b, bank = tmp_path / "a", tmp_path / "b", tmp_path / "bank"
    assert main(["data", "synth", "--out", str(a), "--users", "6", "--queries", "1"]) == 0
    assert main(["data", "synth", "--out", str(b), "--users", "6", "--queries", "1", "--seed", "3"]) == 0
    build = ["--quiet", "bank", "build", "--out", str(bank), "--anchors", "2", "--min-history", "1", *TINY]
    assert main([*build, "--data", str(a)]) == 0
    index = (bank / "index.json").read_bytes()
    capsys.readouterr()
    assert main([*build, "--data", str(b)]) == 2
    assert "was built from other data" in capsys.readouterr().err
    assert (bank / "index.json").read_bytes() == index
    assert main([*build, "--data", str(a)]) == 0  # the same data resumes (nothing to do)


def test_ctrl_c_says_interrupted_and_exits_130(tmp_path, monkeypatch, capsys):
    import mta.cli.evaluate as evaluate

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "load_dataset", interrupted)
    assert main(["eval", "--data", str(tmp_path), "--out", str(tmp_path / "o"), *TINY]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_data_that_declares_another_task_is_refused_not_overridden(lamp_official):
    """The official layout says which LaMP task it holds: asking for another task (as a
    bank of that task does for `mta adapt`) was applied silently."""
    from mta.data.readers import load_dataset

    assert load_dataset(lamp_official).task == "lamp2" and load_dataset(lamp_official, "lamp2").task == "lamp2"
    with pytest.raises(MtaError, match="declares task .*, not lamp3"):
        load_dataset(lamp_official, "lamp3")


def test_task_mode_and_chat_mode_are_models_that_say_what_they_do(tmp_path):
    """Model mta wraps the message in the bank's task prompt (what the adapters learnt);
    model mta-chat passes the messages through the chat template as they are, still
    through the user's adapter; /v1/models says which is which."""
    from fastapi.testclient import TestClient

    from mta.config import GenerateConfig, ServeConfig
    from mta.serving.app import build_app
    from mta.serving.scheduler import Job
    from mta.serving.security import Keys

    bank, store, uid = _record(tmp_path)
    key = add_key(tmp_path / "keys.json", "admin", None, "k")
    app = build_app(bank, store, Keys.read(tmp_path / "keys.json"), ServeConfig(), GenerateConfig(max_new_tokens=2))
    h = {"Authorization": f"Bearer {key}"}
    with TestClient(app) as c:
        listed = {m["id"]: m["mta"]["mode"] for m in c.get("/v1/models", headers=h).json()["data"]}
        assert listed == {"mta": "task", "mta-chat": "chat", "mta-base": "base"}
        for model in listed:
            body = {"model": model, "user": uid, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
            r = c.post("/v1/chat/completions", json=body, headers=h)
            assert r.status_code == 200 and r.json()["mta"]["route"] == ("base" if model == "mta-base" else "fusion")
    from mta.data.synth import synth_users

    sched = app.state.scheduler
    user = synth_users(1, seed=3)[0]  # the stored user, with their history for retrieval
    msg = [{"role": "user", "content": "Recommend me a film"}]
    task_text, chat_text = (bank.backbone.tokenizer.decode(sched._prompt_ids(Job(uid, msg, user, 2, chat=chat)))
                            for chat in (False, True))
    item = next(it for it in user.history if it.description in task_text)  # the retrieved history item
    assert "Recommend me a film" in chat_text and item.description not in chat_text


def test_a_server_told_to_stop_answers_its_running_requests_before_the_limit(tmp_path):
    """SIGTERM: requests still running near the shutdown limit end with a 'shutting down'
    error each (the server's answer: a JSON 503, or an error event in a stream), instead of
    being cut when the limit passes (a plain-text 500, a stream with no end)."""
    import threading

    from mta.config import GenerateConfig
    from mta.serving.scheduler import Job, Scheduler, ShuttingDown

    bank, store, uid = _record(tmp_path)
    sched = Scheduler(bank, store, GenerateConfig(), max_batch=4, max_tokens=100_000)
    sched.stop_ids = frozenset()  # no end of turn: the request runs until stopped
    got, done = [], threading.Event()

    def emit(kind, payload):
        if kind in ("done", "error"):
            got.append((kind, payload))
            done.set()

    sched.submit(Job(uid, [{"role": "user", "content": "go on forever"}], None, 100_000, emit=emit))
    sched.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    sched.drain(0.3)
    assert done.wait(30) and time.monotonic() - t0 < 10
    (kind, err), = got
    assert kind == "error" and isinstance(err, ShuttingDown) and "send it again" in str(err)
    assert not sched.accepting
    sched.shutdown(5)


def test_a_full_disk_while_writing_adapters_is_one_line_exit_3(tmp_path, monkeypatch, capsys):
    """safetensors reports the OS's 'no space left' as its own error: bank build and adapt
    ended in a traceback (exit 1); now one line, exit 3, and nothing half-written."""
    from safetensors import SafetensorError

    import mta.engine.peft_io as peft_io

    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "6", "--queries", "1"]) == 0

    def full(*a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    real = peft_io.save_file
    monkeypatch.setattr(peft_io, "save_file", full)
    capsys.readouterr()
    build = ["--quiet", "bank", "build", "--data", str(data), "--anchors", "2", "--min-history", "1", *TINY]
    assert main([*build, "--out", str(tmp_path / "bank")]) == 3
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "no space left on device" in err[0]
    assert not list((tmp_path / "bank" / "anchors").iterdir())  # no half-written anchor; the index resumes
    monkeypatch.setattr(peft_io, "save_file", real)
    assert main([*build, "--out", str(tmp_path / "bank")]) == 0
    monkeypatch.setattr(peft_io, "save_file", full)
    assert main(["--quiet", "adapt", "--bank", str(tmp_path / "bank"), "--data", str(data), "--out",
                 str(tmp_path / "store"), "--users", "synth-0000"]) == 3
    assert "no space left on device" in capsys.readouterr().err
    assert not UserStore(tmp_path / "store").user_ids()


def test_metrics_relayed_from_a_ray_replica_carry_its_label():
    from mta.serving.ray_serve import labelled

    text = b'# TYPE a_total counter\na_total 3.0\nb_bucket{le="1.0"} 2.0\n'
    assert labelled(text, "r1").decode().splitlines() == [
        "# TYPE a_total counter", 'a_total{replica="r1"} 3.0', 'b_bucket{le="1.0",replica="r1"} 2.0']


def test_adapt_job_ids_never_repeat_after_a_restart(tmp_path):
    """Job ids restarted at 1 with the server and overwrote older job records."""
    from mta.config import GenerateConfig, ServeConfig
    from mta.data.synth import synth_users
    from mta.serving.security import Keys
    from mta.serving.service import Service

    bank, store, _ = _record(tmp_path)
    u = synth_users(3, seed=11)[2]
    first = Service(bank, store, Keys([]), ServeConfig(), GenerateConfig(), users=[u]).start_adapt(u.user_id)
    again = Service(bank, store, Keys([]), ServeConfig(), GenerateConfig(), users=[u]).start_adapt(u.user_id)
    assert first.id != again.id and store.job(first.id)["job"] == first.id and store.job(again.id)["job"] == again.id


def test_gpu_memory_caps_the_cuda_allocator_once_the_model_is_loaded(monkeypatch):
    """--gpu-memory (a share, bytes, or auto: what the loaded model holds plus 24 GiB, at
    most 90% of the device) bounds a CUDA process: its caching allocator is capped at that
    less what the process holds outside it (nvidia-smi's reading, or 0.5 GiB assumed) and a
    0.25 GiB margin; the CPU is left alone; a cap under what the model holds is a one-line
    error."""
    from types import SimpleNamespace

    import torch

    import mta.backbone as backbone
    from mta.backbone import cap_memory
    from mta.errors import ResourceError

    gib = 1024 ** 3
    calls = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: calls.append((f, d)))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: SimpleNamespace(total_memory=140 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 12 * gib)
    outside = [1 * gib]
    monkeypatch.setattr(backbone, "outside_allocator", lambda d: outside[0])
    dev = torch.device("cuda:0")
    off = 1.25 * gib  # 1 GiB read outside the allocator, and the margin
    assert cap_memory(dev, "0.25") == 35 * gib - off and calls[-1] == ((35 * gib - off) / (140 * gib), dev)
    assert cap_memory(dev, str(40 * gib)) == 40 * gib - off and calls[-1] == ((40 * gib - off) / (140 * gib), dev)
    assert cap_memory(dev, "auto") == (12 + 24) * gib - off and calls[-1] == ((36 * gib - off) / (140 * gib), dev)
    assert cap_memory(dev, str(400 * gib)) == 140 * gib - off  # at most the device
    outside[0] = None  # nvidia-smi did not tell: the context's usual 0.5 GiB assumed
    assert cap_memory(dev, str(40 * gib)) == 40 * gib - 0.75 * gib
    with pytest.raises(ResourceError, match="allows 7.0 GiB but the model already holds 12.0 GiB"):
        cap_memory(dev, "0.05")
    outside[0] = 2 * gib
    with pytest.raises(ResourceError, match=r"allows 13.0 GiB .* holds 12.0 GiB .* and 2.2 GiB go outside"):
        cap_memory(dev, str(13 * gib))  # above the model, not above the model and what is outside
    n = len(calls)
    assert cap_memory(torch.device("cpu"), "0.3") is None and len(calls) == n
    # a server's static KV cache, once allocated, is held like the model: auto's room stays 24 GiB
    from mta.backbone import Backbone
    from mta.config import BackboneConfig
    outside[0] = 1 * gib
    bb = SimpleNamespace(memory_cap=36 * gib, device=dev, config=BackboneConfig())
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 30 * gib)
    Backbone.recap_memory(bb)
    assert bb.memory_cap == (30 + 24) * gib - off and calls[-1] == ((54 * gib - off) / (140 * gib), dev)


def test_what_a_process_holds_outside_torchs_allocator_is_read_from_nvidia_smi(monkeypatch):
    import os

    import torch

    import mta.backbone as backbone

    mib = 2 ** 20
    me = os.getpid()
    out = [f"{me + 1}, 9000\n{me}, 3000\n{me}, [N/A]\nnot, a line\n{me}, 500\n"]  # ours on two GPUs: 3,500 MiB
    monkeypatch.setattr(backbone, "_compute_apps", lambda: out[0])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 3000 * mib)
    dev = torch.device("cuda:0")
    assert backbone.outside_allocator(dev) == 500 * mib
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 4000 * mib)
    assert backbone.outside_allocator(dev) == 0  # never below nothing
    out[0] = f"{me + 1}, 10"
    assert backbone.outside_allocator(dev) is None  # this process not listed (another pid namespace)
    out[0] = None
    assert backbone.outside_allocator(dev) is None  # no nvidia-smi, or it failed
    monkeypatch.setattr(backbone.shutil, "which", lambda name: None)
    assert backbone._compute_apps() is None


def test_gpu_memory_is_read_in_one_form_and_bad_values_are_refused():
    from mta.config import BackboneConfig, gpu_memory_cap

    gib = 2 ** 30
    forms = {"auto": "auto", "0.3": "0.3", 0.28: "0.28", "1": "1.0", "40GiB": str(40 * gib), "40g": str(40 * gib),
             "43GB": "43000000000", "4e10": "40000000000", " 8 GiB ": str(8 * gib)}
    for given, want in forms.items():
        assert BackboneConfig(gpu_memory=given).gpu_memory == want, given
    assert BackboneConfig(gpu_memory_share=0.5).gpu_memory == "0.5"  # the old name still reads
    for bad in ("0", "-1", "lots", "1.5", "12MB", "3 parsecs"):
        with pytest.raises(ConfigError, match="gpu_memory"):
            BackboneConfig.build({"gpu_memory": bad})
    assert gpu_memory_cap("auto", 24 * gib, 16 * gib) == int(0.9 * 24 * gib)  # a small GPU: most of it
    assert gpu_memory_cap("0.5", 24 * gib, 16 * gib) == 12 * gib
    from mta.serving.adapt_worker import worker_backbone  # the server's adaptation worker: its share
    assert worker_backbone(BackboneConfig(), "m", "e", 0.25).gpu_memory == "0.25"
    assert worker_backbone(BackboneConfig(gpu_memory="0.1"), "m", "e", 0.25).gpu_memory == "0.1"
    assert worker_backbone(BackboneConfig(gpu_memory="40GiB"), "m", "e", 0.25).gpu_memory == "0.25"


def test_jax_is_kept_off_the_gpu_unless_the_user_says_otherwise(monkeypatch):
    """bm25s takes JAX for its top-k when JAX is importable, and JAX's first use takes 75% of
    a GPU's memory outside torch's allocator (seen on the H200: ~106 GiB in every command):
    importing mta points JAX at the CPU without preallocation, and keeps a user's own choice."""
    import importlib

    import mta

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    importlib.reload(mta)
    assert os.environ["JAX_PLATFORMS"] == "cpu" and os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    importlib.reload(mta)
    assert os.environ["JAX_PLATFORMS"] == "cuda"


def test_a_prefill_out_of_memory_fails_the_joining_requests_and_the_running_ones_go_on(tmp_path, monkeypatch):
    """The server's transient peak is a joining group's prefill: out of GPU memory there (as
    on the H200 at 8B under too small a cap), those requests get a 503-kind error and the
    rows already decoding finish with the answers they get alone (before, every request in
    the server failed with the step)."""
    import torch

    from mta.config import GenerateConfig
    from mta.serving.scheduler import Job, OutOfMemory, Scheduler

    bank, store, uid = _record(tmp_path)
    sched = Scheduler(bank, store, GenerateConfig(max_new_tokens=12), max_batch=8)  # not started: stepped here
    got: dict[int, list] = {}

    def job(i: int, n: int) -> Job:
        got[i] = []
        return Job(uid if i != 1 else "base-user", [{"role": "user", "content": f"a film about space {i}"}], None, n,
                   base_only=i == 1, emit=lambda kind, payload: got[i].append((kind, payload)))

    def drain():
        while sched.jobs:
            sched.decoder.step(sched.batch)
            sched._after_step(0.0)

    sched.submit(job(0, 12))
    sched.submit(job(1, 12))
    sched._admit()
    sched.decoder.step(sched.batch)
    sched._after_step(0.0)
    assert len(sched.jobs) == 2  # both decoding
    real = sched.decoder.advance
    monkeypatch.setattr(sched.decoder, "advance", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    sched.submit(job(2, 4))
    sched._admit()
    assert got[2] == [("error", got[2][0][1])] and isinstance(got[2][0][1], OutOfMemory)
    assert "prefilling 1 prompt(s) beside 2 running" in str(got[2][0][1])
    assert len(sched.jobs) == 2 and sched.pending is None
    monkeypatch.setattr(sched.decoder, "advance", real)
    drain()
    text = {i: "".join(p for k, p in got[i] if k == "delta") for i in (0, 1)}
    assert all(got[i][-1][0] == "done" for i in (0, 1))
    for i in (0, 1):  # the same answers alone
        got_before = text[i]
        sched.submit(job(i, 12))
        sched._admit()
        drain()
        assert "".join(p for k, p in got[i] if k == "delta") == got_before


def test_a_user_adapted_again_beside_decoding_has_their_prefixes_dropped_at_the_next_turn(tmp_path):
    """The adaptation worker installs a user's new stack from another thread: their cached
    prompt prefixes (keyed by the old stack's checksum) go at the scheduler's next turn,
    another user's stay, and nothing waits for the running batch to drain."""
    import threading
    import time

    import torch

    from mta.config import GenerateConfig
    from mta.serving.scheduler import Scheduler

    bank, store, uid = _record(tmp_path)
    sched = Scheduler(bank, store, GenerateConfig(max_new_tokens=4), max_batch=4, prefix_tokens=4096)
    kv = [(torch.zeros(1, 2, 12, 4), torch.zeros(1, 2, 12, 4))]
    sched.prefix.store((uid, "old"), list(range(13)), kv)
    sched.prefix.store(("other", "s"), list(range(13)), kv)
    sched.start()
    threading.Thread(target=sched.forget_later, args=(uid,)).start()
    deadline = time.monotonic() + 10
    while (uid, "old") in sched.prefix.entries and time.monotonic() < deadline:
        time.sleep(0.01)
    sched.shutdown(5)
    assert list(sched.prefix.entries) == [("other", "s")]


@pytest.mark.parametrize("wait, joins", [(3600.0, [(0, 4), (2, 2)]), (0.0, [(0, 4), (3, 1), (3, 1)])])
def test_waiting_requests_join_a_running_batch_in_groups_unless_held_past_the_wait(tmp_path, wait, joins):
    """Each join is a prefill forward beside the running rows' step: with rows decoding,
    waiting requests join once --join-rows slots are free (here 2 of 4), or one by one once
    held past --join-wait-ms (0 here); an empty batch takes them at once."""
    from mta.config import GenerateConfig
    from mta.serving.scheduler import Job, Scheduler

    bank, store, uid = _record(tmp_path)
    sched = Scheduler(bank, store, GenerateConfig(max_new_tokens=12), max_batch=4, join_rows=2, join_wait=wait)
    sched.stop_ids = frozenset()  # every row runs to its max_tokens: the rows end one at a time
    seen = []
    real = sched.decoder.start
    sched.decoder.start = lambda seqs, keys=None: seen.append((len(sched.jobs), len(seqs))) or real(seqs, keys)
    done = []

    def job(i: int, n: int) -> Job:
        return Job(uid, [{"role": "user", "content": f"a film about space {i}"}], None, n,
                   emit=lambda kind, payload: kind == "done" and done.append(i))

    for i, n in enumerate((2, 5, 9, 12)):  # the batch fills, then its rows end one at a time
        sched.submit(job(i, n))
    sched._admit()
    sched.submit(job(4, 3))
    sched.submit(job(5, 3))
    for _ in range(40):
        if not sched.jobs and sched.queue.empty():
            break
        sched._admit()
        if sched.jobs:
            sched.decoder.step(sched.batch)
            sched._after_step(0.0)
    assert seen == joins and sorted(done) == [0, 1, 2, 3, 4, 5]


def test_a_join_reads_the_store_for_the_joining_users_alone(tmp_path, monkeypatch):
    """At a join the running requests keep the records they were planned with (the store is
    read for the joining users only: it was read for every running user at every join); a
    user forgotten (adapted again, deleted) or with nothing running is read again. (Reads
    on the scheduler's thread, here the test's: the stacks' reader thread, which reads a
    waiting request's stack ahead of its load, is not the decode loop.)"""
    import threading

    from mta.config import GenerateConfig
    from mta.serving.scheduler import Job, Scheduler

    bank, store, uid = _record(tmp_path, stack=True)
    sched = Scheduler(bank, store, GenerateConfig(max_new_tokens=12), max_batch=4, join_rows=1, join_wait=0.0)
    sched.stop_ids = frozenset()
    reads = []
    real = store.meta
    here = threading.current_thread()
    monkeypatch.setattr(store, "meta", lambda u: (threading.current_thread() is here and reads.append(u)) or real(u))

    def join(n: int) -> None:
        sched.submit(Job(uid, [{"role": "user", "content": f"a film about space {n}"}], None, n))
        sched._admit()
        sched.decoder.step(sched.batch)
        sched._after_step(0.0)

    join(12)
    assert reads == [uid]
    join(6)  # the same user, running: their request's record
    join(6)
    assert reads == [uid] and len(sched.jobs) == 3
    sched.forget(uid)
    join(3)
    assert reads == [uid, uid]
    while sched.jobs:
        sched.decoder.step(sched.batch)
        sched._after_step(0.0)
    join(2)  # nothing running: read again
    assert reads == [uid] * 3


def test_the_scheduler_counts_its_seconds_by_phase_and_its_joins(tmp_path):
    """What a load run reads to say where a server's time goes: the scheduler's seconds by
    phase (admit, load, route, prefill, wait, merge, step, stream) add up to no more than the
    time it ran, each phase has some, the load phase is the stack loads' time, the route and
    wait phases the prefills' own counts of theirs, and every group of joining requests is
    one join."""
    import time

    from prometheus_client.parser import text_string_to_metric_families

    from mta.config import GenerateConfig
    from mta.serving.metrics import PHASES, Metrics
    from mta.serving.scheduler import Job, Scheduler

    bank, store, uid = _record(tmp_path, stack=True)
    bank.stacks.invalidate()  # the user's stack is read from the store at the first admission (the load phase)
    loads, loading = bank.stacks.loads, bank.stacks.load_seconds
    metrics = Metrics()
    sched = Scheduler(bank, store, GenerateConfig(max_new_tokens=6), max_batch=4, metrics=metrics, join_rows=2,
                      join_wait=3600.0)
    sched.stop_ids = frozenset()
    done = []
    for i, n in enumerate((2, 3, 6, 6, 3)):  # the fifth waits for two free slots
        sched.submit(Job(uid, [{"role": "user", "content": f"a film about space {i}"}], None, n,
                         emit=lambda kind, payload: kind == "done" and done.append(1)))
    t0 = time.monotonic()
    sched.start()
    sched.shutdown(60)  # (after every request has finished)
    wall = time.monotonic() - t0
    fams = {f.name: f for f in text_string_to_metric_families(metrics.text().decode())}
    phase = {s.labels["phase"]: s.value for s in fams["mta_scheduler_seconds"].samples if s.name.endswith("_total")}
    joins = next(s.value for s in fams["mta_joins"].samples if s.name.endswith("_total"))
    assert sorted(phase) == sorted(PHASES) and all(v > 0 for v in phase.values()), phase
    assert sum(phase.values()) <= wall
    assert bank.stacks.loads == loads + 1 and phase["load"] == pytest.approx(bank.stacks.load_seconds - loading)
    assert phase["route"] == pytest.approx(sched.decoder.seconds["route"])
    assert phase["wait"] == pytest.approx(sched.decoder.seconds["wait"])
    assert len(done) == 5
    assert joins == 2  # four into the empty batch, then the fifth once two slots were free
    # the prefill forwards the joins ran (a chunk each), counted as the decoder ran them
    forwards = next(s.value for s in fams["mta_prefill_forwards"].samples if s.name.endswith("_total"))
    assert forwards == sched.decoder.forwards >= joins


def test_a_read_ahead_stack_is_checked_finite_on_the_reader_thread(tmp_path, monkeypatch):
    """The reader thread checks a read-ahead stack's factors are finite, so its load on the
    decode loop's thread skips that check (``load_user(checked=True)``); a stack read at the
    load itself is checked there; a read-ahead stack with a NaN is not marked checked, and
    its load refuses it (the error goes to the request) with the slot left unwritten. The
    read-ahead factors are views of one host buffer in the table's dtype."""
    import torch

    import mta.resident as lb

    bank, store, uid = _record(tmp_path, stack=True)
    engine = bank.backbone.engine
    seen, real_load = [], engine.load_user
    monkeypatch.setattr(engine, "load_user", lambda *a, **k: seen.append(k.get("checked")) or real_load(*a, **k))
    rec = store.meta(uid)
    bank.stacks.invalidate()
    bank.stacks.prefetch(uid, store)
    got = bank.stacks._reads[uid].result(timeout=60)
    # the factors, in the table's dtype, are views of ONE host buffer (one copy, not one a factor)
    stored, _, _ = lb.load_adapter(store.stack_path(uid, rec), bank.backbone.fingerprint)
    dtype = next(iter(engine.layers.values())).bank_A.dtype
    assert list(got[1]) == list(stored) and got[3] is True
    assert len({t.untyped_storage().data_ptr() for ab in got[1].values() for t in ab}) == 1
    for m, (a, b) in got[1].items():
        assert torch.equal(a, stored[m][0].to(dtype)) and torch.equal(b, stored[m][1].to(dtype))
    bank.stacks.ensure({uid: rec}, store)
    bank.stacks.invalidate()
    bank.stacks.ensure({uid: rec}, store)  # nothing read ahead: read and checked at the load
    assert seen == [True, False]
    real_read = lb.load_adapter

    def poisoned(*a, **k):
        tensors, config, extra = real_read(*a, **k)
        name = next(iter(tensors))
        a0, b0 = tensors[name]
        tensors[name] = (a0.clone().fill_(float("nan")), b0)
        return tensors, config, extra
    monkeypatch.setattr(lb, "load_adapter", poisoned)
    bank.stacks.invalidate()
    bank.stacks.prefetch(uid, store)
    assert bank.stacks._reads[uid].result(timeout=60)[3] is False
    with pytest.raises(MtaError, match="NaN or inf"):
        bank.stacks.ensure({uid: rec}, store)
    assert seen[-1] is False and uid not in bank.stacks.slots
    assert not any(ly.stack_A.any() or ly.stack_B.any() for ly in engine.stack_layers.values())  # nothing written


def test_a_waiting_requests_stack_is_read_ahead_off_the_decode_thread(tmp_path, monkeypatch):
    """A submitted request's stack is read from the store (file, checksum, checks) on the
    stacks' reader thread while it waits, so its admission only writes it into the table:
    the same table as a load that reads it itself. A read whose stack is not the one the
    admission plans with (the user adapted again since), or that failed, is dropped and the
    load reads the store itself, its error going to the request."""
    import threading

    import torch

    import mta.resident as lb
    from mta.config import GenerateConfig
    from mta.serving.scheduler import Job, Scheduler

    bank, store, uid = _record(tmp_path, stack=True)
    engine = bank.backbone.engine
    bank.stacks.invalidate()
    reads, real = [], lb.load_adapter
    monkeypatch.setattr(lb, "load_adapter", lambda *a, **k: reads.append(threading.current_thread().name)
                        or real(*a, **k))
    sched = Scheduler(bank, store, GenerateConfig(max_new_tokens=4), max_batch=2)
    sched.stop_ids = frozenset()
    sched.submit(Job(uid, [{"role": "user", "content": "a film about space"}], None, 3))
    bank.stacks._reads[uid].result(timeout=60)  # the read is done before the admission
    assert reads == ["mta-stack-read_0"]
    loads = bank.stacks.loads
    sched._admit()
    assert reads == ["mta-stack-read_0"] and bank.stacks.read_ahead == 1 and bank.stacks.loads == loads + 1
    slot = bank.stacks.slots[uid]
    ahead = {n: (ly.stack_A[slot].clone(), ly.stack_B[slot].clone()) for n, ly in engine.stack_layers.items()}
    rec = store.meta(uid)
    bank.stacks.invalidate()  # the same stack loaded the way it was before: read at the load
    bank.stacks.ensure({uid: rec}, store)
    assert reads[-1] == "MainThread" and bank.stacks.read_ahead == 1
    slot = bank.stacks.slots[uid]
    for n, ly in engine.stack_layers.items():
        assert torch.equal(ly.stack_A[slot], ahead[n][0]) and torch.equal(ly.stack_B[slot], ahead[n][1])
    assert any(bool(a.abs().sum()) for a, _ in ahead.values())  # (a trained stack, not zeros)
    # a read of another stack (the user adapted again since) is not used
    bank.stacks.invalidate()
    bank.stacks.prefetch(uid, store)
    bank.stacks._reads[uid].result(timeout=60)
    older = rec.model_copy(update={"stack": rec.stack.model_copy(update={"sha256": "0" * 64})})
    with pytest.raises(MtaError, match="does not match its checksum"):
        bank.stacks.ensure({uid: older}, store)  # read again, at the load: its own error
    assert bank.stacks.read_ahead == 1 and uid not in bank.stacks._reads
    # a read that failed: the load reads the store, whose error reaches the request
    bank.stacks.invalidate()
    stack = store.user_dir(uid) / "stack" / "adapter_model.safetensors"
    stack.write_bytes(b"not a safetensors file")
    bank.stacks.prefetch(uid, store)
    with pytest.raises(MtaError):
        bank.stacks._reads[uid].result(timeout=60)
    with pytest.raises(MtaError, match="does not match its checksum"):
        bank.stacks.ensure({uid: rec}, store)
    assert bank.stacks.read_ahead == 1
    bank.stacks.close()
    assert bank.stacks._reader is None


def test_a_prompt_too_long_is_refused_at_submission_and_prompts_are_built_off_the_decode_thread(tmp_path):
    """A request's prompt (its retrieval and tokens) is built when it is submitted, on the
    submitting thread, not by the decode loop between steps: a prompt over the server's
    limit is a 400 naming `messages` before anything is queued (streamed or not), and the
    scheduler's thread never builds one."""
    import threading

    from fastapi.testclient import TestClient

    from mta.config import GenerateConfig, ServeConfig
    from mta.serving.app import build_app
    from mta.serving.scheduler import Scheduler
    from mta.serving.security import Keys

    bank, store, uid = _record(tmp_path)
    key = add_key(tmp_path / "keys.json", "admin", None, "k")
    app = build_app(bank, store, Keys.read(tmp_path / "keys.json"), ServeConfig(),
                    GenerateConfig(max_new_tokens=3, max_prompt_tokens=400))
    builders = []
    real = Scheduler._prompt_ids
    Scheduler._prompt_ids = lambda self, job: builders.append(threading.current_thread().name) or real(self, job)
    h = {"Authorization": f"Bearer {key}"}
    try:
        with TestClient(app) as c:
            ok = {"model": "mta", "user": uid, "max_tokens": 3,
                  "messages": [{"role": "user", "content": "a space film"}]}
            assert c.post("/v1/chat/completions", json=ok, headers=h).status_code == 200
            long = {**ok, "messages": [{"role": "user", "content": "a space film " * 200}]}
            for stream in (False, True):
                r = c.post("/v1/chat/completions", json={**long, "stream": stream}, headers=h)
                assert r.status_code == 400, r.text
                assert r.json()["error"]["param"] == "messages" and "this server takes at most 400" in r.text
            assert app.state.service.scheduler.queue.empty()
    finally:
        Scheduler._prompt_ids = real
    assert len(builders) == 3 and "mta-scheduler" not in builders


def test_prompts_are_tokenized_one_at_a_time_on_a_copy_of_the_tokenizer(tmp_path):
    """Submitting threads build prompts concurrently beside the decode loop's incremental
    decoding, and transformers sets a fast tokenizer's truncation and padding on its shared
    Rust object per call ("Already borrowed" when another thread is inside it): prompts are
    encoded on the scheduler's own copy, under its lock, and give the same ids; many
    threads submitting at once while the original tokenizer truncates and pads all succeed."""
    from concurrent.futures import ThreadPoolExecutor

    from mta.config import GenerateConfig
    from mta.serving.scheduler import Job, Scheduler

    bank, store, uid = _record(tmp_path)
    sched = Scheduler(bank, store, GenerateConfig(max_new_tokens=2), max_batch=4, max_queue=1000)
    assert sched.encoder is not sched.tok and sched.encoder._tokenizer is not sched.tok._tokenizer
    held = []
    real = sched._encoding
    sched._encoding = type("Spy", (), {"__enter__": lambda s: held.append(1) or real.__enter__(),
                                       "__exit__": lambda s, *a: real.__exit__(*a)})()
    job = Job(uid, [{"role": "user", "content": "a space film"}], None, 2)
    sched.submit(job)
    assert held == [1] and job.prompt == sched.tok(sched.tok.decode(job.prompt), add_special_tokens=False)["input_ids"]

    def one(i: int) -> int:
        if i % 4 == 0:  # another caller of the shared tokenizer, with its own settings
            sched.tok(["x " * 40, "y"], truncation=True, max_length=8, padding=True)
        j = Job(uid, [{"role": "user", "content": f"a film about space {i} " * 8}], None, 2)
        sched.submit(j)
        return len(j.prompt)

    with ThreadPoolExecutor(8) as ex:
        assert all(n > 8 for n in ex.map(one, range(200)))


def test_the_servers_fed_joins_answer_what_prefilled_joins_answer(tmp_path):
    """The slot decoder's scheduler with a prefix cache: a user's later requests, whose
    prompts share all but a few tokens with the first, are fed through the decode steps
    (--feed-tokens) instead of prefilled, and every request gets the text it gets when
    each joining request is prefilled (--feed-tokens 0), and when the loop's host runs a
    step behind the device (--async-steps)."""
    from mta.config import GenerateConfig
    from mta.decoding.slots import SlotDecoder
    from mta.serving.metrics import Metrics
    from mta.serving.scheduler import Job, Scheduler

    bank, store, uid = _record(tmp_path)
    fed = []
    real = SlotDecoder._place_fed
    SlotDecoder._place_fed = lambda self, rows, t: fed.append(len(rows)) or real(self, rows, t)

    counted = []

    def answers(feed: int, async_steps: bool = False) -> dict[int, str]:
        metrics = Metrics()
        sched = Scheduler(bank, store, GenerateConfig(max_new_tokens=5, decoder="graph"), max_batch=4,
                          prefix_tokens=4096, join_rows=1, join_wait=0.0, feed_tokens=feed, metrics=metrics,
                          async_steps=async_steps)
        assert sched.decoder.async_steps is async_steps
        sched.stop_ids = frozenset()
        out: dict[int, str] = {}

        def job(i: int) -> Job:
            return Job(uid, [{"role": "user", "content": f"a film about space and time, number {i}"}], None, 3 + i % 3,
                       emit=lambda kind, payload, i=i: kind == "delta" and out.__setitem__(i, out.get(i, "") + payload))

        sched.submit(job(0))  # the first: prefilled, its prefix cached
        sched.start()
        deadline = time.monotonic() + 60
        while not out.get(0) and time.monotonic() < deadline:
            time.sleep(0.01)
        for i in range(1, 7):
            sched.submit(job(i))
        sched.shutdown(60)
        counted.append(metrics.fed._value.get())
        return out

    try:
        with_feeding = answers(16)
        assert sum(fed) >= 1 and counted == [sum(fed)]  # later requests were fed, and counted
        fed.clear()
        assert answers(0) == with_feeding and not fed and len(with_feeding) == 7
        assert answers(16, async_steps=True) == with_feeding
    finally:
        SlotDecoder._place_fed = real


def test_a_started_server_leaves_start_ups_objects_out_of_collections(tmp_path):
    """Once warmed up, the server freezes what start-up made (the model, the libraries:
    about half a million objects, which every full collection would scan while the decode
    loop waits) and unfreezes them when it stops (collectable at exit again)."""
    import gc

    from fastapi.testclient import TestClient

    from mta.config import GenerateConfig, ServeConfig
    from mta.serving.app import build_app
    from mta.serving.security import Keys

    bank, store, uid = _record(tmp_path)
    add_key(tmp_path / "keys.json", "admin", None, "k")
    app = build_app(bank, store, Keys.read(tmp_path / "keys.json"), ServeConfig(), GenerateConfig(max_new_tokens=2))
    gc.unfreeze()
    with TestClient(app) as c:
        assert c.get("/readyz").status_code == 200
        assert gc.get_freeze_count() > 10_000
    assert gc.get_freeze_count() == 0


def test_the_prefill_chunk_is_chosen_by_device_unless_given(tmp_path):
    """`mta serve` without --prefill-chunk: 2,048 tokens on CUDA (a prefill forward there
    costs its launches up to a few thousand tokens), 512 on a CPU; a given one, 0 included,
    is kept."""
    from mta.config import GenerateConfig, ServeConfig
    from mta.serving.scheduler import Scheduler, default_prefill_chunk

    bank, store, _ = _record(tmp_path)
    assert ServeConfig().prefill_chunk is None
    assert (default_prefill_chunk("cuda:0"), default_prefill_chunk("cpu")) == (2048, 512)
    chunks = [Scheduler(bank, store, GenerateConfig(), max_batch=2, prefill_chunk=c).prefill_chunk
              for c in (None, 0, 64)]
    assert chunks == [512, 0, 64]
