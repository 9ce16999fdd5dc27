"""Load on `mta serve`: N concurrent clients over M distinct users against a server on
loopback, against the same server limited to one request at a time, in the same run.

    .venv/bin/python benchmarks/serve_load.py                       # SmolLM2, 16 clients, 16 users, 500 requests
    .venv/bin/python benchmarks/serve_load.py --model tiny-random-llama --requests 40   # a smoke run

It builds a small bank and store on synthetic users with the given model (in a temporary
directory, or --work), starts `mta serve` twice (--max-batch N, then --max-batch 1),
sends the same bounded set of chat requests (user i mod M, max_tokens fixed) from N
client threads, and prints requests/s, tokens/s, p50/p99 latency and the error count of
each, with the ratio; the JSON goes to --out.

    .venv/bin/python benchmarks/serve_load.py --rate 8 --decoder generate,graph,compiled --clients 64
    .venv/bin/python benchmarks/serve_load.py --rate 256 --decoder compiled,compiled-async ...  # sync, async

With --rate R the load is open-loop: request i is sent at i / R seconds whatever the
answers before it (as users arrive, not as a fixed set of clients wait), streamed, so each
gives its time to first token and its inter-token gaps; one server per decoder, with
--max-batch --clients, serves the per-user model (``mta``) and then the base model alone
(``mta-base``, the yardstick) under the same arrivals. It prints tokens/s, time to first
token p50/p99, inter-token latency p50/p99 and errors of each, and the server's seconds by
phase (its scheduler's admit, load, route, prefill, wait, merge, step and stream).
--warm-users sends each user one request before the timed load (a server that has run a
while: every user's stack resident and prompt prefix cached); without it each user's first
request, with its stack load and its prefill, is part of the load.

    .venv/bin/python benchmarks/serve_load.py --adapt-during    # latency while users are onboarded

With --adapt-during the same load runs three times at one batch size: without adapt jobs,
with a user being adapted the whole time (new users uploaded and adapted one after
another over HTTP) by the default adaptation worker, and the same with --no-adapt-worker
(jobs on the decode loop's thread); it prints each one's latency and the p99 ratios
against the run without jobs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host_profile  # noqa: E402  (beside this file)

ROOT = Path(__file__).resolve().parents[1]
ready = threading.Event()  # adapt_loop's warm-up job has finished
CUDA_COUNTERS = ("mta_cuda_alloc_retries", "mta_cuda_mallocs", "mta_cuda_frees")  # a server on a GPU has them
# the server's counters a run reads (a name left out here reads as 0: keep it in step with
# what the rows report, mta.serving.metrics)
COUNTERS = ("mta_scheduler_seconds", "mta_joins", "mta_fed_requests", "mta_prefill_forwards", "mta_stack_loads",
            "mta_stack_reads_ahead", *CUDA_COUNTERS)


def mta(*args: str) -> str:
    """``mta ARGS``' output; a failed set-up step ends the benchmark with its own last error line."""
    r = subprocess.run([sys.executable, "-m", "mta", "--quiet", *args], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise SystemExit(f"set-up step `mta {args[0]}` failed (exit {r.returncode}): {last}")
    return r.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(work: Path, model: str, embedder: str, users: int, device: str) -> tuple[str, list[str]]:
    if not (work / "store" / "store.json").exists():
        mta("data", "synth", "--out", str(work / "data"), "--users", str(users + 8), "--queries", "1")
        mta("bank", "build", "--data", str(work / "data"), "--out", str(work / "bank"), "--anchors", "4",
            "--model", model, "--embedder", embedder, "--device", device)
        ids = ",".join(f"synth-{i:04d}" for i in range(users))
        mta("adapt", "--bank", str(work / "bank"), "--data", str(work / "data"), "--out", str(work / "store"),
            "--users", ids, "--device", device)
    if not (work / "keys.json").exists():
        key = mta("keys", "add", "--keys", str(work / "keys.json"), "--role", "admin").strip()
        (work / "admin.key").write_text(key)
    return (work / "admin.key").read_text().strip(), [f"synth-{i:04d}" for i in range(users)]


def adapt_one(client, url: str, uid: str, history: list, stop: threading.Event | None = None) -> str | None:
    """Upload ``uid``'s history, adapt them, wait for the job; its end status (None: stopped first)."""
    client.post(url + "/v1/admin/history", json={"user": uid, "history": history}).raise_for_status()
    job = client.post(url + "/v1/admin/adapt", json={"user": uid}).json()["job"]
    while stop is None or not stop.is_set():
        status = client.get(url + f"/v1/admin/jobs/{job}").json()["status"]
        if status in ("done", "failed", "cancelled"):
            return status
        time.sleep(0.1)
    return None


def adapt_loop(url: str, key: str, work: Path, newcomers: list[str], stop: threading.Event, ended: list) -> None:
    """Keep one user being adapted until ``stop``: a newcomer's history uploaded, the user
    adapted, the next one; each finished job's status goes to ``ended``. One job first, not
    counted, so the adaptation worker has started before the load."""
    history = {u["user_id"]: u["history"] for u in map(json.loads, (work / "data" / "users.jsonl").open())}
    client = httpx.Client(timeout=600, headers={"Authorization": f"Bearer {key}"})
    if adapt_one(client, url, newcomers[-1], history[newcomers[-1]]) != "done":
        raise SystemExit("the warm-up adapt job failed; see the server's log")
    ready.set()
    k = 0
    while not stop.is_set():
        uid = newcomers[k % (len(newcomers) - 1)]
        k += 1
        status = adapt_one(client, url, uid, history[uid], stop)
        if status is not None:
            ended.append(status)


@contextlib.contextmanager
def server(work: Path, a, max_batch: int, decoder: str, extra: tuple[str, ...] = (), name: str = ""):
    """`mta serve` on loopback with ``max_batch`` rows and ``decoder``, ready (its warm-up
    done); yields its URL and process id, stops it (SIGTERM) after."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    tag = "".join(c if c.isalnum() else "-" for c in name)
    log = (work / f"serve-b{max_batch}-{decoder}{'-' + tag if tag else ''}.log").open("w")
    if decoder.endswith("-async"):  # the slot decoder with its host a step behind (the server's default)
        decoder, extra = decoder.removesuffix("-async"), (*extra, "--async-steps")
    elif decoder in ("graph", "compiled"):  # the synchronous slot loop, the async one's reference
        extra = (*extra, "--no-async-steps")
    proc = subprocess.Popen([sys.executable, "-m", "mta", "serve", "--bank", str(work / "bank"), "--store",
                             str(work / "store"), "--users", str(work / "data"), "--keys", str(work / "keys.json"),
                             "--port", str(port), "--max-batch", str(max_batch), "--max-queue", str(a.requests),
                             "--device", a.device, "--decoder", decoder, *a.server_arg, *extra], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + a.start_timeout
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {Path(log.name).read_text()[-1500:]}")
            time.sleep(0.5)
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        log.close()


def pct(xs: list[float], q: float) -> float | None:
    """The ``q`` quantile of ``xs`` (nearest rank), None when empty."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def histograms(client, url: str) -> dict:
    """The server's inter-token latency and decode-step histograms from /metrics: name ->
    (cumulative counts by upper bound, sum, count). The server times every token, which the
    client cannot: it sees a stream event only when the text grows by whole characters.
    Also its counters (COUNTERS: the scheduler's seconds by phase, its joins, fed requests,
    prefill forwards, stack loads): name -> {label: total}; and its warm-up's seconds
    (``mta_warm_up_seconds``): name -> {"": seconds}."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(client.get(url + "/metrics").text):
        if fam.name in COUNTERS:
            out[fam.name] = {s.labels.get("phase", ""): s.value for s in fam.samples if s.name.endswith("_total")}
            continue
        if fam.name == "mta_warm_up_seconds":  # a gauge: what the server's warm-up took, once
            out[fam.name] = {"": fam.samples[0].value} if fam.samples else {}
            continue
        if fam.name not in ("mta_inter_token_latency_seconds", "mta_decode_step_seconds"):
            continue
        buckets = {float(s.labels["le"]): s.value for s in fam.samples if s.name.endswith("_bucket")}
        total = {s.name.rsplit("_", 1)[1]: s.value for s in fam.samples if s.name.endswith(("_sum", "_count"))}
        out[fam.name] = (buckets, total.get("sum", 0.0), total.get("count", 0.0))
    return out


def histogram_stats(before: dict, after: dict, name: str) -> dict:
    """Mean, and the bucket bounds the p50 and p99 fall under, of what ``name`` saw between two scrapes."""
    if name not in after:
        return {}
    b1, s1, n1 = after[name]
    b0, s0, n0 = before.get(name, ({}, 0.0, 0.0))
    n = n1 - n0
    if n <= 0:
        return {}
    cum = sorted((le, c - b0.get(le, 0.0)) for le, c in b1.items())

    def bound(q: float) -> float:  # the smallest bucket bound that holds the q quantile
        return next((le for le, c in cum if c >= q * n), float("inf"))

    return {"mean_s": (s1 - s0) / n, "p50_le_s": bound(0.5), "p99_le_s": bound(0.99), "count": int(n)}


def counter_deltas(before: dict, after: dict, name: str) -> dict:
    """What each label of the counter ``name`` counted between two scrapes."""
    return {k: v - before.get(name, {}).get(k, 0.0) for k, v in after.get(name, {}).items()}


def streamed(client, url: str, body: dict) -> dict:
    """One streamed chat request: when each piece of text arrived, the tokens, success."""
    t0 = time.perf_counter()
    times, tokens = [], 0
    try:
        with client.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as r:
            if r.status_code != 200:
                return {"ok": False, "tokens": 0, "times": [], "t0": t0}
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return {"ok": True, "tokens": tokens, "times": times, "t0": t0}
                obj = json.loads(line[6:])
                if "error" in obj:
                    break
                if obj["choices"][0].get("delta", {}).get("content"):
                    times.append(time.perf_counter())
                tokens = obj.get("usage", {}).get("completion_tokens", tokens)
    except httpx.HTTPError:
        pass
    return {"ok": False, "tokens": tokens, "times": times, "t0": t0}


def open_loop(url: str, key: str, users: list[str], a, model: str, decoder: str, pid: int) -> dict:
    """``a.requests`` streamed requests sent at ``a.rate`` per second (open loop) to ``model``
    (the server's process ``pid``, sampled by py-spy during the load with ``a.profile``)."""
    def body(i: int) -> dict:
        b = {"model": model, "max_tokens": a.max_tokens,
             "messages": [{"role": "user", "content": a.prompt.format(i=i)}]}
        return b if model == "mta-base" else {**b, "user": users[i % len(users)]}

    lanes = min(a.requests, 512)  # threads enough that no request waits for a free one
    client = httpx.Client(timeout=a.timeout, headers={"Authorization": f"Bearer {key}"},
                          limits=httpx.Limits(max_connections=lanes, max_keepalive_connections=lanes))
    for i in range(min(4, a.requests)):  # warm-up, not counted
        streamed(client, url, body(i))
    if a.warm_users and model != "mta-base":  # each user once, not counted: stacks resident, prefixes cached
        with ThreadPoolExecutor(min(lanes, len(users))) as ex:
            list(ex.map(lambda i: streamed(client, url, body(a.requests + i)), range(len(users))))
    before = histograms(client, url)
    rec = a.profile / f"{decoder}-{model}" if a.profile else None
    sampled = host_profile.sampling(pid, rec, a.profile_rate) if rec else contextlib.nullcontext()
    with sampled, ThreadPoolExecutor(lanes) as ex:
        futures, t0 = [], time.perf_counter()
        for i in range(a.requests):
            time.sleep(max(0.0, t0 + i / a.rate - time.perf_counter()))
            futures.append(ex.submit(streamed, client, url, body(i)))
        results = [f.result() for f in futures]
    after = histograms(client, url)
    wall = max((r["times"][-1] if r["times"] else r["t0"]) for r in results) - t0
    ttft = [r["times"][0] - r["t0"] for r in results if r["ok"] and r["times"]]
    itl = [b - a_ for r in results if r["ok"] for a_, b in zip(r["times"], r["times"][1:])]
    return {"decoder": decoder, "model": model, "rate_per_s": a.rate, "requests": a.requests,
            "max_batch": a.clients, "users": len(users), "warm_users": a.warm_users, "wall_s": wall,
            "tokens_per_s": sum(r["tokens"] for r in results if r["ok"]) / wall,
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
            "itl_p50_s": pct(itl, 0.5), "itl_p99_s": pct(itl, 0.99),
            "server_itl": histogram_stats(before, after, "mta_inter_token_latency_seconds"),
            "server_step": histogram_stats(before, after, "mta_decode_step_seconds"),
            "server_phase_s": counter_deltas(before, after, "mta_scheduler_seconds"),
            "server_joins": int(counter_deltas(before, after, "mta_joins").get("", 0)),
            "server_fed": int(counter_deltas(before, after, "mta_fed_requests").get("", 0)),
            "server_prefill_forwards": int(counter_deltas(before, after, "mta_prefill_forwards").get("", 0)),
            "server_stack_loads": int(counter_deltas(before, after, "mta_stack_loads").get("", 0)),
            "server_stack_reads_ahead": int(counter_deltas(before, after, "mta_stack_reads_ahead").get("", 0)),
            # the decoder's warm-up before the server turned ready (compile, capture, kernel tiles)
            "server_warm_up_s": after.get("mta_warm_up_seconds", {}).get(""),
            # the CUDA caching allocator's retries and driver calls during the load (absent on a CPU)
            **{f"server_{n.removeprefix('mta_')}": int(counter_deltas(before, after, n)[""])
               for n in CUDA_COUNTERS if "" in after.get(n, {})},
            "errors": sum(not r["ok"] for r in results),
            **({"host_profile": host_profile.summarise(rec, a.profile_rate)} if rec else {})}


def run(work: Path, key: str, users: list[str], a, max_batch: int, extra: tuple[str, ...] = (),
        newcomers: list[str] | None = None, name: str = "") -> dict:
    """The load on a server of ``max_batch``; with ``newcomers``, a user is being adapted
    the whole time the load runs (``adapt_loop``)."""
    with server(work, a, max_batch, a.decoder, extra, name) as (url, _):
        client = httpx.Client(timeout=a.timeout, headers={"Authorization": f"Bearer {key}"})

        def one(i: int) -> tuple[float, int, bool]:
            body = {"model": "mta", "user": users[i % len(users)], "max_tokens": a.max_tokens,
                    "messages": [{"role": "user", "content": a.prompt.format(i=i)}]}
            t0 = time.perf_counter()
            try:
                r = client.post(url + "/v1/chat/completions", json=body)
                ok = r.status_code == 200
                tokens = r.json()["usage"]["completion_tokens"] if ok else 0
            except httpx.HTTPError:
                ok, tokens = False, 0
            return time.perf_counter() - t0, tokens, ok

        for i in range(min(4, a.requests)):  # warm-up, not counted
            one(i)
        stop, ended = threading.Event(), []
        adapting = threading.Thread(target=adapt_loop, args=(url, key, work, newcomers, stop, ended), daemon=True)
        if newcomers:
            ready.clear()
            adapting.start()
            if not ready.wait(600):
                raise SystemExit("the warm-up adapt job did not finish in 10 minutes")
            time.sleep(0.5)  # the next job under way
        t0 = time.perf_counter()
        with ThreadPoolExecutor(a.clients) as ex:
            results = list(ex.map(one, range(a.requests)))
        wall = time.perf_counter() - t0
        stop.set()
        if newcomers:
            adapting.join(timeout=600)
        lat = [r[0] for r in results]
        return {"name": name or f"max batch {max_batch}", "adapt_jobs_done": ended.count("done"),
                "adapt_jobs_failed": len(ended) - ended.count("done"),
                "max_batch": max_batch, "requests": a.requests, "clients": a.clients, "users": len(users),
                "wall_s": wall, "requests_per_s": a.requests / wall, "tokens_per_s": sum(r[1] for r in results) / wall,
                "p50_s": pct(lat, 0.5), "p99_s": pct(lat, 0.99), "errors": sum(not r[2] for r in results)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--embedder", default="minilm-l6")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--decoder", default="generate",
                    help="the server's decode loop: generate (its eager one), graph (the slot decoder, its step "
                         "captured, synchronous: --no-async-steps), compiled (the same with its step compiled "
                         "first), graph-async or compiled-async (the same with --async-steps, the server's "
                         "default); with --rate, several separated by commas, one server each")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--prompt", help="the request text ({i}: the request's number)",
                    default="Which tag does this movie relate to? description: a film about case number {i}")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--work", type=Path, help="keep the bank, store and logs here (default: a temporary directory)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/serve_load.json"))
    ap.add_argument("--rate", type=float, help="open loop: requests sent at this rate per second, streamed "
                    "(time to first token, inter-token latency), to mta and then to mta-base")
    ap.add_argument("--server-arg", action="append", default=[], help="an option passed on to `mta serve` "
                    "(repeat: --server-arg=--gpu-memory --server-arg=0.6)")
    ap.add_argument("--start-timeout", type=float, default=1800, help="seconds a server may take to turn ready "
                    "(a compiled decoder compiles before it does)")
    ap.add_argument("--warm-users", action="store_true", help="open loop: before the timed load, one request "
                    "of each user (not counted), so their stacks are resident and their prompt prefixes cached, "
                    "as in a server that has run a while; without it each user's first request is in the load")
    ap.add_argument("--profile", type=Path, help="open loop: sample each server's threads with py-spy during "
                    "the timed load (benchmarks/host_profile.py: the scheduler thread's phases, its GIL share, "
                    "what it waits in); the recordings go under this directory")
    ap.add_argument("--profile-rate", type=int, default=250, help="py-spy's samples per second (--profile)")
    ap.add_argument("--adapt-during", action="store_true", help="the load without adapt jobs, with a user being "
                    "adapted by the worker the whole time, and with jobs on the decode loop's thread")
    a = ap.parse_args()
    decoders = [d.strip() for d in a.decoder.split(",")]
    bad = [d for d in decoders if d not in ("generate", "graph", "compiled", "graph-async", "compiled-async")]
    if bad or (len(decoders) > 1 and a.rate is None):
        ap.error(f"--decoder {a.decoder!r}: one of generate, graph, compiled, graph-async, compiled-async "
                 "(several, separated by commas, only with --rate)")
    if a.rate is not None and (a.rate <= 0 or a.adapt_during):
        ap.error("--rate takes a positive number of requests per second, and not with --adapt-during")
    if a.warm_users and a.rate is None:
        ap.error("--warm-users goes with --rate (the open loop)")
    if a.profile is not None:
        if a.rate is None:
            ap.error("--profile goes with --rate (the open loop)")
        try:
            host_profile.check_attach()
        except host_profile.ProfileError as e:
            ap.error(str(e))
    if a.model == "tiny-random-llama" and a.embedder == "minilm-l6":
        a.embedder = "hashing-embedder"
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        key, users = setup(work, a.model, a.embedder, a.users, a.device)
        if a.rate is not None:
            rows = []
            for d in decoders:
                with server(work, a, a.clients, d) as (url, pid):
                    rows += [open_loop(url, key, users, a, model, d, pid) for model in ("mta", "mta-base")]
        elif a.adapt_during:
            newcomers = [f"synth-{i:04d}" for i in range(a.users, a.users + 8)]  # in the data, not in the store
            rows = [run(work, key, users, a, a.clients, name="no adapt job"),
                    run(work, key, users, a, a.clients, newcomers=newcomers, name="adapting, worker"),
                    run(work, key, users, a, a.clients, ("--no-adapt-worker",), newcomers,
                        name="adapting, decode thread")]
        else:
            rows = [run(work, key, users, a, a.clients), run(work, key, users, a, 1)]
    if a.rate is not None:
        report_open_loop(a, rows)
        return
    if a.adapt_during:
        report_adapting(a, rows)
        return
    ratio = rows[0]["requests_per_s"] / rows[1]["requests_per_s"]
    print(f"mta serve, {a.model} on {a.device}: {a.requests} requests, {a.clients} clients over {a.users} users, "
          f"max_tokens {a.max_tokens}, prompt {a.prompt!r}")
    print(f"{'max batch':>9} {'req/s':>8} {'tok/s':>8} {'p50 s':>7} {'p99 s':>7} {'errors':>6}")
    for r in rows:
        print(f"{r['max_batch']:>9} {r['requests_per_s']:>8.2f} {r['tokens_per_s']:>8.1f} {r['p50_s']:>7.2f} "
              f"{r['p99_s']:>7.2f} {r['errors']:>6}")
    print(f"batched / one at a time: {ratio:.2f}x")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"model": a.model, "device": a.device, "server_args": a.server_arg,
                                 "decoder": a.decoder, "max_tokens": a.max_tokens,
                                 "prompt": a.prompt,
                                 "rows": rows, "ratio": ratio}, indent=2) + "\n")
    print(f"wrote {a.out}")


