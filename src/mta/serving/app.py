"""`mta serve`: an OpenAI-compatible HTTP server where every request is answered by its
own user's model (docs/serving.md).

- ``POST /v1/chat/completions`` and ``POST /v1/completions`` (also ``stream: true``, as
  server-sent events), ``GET /v1/models``. The end user is OpenAI's ``user`` field, or the
  user a user-role key is bound to. Model ``mta`` answers personalised (stored user:
  fusion + stack; history only: fusion; neither: base); model ``mta-base`` answers with
  the base model. Each response says how it was answered in an extra ``mta`` field.
- Admin (admin key): ``POST /v1/admin/history`` (upload or replace a user's history),
  ``POST /v1/admin/adapt`` (a background job: fusion + stack), ``GET /v1/admin/jobs/{id}``,
  ``POST /v1/admin/delete``, ``GET /v1/admin/users``. User ids travel in JSON bodies,
  never in paths.
- ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus), ``GET /v1/state``, and a page at ``/``.
- Errors are JSON in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mta.config import AdaptConfig, GenerateConfig, ServeConfig
from mta.data.schema import HistoryItem, User
from mta.errors import MtaError
from mta.loaded_bank import LoadedBank
from mta.serving.metrics import Metrics
from mta.serving.scheduler import Job, QueueFull, Scheduler, ShuttingDown
from mta.serving.security import Keys, Principal
from mta.store import UserStore, check_user_id

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("page.html")
MODELS = ("mta", "mta-base")
JOB_ID = re.compile(r"adapt-[A-Za-z0-9_-]{1,80}")  # what a job id looks like; nothing else names a file


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.code, self.param, self.headers = status, kind, code, param, headers or {}


def _error(status: int, message: str, kind: str, code: str | None = None, param: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


# -- request bodies (OpenAI's, the fields we honour; unknown fields are ignored) ----------------------
class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class _Gen(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = "mta"
    user: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)   # greedy by default (OpenAI's default is 1)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    n: int = 1


class ChatBody(_Gen):
    messages: list[Message] = Field(min_length=1)


class CompletionBody(_Gen):
    prompt: str


class HistoryBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str
    history: list[dict] = Field(min_length=1)


class UserBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str


@dataclass
class AdaptJob:
    id: str
    user: str
    status: str = "queued"   # queued | running | done | failed
    error: str | None = None
    result: dict | None = None
    created: float = field(default_factory=time.time)


class Histories:
    """Users' histories as the server sees them: an upload kept in the store
    (``UserStore.uploaded_history``) over the users file given at start, unless the user
    was deleted over HTTP since."""

    def __init__(self, task, users: list[User], store: UserStore | None):
        self.task, self.store = task, store
        self.base = {u.user_id: u for u in users}

    def get(self, user_id: str) -> User | None:
        if self.store is not None:
            uploaded = self.store.uploaded_history(user_id)
            if uploaded is not None:
                return uploaded
            if self.store.history_deleted(user_id):
                return None
        return self.base.get(user_id)

    def put(self, user: User) -> None:
        if self.store is None:
            raise ApiError(409, "this server has no store to keep histories in")
        self.store.put_history(user)

    def delete(self, user_id: str) -> bool:
        """Forget the user's history; True when there was one."""
        had = self.get(user_id) is not None
        in_file = self.base.pop(user_id, None) is not None and had
        if self.store is not None:
            self.store.delete_history(user_id, mark=in_file)
        return had


