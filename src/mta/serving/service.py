"""The server's service layer: what a request may do and what it does, with no HTTP in
it. ``Service`` holds the opened bank, the store, the keys, the scheduler and the adapt
jobs; the routes (``mta.serving.routes``) parse requests, call it and shape answers.
Errors are ``ApiError``s carrying the HTTP status and OpenAI's error fields."""

from __future__ import annotations

import re
import shutil
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from pydantic import ValidationError

from mta.config import AdaptConfig, BackboneConfig, GenerateConfig, ServeConfig
from mta.data.schema import HistoryItem, User
from mta.errors import MtaError
from mta.loaded_bank import LoadedBank
from mta.serving.adapt_worker import AdaptWorker, install, worker_backbone
from mta.serving.metrics import Metrics
from mta.serving.scheduler import Job, QueueFull, Scheduler, ShuttingDown
from mta.serving.security import Keys, Principal
from mta.store import UserStore, check_user_id

# model -> how it answers: "task" (the bank's task prompt around the last message, with the
# user's retrieved history, through the user's adapter: what the adapter was trained on),
# "chat" (the messages through the chat template as they are, through the user's adapter),
# "base" (the task prompt through the base model alone: the yardstick beside "task")
MODELS = {"mta": "task", "mta-chat": "chat", "mta-base": "base"}
HASHED = re.compile(r"\b[0-9a-f]{32}\b")  # a user's storage key (mta.store.user_key)
JOB_ID = re.compile(r"adapt-[A-Za-z0-9_-]{1,80}")  # what a job id looks like; nothing else names a file


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.code, self.param, self.headers = status, kind, code, param, headers or {}


@dataclass
class AdaptJob:
    id: str
    user: str
    status: str = "queued"   # queued | running | done | failed | cancelled (the user was deleted first)
    error: str | None = None
    result: dict | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None  # monotonic, when it began to run

    def view(self) -> dict:
        return {"job": self.id, "user": self.user, "status": self.status, "error": self.error, "result": self.result}


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


def checked_user(user_id: str) -> str:
    try:
        return check_user_id(user_id)
    except MtaError as e:
        raise ApiError(400, str(e), param="user") from None


