"""Prometheus metrics of one server (its own registry, so tests can run several)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("mta_requests", "HTTP generation requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("mta_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.completion_tokens = Counter("mta_completion_tokens", "tokens generated", registry=r)
        self.batch = Histogram("mta_batch_rows", "rows in a decode step", buckets=(1, 2, 4, 8, 16, 32, 64, 128),
                               registry=r)
        self.step_seconds = Histogram("mta_decode_step_seconds", "seconds per decode step",
                              buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1), registry=r)
        self.latency = Histogram("mta_request_seconds", "seconds from submission to the last token", buckets=LATENCY,
                                 registry=r)
        self.queue = Gauge("mta_queue_depth", "requests waiting", registry=r)
        self.running = Gauge("mta_running_rows", "requests in the running batch", registry=r)
        self.resident = Gauge("mta_resident_users", "users whose stacks are on the device", registry=r)
        self.loads = Gauge("mta_stack_loads", "stacks loaded from the store since start", registry=r)
        self.evictions = Gauge("mta_stack_evictions", "stacks evicted since start", registry=r)
        self.started = time.monotonic()
        self.tokens = 0

    def prefill(self, rows: int, tokens: int, seconds: float) -> None:
        self.prompt_tokens.inc(tokens)

    def step(self, rows: int, seconds: float) -> None:
        self.batch.observe(rows)
        self.step_seconds.observe(seconds)

    def finished(self, job, seconds: float) -> None:
        self.completion_tokens.inc(len(job.seq.tokens))
        self.tokens += len(job.seq.tokens)
        self.latency.observe(seconds)

    def gauges(self, queued: int, running: int, resident: int) -> None:
        self.queue.set(queued)
        self.running.set(running)
        self.resident.set(resident)

    def stacks(self, loads: int, evictions: int) -> None:
        self.loads.set(loads)
        self.evictions.set(evictions)

    def text(self) -> bytes:
        return generate_latest(self.registry)
