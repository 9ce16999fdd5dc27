"""How busy the GPU really was in the profiles recorded before the busy total was fixed.

    python scripts/profile-bounds.py results/gpu-2026-12-01d/gpu-8b.json [...]

Until 2026-12-01's fifth session, ``benchmarks/gpu.py``'s ``profile`` summed the self device
time of every event of ``key_averages()``: operators (``aten::mm``: the time of the kernels
it launched) and the kernels themselves, so an eager window's kernel time was counted about
twice (one window reads "busy 1.32 of the wall time"). Captured decode steps replay kernels
with no operator above them and were not affected. From what a record kept (the total R and
its 15 largest entries) the kernel time K is bounded: each kernel belongs to at most one
operator, so the operators' part O is at most K, and K >= R / 2; O is at least the operators
among the 15 listed, so K <= R - O_listed; K is also at least the kernels listed. The script
prints, for each profile in the files, the recorded fraction and the bounds on the true one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OPERATOR_PREFIXES = ("aten::", "autograd::", "Torch-Compiled Region", "CompiledFunction", "cuda", "Optimizer.")


def is_operator(name: str) -> bool:
    return name.startswith(OPERATOR_PREFIXES)


def profiles(node, path: str = ""):
    """Every recorded profile (a dict with ``busy_fraction`` and ``top``) under ``node``."""
    if isinstance(node, dict):
        if "busy_fraction" in node and "top" in node:
            yield path or ".", node
        for key, value in node.items():
            yield from profiles(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from profiles(value, f"{path}[{i}]")


def bounds(p: dict) -> tuple[float, float] | None:
    """(low, high) of the true busy fraction; None for a CPU profile or a fixed record."""
    if p.get("device_busy_s") is None or "top_ops" in p:  # top_ops: recorded by the fixed code
        return None
    total = p["device_busy_s"]
    ops = sum(r["self_device_ms"] for r in p["top"] if is_operator(r["name"])) / 1e3
    kernels = sum(r["self_device_ms"] for r in p["top"] if not is_operator(r["name"])) / 1e3
    return max(total / 2, kernels) / p["wall_s"], (total - ops) / p["wall_s"]


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python scripts/profile-bounds.py RUN.json [...]", file=sys.stderr)
        return 2
    for name in argv:
        path = Path(name)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            print(f"{name}: cannot read ({e})", file=sys.stderr)
            return 2
        for where, p in profiles(record):
            b = bounds(p)
            if b is None:
                continue
            first = p["top"][0]["name"][:40] if p["top"] else "-"
            print(f"{path}  {where}: wall {p['wall_s']:.2f} s, recorded busy {p['busy_fraction']:.2f}, "
                  f"true busy {b[0]:.2f}-{b[1]:.2f}  (largest entry: {first})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
