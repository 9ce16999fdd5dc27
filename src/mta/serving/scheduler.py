"""The server's scheduler: one thread owns the backbone and the loaded bank; requests of
many users run in the same forward pass, and new ones join the running batch at decode
step boundaries (iteration-level scheduling).

Each loop: admit queued requests (up to ``max_batch`` rows), prefill them and merge them
into the running batch (the plans of ALL running rows are recomputed, so every row
keeps pointing at its own user's stack even when the resident table is reshaped), run
one decode step, stream each row's new text, drop finished rows. Work that changes the
engine's tables for training (adapting a user) or removes a user runs on the same thread
between steps, once the running batch has drained, so nothing serving a request is ever
changed under it.
"""

from __future__ import annotations

import copy
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from mta.config import AdaptConfig, GenerateConfig, ServeConfig
from mta.data.schema import User
from mta.decoding.eager import Batch, Decoder, Prefill, Sequence
from mta.decoding.prefix import PrefixCache
from mta.decoding.prompts import chat_prompt, stop_ids
from mta.decoding.slots import Joining, SlotBatch, SlotDecoder
from mta.engine.engine import Row
from mta.errors import MtaError
from mta.loaded_bank import LoadedBank, Plan, Request
from mta.retrieval import retrieve
from mta.serving.text import TextStream
from mta.store import UserStore

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The bounded queue is full: the caller should retry later."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new work."""


class OutOfMemory(Exception):
    """Joining requests' prompts did not fit in the GPU's memory beside the running rows:
    those requests fail (503, retry), the running ones go on."""


@dataclass(eq=False)
class Job:
    """One generation request as the scheduler runs it. ``emit(kind, payload)`` is called
    from the scheduler thread: ("delta", text), ("done", info) or ("error", exception).
    Two jobs are equal only when they are the same request (``job in jobs`` is an identity
    test, not a comparison of every field)."""

    user_id: str | None
    messages: list[dict]             # chat messages; a completion is one user message
    user: User | None                # history, for retrieval and fusion
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    base_only: bool = False
    chat: bool = False                   # the messages as they are, no task prompt (model mta-chat)
    emit: Callable[[str, object], None] = lambda kind, payload: None
    route: str = ""
    prompt_tokens: int = 0
    text: str = ""
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)
    seq: Sequence | None = None
    seen: int = 0                       # tokens counted in the metrics so far
    first_token_at: float | None = None
    last_token_at: float = 0.0
    detok: TextStream | None = None      # the answer's text, decoded as its tokens arrive
    prompt: list[int] | None = None      # its prompt's token ids, built by ``Scheduler.submit``


# prompt tokens per prefill chunk by default (`mta serve --prefill-chunk`). On CUDA the eager
# prefill forward is bound by its launches: at Llama-3-8B shape on an H100 it took 59 ms for
# 8 rows of 3 new tokens and 66 ms for 8 rows of 256 (benchmarks/join.py --shape 8b, run M in
# docs/performance.md), so a chunk of 2,048 tokens holds the running rows about as long as
# one of 512 and moves 4x the prompt. On a CPU a forward's cost grows with its tokens.
PREFILL_CHUNK = {"cuda": 2048, "cpu": 512}


def default_prefill_chunk(device) -> int:
    return PREFILL_CHUNK.get(torch.device(device).type, PREFILL_CHUNK["cpu"])


def server_decoder(decoder: str, device) -> str:
    """The server's decode loop for ``GenerateConfig.decoder``: ``auto`` is the compiled slot
    loop on CUDA (docs/serving.md) and the eager loop elsewhere."""
    if decoder == "auto":
        return "compiled" if torch.device(device).type == "cuda" else "generate"
    return decoder


