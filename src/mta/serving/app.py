"""`mta serve`: an OpenAI-compatible HTTP server where every request is answered by its
own user's model (docs/serving.md).

- ``POST /v1/chat/completions`` and ``POST /v1/completions`` (also ``stream: true``, as
  server-sent events), ``GET /v1/models``. The end user is OpenAI's ``user`` field, or the
  user a user-role key is bound to. Model ``mta`` answers personalised in task mode (the
  bank's task prompt; stored user: fusion + stack; history only: fusion; neither: base),
  ``mta-chat`` in chat mode (the messages as they are, through the user's adapter),
  ``mta-base`` with the base model (docs/serving.md). Each response says how it was
  answered in an extra ``mta`` field.
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
import gc
import logging
import sys

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError

from mta.config import AdaptConfig, BackboneConfig, GenerateConfig, ServeConfig
from mta.data.schema import User
from mta.errors import MtaError
from mta.loaded_bank import LoadedBank
from mta.serving import routes
from mta.serving.routes import error_response
from mta.serving.security import Keys
from mta.serving.service import ApiError, Service
from mta.store import UserStore

log = logging.getLogger(__name__)


def switch_interval(cfg: ServeConfig) -> None:
    """Set the process's thread switch interval (``ServeConfig.switch_interval_ms``) for the
    whole process. The processes that serve call it (`mta serve`, a Ray replica), not
    ``build_app``: an app built inside another program (a test) leaves its threads alone.

    Why it might matter: torch lets go of the GIL inside each operation, so the scheduler's
    thread asks for it again after every one it launches; while the event loop's thread
    holds it, streaming tokens, the scheduler waits until the holder is asked to let go,
    after one switch interval. On the CPU it changed nothing measurable, and on an H100 at
    8B shape the scheduler waited for the GIL in at most 14% of its samples (docs/serving.md,
    "Where the host time goes" and run S): a knob, unset by default."""
    if cfg.switch_interval_ms is not None:
        sys.setswitchinterval(cfg.switch_interval_ms / 1000)


def build_app(bank: LoadedBank, store: UserStore | None, keys: Keys, cfg: ServeConfig, gen: GenerateConfig,
              users: list[User] | None = None, adapt_cfg: AdaptConfig | None = None, job_prefix: str = "",
              backbone: BackboneConfig | None = None) -> FastAPI:
    """The server around an opened bank (the backbone loaded, the bank checked): the
    service (``app.state.service``), the routes of ``mta.serving.routes``, the body
    limit and OpenAI-shaped errors. ``job_prefix`` makes adapt-job ids unique across
    replicas (mta.serving.ray_serve); ``backbone``, how the backbone was loaded, lets adapt
    jobs run in a worker process beside decoding (``Service``)."""
    svc = Service(bank, store, keys, cfg, gen, users, adapt_cfg, job_prefix, backbone)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.scheduler.start()
        await asyncio.to_thread(svc.scheduler.warm_up)  # a compiled decoder compiles here, not under requests
        # what start-up made (the model, torch, transformers: about half a million objects)
        # is left out of every later collection: one full collection scanning them took 0.30 s
        # inside a join on this project's CPU (docs/serving.md, "Garbage collection")
        gc.freeze()
        svc.ready = True
        yield
        svc.ready = False
        await asyncio.to_thread(svc.scheduler.shutdown, cfg.shutdown_timeout)
        await asyncio.to_thread(svc.close)
        gc.unfreeze()  # collectable again at exit (frozen bindings' objects are reported as leaks)

    app = FastAPI(title="mta", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = svc
    app.state.scheduler, app.state.metrics = svc.scheduler, svc.metrics
    app.add_middleware(BodyLimit)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(BodyTooLarge, body_too_large)
    app.add_exception_handler(MtaError, bad_input)
    app.add_exception_handler(RequestValidationError, invalid)
    for router in (routes.openai, routes.ops, routes.users):
        app.include_router(router)
    return app


class BodyLimit:
    """``--max-body-bytes`` for every body: one whose Content-Length says more is refused
    before it is read; one without (chunked) is refused as soon as what has arrived is
    more (a 413 either way), so a long body cannot hold the server."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = scope["app"].state.service.cfg.max_body_bytes
        size = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        if size.isdigit() and int(size) > limit:
            return await too_large(f"the request body is {size} bytes; the limit is {limit}")(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(413, f"the request body is over the limit of {limit} bytes")
            return message

        await self.app(scope, counted, send)


class BodyTooLarge(HTTPException):
    """Raised while a body is read (FastAPI passes HTTP exceptions on from body parsing)."""


async def body_too_large(_, e: BodyTooLarge):
    return too_large(e.detail)


def too_large(message: str):
    return error_response(413, message, "invalid_request_error", "body_too_large")


async def api_error(_, e: ApiError):
    return error_response(e.status, str(e), e.kind, e.code, e.param, e.headers)


async def bad_input(request, e: MtaError):  # a library refusal (a corrupt stored history...): one line, 400
    return error_response(400, request.app.state.service.public(str(e)), "invalid_request_error")


async def invalid(_, e: RequestValidationError):
    first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(p) for p in first["loc"] if p != "body")
    return error_response(400, f"{param or 'body'}: {first['msg']}", "invalid_request_error", "invalid_value", param)
