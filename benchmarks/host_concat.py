"""A stored stack's host buffer on a busy host: ``torch.cat`` against numpy's concatenation.

A pageable stack is flattened into one host buffer before its one transfer to the device
(``mta.engine.engine.flat_host``). ``torch.cat`` copies each part in its own parallel region,
and a parallel region waits for its slowest thread: beside other processes that keep cores
busy (several GPU processes, each with a CPU thread spinning on its device), every part waits
for a time slice. This times both ways on an OPPU stack at Qwen2.5-1.5B's shape (rank 8 on
its 196 layers: 392 factors, 37 MB in fp32) with the host to itself, then beside ``--busy``
processes each running matmuls on ``--busy-threads`` threads; the ratio is the reference
(``torch.cat``) over ``flat_host`` in the same condition.

    python benchmarks/host_concat.py [--busy 3] [--repeats 30] [--out runs/bench/host_concat.json]
    python benchmarks/host_concat.py --tiny      # a small stack, for the CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mta.engine.engine import flat_host  # noqa: E402

# (in, out) of Qwen2.5-1.5B's seven adapted modules a block, and its 28 blocks
QWEN25_15B_MODULES = [(1536, 1536), (1536, 256), (1536, 256), (1536, 1536), (1536, 8960), (1536, 8960),
                      (8960, 1536)]


def stack_factors(blocks: int, modules, rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(blocks):
        for i, o in modules:
            out += [torch.randn(rank, i, generator=gen), torch.randn(o, rank, generator=gen)]
    return out


def _busy(stop, threads: int) -> None:
    torch.set_num_threads(threads)
    a = torch.randn(1500, 1500)
    while not stop.is_set():
        a @ a


def timed(fn, repeats: int) -> float:
    """The mean seconds of a call (a load's cost is the sum of its waits, so the slow calls
    count: not the median)."""
    for _ in range(2):
        fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--busy", type=int, default=3, help="processes keeping the cores busy in the second condition")
    ap.add_argument("--busy-threads", type=int, default=2, help="threads of each busy process")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--tiny", action="store_true", help="a small stack (2 blocks of small modules)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/host_concat.json"))
    a = ap.parse_args()
    if a.busy < 1 or a.busy_threads < 1 or a.repeats < 1:
        ap.error("--busy, --busy-threads and --repeats must be at least 1")
    parts = stack_factors(2, [(64, 64), (64, 256)], 8) if a.tiny else stack_factors(28, QWEN25_15B_MODULES, 8)
    ways = {"torch.cat": lambda: torch.cat([t.reshape(-1) for t in parts]),
            "flat_host": lambda: flat_host(parts, torch.float32)}
    rows = []
    for condition in ("alone", f"beside {a.busy} busy processes"):
        stop = mp.get_context("spawn").Event() if condition != "alone" else None
        procs = []
        if stop is not None:
            ctx = mp.get_context("spawn")
            procs = [ctx.Process(target=_busy, args=(stop, a.busy_threads), daemon=True) for _ in range(a.busy)]
            for p in procs:
                p.start()
            time.sleep(2.0)  # their imports and first matmuls
        try:
            secs = {name: timed(fn, a.repeats) for name, fn in ways.items()}
        finally:
            if stop is not None:
                stop.set()
                for p in procs:
                    p.join(timeout=10)
        rows.append({"condition": condition, **{f"{k}_seconds": v for k, v in secs.items()},
                     "ratio_reference_over_flat_host": secs["torch.cat"] / secs["flat_host"]})
    res = {"torch": torch.__version__, "threads": torch.get_num_threads(), "factors": len(parts),
           "bytes": sum(t.numel() * t.element_size() for t in parts), "busy_threads": a.busy_threads,
           "repeats": a.repeats, "rows": rows}
    print(f"{len(parts)} factors, {res['bytes'] / 2**20:.1f} MiB, {res['threads']} torch threads")
    print(f"{'condition':32s} {'torch.cat ms':>13s} {'flat_host ms':>13s} {'ratio':>7s}")
    for r in rows:
        print(f"{r['condition']:32s} {1e3 * r['torch.cat_seconds']:13.1f} {1e3 * r['flat_host_seconds']:13.1f} "
              f"{r['ratio_reference_over_flat_host']:7.2f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