class Service:
    """One server's state and operations (see the module doc). ``job_prefix`` makes
    adapt-job ids unique across replicas (mta.serving.ray_serve). ``backbone``: how the
    backbone was loaded, for the adaptation worker (``ServeConfig.adapt_worker``); without
    it (a backbone built in memory) adapt jobs run on the decode loop's thread."""

    def __init__(self, bank: LoadedBank, store: UserStore | None, keys: Keys, cfg: ServeConfig, gen: GenerateConfig,
                 users: list[User] | None = None, adapt_cfg: AdaptConfig | None = None, job_prefix: str = "",
                 backbone: BackboneConfig | None = None):
        self.bank, self.store, self.keys, self.cfg, self.gen = bank, store, keys, cfg, gen
        self.worker: AdaptWorker | None = None
        if cfg.adapt_worker and backbone is not None and store is not None and bank.path is not None:
            self.worker = AdaptWorker(worker_backbone(backbone, bank.backbone.model_id, bank.backbone.embedder_id,
                                                      cfg.adapt_share), bank.path, cfg.adapt_share)
        self._adapts = ThreadPoolExecutor(1, thread_name_prefix="mta-adapt")  # the worker's jobs, in order
        self._writes = threading.Lock()  # this process's writers of the store, one at a time
        self.metrics = Metrics()
        self.adapt_cfg = bank.settings(adapt_cfg)  # once: what was typed, else the bank's and the model's recipes
        self.scheduler = Scheduler(bank, store, gen, cfg.max_batch, cfg.max_queue, self.adapt_cfg, self.metrics,
                                   cfg.max_tokens, cfg.prefill_chunk, cfg.prefix_cache_tokens,
                                   cfg.join_rows, cfg.join_wait_ms / 1000.0, cfg.feed_tokens, cfg.async_steps)
        self.histories = Histories(bank.task, users or [], store)
        self.jobs: dict[str, AdaptJob] = {}
        self.job_prefix = job_prefix
        self.ready = False

    # -- who asks ------------------------------------------------------------------------------------------
    def caller(self, authorization: str) -> Principal:
        key = authorization[7:].strip() if authorization.lower().startswith("bearer ") else None
        who = self.keys.find(key)
        if who is None:
            raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", "authentication_error",
                           "invalid_api_key")
        return who

    @staticmethod
    def admin(who: Principal) -> Principal:
        if who.role != "admin":
            raise ApiError(403, "this needs an admin key", "permission_error", "forbidden")
        return who

    @staticmethod
    def end_user(who: Principal, asked: str | None) -> str | None:
        """The user a request is answered as: a user key's own, or the ``user`` an admin names."""
        if who.role == "user":
            if asked is not None and asked != who.user:
                raise ApiError(403, "this key may act only as its own user", "permission_error", "forbidden", "user")
            return who.user
        return checked_user(asked) if asked is not None else None

    # -- generation ----------------------------------------------------------------------------------------
    def submit(self, user_id: str | None, messages: list[dict], model: str, max_tokens: int | None,
               temperature: float, top_p: float, seed: int | None, stop: list[str], n: int, emit) -> Job:
        """Check a generation request and queue it; ``emit(kind, payload)`` gets its events."""
        if model not in MODELS:
            raise ApiError(404, f"model {model!r} does not exist; this server has {', '.join(MODELS)}",
                           code="model_not_found", param="model")
        if n != 1:
            raise ApiError(400, "n must be 1", param="n")
        if MODELS[model] != "base" and user_id is None:
            raise ApiError(400, f"model {model} answers as one user: name them in OpenAI's `user` field (or use "
                           "that user's key), or ask model mta-base for the base model", param="user")
        max_tokens = max_tokens or self.gen.max_new_tokens or self.bank.task.max_new_tokens
        if max_tokens > self.cfg.max_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit of {self.cfg.max_tokens}",
                           param="max_tokens")
        job = Job(user_id, messages, self.histories.get(user_id) if user_id else None, max_tokens, temperature,
                  top_p, seed, stop, MODELS[model] == "base", emit=emit, chat=MODELS[model] == "chat")
        try:
            self.scheduler.submit(job)
        except MtaError as e:  # its prompt (e.g. too long for this server)
            self.metrics.requests.labels("-", "400").inc()
            raise ApiError(400, self.public(str(e)), param="messages") from None
        except QueueFull:
            self.metrics.requests.labels("-", "429").inc()
            raise ApiError(429, "the server is busy: the request queue is full", "rate_limit_error",
                           "queue_full", headers={"Retry-After": str(self.cfg.retry_after)}) from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down", "server_error", "shutting_down") from None
        return job

    # -- user lifecycle ------------------------------------------------------------------------------------
    def put_history(self, user_id: str, raw: list[dict]) -> int:
        user_id = checked_user(user_id)
        try:
            items = [HistoryItem.model_validate(it) for it in raw]
        except ValidationError as e:
            raise ApiError(400, f"history: {e.errors()[0]['msg']}", param="history") from None
        for j, it in enumerate(items):
            problem = self.bank.task.check_item(it)
            if problem:
                raise ApiError(400, f"history item {j} {problem}", param="history")
        self.histories.put(User(user_id=user_id, history=items))
        return len(items)

    def start_adapt(self, user_id: str) -> AdaptJob:
        """Queue fusion + stack for a user with a history; the job runs between decode steps."""
        user_id = checked_user(user_id)
        user = self.histories.get(user_id)
        if user is None:
            raise ApiError(404, f"user {user_id!r} has no history here; upload one first", code="no_history")
        if self.store is None:
            raise ApiError(409, "this server has no store to adapt into")
        job = AdaptJob(f"adapt-{self.job_prefix}{uuid.uuid4().hex[:16]}", user_id)  # unique across restarts too
        self.jobs[job.id] = job
        self.publish(job)

        def deleted() -> bool:  # here or by another server on the store, while this job waited
            return job.status == "cancelled" or self.histories.get(user_id) is None

        def begin() -> bool:
            if deleted():
                job.status = "cancelled"  # nothing of the user comes back
                return False
            job.status = "running"
            self.publish(job)
            job.started = time.monotonic()
            return True

        def run():
            if not begin():
                return None
            stats = self.bank.adapt([user], self.adapt_cfg, self.store)
            self.bank.stacks.evict(user_id)
            self.scheduler.forget(user_id)
            return {"adapted": stats["adapted"], "bytes": stats["bytes_per_user"].get(user_id)}

        def run_beside():  # in the worker process; only the install takes the store's lock
            if not begin():
                return None
            staged, stats = self.worker.adapt(user, self.adapt_cfg)
            try:
                with self._writes, self.store.writing():
                    if deleted():  # deleted while it trained: the staged user is dropped
                        job.status = "cancelled"
                        return None
                    done = {"adapted": stats["adapted"], "bytes": install(self.store, staged, user_id)}
                self.scheduler.forget_later(user_id)  # the old stack's prompt prefixes
                return done
            finally:  # installed, dropped, or refused (a store locked by another process)
                shutil.rmtree(staged.root, ignore_errors=True)

        def finished(f):
            if job.status != "cancelled":
                try:
                    job.result, job.status = f.result(), "done"
                except BaseException as e:  # noqa: BLE001 - reported through the job
                    job.error, job.status = str(e), "failed"
            self.metrics.adapted(job.status, time.monotonic() - job.started if job.started else None)
            self.publish(job)

        fut = self._adapts.submit(run_beside) if self.worker is not None else self.scheduler.run_exclusive(run)
        fut.add_done_callback(finished)
        return job

    def close(self) -> None:
        """After the scheduler stopped: the adaptation worker stops (a job still training is
        abandoned: the store never sees it)."""
        if self.worker is not None:
            self.worker.close()
        self._adapts.shutdown(wait=False, cancel_futures=True)

    def publish(self, job: AdaptJob) -> None:
        """The job's state, also in the store, so that any process serving the store can
        answer for it (replicas on Ray Serve, a restart)."""
        if self.store is not None:
            self.store.put_job(job.id, job.view())

    def job(self, job_id: str) -> dict:
        job = self.jobs.get(job_id)
        if job is not None:
            return job.view()
        if self.store is not None and JOB_ID.fullmatch(job_id):  # a job of another process on this store
            state = self.store.job(job_id)
            if state is not None:
                return state
        raise ApiError(404, f"no job {job_id!r}", code="not_found")

    def delete_user(self, user_id: str) -> Future:
        """Remove everything of a user (their stack, record, history, jobs) between decode
        steps; the future's result says whether there was anything."""
        user_id = checked_user(user_id)
        store = self.store

        def run():
            self.bank.stacks.evict(user_id)
            self.scheduler.forget(user_id)
            for jid in [j for j, job in self.jobs.items() if job.user == user_id]:
                self.jobs.pop(jid).status = "cancelled"  # a queued adapt of the user must not write them back
            if store is not None:  # the user's job records too: nothing of them remains
                store.delete_jobs_of(user_id)
            removed = False
            if store is not None and store.has(user_id):
                with self._writes, store.writing():
                    store.delete(user_id)
                removed = True
            return self.histories.delete(user_id) or removed

        return self.scheduler.run_exclusive(run)

    def users(self) -> list[dict]:
        stored = self.store.entries() if self.store is not None else []
        return [{"user": e.record.user_id, "stack": e.record.stack is not None, "anchors": e.record.anchor_users}
                if e.record else {"corrupt": e.problem} for e in stored]

    def public(self, message: str) -> str:
        """An error message as a client sees it: the store's path and the hashed storage
        keys stay on the server."""
        if self.store is not None:
            for root in {str(self.store.root), str(self.store.root.resolve())}:
                message = message.replace(root, "the store")
        return HASHED.sub("<key>", message)

    # -- operations ----------------------------------------------------------------------------------------
    def state(self) -> dict:
        up = time.monotonic() - self.metrics.started
        s = self.scheduler
        return {"resident_users": len(self.bank.stacks.slots), "resident_capacity": self.bank.stacks.capacity,
                "running": s.running, "queued": s.queue.qsize(), "max_batch": self.cfg.max_batch,
                "tokens_generated": s.tokens_out, "tokens_per_second": s.tokens_out / max(up, 1e-9),
                "uptime_seconds": up, "task": self.bank.task.name, "model": self.bank.backbone.model_id,
                "example": self.example()}

    def example(self) -> str | None:
        """A question in the task's own form (for the page): the latest history item of the
        first user of the users file, asked as the task asks it; None without one."""
        user = next((u for u in self.histories.base.values() if u.history), None)
        return self.bank.task.item_example(user.history[-1])[0] if user else None

    def models(self) -> list[dict]:
        """OpenAI's model list, each with how it answers (``mta``: mode and task)."""
        what = {"task": f"the {self.bank.task.name} task's prompt with the user's retrieved history, through the "
                        "user's adapter",
                "chat": "the messages as they are (chat template), through the user's adapter",
                "base": f"the {self.bank.task.name} task's prompt through the base model alone"}
        return [{"id": m, "object": "model", "created": 0, "owned_by": "mta",
                 "mta": {"mode": mode, "task": self.bank.task.name, "answers": what[mode]}}
                for m, mode in MODELS.items()]

    def prometheus(self) -> str:
        self.metrics.stacks(self.bank.stacks.loads, self.bank.stacks.evictions, self.bank.stacks.read_ahead)
        return self.metrics.text()
