"""What a user's stack load costs the server's decode loop: ``AdapterEngine.load_user``
writing a stored stack into its slot of the stack tables (the admission of a user who is
not resident), against the same writes made one layer at a time (each layer's factors
checked finite, copied and its scale set, what ``load_user`` did before 2026-12-06), in
the same run: its checks and writes as a few multi-tensor operations, and with
``checked`` (the read-ahead checked the factors on its reader thread) without the check.

    .venv/bin/python benchmarks/stack_load.py                     # 32 narrow blocks on the CPU: host cost
    python3 benchmarks/stack_load.py --shape 8b --device cuda     # Llama-3-8B shape (random bf16)

The stacks are rank 2 on the last ``--blocks`` blocks (`mta serve`'s default 8), 64 users,
in host memory (pinned on CUDA, as the read-ahead leaves them; on CUDA also pageable, as a
stack read from the store at its load is: one layer at a time, and ``load_user``'s single
transfer, ``host_to_device``); each load is timed to the device's end. Prints milliseconds
per load and the ratios; the JSON goes to --out. Each way must leave the same tables
(checked here, exactly).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import torch  # noqa: E402
from join import backbone, sync  # noqa: E402

from mta.engine.engine import block_index  # noqa: E402

USERS, RANK = 64, 2


def per_layer(engine, slot: int, tensors: dict, alpha: float) -> None:
    """The reference: each layer's factors checked finite, copied and its scale set, one
    layer after another."""
    with torch.no_grad():
        for name, ly in engine.stack_layers.items():
            a, b = tensors[name]
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise ValueError(f"{name}: adapter weights contain NaN or inf")
            ly.stack_A[slot, :RANK].copy_(a, non_blocking=a.is_pinned())
            ly.stack_B[slot, :, :RANK].copy_(b, non_blocking=b.is_pinned())
            ly.stack_scale[slot] = alpha / RANK


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=["tiny", "8b"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--blocks", type=int, default=8, help="the stack's blocks, the last ones (mta serve's default)")
    ap.add_argument("--loads", type=int, default=200, help="timed loads per way (after 8 untimed ones)")
    ap.add_argument("--threads", type=int, default=1, help="torch's CPU threads")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/stack_load.json"))
    a = ap.parse_args()
    if a.blocks < 1 or a.loads < 1:
        ap.error("--blocks and --loads must be at least 1")
    torch.set_num_threads(a.threads)
    bb = backbone(a.shape, a.device)
    engine = bb.engine
    n_blocks = bb.model.config.num_hidden_layers
    if a.blocks > n_blocks:
        ap.error(f"--blocks {a.blocks}: the model has {n_blocks} blocks")
    layers = [n for n in engine.layers if block_index(n) is not None and block_index(n) >= n_blocks - a.blocks]
    engine.alloc_stacks(USERS, RANK, layers)
    pin = torch.device(a.device).type == "cuda"
    dtype = next(iter(engine.layers.values())).bank_A.dtype
    gen = torch.Generator().manual_seed(0)
    stacks = []
    for _ in range(USERS):
        s = {n: (0.1 * torch.randn(RANK, ly.in_features, generator=gen, dtype=dtype),
                 0.1 * torch.randn(ly.out_features, RANK, generator=gen, dtype=dtype))
             for n, ly in engine.stack_layers.items()}
        stacks.append({n: tuple(t.pin_memory() if pin else t for t in ab) for n, ab in s.items()})
    ways = {"one layer at a time (reference)": lambda slot: per_layer(engine, slot, stacks[slot], 4.0),
            "load_user": lambda slot: engine.load_user(slot, stacks[slot], alpha=4.0),
            "load_user, read ahead (checked)": lambda slot: engine.load_user(slot, stacks[slot], alpha=4.0,
                                                                            checked=True)}
    if pin:  # a stack read from the store at its load (evaluation's answering): pageable host memory
        paged = [{n: (a.clone(), b.clone()) for n, (a, b) in s.items()} for s in stacks]
        ways["one layer at a time, pageable"] = lambda slot: per_layer(engine, slot, paged[slot], 4.0)
        ways["load_user, pageable (one transfer)"] = lambda slot: engine.load_user(slot, paged[slot], alpha=4.0)
    rows, tables = [], None
    for way, load in ways.items():
        for slot in range(8):
            load(slot)
        sync(a.device)
        t0 = time.perf_counter()
        for k in range(a.loads):
            load(k % USERS)
            sync(a.device)
        ms = 1000 * (time.perf_counter() - t0) / a.loads
        for slot in range(USERS):  # every slot written, then compared with the reference's tables
            load(slot)
        now = [t.clone() for ly in engine.stack_layers.values() for t in ly.stack_tables()]
        if tables is None:
            tables = now
        elif not all(torch.equal(x, y) for x, y in zip(tables, now)):
            sys.exit(f"{way}: the tables differ from the reference's")
        rows.append({"way": way, "ms_per_load": ms})
    ref = rows[0]["ms_per_load"]
    for r in rows:
        r["x_faster_than_reference"] = ref / r["ms_per_load"]
    print(f"{bb.model_id} on {a.device}: a rank-{RANK} stack on the last {a.blocks} blocks ({len(layers)} layers), "
          f"{USERS} users; mean of {a.loads} loads, each to the device's end")
    print(f"{'way':<36} {'ms/load':>8} {'x reference':>11}")
    for r in rows:
        print(f"{r['way']:<36} {r['ms_per_load']:>8.3f} {r['x_faster_than_reference']:>11.2f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"model": bb.model_id, "device": a.device, "blocks": a.blocks, "layers": len(layers),
                                 "users": USERS, "rank": RANK, "loads": a.loads, "torch": torch.__version__,
                                 "rows": rows}, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