def report_open_loop(a, rows: list[dict]) -> None:
    def ms(x: float | None) -> str:
        return f"{1000 * x:.1f}" if x is not None else "-"

    print(f"mta serve, {a.model} on {a.device}: open loop, {a.requests} requests at {a.rate:g}/s, max batch "
          f"{a.clients}, {a.users} users, max_tokens {a.max_tokens}"
          + ("; each user's first request before the timed load (--warm-users)" if a.warm_users else ""))
    print("(ITL: the server's, every token: mean, and the histogram bucket its p50 / p99 fall under; "
          "step: the server's decode step, mean)")
    w = max(9, *(len(r["decoder"]) for r in rows))
    print(f"{'decoder':<{w}} {'model':<9} {'tok/s':>8} {'TTFT p50 ms':>11} {'TTFT p99 ms':>11} {'ITL mean ms':>11} "
          f"{'ITL p50 <=':>10} {'ITL p99 <=':>10} {'step ms':>7} {'errors':>6}")
    for r in rows:
        itl, step = r["server_itl"], r["server_step"]
        print(f"{r['decoder']:<{w}} {r['model']:<9} {r['tokens_per_s']:>8.1f} {ms(r['ttft_p50_s']):>11} "
              f"{ms(r['ttft_p99_s']):>11} {ms(itl.get('mean_s')):>11} {ms(itl.get('p50_le_s')):>10} "
              f"{ms(itl.get('p99_le_s')):>10} {ms(step.get('mean_s')):>7} {r['errors']:>6}")
    print("the scheduler's seconds by phase, its joins (groups of requests joining the running batch) and the "
          "requests fed through the decode steps:")
    for r in rows:
        ph = r.get("server_phase_s", {})
        parts = " ".join(f"{k} {v:.1f} s" for k, v in ph.items())
        print(f"  {r['decoder']:<{w}} {r['model']:<9} wall {r['wall_s']:.1f} s: {parts or '-'}; "
              f"{r.get('server_joins', 0)} joins, {r.get('server_fed', 0)} fed, "
              f"{r.get('server_prefill_forwards', 0)} prefill forwards, {r.get('server_stack_loads', 0)} stack loads "
              f"({r.get('server_stack_reads_ahead', 0)} read ahead)"
              + ("" if "server_cuda_mallocs" not in r else
                 f"; CUDA allocator: {r['server_cuda_alloc_retries']} retries, {r['server_cuda_mallocs']} "
                 f"cudaMalloc, {r['server_cuda_frees']} cudaFree")
              + ("" if r.get("server_warm_up_s") is None else f"; warm-up before ready {r['server_warm_up_s']:.1f} s"))
    for r in rows:
        if "host_profile" in r:
            print(f"host profile (py-spy, {a.profile}/{r['decoder']}-{r['model']}): {r['decoder']} {r['model']}")
            print(host_profile.report(r["host_profile"], "  "))
    for d in dict.fromkeys(r["decoder"] for r in rows):
        mine, base = (next(r for r in rows if r["decoder"] == d and r["model"] == m) for m in ("mta", "mta-base"))
        mine["tokens_vs_base"] = mine["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else None
        print(f"{d}: mta / mta-base tokens/s {mine['tokens_vs_base']:.3f}")
    for d in dict.fromkeys(r["decoder"] for r in rows if r["decoder"].endswith("-async")):
        sync = d.removesuffix("-async")
        for m in ("mta", "mta-base"):
            ahead = next(r for r in rows if r["decoder"] == d and r["model"] == m)
            same = next((r for r in rows if r["decoder"] == sync and r["model"] == m), None)
            if same and same["tokens_per_s"]:
                ahead["tokens_vs_sync"] = ahead["tokens_per_s"] / same["tokens_per_s"]
                print(f"{m}: {d} / {sync} tokens/s {ahead['tokens_vs_sync']:.3f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"model": a.model, "device": a.device, "server_args": a.server_arg,
                                 "open_loop": True, "rate_per_s": a.rate,
                                 "warm_users": a.warm_users, "max_tokens": a.max_tokens, "prompt": a.prompt,
                                 "rows": rows}, indent=2) + "\n")
    print(f"wrote {a.out}")


def report_adapting(a, rows: list[dict]) -> None:
    base = rows[0]
    print(f"mta serve, {a.model} on {a.device}: {a.requests} requests, {a.clients} clients over {a.users} users, "
          f"max_tokens {a.max_tokens}; a user adapted the whole time in the last two runs")
    print(f"{'run':<24} {'req/s':>7} {'p50 s':>7} {'p99 s':>7} {'p99 / none':>10} {'jobs':>5} {'errors':>6}")
    for r in rows:
        r["p99_vs_no_job"] = r["p99_s"] / base["p99_s"]
        print(f"{r['name']:<24} {r['requests_per_s']:>7.2f} {r['p50_s']:>7.2f} {r['p99_s']:>7.2f} "
              f"{r['p99_vs_no_job']:>10.2f} {r['adapt_jobs_done']:>5} {r['errors']:>6}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"model": a.model, "device": a.device, "server_args": a.server_arg,
                                 "decoder": a.decoder, "max_tokens": a.max_tokens,
                                 "prompt": a.prompt, "adapt_during": True, "rows": rows}, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
