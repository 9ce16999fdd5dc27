"""Prometheus metrics of one server (its own registry, so tests can run several), named
and typed as vLLM's users know them: counters for what only grows (``*_total``),
histograms for time to first token, inter-token latency, queue time and request latency,
gauges for what goes up and down, finish reasons and adapt jobs by outcome."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
# every 2.5 ms up to 20 ms: a decode step's range, where the inter-token latency's p50 is read
TOKEN = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.04, 0.06, 0.08, 0.1, 0.25,
         0.5, 1, 2.5)
# what the scheduler's thread spends its time on (Metrics.spent): admit (planning joining
# requests with the running ones), load (their users' stacks read from the store), route
# (their adapters made readable by their prefill: the decode step's dense tables caught up,
# or each row's factors gathered), prefill (their prompts' forward launched), wait (their
# first tokens: on a GPU, the device finishing the prefill), merge (their rows moved into
# the running batch), step (decode steps), stream (the new text to each request)
PHASES = ("admit", "load", "route", "prefill", "wait", "merge", "step", "stream")


def cuda_allocator_stats() -> dict | None:
    """The CUDA caching allocator's counts (``torch.cuda.memory_stats``), None without CUDA
    in use."""
    import torch

    return torch.cuda.memory_stats() if torch.cuda.is_available() and torch.cuda.is_initialized() else None


class _Allocator:
    """The caching allocator's counts, read at each scrape: its retries (an allocation that
    found no free block, so the allocator gave its cached blocks back to the driver and
    tried again: a device synchronisation and driver calls, on the scheduler's thread) and
    its driver allocations and frees (cudaMalloc, a slow driver call; cudaFree, which also
    synchronises the device)."""

    COUNTS = (("mta_cuda_alloc_retries", "num_alloc_retries", "allocations the CUDA caching allocator retried "
               "after giving its cached blocks back"),
              ("mta_cuda_mallocs", "num_device_alloc", "cudaMalloc calls of the CUDA caching allocator"),
              ("mta_cuda_frees", "num_device_free", "cudaFree calls of the CUDA caching allocator"))

    def __init__(self, stats):
        self.stats = stats

    def collect(self):
        s = self.stats()
        if s is None:
            return
        for name, key, doc in self.COUNTS:
            yield CounterMetricFamily(name, doc, value=s.get(key, 0))


class Metrics:
    def __init__(self, allocator=cuda_allocator_stats):
        """``allocator``: what reads the CUDA allocator's counts at a scrape (None: no counts)."""
        self.registry = r = CollectorRegistry()
        if allocator is not None:
            r.register(_Allocator(allocator))
        self.requests = Counter("mta_requests", "HTTP generation requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("mta_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.prefix_tokens = Counter("mta_prefix_cached_tokens", "prompt tokens whose keys and values came from "
                                     "the user's prefix cache", registry=r)
        self._prefix = 0  # the prefix cache's count at the last report
        self.completion_tokens = Counter("mta_completion_tokens", "tokens generated", registry=r)
        self.finish = Counter("mta_request_success", "finished requests by finish reason", ["finished_reason"],
                              registry=r)
        self.batch = Histogram("mta_batch_rows", "rows in a decode step", buckets=(1, 2, 4, 8, 16, 32, 64, 128),
                               registry=r)
        self.step_seconds = Histogram("mta_decode_step_seconds", "seconds per decode step",
                                      buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1), registry=r)
        self.latency = Histogram("mta_request_seconds", "seconds from submission to the last token", buckets=LATENCY,
                                 registry=r)
        self.ttft = Histogram("mta_time_to_first_token_seconds", "seconds from submission to the first token",
                              buckets=LATENCY, registry=r)
        self.itl = Histogram("mta_inter_token_latency_seconds", "seconds between a request's tokens", buckets=TOKEN,
                             registry=r)
        self.queue_time = Histogram("mta_request_queue_time_seconds", "seconds from submission to admission",
                                    buckets=LATENCY, registry=r)
        self.adapt_jobs = Counter("mta_adapt_jobs", "adapt jobs by outcome (done, failed, cancelled)", ["status"],
                                  registry=r)
        self.adapt_seconds = Histogram("mta_adapt_job_seconds", "seconds an adapt job ran", buckets=LATENCY,
                                       registry=r)
        self.phase_seconds = Counter("mta_scheduler_seconds", "seconds the scheduler's thread spent by phase: admit "
                                     "(planning joining requests), load (their users' stacks read from the "
                                     "store), route (their adapters made readable by their prefill), prefill "
                                     "(their prompts' forward launched), wait (their first tokens: the device "
                                     "finishing the prefill), merge (their move into the running batch), step "
                                     "(decode steps), stream (the new text to each request)", ["phase"], registry=r)
        for phase in PHASES:
            self.phase_seconds.labels(phase)
        self.joins = Counter("mta_joins", "groups of requests that joined the running batch", registry=r)
        self.fed = Counter("mta_fed_requests", "joining requests fed through the decode steps (a cached prefix, "
                           "at most --feed-tokens after it) instead of prefilled", registry=r)
        self.queue = Gauge("mta_queue_depth", "requests waiting", registry=r)
        self.running = Gauge("mta_running_rows", "requests in the running batch", registry=r)
        self.resident = Gauge("mta_resident_users", "users whose stacks are on the device", registry=r)
        self.warm_up = Gauge("mta_warm_up_seconds", "seconds the decoder's warm-up took before the server turned "
                             "ready (compile, capture, the dense kernel's tile timing; 0 for the eager loop)",
                             registry=r)
        self.prefill_forwards = Counter("mta_prefill_forwards", "prefill forwards run for joining requests' "
                                        "prompts (a chunk each; fed requests need none)", registry=r)
        self.loads = Counter("mta_stack_loads", "stacks loaded from the store", registry=r)
        self.reads_ahead = Counter("mta_stack_reads_ahead", "stack loads whose stack was read from the store "
                                   "while its request waited", registry=r)
        self.evictions = Counter("mta_stack_evictions", "stacks evicted", registry=r)
        self._stacks = [0, 0, 0]  # the bank's counts at the last report
        self.started = time.monotonic()
        self.tokens = 0

    def spent(self, phase: str, since: float, less: float = 0.0) -> None:
        """The scheduler's thread spent the time from ``since`` (time.monotonic) to now in
        ``phase``, but for ``less`` seconds of it, counted in another phase."""
        self.phase_seconds.labels(phase).inc(max(0.0, time.monotonic() - since - less))

    def add(self, phase: str, seconds: float) -> None:
        """``seconds`` the scheduler's thread spent in ``phase``."""
        self.phase_seconds.labels(phase).inc(seconds)

    def prefill(self, jobs, tokens: int, now: float, fed: int = 0) -> None:
        """A group of ``jobs`` joined (``fed`` of them fed through the decode steps)."""
        self.joins.inc()
        self.fed.inc(fed)
        self.prompt_tokens.inc(tokens)
        for job in jobs:
            self.queue_time.observe(now - job.submitted)

    def new_tokens(self, job, n: int, now: float) -> None:
        """``n`` more tokens of ``job`` at ``now``: its first gives the time to first token,
        the others the time between tokens."""
        if job.first_token_at is None:
            job.first_token_at = now
            self.ttft.observe(now - job.submitted)
            n -= 1
        elif n > 0:
            gap = (now - job.last_token_at) / n
            for _ in range(n):
                self.itl.observe(gap)
        job.last_token_at = now

    def step(self, rows: int, seconds: float) -> None:
        self.batch.observe(rows)
        self.step_seconds.observe(seconds)

    def finished(self, job, seconds: float, reason: str) -> None:
        self.completion_tokens.inc(len(job.seq.tokens))
        self.tokens += len(job.seq.tokens)
        self.latency.observe(seconds)
        self.finish.labels(reason).inc()

    def adapted(self, status: str, seconds: float | None) -> None:
        self.adapt_jobs.labels(status).inc()
        if seconds is not None:
            self.adapt_seconds.observe(seconds)

    def gauges(self, queued: int, running: int, resident: int) -> None:
        self.queue.set(queued)
        self.running.set(running)
        self.resident.set(resident)

    def prefix(self, reused: int) -> None:
        """The prefix cache's running count of reused tokens, added as it grew."""
        self.prefix_tokens.inc(max(0, reused - self._prefix))
        self._prefix = max(reused, self._prefix)

    def stacks(self, loads: int, evictions: int, read_ahead: int = 0) -> None:
        """The bank's running counts of stack loads, evictions and loads read ahead, added
        as they grew."""
        now = (loads, evictions, read_ahead)
        for counter, n, last in zip((self.loads, self.evictions, self.reads_ahead), now, self._stacks):
            counter.inc(max(0, n - last))
        self._stacks = [max(n, last) for n, last in zip(now, self._stacks)]

    def text(self) -> bytes:
        return generate_latest(self.registry)
