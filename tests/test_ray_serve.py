"""`mta serve --ray`: Ray Serve on a local instance with 2 replicas (2 CPU workers, the tiny
model), talked to over HTTP and with the openai client. A user's requests land on one
replica (the ``x-mta-replica`` header), answers equal the single-process server's, a
user-role key is routed by its bound user, an adapt job's status reaches the replica
that runs it, and a user deleted through one replica is gone on all of them."""

from __future__ import annotations

import time

import httpx2 as httpx
import pytest

from tests.serve_helpers import STORED, Server, _h, chat, make_world

pytestmark = pytest.mark.integration  # subprocesses, servers, Ray, benchmarks: the integration tier

pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
PROMPT = "Which tag does this movie relate to? a heist in a casino"


# Both servers compute with one thread (Ray's replicas do by default): the random tiny
# model's greedy answers can flip on a near tie when a reduction is split differently, and
# the test compares answers character for character.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("ray-serve"))


@pytest.fixture(scope="module")
def server(world):
    """The single-process server on the same bank and store: the reference."""
    s = Server(world[0], env=ONE_THREAD)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def ray_server(world):
    d, _ = world
    s = Server(d, "--ray", "local", "--replicas", "2", env={"RAY_AUTH_MODE": "disabled", **ONE_THREAD}, start_s=240)
    yield s
    s.stop()


def _settle(url: str, key: str, users: list[str]) -> None:
    """One request per user, then a pause: a replica reports the users it holds to Ray
    Serve's routers asynchronously, and routing by user only holds once they know."""
    for u in users:
        assert chat(url, key, u, PROMPT).status_code == 200
    time.sleep(3)


