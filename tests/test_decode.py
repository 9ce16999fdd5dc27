"""The iteration-level decode loops (the eager one on dynamic caches, and the slot decoder
on one static cache whose step a CUDA graph captures; eager here on the CPU): rows that
join between steps, and rows that leave, get exactly the greedy tokens they get alone
(tiny model, fp32, CPU)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from mta.decoding.batch import hf_generate
from mta.decoding.eager import Decoder, Sequence
from mta.decoding.prefix import PrefixCache
from mta.decoding.slots import SlotDecoder
from mta.engine.engine import Row
from mta.serving.scheduler import server_decoder
from tests.engine_helpers import backbone_with_adapters, join_after_a_stack_load, run_through_slots, tiny_backbone

DECODERS = {"eager": lambda bb, pad: Decoder(bb, pad),
            "slots": lambda bb, pad: SlotDecoder(bb, pad, slots=6, span=64),
            # `mta serve --decoder compiled`: the slot step through dynamo (aot_eager: its tracing
            # without code generation; inductor is the eval test's and the gpu tests')
            "slots, compiled": lambda bb, pad: SlotDecoder(bb, pad, slots=6, span=64, compile="aot_eager"),
            # `mta serve --async-steps`: each step's tokens taken at the next
            "slots, async steps": lambda bb, pad: SlotDecoder(bb, pad, slots=6, span=64, async_steps=True)}


def _alone(bb, prompt: list[int], row: Row, n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf_generate(bb.engine, [row], ids, torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=bb.tokenizer.pad_token_id, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", DECODERS)
def test_rows_joining_and_leaving_equal_each_alone(kind):
    bb = backbone_with_adapters()
    tok = bb.tokenizer
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in
               ("hello there", "a much longer prompt for the second user", "hi", "mid length one")]
    rows = [Row([0, 1], [0.6, 0.4], user=0), Row([2], [1.0], user=1), Row(active=False), Row([1], [1.0])]
    lengths = [9, 4, 7, 6]
    seqs = [Sequence(p, r, n, frozenset()) for p, r, n in zip(prompts, rows, lengths)]
    dec = DECODERS[kind](bb, tok.pad_token_id)
    batch = dec.merge(None, dec.prefill(seqs[:2]))
    dec.step(batch)
    batch = dec.merge(batch, dec.prefill(seqs[2:3]))  # joins after two tokens
    done = []
    for i in range(20):
        if i == 1:
            batch = dec.merge(batch, dec.prefill(seqs[3:]))
        left = [k for k, s in enumerate(batch.seqs) if s.finish is None]
        done += [s for s in batch.seqs if s.finish is not None]
        if not left:
            break
        batch = dec.keep(batch, left)
        dec.step(batch)
    assert all(s.finish == "length" for s in seqs)
    for s, p, r, n in zip(seqs, prompts, rows, lengths):
        assert s.tokens == _alone(bb, p, r, n)


@pytest.mark.parametrize("kind", DECODERS)
def test_stop_tokens_end_a_row(kind):
    bb = tiny_backbone()
    tok = bb.tokenizer
    p = tok("stop me", add_special_tokens=False)["input_ids"]
    free = _alone(bb, p, Row(active=False), 8)
    k = next(i for i in range(1, 8) if free[i] not in free[:i])  # a token not seen before it
    s = Sequence(p, Row(active=False), 8, frozenset({free[k]}))
    dec = DECODERS[kind](bb, tok.pad_token_id)
    b = dec.merge(None, dec.prefill([s]))
    while s.finish is None:
        dec.step(b)
    assert s.finish == "stop" and s.tokens == free[:k]


@pytest.mark.parametrize("async_steps", [False, True])
def test_slots_are_reused_and_the_cache_shifts_when_full(async_steps):
    """Rows pass through a 3-slot decoder whose cache (2 x 24 positions) fills up several
    times: each row still gets its tokens alone, slots freed by finished rows are taken by
    new ones, and the shared write position moves back when the cache is shifted (with
    async steps too: a row known to have ended one step late)."""
    bb = backbone_with_adapters()
    tok = bb.tokenizer
    texts = ["ab", "cdef", "g", "hijk", "lm", "nopq", "r", "stu"]
    rows = [Row([i % 3], [1.0], user=i % 2) if i % 4 else Row(active=False) for i in range(len(texts))]
    seqs = [Sequence(tok(t, add_special_tokens=False)["input_ids"], r, 6 + i % 5, frozenset())
            for i, (t, r) in enumerate(zip(texts, rows))]
    dec = SlotDecoder(bb, tok.pad_token_id, slots=3, span=24, async_steps=async_steps)
    shifts = run_through_slots(dec, seqs, 3)
    assert shifts >= 1 and sorted(dec.free) == [0, 1, 2]
    for s in seqs:
        assert s.finish == "length" and s.tokens == _alone(bb, s.prompt, s.row, s.max_new_tokens)


@pytest.mark.parametrize("async_steps", [False, True])
def test_a_slot_decoder_and_its_static_cache_are_freed_with_its_last_reference(async_steps):
    """A slot decoder that served rows (prefills through its routing, steps) is freed when
    its last reference goes, with the garbage collector off: no reference cycle keeps it,
    its step decoder or its cache's tensors (GBs at 8B) alive until a full collection
    (benchmarks/join.py's decoders, one after another, ran out of an H100's memory)."""
    bb = backbone_with_adapters()
    tok = bb.tokenizer
    seqs = [Sequence(tok(t, add_special_tokens=False)["input_ids"], Row([i % 3], [1.0], user=i % 2), 4, frozenset())
            for i, t in enumerate(["ab", "cdef", "g", "hijk"])]
    dec = SlotDecoder(bb, tok.pad_token_id, slots=3, span=24, prefix=PrefixCache(1 << 12), async_steps=async_steps)
    run_through_slots(dec, seqs, 3)
    held = [weakref.ref(o) for o in (dec, dec.g, dec.eager, dec.g.cache)]
    held += [weakref.ref(t) for t in vars(dec.g).values() if isinstance(t, torch.Tensor)]
    assert len(held) > 3
    was = gc.isenabled()
    gc.disable()
    try:
        del dec
        assert [r() is None for r in held] == [True] * len(held)
    finally:
        if was:
            gc.enable()


def test_a_compiled_slot_decoder_closed_gives_its_cache_back_and_the_backbone_closes_the_one_it_replaces():
    """A compiled step holds its decoder, and dynamo's trace its cache, until a full garbage
    collection; ``close`` gives the static cache's tensors back at once (the collector off
    otherwise). The backbone's batch-generation decoder, replaced by a larger one, is closed
    before the new one is allocated."""
    bb = backbone_with_adapters()
    tok = bb.tokenizer
    seqs = [Sequence(tok(t, add_special_tokens=False)["input_ids"], Row([i % 3], [1.0], user=i % 2), 4, frozenset())
            for i, t in enumerate(["ab", "cdef", "g"])]
    dec = SlotDecoder(bb, tok.pad_token_id, slots=3, span=24, compile="aot_eager")
    run_through_slots(dec, seqs, 3)
    held = [weakref.ref(t) for layer in dec.g.cache.layers for t in (layer.keys, layer.values)]
    assert held
    was = gc.isenabled()
    gc.disable()
    try:
        dec.close()
        del dec
        assert [r() is None for r in held] == [True] * len(held)
    finally:
        if was:
            gc.enable()
    first = bb.slot_decoder(2, 24)
    assert bb.slot_decoder(2, 16) is first and first.g.cache is not None  # it fits: kept
    bb.slot_decoder(3, 24)
    assert first.g.cache is None


@pytest.mark.parametrize("compile", [False, "aot_eager"])
def test_steps_read_a_window_of_the_cache_and_rows_moved_left_keep_their_tokens(compile):
    """A step reads only the cache's first positions up to a power of two past the write
    position (here from 4), the rows moved left whenever that makes the window smaller:
    rows joining and leaving over many windows and shifts each get their tokens alone, and
    the compiled step is compiled twice (the first window, then the window symbolic)."""
    from torch._dynamo.utils import counters

    bb = backbone_with_adapters()
    tok = bb.tokenizer
    texts = ["ab", "a longer one", "g", "hijk", "lm", "nopq rst", "r", "stu", "vw", "xyz"]
    rows = [Row([i % 3], [1.0], user=i % 2) if i % 4 else Row(active=False) for i in range(len(texts))]
    seqs = [Sequence(tok(t, add_special_tokens=False)["input_ids"], r, 4 + 3 * (i % 4), frozenset())
            for i, (t, r) in enumerate(zip(texts, rows))]
    torch._dynamo.reset()
    counters.clear()
    dec = SlotDecoder(bb, tok.pad_token_id, slots=3, span=24, compile=compile, min_window=4)
    assert dec.g.windows() == [4, 8, 16, 32, 48]
    seen = set()
    real = dec.g.advance
    dec.g.advance = lambda: seen.add(dec.g.window) or real()
    shifts = run_through_slots(dec, seqs, 3)
    assert shifts >= 2 and len(seen) >= 3 and max(seen) < 48
    for s in seqs:
        assert s.finish == "length" and s.tokens == _alone(bb, s.prompt, s.row, s.max_new_tokens)
    if compile:
        assert counters["stats"]["unique_graphs"] == 2


def test_slot_decoder_refuses_what_does_not_fit():
    bb = tiny_backbone()
    dec = SlotDecoder(bb, bb.tokenizer.pad_token_id, slots=1, span=8)
    with pytest.raises(ValueError, match="exceeds the decoder's span 8"):
        dec.prefill([Sequence([5] * 6, Row(active=False), 4, frozenset())])
    with pytest.raises(RuntimeError, match="the decoder has 1 slots"):
        dec.prefill([Sequence([5, 6], Row(active=False), 4, frozenset())] * 2)
    running = dec.merge(None, dec.prefill([Sequence([5, 6], Row(active=False), 4, frozenset())]))
    with pytest.raises(RuntimeError, match="only 0 slots are free"):
        dec.merge(running, dec.prefill([Sequence([5, 6], Row(active=False), 4, frozenset())]))
    # the scheduler drops a batch whose rows all finished (None): its slots are free again
    dec.merge(None, dec.prefill([Sequence([7, 8], Row(active=False), 4, frozenset())]))
    assert dec.free == []


def test_slot_decoder_sees_a_table_changed_in_place():
    """Between admissions only the rows' coefficients are refilled, unless a table changed
    (a user's stack reloaded in place, as the server's store does): then the columns too."""
    bb = backbone_with_adapters()
    eng, tok = bb.engine, bb.tokenizer
    prompt = tok("the same prompt", add_special_tokens=False)["input_ids"]
    row = Row([0], [1.0], user=0)
    dec = SlotDecoder(bb, tok.pad_token_id, slots=2, span=32)
    first = Sequence(prompt, row, 8, frozenset())
    run_through_slots(dec, [first], 2)
    with torch.no_grad():
        for layer in eng.layers.values():
            layer.stack_A.mul_(4.0)  # in place: the tensor's version moves, its identity does not
    second = Sequence(prompt, row, 8, frozenset())
    run_through_slots(dec, [second], 2)
    assert second.tokens == _alone(bb, prompt, row, 8) != first.tokens


def test_the_slot_decoder_builds_a_new_batchs_routing_once(monkeypatch):
    """At a step after rows joined, the routing tensors are built once (the layout's choice
    and the fill share them); a step with the same rows, or after a row left, builds none."""
    bb = backbone_with_adapters()
    tok = bb.tokenizer
    seqs = [Sequence(tok(t, add_special_tokens=False)["input_ids"], r, 4, frozenset())
            for t, r in (("hello there", Row([0, 1], [0.6, 0.4], user=0)), ("hi", Row([2], [1.0], user=1)))]
    dec = SlotDecoder(bb, tok.pad_token_id, slots=4, span=32)
    batch = dec.merge(None, dec.prefill(seqs))
    calls = []
    real = bb.engine.routing
    monkeypatch.setattr(bb.engine, "routing", lambda rows: calls.append(len(rows)) or real(rows))
    dec.step(batch)
    assert calls == [4]  # one routing over the decoder's 4 slots
    dec.step(batch)
    assert calls == [4]
    batch = dec.keep(batch, [1])  # a row leaves: its slot is masked, nothing is routed again
    dec.step(batch)
    assert calls == [4]
    batch = dec.merge(batch, dec.prefill([Sequence(seqs[0].prompt, seqs[0].row, 4, frozenset())]))
    calls.clear()  # (the joining row's eager prefill routes its one row)
    dec.step(batch)  # a row joined: the routing is built again
    assert calls == [4]


@pytest.mark.parametrize("kind", ["slots", "slots, compiled", "slots, async steps"])
def test_a_warmed_up_slot_decoder_frees_its_slots_and_changes_no_token(kind, monkeypatch):
    """The server's warm-up (every slot through an anchor mixture, then a base row) leaves
    every slot free, and rows decoded after it get the tokens they get alone. It times the
    dense kernel's tiles for every folded layer's (outputs, columns) (on the CPU the kernel
    does not run: what it is asked to time is checked)."""
    from mta.engine import kernels

    asked = []
    monkeypatch.setattr(kernels, "tune", lambda shapes, dtype, device: asked.append((set(shapes), dtype)) or 0)
    bb = backbone_with_adapters()
    tok = bb.tokenizer
    dec = DECODERS[kind](bb, tok.pad_token_id)
    prompt = tok("warm-up", add_special_tokens=False)["input_ids"]
    dec.warm([Row([0, 1], [0.5, 0.5])] * dec.n, prompt, steps=3)
    folded = {(ly.out_features, ly.dense_B.shape[1]) for ly in bb.engine.layers.values() if ly._ext is not None}
    assert folded and asked == [(folded, bb.engine.layers[next(iter(bb.engine.layers))].dense_B.dtype)]
    dec.warm([Row(active=False)], prompt, steps=3)
    assert sorted(dec.free) == list(range(dec.n)) and not dec.row_start and dec._taken is None
    rows = [Row([0, 1], [0.6, 0.4], user=0), Row(active=False)]
    seqs = [Sequence(tok(t, add_special_tokens=False)["input_ids"], r, 6, frozenset())
            for t, r in zip(("hello there", "a longer prompt"), rows)]
    batch = dec.merge(None, dec.prefill(seqs))
    while any(s.finish is None for s in seqs):
        dec.step(batch)
    for s in seqs:
        assert s.tokens == _alone(bb, s.prompt, s.row, 6)


def test_the_server_decoder_auto_is_compiled_on_cuda_only():
    assert server_decoder("auto", "cuda") == "compiled" and server_decoder("auto", "cuda:1") == "compiled"
    assert server_decoder("auto", "cpu") == "generate" and server_decoder("auto", torch.device("cpu")) == "generate"
    assert server_decoder("graph", "cpu") == "graph" and server_decoder("generate", "cuda") == "generate"


@pytest.mark.parametrize("kind", DECODERS)
def test_a_prompt_prefilled_in_chunks_gives_the_tokens_of_one_forward(kind):
    """Chunked prefill (the server's, between decode steps): joining rows' prompts go in a
    few columns at a time, and each row still gets the greedy tokens it gets alone."""
    bb = backbone_with_adapters()
    tok = bb.tokenizer
    texts = ("a much longer prompt for the first of these users", "hi", "mid length one")
    rows = [Row([0, 1], [0.6, 0.4], user=0), Row(active=False), Row([2], [1.0], user=1)]
    seqs = [Sequence(tok(t, add_special_tokens=False)["input_ids"], r, 5, frozenset()) for t, r in zip(texts, rows)]
    dec = DECODERS[kind](bb, tok.pad_token_id)
    pf = dec.start(seqs)
    width = max(len(s.prompt) for s in seqs)
    chunks, part = 0, None
    while part is None:
        part = dec.advance(pf, max_tokens=3 * 4)  # 3 rows: 4 columns a chunk
        chunks += 1
    assert chunks == -(-width // 4) and pf.left == 0
    batch = dec.merge(None, part)
    while any(s.finish is None for s in seqs):
        dec.step(batch)
    for s in seqs:
        assert s.tokens == _alone(bb, s.prompt, s.row, 5)


@pytest.mark.parametrize("kind", ["eager", "slots"])
@pytest.mark.parametrize("chunk", [None, 10])
def test_a_users_cached_prompt_prefix_is_reused_and_changes_no_token(kind, chunk):
    """The per-user prefix cache: a user's second prompt starts from the keys and values of
    the prefix it shares with their first (only the rest is computed), rows with and
    without a hit prefilled together keep their order, each row gets its tokens alone, and
    another user (another key) reuses nothing."""
    bb = backbone_with_adapters()
    tok = bb.tokenizer
    cache = PrefixCache(max_tokens=4096)
    dec = Decoder(bb, tok.pad_token_id, cache) if kind == "eager" else \
        SlotDecoder(bb, tok.pad_token_id, slots=6, span=160, prefix=cache)
    shared = "the same long task instruction that every prompt of this user starts with: "
    a, b = Row([0, 1], [0.6, 0.4], user=0), Row([2], [1.0], user=1)

    def run(texts, rows, keys):
        seqs = [Sequence(tok(t, add_special_tokens=False)["input_ids"], r, 4, frozenset()) for t, r in zip(texts, rows)]
        pf, part = dec.start(seqs, keys), None
        while part is None:
            part = dec.advance(pf, chunk)
        batch = dec.merge(None, part)
        while any(s.finish is None for s in seqs):
            dec.step(batch)
        if kind == "slots":
            dec.keep(batch, [])
        for s in seqs:
            assert s.tokens == _alone(bb, s.prompt, s.row, 4)
        return seqs

    run([shared + "first question"], [a], [("u1", "v1")])
    assert cache.hits == 0 and len(cache.entries) == 1
    seqs = run(["something else entirely", shared + "second question", shared + "for user two"], [b, a, b],
               [("u2", "v1"), ("u1", "v1"), ("u2", "v1")])
    common = len(tok(shared, add_special_tokens=False)["input_ids"]) - 1  # the last token may merge with the next word
    assert cache.hits == 1 and cache.reused >= common >= 8, (cache.hits, cache.reused, common)
    assert [s.prompt for s in seqs][1][:common] == list(cache.entries[("u1", "v1")][0][:common])
    # both users hit, their uncached rests of different lengths: one batched part
    run([shared + "a third and much longer question of the first user", shared + "short"], [a, b],
        [("u1", "v1"), ("u2", "v1")])
    assert cache.hits == 3
    cache.forget("u1")
    assert ("u1", "v1") not in cache.entries and ("u2", "v1") in cache.entries


def test_the_prefix_cache_keeps_within_its_tokens():
    cache = PrefixCache(max_tokens=30)
    kv = [(torch.zeros(1, 2, 12, 4), torch.zeros(1, 2, 12, 4))]
    for user in ("a", "b", "c"):
        cache.store((user,), list(range(13)), kv)
    assert list(cache.entries) == [("b",), ("c",)] and cache.tokens == 24  # the oldest went
    assert cache.lookup(("b",), list(range(5)) + [99] * 10) == (0, [])  # 5 shared tokens: not worth it
    n, got = cache.lookup(("c",), list(range(20)))
    assert n == 12 and got[0][0].shape == (1, 2, 12, 4)
    cache.store(("d",), list(range(5)), [(torch.zeros(1, 2, 4, 4),) * 2])  # too short to keep
    assert ("d",) not in cache.entries


def test_a_joining_prefill_reads_the_dense_tables_of_the_decode_step_and_gives_them_back(monkeypatch):
    """Once the slot decoder's step reads the dense layout, a joining group's prefill reads
    the same tables with its own rows' coefficients (a few operations a layer, not a gather
    of each row's factors): the rows still get their tokens alone, and every layer's
    coefficient buffer is the step's own tensor again afterwards (what a captured step
    reads). Before any dense fill (the first group), the gathered routing."""
    import mta.decoding.slots as slots_mod

    bb = backbone_with_adapters()
    tok = bb.tokenizer
    used = []
    real = slots_mod.dense_rows
    monkeypatch.setattr(slots_mod, "dense_rows", lambda eng, rows: used.append(len(rows)) or real(eng, rows))
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("hello there", "a longer prompt", "hi", "mid")]
    rows = [Row([0, 1], [0.6, 0.4], user=0), Row([2], [1.0], user=1), Row([1, 2], [0.5, 0.5]), Row([0], [1.0], user=1)]
    seqs = [Sequence(p, r, 6, frozenset()) for p, r in zip(prompts, rows)]
    dec = SlotDecoder(bb, tok.pad_token_id, slots=6, span=64)
    batch = dec.merge(None, dec.prefill(seqs[:2]))
    assert used == []  # nothing filled yet: gathered
    dec.step(batch)
    assert dec.fixed.layout == "dense"
    before = [layer.dense_W for layer in bb.engine.layers.values()]
    batch = dec.merge(batch, dec.prefill(seqs[2:]))
    assert used == [2]
    assert all(layer.dense_W is w for layer, w in zip(bb.engine.layers.values(), before))
    while any(s.finish is None for s in seqs):
        batch = dec.keep(batch, [k for k, s in enumerate(batch.seqs) if s.finish is None])
        dec.step(batch)
    for s in seqs:
        assert s.tokens == _alone(bb, s.prompt, s.row, s.max_new_tokens)


@pytest.mark.parametrize("kind", ["slots", "slots, async steps"])
def test_a_prefill_after_a_stack_load_reads_the_dense_tables_caught_up_and_the_next_step_refills_no_table(
        kind, monkeypatch):
    """A user's stack loaded into its slot while rows run (the server's admission of a user
    not resident): the joining prefill writes that slot's columns into the decode step's
    dense tables and reads them (no gather), the next step refills the rows' coefficients
    alone, and every row gets the tokens it gets alone with the new stack."""
    import mta.decoding.fixed as fixed_mod
    import mta.decoding.slots as slots_mod

    bb = backbone_with_adapters()
    tok, eng = bb.tokenizer, bb.engine
    used, fills = [], []
    real_rows, real_dense = slots_mod.dense_rows, fixed_mod.dense
    monkeypatch.setattr(slots_mod, "dense_rows", lambda e, rows: used.append(len(rows)) or real_rows(e, rows))
    monkeypatch.setattr(fixed_mod, "dense", lambda *a, **k: fills.append(k["tables"]) or real_dense(*a, **k))
    running = Sequence(tok("a row that runs", add_special_tokens=False)["input_ids"], Row([0, 1], [0.6, 0.4], user=0),
                       12, frozenset())
    dec = DECODERS[kind](bb, tok.pad_token_id)
    batch = dec.merge(None, dec.prefill([running]))
    dec.step(batch)
    assert fills == [True] and used == []
    joining = join_after_a_stack_load(dec, eng, tok, batch, running)
    assert used == [1]  # the joining prefill read the dense tables
    assert fills[1] is False  # the step after the join: the coefficients alone
    for s in (running, joining):
        assert s.tokens == _alone(bb, s.prompt, s.row, s.max_new_tokens)


@pytest.mark.parametrize("compile", [False, "aot_eager"])
def test_a_cached_users_short_rest_is_fed_through_the_decode_steps_without_stalling_the_running_rows(compile):
    """A joining row whose user's prompt prefix is cached and whose rest is at most ``feed``
    tokens is not prefilled: its prefix goes into its slot and the rest goes in one token a
    decode step, while the running rows take a token every step; it gets the tokens it gets
    alone, in the joining order, and its whole prompt is cached for the user's next one.
    Rows without a hit, or with a longer rest, are prefilled beside it."""
    bb = backbone_with_adapters()
    tok = bb.tokenizer
    cache = PrefixCache(max_tokens=4096)
    dec = SlotDecoder(bb, tok.pad_token_id, slots=5, span=256, prefix=cache, feed=16, compile=compile)
    forwards = []
    real = dec.eager._forward
    dec.eager._forward = lambda ids, *a: forwards.append(ids.shape[0]) or real(ids, *a)
    shared = "the same long task instruction that every prompt of this user starts with: "
    a, b = Row([0, 1], [0.6, 0.4], user=0), Row([2], [1.0], user=1)

    def seq(text, row, n=4):
        return Sequence(tok(text, add_special_tokens=False)["input_ids"], row, n, frozenset())

    first = [seq(shared + "first question", a)]
    batch = dec.merge(None, dec.advance(dec.start(first, [("u1",)])))
    running = [seq("a row that keeps decoding while others join", b, 40)]
    batch = dec.merge(batch, dec.advance(dec.start(running, [None])))
    while first[0].finish is None:
        dec.step(batch)
    batch = dec.keep(batch, [k for k, s in enumerate(batch.seqs) if s.finish is None])
    forwards.clear()
    joining = [seq("no key at all", b), seq(shared + "second one", a),
               seq(shared + "a much longer rest than the feed allows, so it is prefilled", a)]
    batch = dec.merge(batch, dec.advance(dec.start(joining, [None, ("u1",), ("u1",)])))
    assert forwards == [1, 1]  # the keyless row and the long rest, each its own part; the fed row none
    assert batch.seqs == running + joining and len(dec.feeding) == 1
    fed = joining[1]
    ((f, left),) = dec.feeding.values()
    rest = len(fed.prompt) - f.n  # the tokens fed through the steps
    assert f.seq is fed and rest == len(left) + 1 and 1 <= rest <= 16
    for _ in range(rest - 1):
        before = len(running[0].tokens)
        dec.step(batch)
        assert fed.tokens == [] and len(running[0].tokens) == before + 1  # no stall, no token yet
    dec.step(batch)
    assert len(fed.tokens) == 1 and not dec.feeding
    assert cache.entries[("u1",)][0] == tuple(fed.prompt[:-1])  # its whole prompt kept for the next one
    while any(s.finish is None for s in batch.seqs):
        batch = dec.keep(batch, [k for k, s in enumerate(batch.seqs) if s.finish is None])
        dec.step(batch)
    for s in first + running + joining:
        assert s.tokens == _alone(bb, s.prompt, s.row, s.max_new_tokens)
    # a fed row dropped while it is still feeding frees its slot; feed=0 prefills every row
    batch = dec.keep(batch, [])
    late = [seq(shared + "second one?", a)]
    batch = dec.merge(batch, dec.advance(dec.start(late, [("u1",)])))
    assert dec.feeding and not dec.keep(batch, []).seqs and not dec.feeding and len(dec.free) == 5
    dec.feed = 0
    forwards.clear()
    dec.merge(None, dec.advance(dec.start([seq(shared + "second one", a)], [("u1",)])))
    assert forwards == [1] and not dec.feeding


def test_async_steps_take_each_steps_tokens_at_the_next_and_change_no_token():
    """With async steps the rows take a step's tokens when the next step has been launched
    (one step behind), a sampling row's step takes them at once, and nothing else changes:
    rows joining (prefilled and fed from a cached prefix), stopping on a stop token, ending
    at their length and sampling get the same tokens as with the synchronous loop."""
    bb = backbone_with_adapters()
    tok = bb.tokenizer
    shared = "the same long task instruction that every prompt of this user starts with: "
    a, b = Row([0, 1], [0.6, 0.4], user=0), Row([2], [1.0], user=1)
    free = _alone(bb, tok("stop here", add_special_tokens=False)["input_ids"], Row(active=False), 8)
    stop = frozenset({free[3]})  # the base row stops at its fourth token

    def scenario(async_steps: bool) -> tuple[list[Sequence], list[int]]:
        dec = SlotDecoder(bb, tok.pad_token_id, slots=4, span=128, prefix=PrefixCache(max_tokens=4096), feed=16,
                          async_steps=async_steps)

        def seq(text, row, n=6, stops=frozenset(), **kw):
            return Sequence(tok(text, add_special_tokens=False)["input_ids"], row, n, stops, **kw)

        first = seq(shared + "first question", a, 3)
        batch = dec.merge(None, dec.advance(dec.start([first], [("u1",)])))
        taken = []  # the first row's tokens after each of its steps
        while first.finish is None:
            dec.step(batch)
            taken.append(len(first.tokens))
        batch = dec.keep(batch, [])
        rows = [seq("a row that keeps decoding", b, 12), seq("stop here", Row(active=False), 8, stop),
                seq(shared + "second one", a), seq("a sampling row", a, 7, temperature=0.8, seed=5)]
        batch = dec.merge(batch, dec.advance(dec.start(rows[:2], [None, None])))
        dec.step(batch)
        batch = dec.merge(batch, dec.advance(dec.start(rows[2:3], [("u1",)])))
        assert len(dec.feeding) == 1  # fed through the steps, not prefilled
        for _ in range(3):
            dec.step(batch)
        batch = dec.merge(batch, dec.advance(dec.start(rows[3:], [None])))
        while any(s.finish is None for s in batch.seqs):
            batch = dec.keep(batch, [k for k, s in enumerate(batch.seqs) if s.finish is None])
            dec.step(batch)
        return [first, *rows], taken

    sync, sync_taken = scenario(False)
    ahead, ahead_taken = scenario(True)
    # the prefill gave the first token; each step's own token is taken at the next step
    assert sync_taken == [2, 3] and ahead_taken == [1, 2, 3]
    assert [s.tokens for s in ahead] == [s.tokens for s in sync]
    assert [s.finish for s in ahead] == [s.finish for s in sync] == ["length", "length", "stop", "length", "length"]
    for s in ahead[:4]:
        assert s.tokens == _alone(bb, s.prompt, s.row, s.max_new_tokens)[:len(s.tokens)]


def test_a_prefill_computes_the_last_positions_logits_alone_and_its_tokens_do_not_change():
    """A prefill forward asks the model for the last position's logits only (the rest of a
    chunk's vocabulary logits are never read): the logits the model returns have one
    position, and each row's tokens are those the model gives with every position's logits."""
    bb = backbone_with_adapters()
    tok = bb.tokenizer
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("a longer prompt here", "hi")]
    rows = [Row([0, 2], [0.7, 0.3], user=1), Row(active=False)]
    ours, every = Decoder(bb, tok.pad_token_id), Decoder(bb, tok.pad_token_id)
    assert ours.last_only == {"logits_to_keep": 1}
    every.last_only = {}
    shapes, forward = [], bb.model.forward

    def spy(*a, **k):
        out = forward(*a, **k)
        shapes.append(out.logits.shape[1])
        return out

    def run(dec) -> list[list[int]]:
        seqs = [Sequence(p, r, 5, frozenset()) for p, r in zip(prompts, rows)]
        batch = dec.prefill(seqs)
        while any(s.finish is None for s in batch.seqs):
            dec.step(batch)
        return [s.tokens for s in seqs]

    bb.model.forward = spy
    try:
        mine = run(ours)
        assert shapes[0] == 1
        shapes.clear()
        assert run(every) == mine and shapes[0] == max(map(len, prompts))
    finally:
        del bb.model.forward
    assert mine == [_alone(bb, p, r, 5) for p, r in zip(prompts, rows)]
