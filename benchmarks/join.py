"""What one join costs the server's decode loop: a group of requests joining a running
batch of the slot decoder (`mta serve`'s loop), their prompts prefilled and moved into the
static cache, timed for rows of the base model alone (the reference), for rows with
adapters read through the decode step's dense tables, and for the same rows through the
gathered routing (each row's factors gathered for every layer), in the same run; then the
same joins fed (what the server does with `--feed-tokens`, default 16: each row's cached
prefix into its slot, the few tokens after it through the decode steps that follow, no
prefill forward); then joins right after the first joining user's stack was loaded (a
user who was not resident): the dense tables caught up on that slot alone (the server's
way), against the same slot written some other way (the tables filled again whole and the
prefill gathering, what every stack load cost before); then users' first requests
(``--first-prompt`` tokens, nothing cached: the whole prompt prefilled), base rows against
`mta` rows after a stack load.

    .venv/bin/python benchmarks/join.py                           # 32 narrow blocks on the CPU: host cost
    python3 benchmarks/join.py --shape 8b --device cuda           # Llama-3-8B shape (random bf16)

A join is ``start`` (each row's cached prompt prefix looked up: every row of the group
has one, as a user's second request), ``advance`` (the prefill forward) and ``merge``
(the rows into free slots), then one decode step of the whole batch (timed apart, "next
step": it fills the new rows' routing, and after a load the tables). The
running batch holds ``--slots`` minus ``--rows`` rows; the anchors, users and ranks are
those of benchmarks/gpu.py's mixed-user rows (top-2 of 8 rank-8 anchors, own rank-2
stacks). Prints milliseconds per join and the ratios; the JSON goes to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import torch  # noqa: E402

from mta.backbone import Backbone  # noqa: E402
from mta.config import BackboneConfig  # noqa: E402
from mta.decoding.eager import Sequence  # noqa: E402
from mta.decoding.prefix import PrefixCache  # noqa: E402
from mta.decoding.slots import SlotDecoder  # noqa: E402
from mta.engine.engine import Row  # noqa: E402
from mta.models import load_embedder  # noqa: E402

PROMPT = 30  # tokens of a user's repeated prompt prefix; each request adds REST of its own
REST = 3


def backbone(shape: str, device: str) -> Backbone:
    if shape == "8b":
        return Backbone.load(BackboneConfig(model="random-llama3-8b", embedder="hashing-embedder", device=device,
                                            dtype="bf16"))
    from mta.models.tiny import tiny_llama
    model, tok = tiny_llama(seed=0, layers=32, hidden=64)
    return Backbone.wrap(model, tok, load_embedder("hashing-embedder"), "tiny-random-llama (32 blocks, hidden 64)",
                         "hashing-embedder", BackboneConfig(device=device))


def requests(n: int, first: int, mixed: bool, users: int, length: int = 0) -> list[Sequence]:
    """``n`` requests from the ``first``-th on: a user's repeated prefix and REST tokens of
    its own, or (``length``) a prompt of that many tokens of its own (a first request)."""
    def row(i: int) -> Row:
        return Row([i % 8, (i + 1) % 8], [0.6, 0.4], user=i % users) if mixed else Row(active=False)

    def prompt(i: int) -> list[int]:
        if length:
            return [5 + (i * 7 + j) % 90 for j in range(length)]
        return [5 + j % 50 for j in range(PROMPT)] + [60 + i % 100, 7, 8][:REST]
    return [Sequence(prompt(first + i), row(first + i), 4, frozenset()) for i in range(n)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_joins(bb: Backbone, a, mixed: bool, gathered: bool, feed: int = 0, load: str = "", first: int = 0) -> dict:
    """Milliseconds per join and per part of it (start, advance, merge; means over
    ``a.joins`` after two untimed ones), and of the decode step after it (``step``: it fills
    the new batch's routing). ``feed``: the slot decoder's ``feed`` (rows whose cached prefix
    leaves at most that many tokens go in through the decode steps: no prefill forward;
    their tokens ride in the steps that follow, which the running rows take anyway).
    ``load``: before each join the first joining user's stack is written into its slot (a
    user who is not resident, as the server's admission loads them): ``"load"`` through
    ``load_user`` (the server's way: the dense tables catch up on that slot alone),
    ``"write"`` as a plain in-place write (any other change: the tables are filled again
    whole and the prefill gathers each row's factors, what every stack load cost before
    the catch-up). ``first``: each joining row is a user's first request, a prompt of that
    many tokens with nothing cached (the whole prompt prefilled). Also, per join (counts,
    not timings): ``forwards``, the prefill forwards its advance ran, and ``cached``, the
    prompt tokens its rows took from the prefix cache."""
    dec = SlotDecoder(bb, bb.tokenizer.pad_token_id, slots=a.slots, span=max(256, first + 64),
                      prefix=PrefixCache(1 << 22), feed=feed)
    if gathered:
        dec.eager.router = bb.engine.route
    running = a.slots - a.rows
    with torch.no_grad():
        batch = dec.merge(None, dec.prefill(requests(running, 0, mixed, a.users)))
        dec.step(batch)
        keys = [(f"user-{i}", mixed) for i in range(a.rows)]
        warm = dec.start(requests(a.rows, 0, mixed, a.users), keys)  # the prefixes into the cache
        batch = dec.keep(dec.merge(batch, dec.advance(warm)), list(range(running)))
        total = {"start": 0.0, "advance": 0.0, "merge": 0.0, "step": 0.0}
        counts = {"forwards": 0, "cached": 0}
        for j in range(a.joins + 2):
            seqs = requests(a.rows, 1 + j, mixed, a.users, first)
            if first:  # nothing cached under these keys: every prompt prefilled whole
                keys = [(f"first-{j}-{i}", mixed) for i in range(a.rows)]
            if load:  # the slot's own factors again: the tokens do not change, the tables' versions do
                slot = seqs[0].row.user
                if load == "load":
                    bb.engine.load_user(slot, bb.engine.user_tensors(slot), alpha=bb.engine.slot_lora[slot][1])
                else:
                    for layer in bb.engine.stack_layers.values():
                        layer.stack_A[slot].mul_(1.0)
            sync(a.device)
            forwards, cached = dec.forwards, dec.prefix.reused
            t0 = time.perf_counter()
            pf = dec.start(seqs, keys)
            sync(a.device)
            t1 = time.perf_counter()
            part = dec.advance(pf)
            sync(a.device)
            t2 = time.perf_counter()
            batch = dec.merge(batch, part)
            sync(a.device)
            t3 = time.perf_counter()
            dec.step(batch)
            sync(a.device)
            if j >= 2:
                for name, dt in (("start", t1 - t0), ("advance", t2 - t1), ("merge", t3 - t2),
                                 ("step", time.perf_counter() - t3)):
                    total[name] += dt
                counts["forwards"] += dec.forwards - forwards
                counts["cached"] += dec.prefix.reused - cached
            batch = dec.keep(batch, list(range(running)))
    out = {k: 1000 * v / a.joins for k, v in total.items()}
    return {"join": out["start"] + out["advance"] + out["merge"], **out,
            "per_join": {k: v / a.joins for k, v in counts.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=["tiny", "8b"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--rows", type=int, default=8, help="rows joining at once (mta serve's default --join-rows)")
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--joins", type=int, default=16, help="timed joins per configuration")
    ap.add_argument("--first-prompt", type=int, default=128, help="tokens of a user's first request (nothing "
                    "cached: the whole prompt prefilled) in the last two rows; 0: not timed")
    ap.add_argument("--threads", type=int, default=1, help="torch's CPU threads")
    ap.add_argument("--gc", choices=["freeze", "on"], default="freeze",
                    help="freeze: start-up's objects left out of garbage collection, as `mta serve` does; on: not")
    ap.add_argument("--out", type=Path, default=Path("join.json"))
    a = ap.parse_args()
    if not 0 < a.rows < a.slots:
        ap.error(f"--rows must be between 1 and --slots - 1 ({a.slots - 1})")
    if a.first_prompt < 0:
        ap.error(f"--first-prompt must be 0 (off) or a number of tokens, not {a.first_prompt}")
    torch.set_num_threads(a.threads)
    bb = backbone(a.shape, a.device)
    bb.engine.set_bank(8, 8, 16.0)
    bb.engine.init_bank(seed=0, b_std=0.1)
    bb.engine.add_users(a.users, 2, 4.0, seed=1, b_std=0.1)
    tracked = len(gc.get_objects())
    if a.gc == "freeze":
        gc.freeze()  # as `mta serve` does once started: start-up's objects left out of every collection
    collections = {"count": [0, 0, 0], "seconds": [0.0, 0.0, 0.0]}  # by generation, over every join below
    started = [0.0]

    def count(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            collections["count"][info["generation"]] += 1
            collections["seconds"][info["generation"]] += time.perf_counter() - started[0]

    gc.callbacks.append(count)
    rows = [("base model rows", False, False, 0), ("mta rows, dense tables", True, False, 0),
            ("mta rows, gathered routing", True, True, 0),
            ("base model rows, fed", False, False, 16), ("mta rows, fed (the server)", True, False, 16),
            ("mta rows after a stack write", True, False, 0, "write"),
            ("mta rows after a stack load (server)", True, False, 0, "load")]
    if a.first_prompt:
        rows += [(f"base rows, first requests ({a.first_prompt} tok)", False, False, 0, "", a.first_prompt),
                 (f"mta rows, first, after a load ({a.first_prompt} tok)", True, False, 0, "load", a.first_prompt)]
    parts = {name: time_joins(bb, a, mixed, gathered, feed, *more) for name, mixed, gathered, feed, *more in rows}
    gc.callbacks.remove(count)
    gc.unfreeze()
    ms = {name: p["join"] for name, p in parts.items()}
    ref = ms[rows[0][0]]
    print(f"{bb.model_id} on {a.device}: {a.rows} rows joining {a.slots - a.rows} running, "
          f"each with a cached prompt prefix and {REST} tokens after it; mean of {a.joins} joins (start: "
          "prefix look-up; advance: the prefill forward; merge: into the slots; fed: the rest through the "
          "decode steps, --feed-tokens 16)")
    print(f"{'join of':<40} {'ms':>8} {'x base':>7} {'start':>7} {'advance':>8} {'merge':>7} {'next step':>9}")
    for name, *_ in rows:
        p = parts[name]
        print(f"{name:<40} {ms[name]:>8.1f} {ms[name] / ref:>7.2f} {p['start']:>7.1f} {p['advance']:>8.1f} "
              f"{p['merge']:>7.1f} {p['step']:>9.1f}")
    dense, gathered, fed = ms[rows[1][0]], ms[rows[2][0]], ms[rows[4][0]]
    with_step = {name: p["join"] + p["step"] for name, p in parts.items()}
    after_load = with_step[rows[5][0]] / with_step[rows[6][0]]
    print(f"dense tables against the gathered routing: {gathered / dense:.2f}x faster; fed against "
          f"prefilled (dense): {dense / fed:.2f}x faster; after a stack load, the join and its next step with "
          f"the tables caught up against refilled whole: {after_load:.2f}x faster")
    first = with_step[rows[8][0]] / with_step[rows[7][0]] if a.first_prompt else None
    if first is not None:
        print(f"a user's first request ({a.first_prompt} tokens) with its stack load, join and next step: "
              f"{first:.2f}x the base model's")
    print(f"garbage collection ({a.gc}; {tracked} objects tracked after start-up): full collections "
          f"{collections['count'][2]} taking {collections['seconds'][2]:.3f} s, younger "
          f"{collections['count'][0] + collections['count'][1]} taking "
          f"{collections['seconds'][0] + collections['seconds'][1]:.3f} s")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"model": bb.model_id, "device": a.device, "slots": a.slots, "rows": a.rows,
                                 "users": a.users, "joins": a.joins, "threads": a.threads,
                                 "ms_per_join": ms, "ms_by_part": parts, "dense_vs_gathered": gathered / dense,
                                 "fed_vs_dense": dense / fed, "after_load_caught_up_vs_refilled": after_load,
                                 "first_prompt": a.first_prompt, "first_request_vs_base": first,
                                 "gc": a.gc, "tracked_objects": tracked,
                                 "collections": collections},
                                indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