def _content(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_routed_by_user_and_equal_to_the_single_server(ray_server, server, world):
    _, keys = world
    users = [*STORED, "synth-0005"]  # three with a stack, one with history only
    seen: dict[str, set[str]] = {u: set() for u in users}
    _settle(ray_server.url, keys["admin"], users)
    for _ in range(3):
        for u in users:
            r = chat(ray_server.url, keys["admin"], u, PROMPT)
            seen[u].add(r.headers["x-mta-replica"])
            assert _content(r) == _content(chat(server.url, keys["admin"], u, PROMPT)), u
            assert r.json()["mta"]["route"] == ("fusion" if u == "synth-0005" else "mta")
    assert all(len(replicas) == 1 for replicas in seen.values()), seen
    # a user-role key names no user in the body: it is routed by the user it is bound to
    r = chat(ray_server.url, keys["user"], None, PROMPT)
    assert r.headers["x-mta-replica"] in seen["synth-0001"] and r.json()["mta"]["user"] == "synth-0001"
    # the proxy passes the server's own errors through
    assert chat(ray_server.url, keys["user"], "synth-0000", PROMPT).status_code == 403
    assert chat(ray_server.url, "", "synth-0000", PROMPT).status_code == 401


def test_concurrent_clients_through_the_router(ray_server, world):
    from concurrent.futures import ThreadPoolExecutor

    _, keys = world
    users = [*STORED, "synth-0005"]
    _settle(ray_server.url, keys["admin"], users)
    with ThreadPoolExecutor(12) as ex:
        got = list(ex.map(lambda i: chat(ray_server.url, keys["admin"], users[i % 4], f"{PROMPT} {i}"), range(24)))
    assert [r.status_code for r in got] == [200] * 24
    by_user: dict[str, set[str]] = {}
    for i, r in enumerate(got):
        by_user.setdefault(users[i % 4], set()).add(r.headers["x-mta-replica"])
    assert all(len(v) == 1 for v in by_user.values()), by_user
    m = httpx.get(ray_server.url + "/metrics")
    samples = [ln for ln in m.text.splitlines() if ln and not ln.startswith("#")]
    who = m.headers["x-mta-replica"]
    assert samples and all(f'replica="{who}"' in ln for ln in samples)  # series never mix replicas


def test_the_openai_client_works_through_ray(ray_server, server, world):
    _, keys = world
    client = openai.OpenAI(base_url=ray_server.url + "/v1", api_key=keys["admin"])
    want = _content(chat(server.url, keys["admin"], "synth-0002", PROMPT))
    msgs = [{"role": "user", "content": PROMPT}]
    got = client.chat.completions.create(model="mta", messages=msgs, max_tokens=6, user="synth-0002")
    assert got.choices[0].message.content == want
    stream = client.chat.completions.create(model="mta", messages=msgs, max_tokens=6, user="synth-0002",
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want
    assert {m.id for m in client.models.list()} == {"mta", "mta-chat", "mta-base"}


def test_adapt_job_and_delete_across_replicas(ray_server, world):
    _, keys = world
    admin = _h(keys["admin"])
    user = "synth-0003"  # in the users file, not adapted yet
    assert chat(ray_server.url, keys["admin"], user, PROMPT).json()["mta"]["route"] == "fusion"
    r = httpx.post(ray_server.url + "/v1/admin/adapt", json={"user": user}, headers=admin, timeout=60)
    assert r.status_code == 202, r.text
    job = r.json()["job"]
    deadline = time.monotonic() + 600  # a wait, not a speed check: a busy 2-core machine is slow
    while True:  # any replica answers: the job's state is in the shared store
        s = httpx.get(ray_server.url + f"/v1/admin/jobs/{job}", headers=admin, timeout=30)
        assert s.status_code == 200, s.text
        if s.json()["status"] in ("done", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert s.json()["status"] == "done", s.json()
    assert chat(ray_server.url, keys["admin"], user, PROMPT).json()["mta"]["route"] == "mta"
    d = httpx.post(ray_server.url + "/v1/admin/delete", json={"user": user}, headers=admin, timeout=60)
    assert d.status_code == 200, d.text
    # gone everywhere: whichever replica answers, neither a stack nor the users file's history is used
    for _ in range(4):
        assert chat(ray_server.url, keys["admin"], user, PROMPT).json()["mta"]["route"] == "base"


def test_replicas_share_the_store_safely(world, tmp_path):
    """The two mechanisms that keep replicas consistent, without Ray: a stack re-adapted by
    another process is loaded again (checked by its sha256), and a deleted user's history
    is tombstoned in the store, so a second server on it stops using the users file's copy."""
    import shutil

    from mta.backbone import Backbone
    from mta.cli.main import main
    from mta.config import BackboneConfig
    from mta.data.readers import load_dataset
    from mta.loaded_bank import LoadedBank
    from mta.serving.service import Histories
    from mta.store import UserStore

    d, _ = world
    shutil.copytree(d / "store", tmp_path / "store")
    store = UserStore(tmp_path / "store")
    bank = LoadedBank(Backbone.load(BackboneConfig(model="tiny-random-llama", embedder="hashing-embedder")),
                      d / "bank")
    user = STORED[0]
    bank.stacks.ensure({user: store.meta(user)}, store)
    bank.stacks.ensure({user: store.meta(user)}, store)
    assert bank.stacks.loads == 1  # resident: not loaded again
    assert main(["--quiet", "adapt", "--bank", str(d / "bank"), "--data", str(d / "data"), "--out",
                 str(tmp_path / "store"), "--users", user, "--stack-lr", "0.01"]) == 0  # "another replica"
    bank.stacks.ensure({user: store.meta(user)}, store)
    assert bank.stacks.loads == 2  # the newer stack replaced the stale one in its slot

    users = load_dataset(d / "data", bank.task.name).users
    one, two = Histories(bank.task, users, store), Histories(bank.task, users, store)
    assert two.get("synth-0004") is not None
    assert one.delete("synth-0004")
    assert two.get("synth-0004") is None and Histories(bank.task, users, store).get("synth-0004") is None
    one.put(users[4])  # uploading a history again brings the user back everywhere
    assert two.get("synth-0004") is not None


def test_a_job_is_answered_by_any_server_on_the_store(server, world):
    """The job state lives in the shared store: a second server on the same store (as another
    replica would) answers for a job the first one runs."""
    d, keys = world
    admin = _h(keys["admin"])
    second = Server(d)
    try:
        r = httpx.post(server.url + "/v1/admin/adapt", json={"user": "synth-0006"}, headers=admin, timeout=60)
        assert r.status_code == 202, r.text
        job = r.json()["job"]
        deadline = time.monotonic() + 600
        while True:
            s = httpx.get(second.url + f"/v1/admin/jobs/{job}", headers=admin, timeout=30)
            assert s.status_code == 200, s.text
            if s.json()["status"] in ("done", "failed") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert s.json()["status"] == "done" and s.json()["user"] == "synth-0006", s.json()
        assert httpx.get(second.url + "/v1/admin/jobs/adapt-nope", headers=admin).status_code == 404
        assert httpx.get(second.url + "/v1/admin/jobs/..%2Fstore", headers=admin).status_code == 404
    finally:
        second.stop()
