"""The server's streamed answer (mta.serving.routes._stream): the deltas waiting in a
request's queue when the event loop gets to it go out as one chunk (a loop behind the
scheduler sends a chunk a stream, not a token), in order, and what follows a run of deltas
(the end, an error) is still sent after them; a delta that arrives alone is its own chunk."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from mta.serving.routes import _stream


class _Counter:
    def __init__(self):
        self.n = 0

    def labels(self, *args):
        return self

    def inc(self):
        self.n += 1


def _svc():
    return SimpleNamespace(metrics=SimpleNamespace(requests=_Counter()), public=lambda text: text)


def _events(chunks: list[str]) -> list:
    return [json.loads(c[6:]) if c != "data: [DONE]\n\n" else "[DONE]" for c in chunks]


def _run(feed):
    """The chunks `_stream` sends while ``feed`` (a coroutine given the queue) puts events."""
    async def go():
        q: asyncio.Queue = asyncio.Queue()
        job = SimpleNamespace(user_id="u1", cancelled=False)
        out = []

        async def read():
            async for c in _stream(_svc(), "chatcmpl-x", 0, "mta", True, job, q):
                out.append(c)
        reader = asyncio.create_task(read())
        await feed(q)
        await asyncio.wait_for(reader, 5)
        return out, job
    return asyncio.run(go())


DONE = ("done", {"finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 4, "route": "mta"})


def test_deltas_waiting_together_go_out_as_one_chunk_then_the_end():
    async def feed(q):
        for e in (("delta", "Sci"), ("delta", "-fi"), ("delta", ", "), DONE):
            q.put_nowait(e)
    chunks, job = _run(feed)
    ev = _events(chunks)
    assert ev[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["delta"].get("content") for e in ev[1:-1]] == ["Sci-fi, ", None]
    assert ev[-2]["choices"][0]["finish_reason"] == "stop" and ev[-2]["usage"]["completion_tokens"] == 4
    assert ev[-1] == "[DONE]" and job.cancelled  # (the stream's end frees its row)


def test_deltas_arriving_apart_stay_apart_and_an_error_after_deltas_is_sent():
    async def feed(q):
        q.put_nowait(("delta", "a"))
        await asyncio.sleep(0.05)  # the reader sends "a" alone before "b" arrives
        q.put_nowait(("delta", "b"))
        q.put_nowait(("delta", "c"))
        q.put_nowait(("error", RuntimeError("the step failed")))
    ev = _events(_run(feed)[0])
    assert [e["choices"][0]["delta"]["content"] for e in ev[1:3]] == ["a", "bc"]
    assert ev[3]["error"]["message"] == "the step failed" and len(ev) == 4
