"""The HTTP routes of `mta serve`, at module level: each parses its request (OpenAI's
bodies, the fields we honour), asks the ``Service`` on ``app.state.service`` and shapes
the answer. Who asks is a dependency (``caller``, ``admin``); errors are ``ApiError``s,
turned into OpenAI's error shape by the app (``mta.serving.app``)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from mta import __version__
from mta.errors import MtaError
from mta.serving.scheduler import Job, OutOfMemory, ShuttingDown
from mta.serving.security import Principal
from mta.serving.service import ApiError, Service

PAGE = Path(__file__).with_name("page.html")


def error_response(status: int, message: str, kind: str, code: str | None = None, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


# -- request bodies (OpenAI's): the fields we honour; the ones we do not are refused (400,
# naming the field) when they ask for something; anything else unknown is ignored, as OpenAI does
class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_chat(self, param: str) -> dict:
        """{"role", "content"} for the chat template: array content joined from its text
        parts (any other part is refused), OpenAI's developer role as a system message."""
        if isinstance(self.content, str):
            text = self.content
        else:
            other = [p.type for p in self.content if p.type != "text" or p.text is None]
            if other:
                raise ApiError(400, f"content part of type {other[0]!r} is not supported: this server reads text",
                               param=param)
            text = "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


# field -> the value that asks for nothing (a request giving anything else is refused)
UNSUPPORTED: dict[str, object] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "best_of": (None, 1),
    "echo": (None, False), "suffix": (None, ""), "response_format": (None, {"type": "text"}),
}


class _Gen(BaseModel):
    model_config = ConfigDict(extra="allow")
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

    def refuse_unsupported(self) -> None:
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
                raise ApiError(400, f"`{name}` is not supported by this server; leave it out", param=name,
                               code="unsupported_parameter")


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


# -- dependencies ------------------------------------------------------------------------------------
def service(request: Request) -> Service:
    return request.app.state.service


Svc = Annotated[Service, Depends(service)]


def caller(svc: Svc, authorization: Annotated[str, Header()] = "") -> Principal:
    return svc.caller(authorization)


def admin(who: Annotated[Principal, Depends(caller)]) -> Principal:
    return Service.admin(who)


Caller = Annotated[Principal, Depends(caller)]
Admin = Annotated[Principal, Depends(admin)]

openai = APIRouter()
ops = APIRouter()
users = APIRouter(prefix="/v1/admin")


# -- generation ----------------------------------------------------------------------------------------
async def _generate(svc: Service, who: Principal, body: _Gen, messages: list[dict], chat: bool):
    body.refuse_unsupported()
    user_id = svc.end_user(who, body.user)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    # (in a worker thread: submitting builds the prompt, a retrieval and a tokenisation that
    # would hold up every other request on the event loop)
    job = await run_in_threadpool(
        svc.submit, user_id, messages, body.model, body.max_completion_tokens or body.max_tokens, body.temperature,
        body.top_p, body.seed, [body.stop] if isinstance(body.stop, str) else list(body.stop or []), body.n,
        emit=lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload)))
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if body.stream:
        return StreamingResponse(_stream(svc, rid, created, body.model, chat, job, events),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    text, info = "", None
    try:
        while info is None:
            kind, payload = await events.get()
            if kind == "delta":
                text += payload
            elif kind == "done":
                info = payload
            elif isinstance(payload, ShuttingDown):
                raise ApiError(503, str(payload), "server_error", "shutting_down")
            elif isinstance(payload, OutOfMemory):
                raise ApiError(503, str(payload), "server_error", "out_of_memory", headers={"Retry-After": "1"})
            else:
                raise payload
    except asyncio.CancelledError:
        job.cancelled = True
        raise
    except MtaError as e:
        svc.metrics.requests.labels(job.route or "-", "400").inc()
        raise ApiError(400, svc.public(str(e))) from None
    svc.metrics.requests.labels(info["route"], "200").inc()
    choice = {"index": 0, "finish_reason": info["finish_reason"]}
    choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": body.model, "choices": [choice], "usage": _usage(info),
            "mta": {"route": info["route"], "user": user_id}}


def _usage(info: dict) -> dict:
    return {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"],
            "total_tokens": info["prompt_tokens"] + info["completion_tokens"]}


