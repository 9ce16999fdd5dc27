"""A cost model for 10^4, 10^6 and 10^8 users, computed from a measured GPU benchmark run
(benchmarks/gpu.py's JSON: model shape, adaptation seconds per user, stored bytes per user).

    .venv/bin/python scripts/scale.py docs/gpu-run-2026-11-29.json [--active 0.01] [--reserve-gib 40]

Per number of users: adaptation GPU-hours (the measured seconds per user, users adapted
256 per pass), store bytes (records aside: the stack files), and what serving costs per
resident user — our server holds only the user's stack (the bank is shared, once per
GPU), vLLM holds the user's whole exported adapter (rank k*r + r_s, padded to a rank it
accepts, on every adapted layer, in the served dtype). Replicas: GPUs needed to keep
``--active`` of the users resident at once, each GPU with its memory less the weights,
the shared bank and ``--reserve-gib`` (KV cache, activations). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

GPU_BYTES = 141e9  # an H200's memory, as the benchmark machine reports it (139 GiB usable)
SERVING_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def module_sizes(shape: dict) -> list[int]:
    """(in + out) of the seven adapted linear projections of one Llama block."""
    h, m = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return [h + h, h + kv, h + kv, h + h, h + m, h + m, m + h]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a benchmarks/gpu.py JSON")
    ap.add_argument("--anchors", type=int, default=50)
    ap.add_argument("--bank-rank", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--stack-rank", type=int, default=2)
    ap.add_argument("--stack-layers", type=int, default=8, help="blocks with a stack (the default: the last 8)")
    ap.add_argument("--active", type=float, default=0.01, help="share of users resident at once")
    ap.add_argument("--reserve-gib", type=float, default=40.0, help="per GPU, for KV cache and activations")
    a = ap.parse_args()
    run = json.loads(a.run.read_text())
    shape, adapt = run["shape"], run["adapt"]
    layers = shape["num_hidden_layers"]
    per_block = sum(module_sizes(shape))
    weights = 2 * (run.get("weights_bytes") or _weights(shape))  # bf16
    stack_all = per_block * layers * a.stack_rank * 4  # fp32, every block: what the benchmark stored
    stack = per_block * min(a.stack_layers or layers, layers) * a.stack_rank * 2  # bf16 on the GPU
    stored = per_block * min(a.stack_layers or layers, layers) * a.stack_rank * 4  # fp32 file
    bank = a.anchors * per_block * layers * a.bank_rank * 2
    export_rank = next(r for r in SERVING_RANKS if r >= a.top_k * a.bank_rank + a.stack_rank)
    vllm_user = per_block * layers * export_rank * 2
    free = GPU_BYTES - weights - bank - a.reserve_gib * 2**30
    print(f"From {a.run}: {shape['num_hidden_layers']} blocks, hidden {shape['hidden_size']}; measured "
          f"{adapt['ours_seconds_per_user']:.3f} s of adaptation per user ({adapt['users']} users per pass, one GPU); "
          f"stack files of {adapt['stored_bytes_per_user_fp32']:,} B measured for a rank-{a.stack_rank} stack on "
          f"every block (computed from the shape: {stack_all:,} B of tensors).")
    print(f"Settings: {a.anchors} anchors of rank {a.bank_rank}, top-{a.top_k}, a rank-{a.stack_rank} stack on "
          f"{a.stack_layers or layers} blocks; {a.active:.0%} of users resident at once; {a.reserve_gib:g} GiB per "
          "GPU kept for KV cache and activations.\n")
    print("| users | adaptation GPU-hours | store (stacks) | per resident user: ours | per resident user: vLLM "
          "| resident users per GPU: ours / vLLM | GPUs to hold the active users: ours / vLLM |")
    print("|---|---|---|---|---|---|---|")
    for n in (10**4, 10**6, 10**8):
        hours = n * adapt["ours_seconds_per_user"] / 3600
        active = max(1, round(n * a.active))
        ours_cap, vllm_cap = int(free // stack), int(free // vllm_user)
        print(f"| {n:.0e} | {hours:,.1f} | {_bytes(n * stored)} | {_bytes(stack)} | {_bytes(vllm_user)} "
              f"(rank {export_rank}) | {ours_cap:,} / {vllm_cap:,} | {math.ceil(active / ours_cap):,} / "
              f"{math.ceil(active / vllm_cap):,} |")
    print(f"\nShared once per GPU: bf16 weights {_bytes(weights)}, our bank {_bytes(bank)}.")


def _weights(shape: dict) -> int:
    per_block = sum(i * o for i, o in _pairs(shape))
    return shape["num_hidden_layers"] * per_block + 2 * shape["vocab_size"] * shape["hidden_size"]


def _pairs(shape: dict) -> list[tuple[int, int]]:
    h, m = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return [(h, h), (h, kv), (h, kv), (h, h), (h, m), (h, m), (m, h)]


def _bytes(n: float) -> str:
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


if __name__ == "__main__":
    main()
