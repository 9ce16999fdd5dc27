"""`mta serve` started for real on loopback with the tiny model, and talked to over HTTP
(httpx and the official openai client): streaming, mixed users in one batch equal to
`mta generate`, adapt-then-serve without a restart, delete, LRU eviction and reload,
401/403/413/429, a shutdown during a request, and the page in a real headless browser."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import pytest

from tests.serve_helpers import ROOT, STORED, Server, _h, chat, make_world

pytestmark = pytest.mark.integration  # subprocesses, servers, Ray, benchmarks: the integration tier


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(world):
    d, _ = world
    s = Server(d)
    yield s
    s.stop()


def test_chat_completion_and_models(server, world):
    _, keys = world
    r = httpx.get(server.url + "/v1/models", headers=_h(keys["admin"]))
    assert r.status_code == 200 and {m["id"] for m in r.json()["data"]} == {"mta", "mta-chat", "mta-base"}
    r = chat(server.url, keys["admin"], "synth-0000", "Which tag? a film")
    j = r.json()
    assert r.status_code == 200 and j["object"] == "chat.completion" and j["mta"]["route"] == "mta"
    assert j["usage"]["completion_tokens"] <= 6 and j["choices"][0]["message"]["role"] == "assistant"
    assert chat(server.url, keys["admin"], "synth-0005", "q").json()["mta"]["route"] == "fusion"  # history only
    assert chat(server.url, keys["admin"], "stranger", "q").json()["mta"]["route"] == "base"
    assert chat(server.url, keys["admin"], "synth-0000", "q", model="mta-base").json()["mta"]["route"] == "base"


def test_streaming_equals_the_whole_answer(server, world):
    _, keys = world
    whole = chat(server.url, keys["admin"], "synth-0002", "stream me", max_tokens=8).json()
    parts, last = [], None
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=_h(keys["admin"]), timeout=120,
                      json={"model": "mta", "user": "synth-0002", "stream": True, "max_tokens": 8,
                            "messages": [{"role": "user", "content": "stream me"}]}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for ln in lines[:-1]:
        last = json.loads(ln[6:])
        parts.append(last["choices"][0]["delta"].get("content", ""))
    assert "".join(parts) == whole["choices"][0]["message"]["content"]
    assert last["mta"]["route"] == "mta" and last["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_mixed_users_in_one_batch_equal_mta_generate(server, world, tmp_path):
    d, keys = world
    reqs = [(u, f"Which tag does this movie relate to? description: film {i}") for i, u in
            enumerate(STORED + ["synth-0005", "nobody"] + STORED)]
    with ThreadPoolExecutor(len(reqs)) as ex:
        answers = list(ex.map(lambda r: chat(server.url, keys["admin"], r[0], r[1]).json(), reqs))
    f = tmp_path / "reqs.jsonl"
    f.write_text("".join(json.dumps({"user_id": u, "input": t}) + "\n" for u, t in reqs))
    out = subprocess.run([sys.executable, "-m", "mta", "generate", "--bank", str(d / "bank"), "--store",
                          str(d / "store"), "--data", str(d / "data"), "--input-file", str(f), "--max-new-tokens", "6"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    expected = [json.loads(x) for x in out.splitlines() if x.strip()]
    assert [a["choices"][0]["message"]["content"] for a in answers] == [e["output"] for e in expected]
    assert [a["mta"]["route"] for a in answers] == [e["route"] for e in expected]
    metrics = httpx.get(server.url + "/metrics").text
    rows_bucket = [ln for ln in metrics.splitlines() if ln.startswith('mta_batch_rows_bucket{le="1.0"}')]
    total = [ln for ln in metrics.splitlines() if ln.startswith("mta_batch_rows_count")]
    assert float(rows_bucket[0].split()[-1]) < float(total[0].split()[-1])  # some steps ran several rows

    def cached() -> float:  # prompt tokens that came from the per-user prefix cache so far
        lines = httpx.get(server.url + "/metrics").text.splitlines()
        return float(next(ln for ln in lines if ln.startswith("mta_prefix_cached_tokens_total")).split()[-1])

    before = cached()
    again = [chat(server.url, keys["admin"], STORED[0], f"Which tag does this movie relate to? description: film {i}")
             .json()["choices"][0]["message"]["content"] for i in (0, len(STORED) + 2)]  # asked before, one at a time
    assert cached() > before and again == [answers[0]["choices"][0]["message"]["content"],
                                           answers[len(STORED) + 2]["choices"][0]["message"]["content"]]


def test_the_slot_decoder_serves_the_same_answers(server, world):
    """`mta serve --decoder graph` (one static cache, the step captured on CUDA; eager here),
    its joining rows' prompts prefilled 16 tokens at a time between decode steps: mixed
    users arriving together get the answers of the default loop, sampled ones too."""
    d, keys = world
    reqs = [(u, f"Which tag does this movie relate to? description: film {i}") for i, u in
            enumerate(STORED + ["synth-0005", "nobody"] + STORED)]
    slots = Server(d, "--decoder", "graph", "--max-batch", "4", "--prefill-chunk", "16")
    try:
        for kw in ({}, {"temperature": 0.9, "seed": 3, "max_tokens": 5}):
            with ThreadPoolExecutor(len(reqs)) as ex:
                want = list(ex.map(lambda r, kw=kw: chat(server.url, keys["admin"], r[0], r[1], **kw).json(), reqs))
                got = list(ex.map(lambda r, kw=kw: chat(slots.url, keys["admin"], r[0], r[1], **kw).json(), reqs))
            assert [a["choices"][0]["message"]["content"] for a in got] == \
                [a["choices"][0]["message"]["content"] for a in want], kw
            assert [a["mta"]["route"] for a in got] == [a["mta"]["route"] for a in want]
    finally:
        slots.stop()


def test_the_openai_client_works(server, world):
    openai = pytest.importorskip("openai")
    _, keys = world
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=keys["admin"])
    assert {m.id for m in client.models.list()} == {"mta", "mta-chat", "mta-base"}
    r = client.chat.completions.create(model="mta", user="synth-0000", max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 4
    chunks = list(client.chat.completions.create(model="mta", user="synth-0000", max_tokens=4, stream=True,
                                                 messages=[{"role": "user", "content": "hi"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    c = client.completions.create(model="mta-base", prompt="hello", max_tokens=3)
    assert c.choices[0].finish_reason in ("stop", "length")


def test_keys_and_limits(server, world):
    _, keys = world
    assert chat(server.url, "", "synth-0000", "q").status_code == 401
    assert chat(server.url, "mta-wrong", "synth-0000", "q").status_code == 401
    r = chat(server.url, keys["user"], "synth-0000", "q")
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    mine = chat(server.url, keys["user"], None, "q")  # the key's own user
    assert mine.status_code == 200 and mine.json()["mta"]["user"] == "synth-0001"
    assert httpx.post(server.url + "/v1/admin/delete", json={"user": "x"}, headers=_h(keys["user"])).status_code == 403
    big = httpx.post(server.url + "/v1/chat/completions", headers=_h(keys["admin"]), content=b"x" * (2 << 20))
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
    assert chat(server.url, keys["admin"], "u", "q", max_tokens=100_000).status_code == 400
    assert chat(server.url, keys["admin"], "u", "q", model="gpt-4").status_code == 404
    bad = httpx.post(server.url + "/v1/chat/completions", headers=_h(keys["admin"]), json={"messages": []})
    assert bad.status_code == 400 and "error" in bad.json()


def test_adapt_then_serve_without_restart_then_delete(server, world):
    d, keys = world
    history = [json.loads(ln) for ln in (d / "data" / "users.jsonl").read_text().splitlines()][6]["history"]
    admin = _h(keys["admin"])
    assert chat(server.url, keys["admin"], "newcomer", "q").json()["mta"]["route"] == "base"
    r = httpx.post(server.url + "/v1/admin/history", json={"user": "newcomer", "history": history}, headers=admin)
    assert r.status_code == 200 and r.json()["history_items"] == len(history)
    assert chat(server.url, keys["admin"], "newcomer", "q").json()["mta"]["route"] == "fusion"
    job = httpx.post(server.url + "/v1/admin/adapt", json={"user": "newcomer"}, headers=admin).json()["job"]
    # a long poll: one request answered when the job has ended (or after 60 s)
    st = httpx.get(server.url + f"/v1/admin/jobs/{job}?wait=60", headers=admin, timeout=90).json()
    assert st["status"] == "done", st
    bad = httpx.get(server.url + f"/v1/admin/jobs/{job}?wait=61", headers=admin)
    assert bad.status_code == 400 and "wait" in bad.text
    assert chat(server.url, keys["admin"], "newcomer", "q").json()["mta"]["route"] == "mta"
    users = httpx.get(server.url + "/v1/admin/users", headers=admin).json()["users"]
    assert "newcomer" in {u.get("user") for u in users}
    assert httpx.post(server.url + "/v1/admin/delete", json={"user": "newcomer"}, headers=admin).status_code == 200
    assert chat(server.url, keys["admin"], "newcomer", "q").json()["mta"]["route"] == "base"
    assert not any(p.name.startswith(".") is False and "newcomer" in p.read_text(errors="ignore")
                   for p in (d / "store").rglob("*.json"))  # nothing of them remains
    assert httpx.post(server.url + "/v1/admin/delete", json={"user": "newcomer"}, headers=admin).status_code == 404


def test_lru_eviction_and_reload_and_a_full_queue(world):
    d, keys = world
    s = Server(d, "--resident", "1", "--max-batch", "1", "--max-queue", "1")
    try:
        first = [chat(s.url, keys["admin"], u, "same question").json() for u in STORED]
        again = [chat(s.url, keys["admin"], u, "same question").json() for u in STORED]
        assert [a["choices"][0]["message"]["content"] for a in first] == \
            [a["choices"][0]["message"]["content"] for a in again]
        m = httpx.get(s.url + "/metrics").text
        value = {ln.split()[0]: float(ln.split()[1]) for ln in m.splitlines() if ln and not ln.startswith("#")}
        assert value["mta_stack_loads_total"] == 6 and value["mta_stack_evictions_total"] == 5
        assert value["mta_resident_users"] == 1 and "# TYPE mta_stack_loads_total counter" in m
        assert value["mta_warm_up_seconds"] == 0  # the eager loop (the CPU's default) has nothing to warm up
        assert value["mta_time_to_first_token_seconds_count"] == 6
        assert value["mta_request_queue_time_seconds_count"] == 6
        assert value["mta_inter_token_latency_seconds_count"] > 0
        assert sum(v for k, v in value.items() if k.startswith("mta_request_success_total")) == 6
        with ThreadPoolExecutor(12) as ex:
            codes = list(ex.map(lambda i: chat(s.url, keys["admin"], STORED[i % 3], f"q{i}", max_tokens=40), range(12)))
        busy = [r for r in codes if r.status_code == 429]
        assert busy and all(r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
                            for r in busy)
        assert all(r.status_code in (200, 429) for r in codes)
    finally:
        s.stop()


def test_shutdown_lets_a_running_request_finish(world):
    d, keys = world
    s = Server(d)
    with ThreadPoolExecutor(1) as ex:
        fut = ex.submit(chat, s.url, keys["admin"], "synth-0000", "a long answer please", max_tokens=200)
        time.sleep(1.0)
        s.proc.send_signal(signal.SIGTERM)
        r = fut.result(timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    # uvicorn re-raises the signal once its graceful shutdown is done, so the exit status says SIGTERM
    assert s.proc.wait(timeout=60) in (0, -signal.SIGTERM)
    s.log.close()
    assert "Traceback" not in (d / f"serve-{s.port}.log").read_text()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None and not os.environ.get("MTA_REQUIRE_BROWSER"),
                    reason="no Chromium here (.ci/run installs it and sets MTA_REQUIRE_BROWSER)")
def test_page_in_a_headless_browser(server, world, tmp_path):
    _, keys = world
    if _chromium() is None:
        pytest.fail("MTA_REQUIRE_BROWSER is set but there is no chromium (apt-get install chromium)")
    url = f"{server.url}/#key={keys['admin']}&user=synth-0000&prompt=Which%20tag%3F&run=1"
    r = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--dump-dom", url],
                       capture_output=True, text=True, timeout=120)
    dom = r.stdout
    assert 'id="base" data-done="1"' in dom and 'id="mine" data-done="1"' in dom, r.stderr[-2000:]
    assert "answered by: base" in dom and "answered by: mta" in dom
    assert "users resident" in dom and "synth task" in dom
    assert '<option value="synth-0000">' in dom and "stored: anchors" in dom  # the admin's user picker
    assert "/v1/admin/adapt" in dom  # the routes, explained
    assert 'data-example="1"' in dom  # an example question in the task's form
    # chat mode, at a phone's width, and a screenshot of it kept with the test's files
    shot = tmp_path / "page-420px.png"
    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile2'}", "--virtual-time-budget=20000", "--window-size=420,1400"]
    url = f"{server.url}/#key={keys['admin']}&user=synth-0000&prompt=hello&mode=chat&run=1"
    r = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert "(mta-chat)" in r.stdout and 'id="mine" data-done="1"' in r.stdout, r.stderr[-2000:]
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 1000
    # onboarding from the page: upload a history, adapt (followed to its end), then compare
    d, _ = world
    first = json.loads((d / "data" / "users.jsonl").read_text().splitlines()[0])
    hist = urllib.parse.quote(json.dumps(first["history"]))
    url = f"{server.url}/#key={keys['admin']}&user=page-user&prompt=Which%20tag%3F&history={hist}&onboard=1"
    slow = [f for f in flags if not f.startswith("--virtual-time-budget")] + ["--virtual-time-budget=300000"]
    r = subprocess.run([*slow, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    status = r.stdout[r.stdout.find('id="onboard-status"'):][:300]
    assert 'id="onboard-status" data-done="1"' in r.stdout and "adapted (" in r.stdout, status
    assert "answered by: mta" in r.stdout
    admin = {"Authorization": f"Bearer {keys['admin']}"}
    assert httpx.post(server.url + "/v1/admin/delete", json={"user": "page-user"}, headers=admin).status_code == 200
