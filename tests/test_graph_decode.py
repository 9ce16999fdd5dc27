"""GraphDecoder (the decode step captured in a CUDA graph; eager on a CPU): greedy tokens
identical to transformers' `generate`, for the base model and for mixed users through the
engine's pinned routing; one decoder serves later batches (other prompts, other users);
end-of-sequence handling as `generate` pads. The captured path on CUDA: tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch

from mta.decoding import fixed, routing
from mta.decoding.fixed import captured_buffers
from mta.decoding.step import GraphDecoder
from mta.engine.engine import Row
from tests.engine_helpers import FIRST, NEW, OTHER, PROMPTS, SECOND, _enc, _hf, decode_engine, random_stack


@pytest.fixture(scope="module")
def setup():
    return decode_engine()


def test_base_model_equals_generate_across_batches(setup):
    eng, tok = setup
    dec = GraphDecoder(eng.model, batch=4, max_len=64)
    assert not dec.graph_on  # a CPU: the same step, eagerly
    for prompts in (PROMPTS, OTHER, PROMPTS):  # one decoder, later batches refill it in place
        enc = _enc(tok, prompts)
        got = dec.generate(enc["input_ids"], enc["attention_mask"], NEW, pad_token_id=tok.pad_token_id)
        assert torch.equal(got, _hf(eng, tok, enc, None)), prompts


def test_mixed_users_through_pinned_routing_equal_the_eager_engine(setup):
    eng, tok = setup
    dec = GraphDecoder(eng.model, batch=4, max_len=64)
    enc = _enc(tok, PROMPTS)
    for rows in (FIRST, SECOND):
        with fixed.pinned(eng, rows, width=16):
            if not dec.buffers:
                dec.buffers = captured_buffers(eng)
            got = dec.generate(enc["input_ids"], enc["attention_mask"], NEW, pad_token_id=tok.pad_token_id)
        assert torch.equal(got, _hf(eng, tok, enc, rows)), rows
    base = dec.generate(enc["input_ids"], enc["attention_mask"], NEW, pad_token_id=tok.pad_token_id)
    assert not torch.equal(base, _hf(eng, tok, enc, FIRST))  # the adapters matter: the check can fail


@pytest.mark.parametrize("layout", ["base", "pinned", "dense"])
def test_compiled_step_equals_generate(setup, layout, caplog):
    """``compile=``: the step through dynamo (``aot_eager`` here: the same tracing and
    functionalisation of the in-place buffer updates as inductor, no code generation; inductor
    under capture is the ``gpu`` test's) gives generate's tokens, for the base model and
    mixed users in both fixed layouts, across two batches of other users."""
    import contextlib
    import logging

    caplog.set_level(logging.INFO, logger="mta.decoding.step")
    eng, tok = setup
    dec = GraphDecoder(eng.model, batch=4, max_len=64, compile="aot_eager")
    for prompts, rows in ((PROMPTS, FIRST), (OTHER, SECOND)):
        enc = _enc(tok, prompts)
        on = contextlib.nullcontext() if layout == "base" else \
            fixed.pinned(eng, rows, width=16) if layout == "pinned" else fixed.dense(eng, rows)
        with on:
            got = dec.generate(enc["input_ids"], enc["attention_mask"], NEW, pad_token_id=tok.pad_token_id)
        assert torch.equal(got, _hf(eng, tok, enc, None if layout == "base" else rows)), (layout, prompts)
    # the compile is announced once, when it happens (a server's first requests wait on it)
    assert caplog.text.count("compiling the decode step for 4 rows x 64 positions") == 1
    assert "decode step compiled in" in caplog.text


def test_end_of_sequence_pads_like_generate(setup):
    eng, tok = setup
    enc = _enc(tok, PROMPTS)
    free = _hf(eng, tok, enc, None)[:, enc["input_ids"].shape[1]:]
    eos = int(free[0, 3])  # a token the first row emits: its row ends there, the others maybe later
    want = _hf(eng, tok, enc, None, eos_token_id=eos)
    dec = GraphDecoder(eng.model, batch=4, max_len=64)
    got = dec.generate(enc["input_ids"], enc["attention_mask"], NEW, eos_token_id=eos,
                       pad_token_id=tok.pad_token_id, check_every=2)
    assert torch.equal(got[:, :want.shape[1]], want)
    assert (got[:, want.shape[1]:] == tok.pad_token_id).all()  # generate stopped; the rest is padding
    assert (got[0, enc["input_ids"].shape[1] + 4:] == tok.pad_token_id).all()


def test_bad_shapes_are_refused(setup):
    eng, tok = setup
    dec = GraphDecoder(eng.model, batch=4, max_len=16)
    enc = _enc(tok, PROMPTS)
    with pytest.raises(ValueError, match="exceed"):
        dec.generate(enc["input_ids"], enc["attention_mask"], 16)
    with pytest.raises(ValueError, match="pad the batch"):
        GraphDecoder(eng.model, batch=4, max_len=64).generate(enc["input_ids"][:2], enc["attention_mask"][:2], 2)
    with pytest.raises(ValueError, match="CUDA"):
        GraphDecoder(eng.model, batch=4, max_len=16, graph=True)
    with pytest.raises(ValueError, match="compile must be"):
        GraphDecoder(eng.model, batch=4, max_len=16, compile="")
    for compile, mode in ((True, "reduce-overhead"), ("aot_eager", "max-autotune-no-cudagraphs")):
        with pytest.raises(ValueError, match="compile_mode must be one of default, max-autotune-no-cudagraphs"):
            GraphDecoder(eng.model, batch=4, max_len=16, compile=compile, compile_mode=mode)


def test_prompts_without_padding(setup):
    """No row padded (the benchmark's case): the unwritten cache slots must stay masked,
    which a 2D all-ones mask would let transformers skip."""
    eng, tok = setup
    enc = _enc(tok, ["abcd", "efgh", "ijkl", "mnop"])
    assert bool(enc["attention_mask"].all())
    dec = GraphDecoder(eng.model, batch=4, max_len=64)
    got = dec.generate(enc["input_ids"], enc["attention_mask"], NEW, pad_token_id=tok.pad_token_id)
    assert torch.equal(got, _hf(eng, tok, enc, None))


def test_batch_generation_runs_the_slot_decoder_and_keeps_it_while_calls_fit():
    """`generate(..., decoder="graph")`: every prompt through the backbone's slot decoder (the
    server's loop), the same answers as transformers' generate, mixed users and the base
    model; a later call that fits reuses the decoder, a larger one replaces it."""
    from mta.decoding.batch import generate
    from tests.engine_helpers import tiny_backbone

    bb = tiny_backbone()
    bb.engine.set_bank(3, 4, 8.0)
    bb.engine.init_bank(seed=0, b_std=0.3)
    bb.engine.add_users(2, 2, 4.0, seed=1, b_std=0.3)
    prompts = ["hello there", "a much longer prompt for the second user of this batch", "hi", "mid length one",
               "five", "six rows in three slots"]
    rows = [Row([0, 1], [0.6, 0.4], user=0), Row([2], [1.0], user=1), Row(active=False), Row([1], [1.0]),
            Row([2], [1.0], user=0), Row([0], [1.0])]
    done = []
    want = generate(bb, prompts, rows, 6, batch_size=3)
    got = generate(bb, prompts, rows, 6, batch_size=3, decoder="graph", on_batch=done.append)
    assert got == want and sum(done) == len(prompts)
    dec = bb.slot_decoder(3, 8)
    assert generate(bb, prompts[:2], None, 4, batch_size=3, decoder="graph") == generate(bb, prompts[:2], None, 4,
                                                                                      batch_size=3)
    assert bb.slot_decoder(3, 8) is dec and bb.slot_decoder(3, dec.span + 1) is not dec
    assert generate(bb, [], None, 4, decoder="graph") == []  # nothing to generate: no decoder asked for


def test_eval_with_the_graph_decoder_gives_the_same_answers(tmp_path):
    """`--decoder graph` and `--decoder compiled` (the step through inductor, here its CPU
    code) through `mta eval` (base prompts and mixed users of a bank): the same predictions
    as transformers' generate."""
    import json

    from mta.cli.main import main

    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "8", "--queries", "1"]) == 0
    common = ["--methods", "rag-1,mta", "--anchors", "2", "--n-boot", "100", "--model", "tiny-random-llama",
              "--embedder", "hashing-embedder", "--max-new-tokens", "6"]
    preds = {}
    for decoder in ("generate", "graph", "compiled"):
        out = tmp_path / decoder
        assert main(["eval", "--data", str(data), "--out", str(out), "--decoder", decoder, *common]) == 0
        preds[decoder] = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert preds["graph"] == preds["generate"] == preds["compiled"] and len(preds["graph"]) == 16
    assert sum(bool(o) for p in preds["graph"] for o in p["outputs"]) > 8  # answers, not empty strings
    with pytest.raises(ValueError, match="no generation arguments"):
        from mta.decoding.batch import generate

        generate(None, ["x"], None, 2, decoder="graph", temperature=0.5)


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)])
def test_gqa_decode_attention_equals_the_eager_reference(heads, kv_heads):
    """One new token per row over a cache with masked slots: our grouped-head SDPA gives
    what transformers' eager attention (keys and values repeated per query head) gives."""
    from types import SimpleNamespace

    from transformers.models.llama.modeling_llama import eager_attention_forward

    from mta.decoding.attention import gqa_decode_attention

    g = torch.Generator().manual_seed(0)
    b, d, length = 3, 16, 10
    q = torch.randn(b, heads, 1, d, generator=g)
    k = torch.randn(b, kv_heads, length, d, generator=g)
    v = torch.randn(b, kv_heads, length, d, generator=g)
    mask = torch.zeros(b, 1, 1, length)
    mask[0, ..., :4] = torch.finfo(torch.float32).min   # a left-padded row
    mask[1, ..., 7:] = torch.finfo(torch.float32).min   # slots not written yet
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False, is_causal=True)
    ours, _ = gqa_decode_attention(module, q, k, v, mask, scaling=d ** -0.5)
    ref, _ = eager_attention_forward(module, q, k, v, mask, scaling=d ** -0.5)
    assert ours.shape == ref.shape == (b, 1, heads, d)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # the masked slots matter: without the mask the answer moves
    free, _ = gqa_decode_attention(module, q, k, v, torch.zeros_like(mask), scaling=d ** -0.5)
    assert not torch.allclose(free, ref, atol=1e-3)


