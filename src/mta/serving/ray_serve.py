"""`mta serve --ray`: the same HTTP API served by N replicas on Ray Serve (docs/scale.md).

Two deployments:

- ``Replica`` (N of them, one GPU each on a GPU cluster): one whole ``mta serve`` process
  image (backbone, loaded bank, scheduler, the FastAPI app of ``mta.serving.app``) that
  listens on its own loopback port; requests are relayed to it unchanged, so auth,
  limits, streaming, metrics and errors are exactly the single server's. Each replica
  batches the different users it is sent, as ``mta serve`` does.
- ``Router`` (the ingress, on Ray Serve's HTTP proxy): reads the end user of a request
  (OpenAI's ``user`` field, or the user a user-role key is bound to) and sends the request
  to a replica with Ray Serve's model multiplexing, the user id as the multiplexed model
  id, so a user's requests go to the replica that already holds their stack. Requests
  without a user (base model, ``/v1/models``, health) go to any replica.

Every response carries ``x-mta-replica`` (the replica that answered). Routing by user is
Ray Serve's affinity, best effort: a replica reports the users it holds asynchronously,
and a busy one can be passed over, so a user may be held by two replicas; that is only a
cost, never a wrong answer, because everything lives in the shared store: histories,
stacks (a replica holding an older stack than the store's reloads it: stacks are checked
by their sha256 on every batch), adapt jobs' states (``STORE/jobs``; job ids are unique
per replica, so any replica answers a status query), and deletions (a deleted user's
slot is dropped by every replica within ``SWEEP_S`` seconds).
"""

# No ``from __future__ import annotations`` here: Ray pickles the router class by value, and
# FastAPI must see ``Request`` as a class, not as a string it cannot resolve over there.
import json
import logging
import re
import socket
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request  # module level: the router's annotations resolve here

log = logging.getLogger(__name__)
SWEEP_S = 2.0
REPLICA_HEADER = "x-mta-replica"
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"}


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?( .*)$")


def labelled(text: bytes, replica: str) -> bytes:
    """Prometheus text with ``replica="..."`` added to every sample, so that series of
    different replicas never mix (a counter read from another replica looked like a drop)."""
    out = []
    for line in text.decode("utf-8").splitlines():
        m = SAMPLE.match(line)
        if m and not line.startswith("#"):
            name, labels, rest = m.groups()
            inner = labels[1:-1] if labels else ""
            line = f'{name}{{{inner + "," if inner else ""}replica="{replica}"}}{rest}'
        out.append(line)
    return ("\n".join(out) + "\n").encode("utf-8")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ReplicaServer:
    """One replica's server: the single-process app on a loopback port, in a thread."""

    def __init__(self, spec: dict):
        import uvicorn

        from mta.backbone import Backbone
        from mta.bank import read_index
        from mta.config import load_sections
        from mta.data.readers import load_dataset
        from mta.loaded_bank import LoadedBank
        from mta.serving.app import build_app, switch_interval
        from mta.serving.security import Keys
        from mta.store import UserStore

        cfg = load_sections(spec["configs"])  # resolved by the driver (flags, recipes, the bank's record)
        switch_interval(cfg["serve"])
        bank = Path(spec["bank"])
        rec = read_index(bank)
        self.store = UserStore(Path(spec["store"]), create=True) if spec.get("store") else None
        histories = load_dataset(Path(spec["users"]), rec.task).users if spec.get("users") else []
        self.loaded = LoadedBank(Backbone.load(cfg["backbone"], rec.model, rec.embedder), bank,
                                 resident=cfg["serve"].resident)
        app = build_app(self.loaded, self.store, Keys.read(Path(spec["keys"])), cfg["serve"], cfg["generate"],
                        histories, cfg["adapt"], job_prefix=spec.get("job_prefix", ""), backbone=cfg["backbone"])
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=int(cfg["serve"].shutdown_timeout)))
        self.thread = threading.Thread(target=self.server.run, name="mta-replica-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the replica's server did not start")
            time.sleep(0.05)
        self.sweeper = threading.Thread(target=self._sweep, name="mta-replica-sweep", daemon=True)
        self.sweeper.start()

    def _sweep(self) -> None:
        """Drop resident stacks of users that left the store (deleted through another replica)."""
        while not self.server.should_exit:
            time.sleep(SWEEP_S)
            if self.store is None:
                continue
            for uid in list(self.loaded.stacks.slots):
                if not self.store.has(uid):
                    self.loaded.stacks.evict(uid)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=120)