async def _stream(svc: Service, rid: str, created: int, model: str, chat: bool, job: Job,
                  events: asyncio.Queue) -> AsyncIterator[str]:
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
            first = {"id": rid, "object": obj, "created": created, "model": model,
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
            yield f"data: {json.dumps(first)}\n\n"
        held = None  # an event taken from the queue while merging deltas, handled next
        while True:
            kind, payload = held if held is not None else await events.get()
            held = None
            if kind == "delta":
                # the deltas queued behind this one go out in the same chunk: when the event
                # loop falls behind the scheduler (a burst of tokens for many streams) it
                # sends one chunk a stream instead of one a token, and so holds the GIL that
                # the scheduler's thread needs for less time
                parts = [payload]
                while held is None and not events.empty():
                    nxt = events.get_nowait()
                    if nxt[0] == "delta":
                        parts.append(nxt[1])
                    else:
                        held = nxt
                yield chunk("".join(parts))
            elif kind == "done":
                svc.metrics.requests.labels(payload["route"], "200").inc()
                yield chunk(None, payload["finish_reason"], {
                    "usage": _usage(payload), "mta": {"route": payload["route"], "user": job.user_id}})
                yield "data: [DONE]\n\n"
                return
            else:
                code = "shutting_down" if isinstance(payload, ShuttingDown) else \
                    "out_of_memory" if isinstance(payload, OutOfMemory) else None
                err = {"error": {"message": svc.public(str(payload)),
                                 "type": "server_error" if code else "invalid_request_error", "param": None,
                                 "code": code}}
                yield f"data: {json.dumps(err)}\n\n"
                return
    finally:
        job.cancelled = True  # a client that went away frees its row at the next step


@openai.post("/v1/chat/completions")
async def chat_completions(body: ChatBody, svc: Svc, who: Caller):
    if body.messages[-1].role != "user":
        raise ApiError(400, "the last message must be the user's", param="messages")
    return await _generate(svc, who, body, [m.as_chat(f"messages.{i}.content") for i, m in enumerate(body.messages)],
                           chat=True)


@openai.post("/v1/completions")
async def completions(body: CompletionBody, svc: Svc, who: Caller):
    if not body.prompt.strip():
        raise ApiError(400, "the prompt is empty", param="prompt")
    return await _generate(svc, who, body, [{"role": "user", "content": body.prompt}], chat=False)


@openai.get("/v1/models")
async def models(svc: Svc, who: Caller):
    return {"object": "list", "data": svc.models()}


# -- operations ----------------------------------------------------------------------------------------
@ops.get("/healthz")
@ops.get("/health")
async def healthz():
    return {"status": "ok"}


@ops.get("/version")
async def version():
    return {"version": __version__}


@ops.get("/readyz")
async def readyz(svc: Svc):
    if not svc.ready or not svc.scheduler.accepting:
        return error_response(503, "not ready", "server_error", "not_ready")
    return {"status": "ready"}


@ops.get("/metrics")
async def prometheus(svc: Svc):
    return Response(svc.prometheus(), media_type="text/plain; version=0.0.4")


@ops.get("/v1/state")
async def server_state(svc: Svc, who: Caller):
    return svc.state()


@ops.get("/", response_class=HTMLResponse)
async def page():
    return PAGE.read_text(encoding="utf-8")


# -- user lifecycle (admin) ------------------------------------------------------------------------------
@users.post("/history")
async def put_history(body: HistoryBody, svc: Svc, who: Admin):
    n = svc.put_history(body.user, body.history)
    return {"user": body.user, "history_items": n}


@users.post("/adapt", status_code=202)
async def adapt(body: UserBody, svc: Svc, who: Admin):
    job = svc.start_adapt(body.user)
    return {"job": job.id, "status": job.status}


@users.get("/jobs/{job_id}")
async def job_status(job_id: str, svc: Svc, who: Admin,
                     wait: Annotated[float, Query(ge=0, le=60, allow_inf_nan=False)] = 0.0):
    """The job's state; ``wait``: up to that many seconds for a queued or running job to end
    first (a long poll: a client follows a job without asking every fraction of a second)."""
    state = svc.job(job_id)
    end = time.monotonic() + wait
    while state["status"] in ("queued", "running") and time.monotonic() < end:
        await asyncio.sleep(min(0.1, max(0.0, end - time.monotonic())))
        state = svc.job(job_id)
    return state


@users.post("/delete")
async def delete_user(body: UserBody, svc: Svc, who: Admin):
    if not await asyncio.wrap_future(svc.delete_user(body.user)):
        raise ApiError(404, f"user {body.user!r} is not here", code="not_found")
    return {"user": body.user, "deleted": True}


@users.get("/users")
async def list_users(svc: Svc, who: Admin):
    return {"users": svc.users()}
