"""Adaptation beside decoding (mta.serving.adapt_worker): a server's adapt job runs in a
worker process, so other users' requests are answered while it trains, and a user deleted
while their job trains does not come back."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from mta.bank import build_bank
from mta.config import AdaptConfig, BackboneConfig, BankConfig, GenerateConfig, ServeConfig
from mta.data.synth import synth_users
from mta.loaded_bank import LoadedBank
from mta.serving.app import build_app
from mta.serving.security import Keys, add_key
from mta.store import UserStore
from mta.tasks import get_task
from tests.engine_helpers import tiny_backbone

pytestmark = pytest.mark.integration  # a worker process

SMALL = {"batch_size": 4, "max_length": 160}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An app whose adapt jobs run in a worker (the backbone is loadable by name), a stored
    user, a newcomer with a history, and an admin key."""
    d = tmp_path_factory.mktemp("worker")
    backbone = tiny_backbone()
    build_bank(backbone, synth_users(4, seed=9), get_task("synth"),
               BankConfig.make(anchors=2, min_history=1, **SMALL), d / "bank")
    bank = LoadedBank(backbone, d / "bank")
    store = UserStore(d / "store", create=True)
    stored, newcomer, doomed = synth_users(3, seed=3)
    adapt = AdaptConfig.make(**SMALL)
    bank.adapt([stored], adapt, store)
    key = add_key(d / "keys.json", "admin", None, "k")
    app = build_app(bank, store, Keys.read(d / "keys.json"), ServeConfig(), GenerateConfig(max_new_tokens=3),
                    [newcomer, doomed], adapt,
                    backbone=BackboneConfig(model="tiny-random-llama", embedder="hashing-embedder", device="cpu"))
    with TestClient(app) as c:  # one server for the module (its scheduler thread starts once)
        yield c, app.state.service, store, stored.user_id, newcomer.user_id, doomed.user_id, \
            {"Authorization": f"Bearer {key}"}


def _status(c, job: str, h: dict) -> str:
    r = c.get(f"/v1/admin/jobs/{job}", headers=h)
    return r.json()["status"] if r.status_code == 200 else f"http {r.status_code}"


def _chat(c, user: str, h: dict):
    return c.post("/v1/chat/completions", headers=h, json={"model": "mta", "user": user, "max_tokens": 3,
                                                            "messages": [{"role": "user", "content": "a film"}]})


def test_other_users_are_answered_while_a_user_is_adapted_beside_them(served):
    c, svc, store, stored, newcomer, _, h = served
    assert svc.worker is not None  # the server adapts in a worker
    job = c.post("/v1/admin/adapt", json={"user": newcomer}, headers=h).json()["job"]
    while _status(c, job, h) == "queued":
        time.sleep(0.01)
    answered = []
    for _ in range(3):  # the worker is still starting or training: seconds, where a chat takes milliseconds
        r = _chat(c, stored, h)
        assert r.status_code == 200, r.text
        answered.append(_status(c, job, h))
    assert answered == ["running"] * 3, answered  # on the decode loop's thread the chats would wait for it
    deadline = time.monotonic() + 120
    while _status(c, job, h) == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _status(c, job, h) == "done"
    assert _chat(c, newcomer, h).json()["mta"]["route"] == "mta"  # installed and served, no restart
    assert store.meta(newcomer).stack is not None and svc.worker.starts == 1


def test_a_user_deleted_while_their_job_trains_does_not_come_back(served):
    c, svc, store, _, _, doomed, h = served
    job = c.post("/v1/admin/adapt", json={"user": doomed}, headers=h).json()["job"]
    while _status(c, job, h) == "queued":
        time.sleep(0.01)
    assert c.post("/v1/admin/delete", json={"user": doomed}, headers=h).status_code == 200
    svc._adapts.submit(lambda: None).result(timeout=120)  # the worker's job has ended (one at a time)
    assert not store.has(doomed)
    assert not any(svc.worker._staging.iterdir())  # the dropped user's staged copy is gone too
    assert _chat(c, doomed, h).json()["mta"]["route"] == "base"