def deployments(spec: dict, replicas: int, resident: int, gpu: bool):
    """The Ray Serve application: a Router in front of ``replicas`` Replicas."""
    import httpx2 as httpx
    from fastapi.responses import StreamingResponse
    from ray import serve

    @serve.deployment(num_replicas=replicas, max_ongoing_requests=max(64, spec["configs"]["serve"]["max_queue"]),
                      ray_actor_options={"num_gpus": 1} if gpu else {"num_cpus": 1})
    class Replica:
        def __init__(self, spec: dict):
            self.id = serve.get_replica_context().replica_id.unique_id
            self.server = ReplicaServer({**spec, "job_prefix": f"{self.id}-"})
            self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.server.port}", timeout=None)

        @serve.multiplexed(max_num_models_per_replica=resident)
        async def user(self, user_id: str) -> str:
            # the stack itself is loaded by the scheduler on the user's first batch (and
            # evicted by its LRU); this records, for Ray Serve's routing, who lives here
            return user_id

        async def forward(self, method: str, path: str, query: str, headers: list, body: bytes):
            uid = serve.get_multiplexed_model_id()
            if uid:
                await self.user(uid)
            url = path + (f"?{query}" if query else "")
            req = self.client.build_request(method, url, headers=[(k, v) for k, v in headers
                                                                  if k.lower() not in HOP_HEADERS], content=body)
            resp = await self.client.send(req, stream=True)
            try:
                out = [(k, v) for k, v in resp.headers.items() if k.lower() not in HOP_HEADERS]
                yield {"status": resp.status_code, "headers": out + [(REPLICA_HEADER, self.id)]}
                if path == "/metrics":  # a scrape reaches one replica: its series say which
                    yield labelled(await resp.aread(), self.id)
                    return
                async for chunk in resp.aiter_raw():
                    yield chunk
            finally:
                await resp.aclose()

        async def __del__(self):
            await self.client.aclose()
            self.server.stop()

    keys_path = Path(spec["keys"])
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    # one router for the whole cluster: it only relays, so it must not be the bottleneck
    # (Ray Serve's default of 5 ongoing requests per replica would serialise the clients)
    @serve.deployment(ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=max(1024, 2 * replicas * spec["configs"]["serve"]["max_queue"]))
    @serve.ingress(app)
    class Router:
        def __init__(self, replica):
            from mta.serving.security import Keys

            self.replica = replica
            self.keys = Keys.read(keys_path)

        def _user(self, request: Request, path: str, body: bytes) -> str:
            auth = request.headers.get("authorization", "")
            who = self.keys.find(auth[7:].strip() if auth.lower().startswith("bearer ") else None)
            if who is not None and who.role == "user":
                return who.user or ""
            if body and request.headers.get("content-type", "").startswith("application/json"):
                try:
                    user = json.loads(body).get("user")
                except (ValueError, AttributeError):
                    return ""
                return user if isinstance(user, str) and 0 < len(user) <= 128 else ""
            return ""

        @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
        async def relay(self, request: Request, path: str):
            body = await request.body()
            uid = self._user(request, "/" + path, body)
            handle = self.replica.options(stream=True, multiplexed_model_id=uid)
            gen = handle.forward.remote(request.method, "/" + path, request.url.query,
                                        list(request.headers.items()), body)
            head = await gen.__anext__()
            headers = dict(head["headers"])
            media = headers.pop("content-type", None)

            async def rest():
                async for chunk in gen:
                    yield chunk
            return StreamingResponse(rest(), status_code=head["status"], headers=headers, media_type=media)

    return Router.bind(Replica.bind(spec))


def serve_on_ray(address: str, spec: dict, host: str, port: int, replicas: int, resident: int, device: str,
                 ready=None, stop: threading.Event | None = None) -> None:
    """Start Ray Serve (``address`` "local": a local instance), run the app on host:port
    until ``stop`` is set or the process is interrupted, then shut Serve down. Replicas
    take one GPU each when ``device`` is CUDA, or "auto" on a cluster with GPUs."""
    import ray
    from ray import serve

    started = not ray.is_initialized()
    if started:
        ray.init(address=None if address == "local" else address, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False)
    gpu = device.startswith("cuda") or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
        serve.run(deployments(spec, replicas, resident, gpu), name="mta", route_prefix="/")
        if ready is not None:
            ready()
        stop = stop or threading.Event()
        if threading.current_thread() is threading.main_thread():
            import signal

            signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    finally:
        try:
            serve.shutdown()
        finally:
            if started:
                ray.shutdown()