class Scheduler:
    def __init__(self, bank: LoadedBank, store: UserStore | None, gen: GenerateConfig, max_batch: int = 32,
                 max_queue: int = 256, fusion: AdaptConfig | None = None, metrics=None, max_tokens: int = 512,
                 prefill_chunk: int | None = 0, prefix_tokens: int = 0, join_rows: int | None = None,
                 join_wait: float | None = None, feed_tokens: int | None = None, async_steps: bool | None = None):
        self.bank, self.store, self.gen, self.fusion = bank, store, gen, fusion
        self.tok = bank.backbone.tokenizer
        # prompts are tokenized by the submitting threads, beside this thread's incremental
        # decoding: on a copy of their own, one call at a time (transformers sets a fast
        # tokenizer's truncation and padding on the shared Rust object per call, which fails
        # as "Already borrowed" when another thread is inside it: transformers#47085)
        self.encoder = copy.deepcopy(self.tok)
        self._encoding = threading.Lock()
        self.decoder_kind = server_decoder(gen.decoder, bank.backbone.device)
        self.prefix = PrefixCache(prefix_tokens) if prefix_tokens else None  # users' prompt prefixes
        self._forget: set[str] = set()  # users whose prefixes go at the next turn (`forget_later`)
        self._records: dict = {}  # user -> the store record their running requests were planned with
        self._forget_lock = threading.Lock()
        if self.decoder_kind != "generate":  # one static cache, the step captured in a CUDA graph (decoding.slots)
            self.decoder = SlotDecoder(bank.backbone, self.tok.pad_token_id, slots=max_batch,
                                       span=gen.max_prompt_tokens + max_tokens, compile=self.decoder_kind == "compiled",
                                       prefix=self.prefix,
                                       feed=ServeConfig().feed_tokens if feed_tokens is None else feed_tokens,
                                       async_steps=ServeConfig().async_steps if async_steps is None else async_steps)
            bank.backbone.recap_memory()  # --gpu-memory auto: the static cache is held like the model
        else:
            self.decoder = Decoder(bank.backbone, self.tok.pad_token_id, self.prefix)
        self.stop_ids = frozenset(stop_ids(self.tok))
        self.max_batch = max_batch
        # rows join a running batch in groups (each join is a prefill forward and a routing refill)
        # (None: `mta serve`'s defaults, ServeConfig's join_rows and join_wait_ms)
        self.join_rows = min(max_batch, join_rows if join_rows is not None else max(1, max_batch // 8))
        self.join_wait = join_wait if join_wait is not None else ServeConfig().join_wait_ms / 1000.0
        self._held_since: float | None = None  # when a waiting request was first held back
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.exclusive: queue.Queue[tuple[Callable, Future]] = queue.Queue()
        self.metrics = metrics
        self.batch: Batch | SlotBatch | None = None
        self.jobs: list[Job] = []
        # joining rows whose prompts are being prefilled a chunk at a time, between decode steps
        self.prefill_chunk = default_prefill_chunk(bank.backbone.device) if prefill_chunk is None else prefill_chunk
        self.pending: tuple[Prefill, list[Job], float] | None = None
        self.accepting = True
        self.tokens_out = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mta-scheduler", daemon=True)
        self._ids = itertools.count()
        self._aborting = False

    # -- the outside -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def warm_up(self, steps: int = 3) -> float:
        """(Before the server turns ready.) Run the slot decoder's step for the rows it will
        see, so that its compile and capture happen now and not under the first requests:
        every slot through an anchor mixture of the fusion's top-k, then one base-model row
        (each a layout of its own, mta.decoding.fixed). A stored user's stack can change the
        layout, which captures (and compiles) once more at its first request. Nothing to do
        for the eager loop. Returns the seconds it took."""
        if not isinstance(self.decoder, SlotDecoder):
            return 0.0
        t0 = time.monotonic()
        self.run_exclusive(lambda: self._warm(steps)).result()
        took = time.monotonic() - t0
        log.info("decoder warmed up (%s) in %.1f s", self.decoder_kind, took)
        if self.metrics:
            self.metrics.warm_up.set(took)
        return took

    def _warm(self, steps: int) -> None:
        k = min(self.bank.backbone.engine.n_anchors, self.fusion.top_k if self.fusion else 2)
        mixed = Row(anchors=tuple(range(k)), weights=(1.0 / k,) * k) if k else Row(active=False)
        prompt = self.tok("warm-up", add_special_tokens=False)["input_ids"] or [self.tok.pad_token_id]
        for rows in ([mixed] * self.max_batch, [Row(active=False)]):
            self.decoder.warm(rows, prompt, steps)

    def submit(self, job: Job) -> None:
        """Queue ``job`` with its prompt built here, on the caller's thread (its history's
        retrieval and its tokens: host work the decode loop's thread would otherwise do
        between steps, as vLLM's API server tokenizes outside its engine). A prompt the
        server cannot take raises its MtaError here, before anything is queued."""
        if not self.accepting:
            raise ShuttingDown()
        if job.prompt is None:
            job.prompt = self._prompt_ids(job)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None
        self._wake.set()
        self._gauge()
        if self.store is not None and job.user_id and not job.base_only:
            # the user's stack read from the store while the request waits (mta.resident:
            # ResidentStacks.prefetch), not at its admission on the decode loop's thread
            self.bank.stacks.prefetch(job.user_id, self.store)

    def run_exclusive(self, fn: Callable[[], object]) -> Future:
        """Run ``fn`` on the scheduler thread once no request is running."""
        fut: Future = Future()
        self.exclusive.put((fn, fut))
        self._wake.set()
        return fut

    def drain(self, within: float) -> None:
        """Stop taking requests; the ones still running or queued after ``within`` seconds
        end with a ShuttingDown error (so each gets an answer that says so, not a cut
        connection). For a server told to stop (SIGTERM)."""
        self.accepting = False
        timer = threading.Timer(within, self._abort_all)
        timer.daemon = True
        timer.start()

    def _abort_all(self) -> None:
        self._aborting = True
        self._wake.set()

    def _fail_everything(self) -> None:
        """(Scheduler thread.) Every running and queued request ends with ShuttingDown."""
        err = ShuttingDown("the server stopped before this request finished; send it again")
        left = list(self.jobs) + (self.pending[1] if self.pending else [])
        self.pending = None
        while True:
            try:
                left.append(self.queue.get_nowait())
            except queue.Empty:
                break
        for job in left:
            job.emit("error", err)
        self.jobs, self.batch = [], None
        self._aborting = False

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop taking requests, let the running and queued ones finish, then stop."""
        self.accepting = False
        deadline = time.monotonic() + timeout
        while ((self.jobs or self.pending or not self.queue.empty() or not self.exclusive.empty())
               and time.monotonic() < deadline):
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        self.bank.stacks.close()

    @property
    def running(self) -> int:
        return len(self.jobs)

    # -- the loop ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self._forget:
                    with self._forget_lock:
                        users, self._forget = self._forget, set()
                    for user_id in users:
                        self.forget(user_id)
                if self._aborting:
                    self._fail_everything()
                if not self.jobs and not self.pending and not self.exclusive.empty():
                    fn, fut = self.exclusive.get_nowait()
                    if fut.set_running_or_notify_cancel():
                        try:
                            fut.set_result(fn())
                        except BaseException as e:  # noqa: BLE001 - handed to the caller
                            fut.set_exception(e)
                    continue
                if self.pending:  # a chunk of the joining rows' prompts, then the running rows' step
                    self._prefill_some()
                elif self.exclusive.empty():  # exclusive work waits: let the batch drain
                    self._admit()
                if not self.jobs:
                    if not self.pending:
                        self._wake.wait(0.05)
                        self._wake.clear()
                    continue
                t0 = time.monotonic()
                self.decoder.step(self.batch)
                self._spent("step", t0)
                self._after_step(time.monotonic() - t0)
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
                log.exception("scheduler step failed")
                for job in self.jobs + (self.pending[1] if self.pending else []):
                    job.emit("error", e)
                self.jobs, self.batch, self.pending = [], None, None

    def _joinable(self) -> bool:
        """Whether waiting requests join now: always into an empty batch; into a running one
        once ``join_rows`` slots are free, or once a request has been held ``join_wait``."""
        if self.queue.empty():
            self._held_since = None
            return False
        free = self.max_batch - len(self.jobs)
        if not self.jobs or free >= self.join_rows:
            return True
        if free <= 0:
            return False
        now = time.monotonic()
        if self._held_since is None:
            self._held_since = now
        return now - self._held_since >= self.join_wait

    def _spent(self, phase: str, since: float, less: float = 0.0) -> None:
        if self.metrics:
            self.metrics.spent(phase, since, less)

    def _admit(self) -> None:
        """Waiting requests join: planned with the running ones (the admit phase; their users'
        stacks read from the store, the load phase), then the first chunk of their prefill."""
        if not self._joinable():
            return
        t0, loading = time.monotonic(), self.bank.stacks.load_seconds
        try:
            self._plan_joining()
        finally:
            loaded = self.bank.stacks.load_seconds - loading
            self._spent("admit", t0, less=loaded)
            if self.metrics and loaded:
                self.metrics.add("load", loaded)
        if self.pending:
            self._prefill_some()

    def _plan_joining(self) -> None:
        """The waiting requests (as many as there are free slots) planned with the running
        ones, their prompts built, their prefill started (``self.pending``)."""
        self._held_since = None
        new: list[Job] = []
        while len(self.jobs) + len(new) < self.max_batch:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if not job.cancelled:
                new.append(job)
        if not new:
            return
        self._gauge()
        # the running requests' users keep the records they started with (the store is read
        # for the joining users alone: at every join it was read for every running user)
        running = {job.user_id for job in self.jobs}
        known = {u: rec for u, rec in self._records.items() if u in running}
        try:
            plans, routes = self._plans(self.jobs + new, known)
        except Exception:  # noqa: BLE001 - e.g. a corrupt user: find the requests at fault, fail them alone
            known = {}  # (and every record read again: one may have changed under a running request)
            new = [job for job in new if self._plannable(job)]
            if not new:
                if self.jobs:
                    self._plans(self.jobs, known)
                self._records = known
                return
            plans, routes = self._plans(self.jobs + new, known)
        self._records = known
        rows = self.bank.rows(plans)
        for job, row in zip(self.jobs, rows):  # running rows follow their users' (new) slots
            job.seq.row = row
        fresh, keys = [], []
        for job, row, plan, route in zip(new, rows[len(self.jobs):], plans[len(self.jobs):], routes[len(self.jobs):]):
            job.route = route
            job.prompt_tokens = len(job.prompt)
            job.seq = Sequence(job.prompt, row, job.max_tokens, self.stop_ids, job.temperature, job.top_p, job.seed)
            fresh.append(job)
            keys.append(self._prefix_key(job, plan))
        if fresh:
            self.pending = (self.decoder.start([j.seq for j in fresh], keys), fresh, time.monotonic())

    def _prefix_key(self, job: Job, plan: Plan) -> tuple:
        """What a prompt prefix's keys and values depend on besides its tokens: the user and
        their adapters (the stored stack's checksum, the mixture and its merge); one key for
        the base model's rows (mta.decoding.prefix)."""
        if job.base_only:
            return (None, "base")
        return (job.user_id, self.bank.stacks.stamps.get(job.user_id), plan.anchors, plan.weights, plan.merge,
                plan.svd_rank)

    def forget(self, user_id: str) -> None:
        """(Scheduler thread.) Drop a user's cached prompt prefixes (deleted, or adapted again)
        and the record their requests were planned with (the next join reads the store)."""
        self._records.pop(user_id, None)
        if self.prefix is not None:
            self.prefix.forget(user_id)

    def forget_later(self, user_id: str) -> None:
        """(Any thread.) `forget` at the scheduler's next turn, without waiting for the running
        batch to drain (a user adapted again by the worker: their old prefixes, under the old
        stack's checksum, would only take room until pushed out)."""
        with self._forget_lock:
            self._forget.add(user_id)
        self._wake.set()

    def _prefill_some(self) -> None:
        """The next chunk of the joining rows' prompts (all of them without a chunk size);
        with the last one they join the running batch."""
        pf, fresh, t0 = self.pending
        began, forwards, parts = time.monotonic(), self.decoder.forwards, dict(self.decoder.seconds)
        try:
            part = self.decoder.advance(pf, self.prefill_chunk or None)
        except torch.OutOfMemoryError:  # the prefill's activations are the transient peak
            self.pending = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            err = OutOfMemory(f"out of GPU memory prefilling {len(fresh)} prompt(s) beside {len(self.jobs)} "
                              "running request(s): retry, or give the server more room (--gpu-memory, or a "
                              "smaller --max-batch or --prefill-chunk)")
            log.warning("%s", err)
            for job in fresh:
                job.emit("error", err)
            return
        spent = {k: v - parts[k] for k, v in self.decoder.seconds.items()}  # the route and wait phases
        self._spent("prefill", began, less=sum(spent.values()))
        if self.metrics:
            for phase, seconds in spent.items():
                self.metrics.add(phase, seconds)
            self.metrics.prefill_forwards.inc(self.decoder.forwards - forwards)
        if part is None:
            return
        self.pending = None
        began = time.monotonic()
        self.batch = self.decoder.merge(self.batch, part)
        self.batch.routing = None
        self.jobs += fresh
        self._spent("merge", began)
        if self.metrics:
            fed = len(part.fed) if isinstance(part, Joining) else 0  # (the eager loop prefills every row)
            self.metrics.prefill(fresh, sum(j.prompt_tokens for j in fresh), t0, fed)
            if self.prefix is not None:
                self.metrics.prefix(self.prefix.reused)
        self._after_step(0.0, only=fresh)

    def _plannable(self, job: Job) -> bool:
        """Whether ``job`` plans on its own; if not, it gets its error (and no one else does)."""
        try:
            self._plans([job])
        except Exception as e:  # noqa: BLE001 - the request's own error, e.g. an unreadable record
            job.emit("error", e)
            return False
        return True

    def _plans(self, jobs: list[Job], known: dict | None = None) -> tuple[list[Plan], list[str]]:
        personal = [j for j in jobs if not j.base_only]
        reqs = [Request(j.user_id or "", "", j.user) for j in personal]
        plans, routes, _ = self.bank.plans(reqs, self.store, self.fusion, known) if reqs else ([], [], [])
        it = iter(zip(plans, routes))
        out_p, out_r = [], []
        for j in jobs:
            p, r = (Plan(), "base") if j.base_only else next(it)
            out_p.append(p)
            out_r.append(r)
        return out_p, out_r

    def _prompt_ids(self, job: Job) -> list[int]:
        """The same prompt `mta generate` builds: the task's template with the user's BM25
        top-k history items around the last user message, through the chat template."""
        task = self.bank.task
        last = job.messages[-1]["content"]
        if job.chat:  # free chat: the messages as they are
            text = self.encoder.apply_chat_template(job.messages, tokenize=False, add_generation_prompt=True) \
                if getattr(self.encoder, "chat_template", None) else last + "\n"
            return self._encoded(text)
        items = retrieve(task, last, job.user.history, self.gen.retrieve_k) if job.user else []
        content = task.prompt(last, items)
        if len(job.messages) == 1:
            text = chat_prompt(self.encoder, content)
        else:
            msgs = [*job.messages[:-1], {"role": "user", "content": content}]
            text = self.encoder.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return self._encoded(text)

    def _encoded(self, text: str) -> list[int]:
        """``text``'s token ids, or an MtaError when they are more than this server takes."""
        with self._encoding:
            ids = self.encoder(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.gen.max_prompt_tokens:
            raise MtaError(f"the prompt is {len(ids)} tokens; this server takes at most {self.gen.max_prompt_tokens}")
        return ids

    def _after_step(self, seconds: float, only: list[Job] | None = None) -> None:
        """Stream what each row added, finish rows that are done, drop them."""
        t0 = time.monotonic()
        keep = []
        for k, job in enumerate(self.jobs):
            if only is not None and job not in only:
                keep.append(k)
                continue
            s = job.seq
            if self.metrics and len(s.tokens) > job.seen:
                self.metrics.new_tokens(job, len(s.tokens) - job.seen, time.monotonic())
                job.seen = len(s.tokens)
            if job.detok is None:
                job.detok = TextStream(self.tok)
            text = job.detok.update(s.tokens)  # whole characters only: never split a multi-byte one
            if s.finish is not None:  # the end: the tokenizer's own decode of every token
                text = job.detok.final(s.tokens)
            stop_at = min((i for i in (text.find(x) for x in job.stop) if i >= 0), default=-1)
            if stop_at >= 0:
                text, s.finish = text[:stop_at], "stop"
            if len(text) > len(job.text):
                job.emit("delta", text[len(job.text):])
                job.text = text
            if job.cancelled and s.finish is None:
                s.finish = "cancelled"
            if s.finish is not None:
                self.tokens_out += len(s.tokens)
                job.emit("done", {"finish_reason": s.finish if s.finish != "cancelled" else "stop",
                                  "prompt_tokens": job.prompt_tokens, "completion_tokens": len(s.tokens),
                                  "route": job.route})
                if self.metrics:
                    self.metrics.finished(job, time.monotonic() - job.submitted, s.finish)
            else:
                keep.append(k)
        if self.metrics and only is None:
            self.metrics.step(len(self.jobs), seconds)
        if len(keep) < len(self.jobs):
            self.jobs = [self.jobs[k] for k in keep]
            # a decoder's keep says whether its routing still holds (the slot decoder's does:
            # a freed slot is masked, what it is routed to is never read)
            self.batch = self.decoder.keep(self.batch, keep) if keep else None
        self._gauge()
        self._spent("stream", t0)

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.gauges(self.queue.qsize(), len(self.jobs), len(self.bank.stacks.slots))
