"""benchmarks/serve_load.py reads the server's counters from /metrics: each counter a row
reports is read with the value the server counted (a name the scrape skipped read as 0)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

from prometheus_client import generate_latest

from mta.serving.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
serve_load = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_load)


class _Client:
    def __init__(self, m: Metrics):
        self.m = m

    def get(self, url: str) -> SimpleNamespace:
        assert url.endswith("/metrics")
        return SimpleNamespace(text=generate_latest(self.m.registry).decode())


def test_every_counter_a_row_reports_is_read_with_what_the_server_counted():
    m = Metrics()
    client = _Client(m)
    before = serve_load.histograms(client, "http://x")
    m.joins.inc(3)
    m.fed.inc(5)
    m.prefill_forwards.inc(7)
    m.loads.inc(11)
    m.reads_ahead.inc(2)
    m.add("prefill", 1.5)
    after = serve_load.histograms(client, "http://x")
    got = {name: serve_load.counter_deltas(before, after, name) for name in serve_load.COUNTERS}
    assert got["mta_joins"] == {"": 3} and got["mta_fed_requests"] == {"": 5}
    assert got["mta_prefill_forwards"] == {"": 7} and got["mta_stack_loads"] == {"": 11}
    assert got["mta_stack_reads_ahead"] == {"": 2} and got["mta_scheduler_seconds"]["prefill"] == 1.5
    # every counter the rows name is scraped (a row reading one the scrape skips gets 0)
    source = (ROOT / "benchmarks" / "serve_load.py").read_text()
    for name in ("mta_prefill_forwards", "mta_stack_loads", "mta_stack_reads_ahead", "mta_joins", "mta_fed_requests"):
        assert f'counter_deltas(before, after, "{name}")' in source and name in serve_load.COUNTERS


def test_the_cuda_allocators_counts_are_scraped_as_they_grew_and_absent_without_cuda():
    """A server on a GPU exports its CUDA caching allocator's retries and driver calls, read
    at each scrape; the load run reads what they counted during the load. Without CUDA in use
    the counters are not exported at all (a run reports none, not zeros)."""
    stats = {"num_alloc_retries": 1, "num_device_alloc": 40, "num_device_free": 2}
    m = Metrics(allocator=lambda: dict(stats))
    client = _Client(m)
    before = serve_load.histograms(client, "http://x")
    stats.update(num_alloc_retries=4, num_device_alloc=43, num_device_free=9)
    after = serve_load.histograms(client, "http://x")
    got = {n: serve_load.counter_deltas(before, after, n) for n in serve_load.CUDA_COUNTERS}
    assert got == {"mta_cuda_alloc_retries": {"": 3}, "mta_cuda_mallocs": {"": 3}, "mta_cuda_frees": {"": 7}}
    none = Metrics(allocator=lambda: None)
    scraped = serve_load.histograms(_Client(none), "http://x")
    assert not any(n in scraped for n in serve_load.CUDA_COUNTERS)
    assert not any(n in serve_load.histograms(_Client(Metrics(allocator=None)), "http://x")
                   for n in serve_load.CUDA_COUNTERS)