def build_app(bank: LoadedBank, store: UserStore | None, keys: Keys, cfg: ServeConfig, gen: GenerateConfig,
              users: list[User] | None = None, adapt_cfg: AdaptConfig | None = None, job_prefix: str = "") -> FastAPI:
    """The server around an opened bank (the backbone loaded, the bank checked).
    ``job_prefix`` makes adapt-job ids unique across replicas (mta.serving.ray_serve)."""
    metrics = Metrics()
    adapt_cfg = bank.settings(adapt_cfg)  # once: what the CLI typed, else the bank's and the model's recipes
    scheduler = Scheduler(bank, store, gen, cfg.max_batch, cfg.max_queue, adapt_cfg, metrics, cfg.max_tokens)
    histories = Histories(bank.task, users or [], store)
    jobs: dict[str, AdaptJob] = {}
    counter = itertools.count(1)
    state = {"ready": False}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        state["ready"] = True
        yield
        state["ready"] = False
        await asyncio.to_thread(scheduler.shutdown, cfg.shutdown_timeout)

    app = FastAPI(title="mta", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler, app.state.metrics = scheduler, metrics

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > cfg.max_body_bytes:
            return _error(413, f"the request body is {size} bytes; the limit is {cfg.max_body_bytes}",
                          "invalid_request_error", "body_too_large")
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return _error(e.status, str(e), e.kind, e.code, e.param, e.headers)

    @app.exception_handler(MtaError)
    async def bad_input(_, e: MtaError):  # a library refusal (a corrupt stored history...): one line, 400
        return _error(400, str(e), "invalid_request_error", None, None, None)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"] if p != "body")
        return _error(400, f"{param or 'body'}: {first['msg']}", "invalid_request_error", "invalid_value", param)

    def principal(request: Request) -> Principal:
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        who = keys.find(key)
        if who is None:
            raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", "authentication_error",
                           "invalid_api_key")
        return who

    def admin(request: Request) -> Principal:
        who = principal(request)
        if who.role != "admin":
            raise ApiError(403, "this needs an admin key", "permission_error", "forbidden")
        return who

    def end_user(who: Principal, asked: str | None) -> str | None:
        if who.role == "user":
            if asked is not None and asked != who.user:
                raise ApiError(403, "this key may act only as its own user", "permission_error", "forbidden", "user")
            return who.user
        if asked is not None:
            try:
                check_user_id(asked)
            except MtaError as e:
                raise ApiError(400, str(e), param="user") from None
        return asked

    # -- generation -----------------------------------------------------------------------------------
    async def generate(request: Request, body: _Gen, messages: list[dict], chat: bool):
        who = principal(request)
        user_id = end_user(who, body.user)
        if body.model not in MODELS:
            raise ApiError(404, f"model {body.model!r} does not exist; this server has {', '.join(MODELS)}",
                           code="model_not_found", param="model")
        if body.n != 1:
            raise ApiError(400, "n must be 1", param="n")
        max_tokens = body.max_completion_tokens or body.max_tokens or gen.max_new_tokens or bank.task.max_new_tokens
        if max_tokens > cfg.max_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit of {cfg.max_tokens}",
                           param="max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(user_id, messages, histories.get(user_id) if user_id else None, max_tokens, body.temperature,
                  body.top_p, body.seed, stop, body.model == "mta-base",
                  emit=lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload)))
        try:
            scheduler.submit(job)
        except QueueFull:
            metrics.requests.labels("-", "429").inc()
            raise ApiError(429, "the server is busy: the request queue is full", "rate_limit_error",
                           "queue_full", headers={"Retry-After": str(cfg.retry_after)}) from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down", "server_error", "shutting_down") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.stream:
            return StreamingResponse(stream(rid, created, body.model, chat, job, events, request),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, info = "", None
        try:
            while info is None:
                kind, payload = await events.get()
                if kind == "delta":
                    text += payload
                elif kind == "done":
                    info = payload
                else:
                    raise payload
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        except MtaError as e:
            metrics.requests.labels(job.route or "-", "400").inc()
            raise ApiError(400, str(e)) from None
        metrics.requests.labels(info["route"], "200").inc()
        choice = {"index": 0, "finish_reason": info["finish_reason"]}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": body.model, "choices": [choice],
                "usage": {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"],
                          "total_tokens": info["prompt_tokens"] + info["completion_tokens"]},
                "mta": {"route": info["route"], "user": user_id}}

    async def stream(rid, created, model, chat, job: Job, events: asyncio.Queue,
                     request: Request) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None = None, extra: dict | None = None) -> str:
            c: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if chat:
                c["delta"] = {} if delta is None else {"content": delta}
            else:
                c["text"] = delta or ""
            body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [c], **(extra or {})}
            return f"data: {json.dumps(body)}\n\n"

        try:
            if chat:
                yield f"data: {json.dumps({'id': rid, 'object': obj, 'created': created, 'model': model, 'choices': [{'index': 0, 'delta': {'role': 'assistant', 'content': ''}, 'finish_reason': None}]})}\n\n"  # noqa: E501
            while True:
                kind, payload = await events.get()
                if kind == "delta":
                    yield chunk(payload)
                elif kind == "done":
                    metrics.requests.labels(payload["route"], "200").inc()
                    yield chunk(None, payload["finish_reason"], {
                        "usage": {"prompt_tokens": payload["prompt_tokens"],
                                  "completion_tokens": payload["completion_tokens"],
                                  "total_tokens": payload["prompt_tokens"] + payload["completion_tokens"]},
                        "mta": {"route": payload["route"], "user": job.user_id}})
                    yield "data: [DONE]\n\n"
                    return
                else:
                    err = {"error": {"message": str(payload), "type": "invalid_request_error", "param": None,
                                     "code": None}}
                    yield f"data: {json.dumps(err)}\n\n"
                    return
        finally:
            job.cancelled = True  # a client that went away frees its row at the next step

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatBody):
        if body.messages[-1].role != "user":
            raise ApiError(400, "the last message must be the user's", param="messages")
        return await generate(request, body, [m.model_dump() for m in body.messages], chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionBody):
        if not body.prompt.strip():
            raise ApiError(400, "the prompt is empty", param="prompt")
        return await generate(request, body, [{"role": "user", "content": body.prompt}], chat=False)

    @app.get("/v1/models")
    async def models(request: Request):
        principal(request)
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "mta"}
                                           for m in MODELS]}

    # -- operations ---------------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not state["ready"] or not scheduler.accepting:
            return _error(503, "not ready", "server_error", "not_ready")
        return {"status": "ready"}

    @app.get("/metrics")
    async def prometheus():
        metrics.stacks(bank.stacks.loads, bank.stacks.evictions)
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/state")
    async def server_state(request: Request):
        principal(request)
        up = time.monotonic() - metrics.started
        return {"resident_users": len(bank.stacks.slots), "resident_capacity": bank.stacks.capacity,
                "running": scheduler.running, "queued": scheduler.queue.qsize(), "max_batch": cfg.max_batch,
                "tokens_generated": scheduler.tokens_out, "tokens_per_second": scheduler.tokens_out / max(up, 1e-9),
                "uptime_seconds": up, "task": bank.task.name, "model": bank.backbone.model_id}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text(encoding="utf-8")

    # -- user lifecycle (admin) ------------------------------------------------------------------------------
    def checked(user_id: str) -> str:
        try:
            return check_user_id(user_id)
        except MtaError as e:
            raise ApiError(400, str(e), param="user") from None

    @app.post("/v1/admin/history")
    async def put_history(request: Request, body: HistoryBody):
        admin(request)
        user_id = checked(body.user)
        try:
            items = [HistoryItem.model_validate(it) for it in body.history]
        except ValidationError as e:
            raise ApiError(400, f"history: {e.errors()[0]['msg']}", param="history") from None
        for j, it in enumerate(items):
            problem = bank.task.check_item(it)
            if problem:
                raise ApiError(400, f"history item {j} {problem}", param="history")
        histories.put(User(user_id=user_id, history=items))
        return {"user": user_id, "history_items": len(items)}

    @app.post("/v1/admin/adapt", status_code=202)
    async def adapt(request: Request, body: UserBody):
        admin(request)
        user_id = checked(body.user)
        user = histories.get(user_id)
        if user is None:
            raise ApiError(404, f"user {user_id!r} has no history here; upload one first", code="no_history")
        if store is None:
            raise ApiError(409, "this server has no store to adapt into")
        job = AdaptJob(f"adapt-{job_prefix}{next(counter)}", user_id)
        jobs[job.id] = job
        publish(job)

        def run():
            job.status = "running"
            publish(job)
            stats = bank.adapt([user], adapt_cfg, store)
            bank.stacks.evict(user_id)
            return {"adapted": stats["adapted"], "bytes": stats["bytes_per_user"].get(user_id)}

        fut = scheduler.run_exclusive(run)

        def finished(f):
            try:
                job.result, job.status = f.result(), "done"
            except BaseException as e:  # noqa: BLE001 - reported through the job
                job.error, job.status = str(e), "failed"
            publish(job)

        fut.add_done_callback(finished)
        return {"job": job.id, "status": job.status}

    def job_view(job: AdaptJob) -> dict:
        return {"job": job.id, "user": job.user, "status": job.status, "error": job.error, "result": job.result}

    def publish(job: AdaptJob) -> None:
        """The job's state, also in the store (STORE/jobs/<id>.json, atomically), so that any
        process serving the store can answer for it (replicas on Ray Serve, a restart)."""
        if store is not None:
            store.put_job(job.id, job_view(job))

    @app.get("/v1/admin/jobs/{job_id}")
    async def job_status(request: Request, job_id: str):
        admin(request)
        job = jobs.get(job_id)
        if job is not None:
            return job_view(job)
        if store is not None and JOB_ID.fullmatch(job_id):  # a job of another process on this store
            state = store.job(job_id)
            if state is not None:
                return state
        raise ApiError(404, f"no job {job_id!r}", code="not_found")

    @app.post("/v1/admin/delete")
    async def delete_user(request: Request, body: UserBody):
        admin(request)
        user_id = checked(body.user)

        def run():
            bank.stacks.evict(user_id)
            for jid in [j for j, job in jobs.items() if job.user == user_id]:
                del jobs[jid]
            if store is not None:  # the user's job records too: nothing of them remains
                store.delete_jobs_of(user_id)
            removed = False
            if store is not None and store.has(user_id):
                with store.writing():
                    store.delete(user_id)
                removed = True
            return histories.delete(user_id) or removed

        if not await asyncio.wrap_future(scheduler.run_exclusive(run)):
            raise ApiError(404, f"user {user_id!r} is not here", code="not_found")
        return {"user": user_id, "deleted": True}

    @app.get("/v1/admin/users")
    async def list_users(request: Request):
        admin(request)
        stored = store.entries() if store is not None else []
        return {"users": [{"user": e.record.user_id, "stack": e.record.stack is not None,
                           "anchors": e.record.anchor_users} if e.record else {"corrupt": e.problem}
                          for e in stored]}

    return app