def test_dense_routing_equals_the_eager_engine(setup):
    """The dense layout (every table as columns, each row's coefficients over them) gives
    the routing's logits, for anchors, users, inactive rows and padding rows alike."""
    eng, tok = setup
    enc = _enc(tok, PROMPTS)
    with torch.no_grad():
        with eng.route(FIRST):
            ref = eng.model(**enc).logits
        with fixed.dense(eng, FIRST):
            got = eng.model(**enc).logits
        with fixed.dense(eng, FIRST, batch=6):  # two padding rows: nothing added to them
            ids = torch.cat([enc["input_ids"], enc["input_ids"][:2]])
            mask = torch.cat([enc["attention_mask"], enc["attention_mask"][:2]])
            padded = eng.model(input_ids=ids, attention_mask=mask).logits
        base = eng.model(input_ids=ids[4:], attention_mask=mask[4:]).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(padded[:4], ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(padded[4:], base, rtol=1e-5, atol=1e-5)
    assert eng.backend is routing.GATHERED  # off again on leaving


def test_mixed_users_through_dense_routing_equal_the_eager_engine(setup):
    """One decoder, two batches of other users: the second refills the dense buffers in
    place (the same tensors the captured step reads)."""
    eng, tok = setup
    dec = GraphDecoder(eng.model, batch=4, max_len=64)
    enc = _enc(tok, PROMPTS)
    seen = None
    for rows in (FIRST, SECOND):
        with fixed.dense(eng, rows):
            dec.buffers = captured_buffers(eng)
            ptrs = [b.data_ptr() for b in dec.buffers]
            assert seen is None or ptrs == seen
            seen = ptrs
            got = dec.generate(enc["input_ids"], enc["attention_mask"], NEW, pad_token_id=tok.pad_token_id)
        assert torch.equal(got, _hf(eng, tok, enc, rows)), rows


def test_the_pool_takes_the_layout_with_fewer_bytes(setup):
    eng, _ = setup
    # 4 anchors x rank 4 + 3 users x rank 2 = 22 columns; a row of FIRST needs 2 x 4 + 2 = 10
    assert fixed.fixed_layout(eng, FIRST, 4) == "dense"       # 22 <= 4 x 10
    assert fixed.fixed_layout(eng, FIRST[:1], 2) == "pinned"  # 22 > 2 x 10


def test_tables_state_sees_replacement_and_in_place_change():
    from tests.engine_helpers import tiny_engine

    eng, _, _ = tiny_engine(users=2)
    state = fixed.tables_state(eng)
    assert fixed.stack_catch_up(eng, state) is not None and fixed.stack_catch_up(eng, None) is None
    layer = next(iter(eng.layers.values()))
    with torch.no_grad():
        layer.stack_B.add_(1.0)  # in place: the version moves
    assert fixed.stack_catch_up(eng, state) is None
    state = fixed.tables_state(eng)
    eng.add_users(3, 2, 4.0)  # new tables (new tensors, perhaps at a freed address)
    assert fixed.stack_catch_up(eng, state) is None


def test_the_engine_names_the_stack_slots_loaded_since_a_state_and_only_while_loads_are_all_that_wrote(monkeypatch):
    import mta.engine.engine as engine_mod
    from tests.engine_helpers import tiny_engine

    eng, _, _ = tiny_engine(users=4)
    v0 = eng.stack_versions()
    assert eng.stack_loads(v0) == []
    eng.load_user(1, random_stack(eng, 1), alpha=4.0)
    v1 = eng.stack_versions()
    eng.load_user(3, random_stack(eng, 2))
    eng.load_user(1, random_stack(eng, 3))
    assert eng.stack_loads(v0) == [1, 3] and eng.stack_loads(v1) == [1, 3]
    assert eng.stack_loads(eng.stack_versions()) == []
    with torch.no_grad():  # anything else writing a stack table: no state before it is caught up
        next(iter(eng.stack_layers.values())).stack_B.add_(1.0)
    assert eng.stack_loads(v0) is None and eng.stack_loads(v1) is None
    v2 = eng.stack_versions()
    eng.load_user(2, random_stack(eng, 4))
    assert eng.stack_loads(v2) == [2] and eng.stack_loads(v0) is None
    monkeypatch.setattr(engine_mod, "STACK_LOG", 4)  # a short log: the oldest states fall out of it
    v3 = eng.stack_versions()
    for slot in (0, 1, 2, 3, 0, 1):
        eng.load_user(slot, random_stack(eng, 10 + slot))
    assert eng.stack_loads(v3) is None and len(eng._stack_log) <= 5


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_dense_tables_catch_up_on_loaded_stacks_as_a_whole_refill_would(dtype):
    """Stacks loaded into two slots after a dense fill: writing those slots' columns alone
    (with the new scale of one of them) gives exactly the tables a whole refill gives, in
    the same tensors (a captured step keeps reading them), and the logits of the routing;
    after any other write the tables are not caught up. The A columns are folded into the
    base weight's matrix, as on a GPU; bf16: a bf16 base with bf16 adapter compute (the
    B columns rounded once from the fp32 tables, as the whole refill rounds them)."""
    from mta.engine.engine import AdapterEngine, EngineSpec
    from mta.models.tiny import tiny_llama

    model, tok = tiny_llama(seed=0)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    eng = AdapterEngine(model, EngineSpec(n_anchors=4, rank=4, alpha=8.0, compute_dtype=model.dtype))
    eng.init_bank(seed=0, b_std=0.3)
    eng.add_users(3, 2, 4.0, seed=1, b_std=0.3)
    enc = _enc(tok, PROMPTS)
    rows = [Row([0, 1], [0.6, 0.4], user=0), Row([2], [1.0], user=1), Row([3], [1.0], user=2), Row(active=False)]
    with torch.no_grad(), fixed.dense(eng, rows):
        model(**enc)
    state = fixed.tables_state(eng)
    held = [(ly.dense_A, ly.dense_B) for ly in eng.layers.values()]
    eng.load_user(1, random_stack(eng, 1), alpha=6.0)  # a new scale for slot 1
    eng.load_user(2, random_stack(eng, 2))
    assert eng.stack_loads(state.stack_versions) == [1, 2]  # changed since the fill, in those slots alone
    assert fixed.stack_catch_up(eng, state) is not None
    caught = [(a.clone(), b.clone()) for a, b in held]
    assert all(ly.dense_A is a and ly.dense_B is b for ly, (a, b) in zip(eng.layers.values(), held))
    with torch.no_grad():
        with eng.route(rows):
            ref = model(**enc).logits
        with fixed.dense(eng, rows, tables=True):  # the whole refill
            got = model(**enc).logits
    for ly, (a, b) in zip(eng.layers.values(), caught):
        assert torch.equal(ly.dense_A, a) and torch.equal(ly.dense_B, b)
        assert ly._ext is not None  # the A columns rows of the base weight's matrix
    if dtype == "fp32":  # (bf16 logits of two layouts differ by more than rounding tests can bound)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    state = fixed.tables_state(eng)
    with torch.no_grad():
        next(iter(eng.stack_layers.values())).stack_A.mul_(2.0)
    assert fixed.stack_catch_up(eng, state) is None


def test_width_is_what_the_gather_concatenates(setup):
    eng, _ = setup
    for rows in (FIRST, SECOND, [Row(active=False)], [Row([1], [1.0])], [Row(user=0)]):
        rt = eng.routing(rows)
        for layer in eng.layers.values():
            got = routing.gathered(layer, rt)
            assert routing.width(layer, rt) == (0 if got is None else got[0].shape[1]), rows


def test_a_gather_of_one_table_concatenates_nothing(setup):
    """A bank's training gathers one table a layer (every row one anchor): no ``cat`` of one
    tensor, a copy of the factors a layer a micro-batch (run Y's bank profile, docs/
    performance.md); rows that read two tables still concatenate them."""
    from torch.profiler import ProfilerActivity, profile

    eng, _ = setup
    layer = next(iter(eng.layers.values()))

    def cats(rows) -> int:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            got = routing.gathered(layer, eng.routing(rows))
        assert got is not None
        return sum(e.count for e in prof.key_averages() if e.key == "aten::cat")

    assert cats([Row([1], [1.0]), Row([0], [1.0])]) == 0
    assert cats(FIRST) > 0  # (anchors and a stack: the count can see a cat)


@pytest.mark.parametrize("shape, y_dtype", [((3, 5, 8), torch.float32), ((3, 8), torch.float32),
                                            ((3, 5, 8), torch.float64)])
def test_rows_added_into_the_base_output_equal_the_copy(shape, y_dtype):
    """``_add_rows(into_y=True)`` writes into the base output (no copy of it) and gives the
    same values and gradients as the out-of-place sum: prefill (3-D), a decode step (2-D),
    and a base output of another dtype than the factors (the separate add)."""
    torch.manual_seed(0)
    rows, ins, outs, r = shape[0], shape[-1], 6, 4
    x0 = torch.randn(*shape)
    w = torch.randn(outs, ins, dtype=y_dtype)
    a0, b0 = torch.randn(rows, r, ins), torch.randn(rows, outs, r)
    seed = torch.randn(*shape[:-1], outs, dtype=y_dtype)
    got = []
    for into in (False, True):
        x, a, b = (t.clone().requires_grad_(True) for t in (x0, a0, b0))
        y = torch.nn.functional.linear(x.to(y_dtype), w)
        out = routing._add_rows(x, y, a, b, into_y=into)
        assert (out.data_ptr() == y.data_ptr()) == into
        (out * seed).sum().backward()
        got.append([out.detach(), x.grad, a.grad, b.grad])
    for u, v in zip(*got):
        assert torch.equal(u, v)


def test_training_adds_each_layer_s_rows_into_its_base_output(setup):
    """Through the engine with autograd on (a bank's training), every adapted layer of a
    plain ``nn.Linear`` adds its rows into its base output: no out-of-place ``baddbmm``,
    which copies that output first."""
    from torch.profiler import ProfilerActivity, profile

    eng, tok = setup
    enc = _enc(tok, PROMPTS)
    params = eng.trainable("bank")
    try:
        with eng.route([Row([1], [1.0]), Row([0], [1.0]), Row([1], [1.0]), Row([0], [1.0])]):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                eng.model(input_ids=enc["input_ids"]).logits.sum().backward()
        assert all(p.grad is not None for p in params)
    finally:
        for p in params:
            p.grad = None
        eng.trainable(None)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("aten::baddbmm_", 0) == len(eng.layers)
    assert counts.get("aten::baddbmm", 0) == 0


def test_dense_folds_the_a_columns_into_the_base_weight_and_removal_restores_it():
    """The dense layout on a bias-free linear whose weight is in the compute dtype: the A
    columns become extra rows of one matrix whose first rows are the base weight (a view,
    no second copy); the logits equal the unfolded layout's and the routing's; a captured
    step's pointers see the weights move; removing the engine gives each base weight its
    own storage with its values unchanged."""
    from mta.decoding.routing import weight_moves
    from tests.engine_helpers import tiny_engine

    eng, model, tok = tiny_engine(users=3)
    before = {n: ly.base.weight.detach().clone() for n, ly in eng.layers.items()}
    enc = _enc(tok, PROMPTS)
    dec = GraphDecoder(model, batch=4, max_len=64)
    dec._graphs[dec._key()] = (object(), weight_moves())  # as if captured now (CPU: no graphs)
    assert not dec.stale()
    with torch.no_grad():
        with eng.route(FIRST):
            ref = model(**enc).logits
        with fixed.dense(eng, FIRST):
            folded = model(**enc).logits
        for ly in eng.layers.values():
            assert ly._ext is not None and ly.base.weight.data_ptr() == ly._ext.data_ptr()
            assert ly.dense_A.data_ptr() == ly._ext[ly.out_features:].data_ptr()
        assert dec.stale()  # a step captured before would be captured again
        for ly in eng.layers.values():
            ly.fold_dense = False
        with fixed.dense(eng, FIRST):
            plain = model(**enc).logits
        assert all(ly._ext is None for ly in eng.layers.values())
        for ly in eng.layers.values():
            ly.fold_dense = True
        with fixed.dense(eng, FIRST):
            assert torch.equal(model(**enc).logits, folded)
    torch.testing.assert_close(folded, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-5)
    layers = dict(eng.layers)
    eng.remove()
    for n, ly in layers.items():
        assert ly._ext is None and torch.equal(ly.base.weight, before[n])
        assert ly.base.weight.untyped_storage().nbytes() == ly.base.weight.numel() * ly.base.weight.element_size()


def test_dense_layers_add_into_their_base_output():
    """The dense layout, folded and not, adds each layer's columns into the base output
    (``addmm_``), never into a copy of it (an out-of-place ``addmm``), with the same logits
    as the routing."""
    from torch.profiler import ProfilerActivity, profile

    from tests.engine_helpers import tiny_engine

    eng, model, tok = tiny_engine(users=3)
    enc = _enc(tok, PROMPTS)
    with torch.no_grad():
        with eng.route(FIRST):
            ref = model(**enc).logits
        for fold in (True, False):
            for ly in eng.layers.values():
                ly.fold_dense = fold
            with fixed.dense(eng, FIRST):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    got = model(**enc).logits
            counts = {e.key: e.count for e in prof.key_averages()}
            assert counts.get("aten::addmm_", 0) == len(eng.layers), fold
            assert counts.get("aten::addmm", 0) == 0, fold
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_layers_of_one_column_layout_share_one_coefficient_buffer_and_equal_the_routing():
    """Stacks in the last block only, with a scale of their own: the dense coefficients are
    computed once per column layout (the scales sit in dense_B), so the layers with a stack
    share one buffer and those without another; the logits are the routing's, also after a
    refill of the coefficients alone for other rows."""
    from mta.decoding.routing import dense_layout
    from tests.engine_helpers import tiny_engine

    eng, model, tok = tiny_engine(b_std=0.3)
    eng.add_users(3, 2, 6.0, seed=1, b_std=0.3, last_layers=1)  # alpha 6: scale 3 for the stack columns
    enc = _enc(tok, PROMPTS)
    state = None
    for rows in (FIRST, SECOND):
        with torch.no_grad():
            with eng.route(rows):
                ref = model(**enc).logits
            same = fixed.stack_catch_up(eng, state) is not None
            state = fixed.tables_state(eng)
            with fixed.dense(eng, rows, tables=not same):
                got = model(**enc).logits
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        buffers = {id(ly.dense_W) for ly in eng.layers.values()}
        layouts = {dense_layout(ly, len(rows)) for ly in eng.layers.values()}
        assert len(buffers) == len(layouts) == 2


def test_gathered_factors_are_never_those_of_a_dead_routing_or_table():
    """The gathered-factor cache holds the routing and the tables it was built from and
    compares them by identity: a new routing (or table) that CPython puts at a dead one's
    address (same ``id``) gets its own rows' factors, never the dead one's (before, a
    server's joining prefill of one row could read a finished 4-row batch's factors)."""
    import gc
    import weakref

    from tests.engine_helpers import tiny_engine

    eng, _, _ = tiny_engine(users=3)
    layer = next(iter(eng.layers.values()))
    with torch.no_grad():
        rt = eng.routing([Row([0, 1], [0.5, 0.5], user=0)] * 4)
        routing.gathered(layer, rt)
        alive = weakref.ref(rt)
        del rt
        gc.collect()
        assert alive() is not None  # held by the cache: its address cannot be reused
        for _ in range(200):  # fresh routings of other sizes, as joins and leaves make them
            for n in (4, 1):
                rt = eng.routing([Row([n % 2], [1.0], user=n % 3)] * n)
                a, b = routing.gathered(layer, rt)
                assert a.shape[0] == b.shape[0] == n
                del rt, a, b
        stack_a = layer.stack_A
        rt = eng.routing([Row([0], [1.0], user=0)])
        first = routing.gathered(layer, rt)
        eng.add_users(3, 2, 4.0, seed=7, b_std=0.3)  # new stack tables: not the cached ones
        assert layer.stack_A is not stack_a
        assert not torch.equal(routing.gathered(layer, rt)[0], first[0])
