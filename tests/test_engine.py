"""The engine's forward pass against its formula, per-row routing, removal, generation."""

from __future__ import annotations

import re

import pytest
import torch

from mta.decoding.batch import hf_generate
from mta.engine.engine import AdapterEngine, EngineSpec, Row
from mta.errors import MtaError
from mta.fusion import merge_delta, merge_factor
from mta.models.tiny import tiny_llama
from tests.engine_helpers import tiny_engine


def _layer_expect(layer, x, anchors, weights, mode, user=None, eng=None):
    """Dense float64 reference of one injected layer for one row."""
    W = layer.base.weight.double()
    y = x.double() @ W.T
    if anchors:
        A, B = layer.bank_A[anchors].double(), layer.bank_B[anchors].double()
        w = torch.tensor(weights, dtype=torch.float64)
        if mode == "delta":
            dW = merge_delta(A, B, w)
        else:
            a, b = merge_factor(A, B, w)
            dW = b @ a
        y = y + layer.scale * x.double() @ dW.T
    if user is not None:
        dS = layer.stack_B[user].double() @ layer.stack_A[user].double()
        rank, alpha = eng.slot_lora[user]
        y = y + (alpha / rank) * x.double() @ dS.T
    return y


@pytest.mark.parametrize("mode", ["delta", "factor"])
def test_layer_matches_formula_per_row(mode):
    eng, model, _ = tiny_engine(n_anchors=5, users=3, b_std=0.2)
    layer = eng.layers["model.layers.1.mlp.down_proj"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, layer.in_features, generator=g)
    mixes = [([0, 3], [0.7, 0.3], 2), ([4], [1.0], None), None, ([1, 2], [0.5, 0.5], 0)]
    if mode == "factor":  # merges other than the exact one route through a fused table
        eng.install_fused([m[:2] for m in mixes if m], "factor")
        fused = iter(range(3))
        rows = [Row(fused=next(fused), user=m[2]) if m else Row(active=False) for m in mixes]
    else:
        rows = [Row(m[0], m[1], user=m[2]) if m else Row(active=False) for m in mixes]
    with eng.route(rows), torch.no_grad():
        y = layer(x)
    for b, m in enumerate(mixes):
        if m is None:
            expect = x[b].double() @ layer.base.weight.double().T
        else:
            expect = _layer_expect(layer, x[b], m[0], m[1], mode, m[2], eng)
        torch.testing.assert_close(y[b].double(), expect, atol=1e-5, rtol=1e-5)


def test_batched_equals_one_by_one_logits():
    eng, model, _ = tiny_engine(n_anchors=4, users=2, b_std=0.2)
    ids = torch.randint(3, 200, (3, 9), generator=torch.Generator().manual_seed(2))
    rows = [Row([0, 1], [0.6, 0.4], user=1), Row([2], [1.0]), Row([3, 0], [0.5, 0.5], user=0)]
    with eng.route(rows), torch.no_grad():
        together = model(ids).logits
    for b, r in enumerate(rows):
        with eng.route([r]), torch.no_grad():
            alone = model(ids[b:b + 1]).logits
        torch.testing.assert_close(together[b:b + 1], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_row_off_and_removal_restore_the_base_model(family):
    """Both block families the registry holds; Qwen2's q/k/v projections carry a bias."""
    model, _ = tiny_llama(seed=0, family=family)
    assert (model.model.layers[0].self_attn.q_proj.bias is not None) == (family == "qwen2")
    ids = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eng = AdapterEngine(model, EngineSpec(n_anchors=2, rank=4))
    eng.init_bank(b_std=0.3)
    with eng.route([Row([0], [1.0]), Row(active=False)]), torch.no_grad():
        out = model(ids).logits
    assert torch.equal(out[1], base[1]) and not torch.allclose(out[0], base[0])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)  # no routing set: base model
    eng.remove()
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_unknown_target_module_is_reported():
    model, _ = tiny_llama(seed=0)
    with pytest.raises(MtaError, match=r"unknown target module\(s\) \['c_attn'\].*q_proj"):
        AdapterEngine(model, EngineSpec(n_anchors=1, target_modules=("q_proj", "c_attn")))


def test_routing_errors_are_bugs_not_user_errors():
    """A bad row is the caller's bug: ValueError, which the CLI does not dress up as exit 2."""
    eng, _, _ = tiny_engine(n_anchors=2, users=1)
    for row, match in ((Row([5], [1.0]), r"anchor slots \[5\] out of range"),
                       (Row(user=3), "user slots .* out of range"),
                       (Row([0, 1], [1.0]), "as many weights as anchors"),
                       (Row([0, 1], [0.5, float("nan")]), "weights contain NaN or inf"),
                       (Row([], [1.0]), "weights without anchors"),
                       (Row(fused=0), "fused slots .* out of range")):
        with pytest.raises(ValueError, match=match) as e:
            eng.routing([row])
        assert not isinstance(e.value, MtaError)
    with pytest.raises(ValueError, match="must sum to 1"):
        eng.install_fused([([0, 1], [0.9, 0.9])], "factor")


def test_svd_rows_equal_truncated_merge():
    eng, model, _ = tiny_engine(n_anchors=3, b_std=0.2)
    eng.install_fused([([0, 1], [0.5, 0.5]), ([2], [1.0])], "svd", svd_rank=4)
    layer = eng.layers["model.layers.0.self_attn.q_proj"]
    x = torch.randn(2, 2, layer.in_features)
    with eng.route([Row(fused=0), Row(fused=1)]), torch.no_grad():
        y = layer(x)
    # rank 4 >= rank of a single anchor (4): row 1 must equal that anchor exactly
    expect = _layer_expect(layer, x[1], [2], [1.0], "delta", eng=eng)
    torch.testing.assert_close(y[1].double(), expect, atol=1e-5, rtol=1e-5)


def _encode(tok, texts):
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@pytest.mark.parametrize("sample", [False, True])
def test_mixed_user_generation_equals_one_by_one(sample):
    eng, model, tok = tiny_engine(n_anchors=4, users=3, b_std=0.3)
    tok.padding_side = "left"
    prompts = ["hello there", "a much longer prompt for user two", "hi", "short one"]
    rows = [Row([0, 1], [0.6, 0.4], user=0), Row([2], [1.0], user=2), Row(active=False),
            Row([3], [1.0])]
    kw = dict(max_new_tokens=8, pad_token_id=tok.pad_token_id, eos_token_id=None)
    if sample:
        kw.update(do_sample=True, top_k=0, temperature=1e-4)  # sampling path, near-greedy
    else:
        kw.update(do_sample=False)
    enc = _encode(tok, prompts)
    together = hf_generate(eng, rows, enc["input_ids"], enc["attention_mask"], **kw)
    for b, r in enumerate(rows):
        one = _encode(tok, [prompts[b]])
        alone = hf_generate(eng, [r], one["input_ids"], one["attention_mask"], **kw)
        n = one["input_ids"].shape[1]
        assert together[b, -8:].tolist() == alone[0, n:].tolist()
    # the users really differ: row 0 and row 2 (base) diverge on the same prompt
    enc2 = _encode(tok, [prompts[0]] * 2)
    pair = hf_generate(eng, [rows[0], rows[2]], enc2["input_ids"], enc2["attention_mask"], **kw)
    assert pair[0].tolist() != pair[1].tolist()


def test_generation_cache_sees_weight_updates():
    eng, model, _ = tiny_engine(n_anchors=2, users=2, b_std=0.2)
    ids = torch.randint(3, 200, (2, 5), generator=torch.Generator().manual_seed(7))
    rows = [Row([0], [1.0], user=0), Row([1], [1.0], user=1)]
    with eng.route(rows), torch.no_grad():
        first = model(ids).logits
        again = model(ids).logits  # served from the gathered-factor cache
        assert torch.equal(first, again)
        new = {k: (a * 3, b * 3) for k, (a, b) in eng.user_tensors(1).items()}
        eng.load_user(1, new)  # in place: the cache must not serve stale factors
        changed = model(ids).logits
    assert torch.equal(changed[0], first[0]) and not torch.allclose(changed[1], first[1])
    with eng.route(rows), torch.no_grad():
        assert torch.equal(model(ids).logits, changed)


def test_a_scoring_forward_keeps_no_layers_gathered_factors_and_scores_the_same(monkeypatch):
    """A routing of one forward (``reuse=False``: the label and rating rules' scoring, the
    held-out losses) leaves no layer holding its rows' gathered factors: kept, they are every
    row's copy of its adapters in every layer at once (2.4 GB for 64 rows at 1.5B). The
    losses are those of a forward that keeps them."""
    from mta.engine import train as engine_train
    from tests.engine_helpers import random_examples

    eng, model, tok = tiny_engine(n_anchors=2, users=2, b_std=0.2)
    ids = torch.randint(3, 200, (2, 5), generator=torch.Generator().manual_seed(7))
    rows = [Row([0], [1.0], user=0), Row([1], [1.0], user=1)]
    held = lambda: sum(ly._cache is not None for ly in eng.layers.values())  # noqa: E731
    with torch.no_grad():
        with eng.route(rows):
            kept = model(ids).logits
            assert held() == len(eng.layers)  # generation: kept for the next step
        with eng.route(rows, reuse=False):
            once = model(ids).logits
            assert held() == 0
    assert torch.equal(kept, once)

    seen = []
    real = engine_train.target_token_loss

    def spy(m, i, labels):
        out = real(m, i, labels)
        seen.append(held())
        return out

    pairs = [(rows[k % 2], e) for k, e in enumerate(random_examples(6, seed=1))]
    before = engine_train.row_losses(eng, pairs, tok.pad_token_id, max_rows=4)
    monkeypatch.setattr(engine_train, "target_token_loss", spy)
    assert engine_train.row_losses(eng, pairs, tok.pad_token_id, max_rows=4) == before
    assert seen == [0, 0]


def test_a_lower_rank_stack_loaded_over_a_higher_one_leaves_no_old_directions():
    """``load_user`` writes the user's rank and zeroes the table's directions past it: a
    rank-1 stack loaded into a slot that held a rank-3 one is that rank-1 stack alone."""
    from tests.engine_helpers import random_stack

    eng, model, _ = tiny_engine(n_anchors=2, users=2, b_std=0.2)
    eng.alloc_stacks(2, 3, list(eng.stack_layers) or list(eng.layers))
    eng.load_user(0, random_stack(eng, 1, rank=3), alpha=3.0)
    low = random_stack(eng, 2, rank=1)
    eng.load_user(0, low, alpha=1.0)
    for name, ly in eng.stack_layers.items():
        assert torch.equal(ly.stack_A[0, :1], low[name][0]) and not ly.stack_A[0, 1:].any()
        assert torch.equal(ly.stack_B[0, :, :1], low[name][1]) and not ly.stack_B[0, :, 1:].any()
    ids = torch.randint(3, 200, (1, 5), generator=torch.Generator().manual_seed(3))
    with eng.route([Row(user=0)]), torch.no_grad():
        loaded = model(ids).logits
    eng.alloc_stacks(2, 1, list(eng.stack_layers))  # a fresh rank-1 table holding the same stack
    eng.load_user(0, low, alpha=1.0)
    with eng.route([Row(user=0)]), torch.no_grad():
        torch.testing.assert_close(model(ids).logits, loaded, atol=1e-6, rtol=0)


def test_host_factors_move_as_one_buffer_cast_and_shaped_as_they_were():
    """``host_to_device`` (a pageable stack's load onto a GPU) hands back each factor in the
    table's dtype and shape, views of ONE buffer (one transfer, not one a factor),
    non-contiguous factors included. On the CPU it runs the same flattening and split."""
    from mta.engine.engine import host_to_device

    gen = torch.Generator().manual_seed(0)
    factors = [torch.randn(2, 7, generator=gen), torch.randn(5, 2, generator=gen).t(),
               torch.randn(3, generator=gen), torch.randn(4, 1, 6, generator=gen)]
    moved = host_to_device(factors, "cpu", torch.bfloat16)
    assert [m.shape for m in moved] == [f.shape for f in factors]
    for m, f in zip(moved, factors):
        assert m.dtype == torch.bfloat16 and torch.equal(m, f.to(torch.bfloat16))
    assert len({m.untyped_storage().data_ptr() for m in moved}) == 1
    assert host_to_device([], "cpu", torch.float32) == []


def test_host_factors_are_flattened_by_numpy_where_it_holds_their_dtype(monkeypatch):
    """``flat_host`` (the one buffer of a pageable stack's load) concatenates with numpy, one
    single-threaded copy, not ``torch.cat``'s parallel region a part, which waits for a time
    slice a part on a host other processes keep busy (OPPU's stacks in run AA); a dtype numpy
    lacks (bfloat16), or parts of several dtypes, go through ``torch.cat``. The values, order
    and dtype are ``torch.cat``'s either way."""
    import mta.engine.engine as engine_mod
    from mta.engine.engine import flat_host

    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(2, 7, generator=gen), torch.randn(5, 2, generator=gen).t(), torch.randn(3, generator=gen)]
    cats = []
    real_cat = torch.cat
    monkeypatch.setattr(engine_mod.torch, "cat", lambda ts, *a, **kw: cats.append(len(ts)) or real_cat(ts, *a, **kw))
    for src, dtype, by_torch in ((torch.float32, torch.float32, False), (torch.float32, torch.bfloat16, False),
                                 (torch.float16, torch.float32, False), (torch.bfloat16, torch.float32, True)):
        cats.clear()
        ts = [t.to(src) for t in parts]
        flat = flat_host(ts, dtype)
        want = real_cat([t.reshape(-1).to(dtype) for t in ts])
        assert flat.dtype == dtype and flat.is_contiguous() and torch.equal(flat, want), (src, dtype)
        assert bool(cats) == by_torch, (src, dtype)
    cats.clear()
    mixed = flat_host([parts[0], parts[1].double()], torch.float32)
    assert cats == [2] and torch.equal(mixed, real_cat([parts[0].reshape(-1), parts[1].reshape(-1)]))
    cats.clear()  # parts not in host memory (a meta tensor stands for a device's): torch.cat, not numpy
    on_device = flat_host([torch.empty(3, device="meta"), torch.empty(2, device="meta")], torch.float32)
    assert cats == [2] and on_device.shape == (5,) and on_device.device.type == "meta"


def test_finite_is_exact_where_the_one_norm_overflows_and_finds_each_kind_of_bad_value():
    """``finite`` (a stack's check before its load) decides by one norm over every factor,
    and checks again tensor by tensor where the norm says no: values so large that the norm
    overflows are still finite; one NaN, inf or -inf anywhere is not; integer and empty
    tensors pass."""
    from mta.engine.engine import all_finite, finite

    good = [torch.randn(3, 4), torch.zeros(0, 2), torch.randn(2, 5, dtype=torch.bfloat16)]
    huge = torch.full((4,), 3e38)
    assert not all_finite([huge])  # the norm overflows ...
    assert finite(good + [huge]) and finite([]) and finite([torch.ones(3, dtype=torch.int64)])  # ... finite says so
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.randn(6, 7)
        t[4, 1] = bad
        assert not finite(good + [t, huge])


def test_factors_brought_to_the_host_are_each_their_own_contiguous_tensor():
    """``device_to_host`` (an adapter's save) gives each factor back equal, contiguous and
    in a storage of its own (safetensors refuses shared ones), a transposed view included.
    Its one-copy-a-device path is `tests/test_gpu.py`'s."""
    from mta.engine.engine import device_to_host

    gen = torch.Generator().manual_seed(1)
    factors = [torch.randn(3, 4, generator=gen), torch.randn(4, 2, generator=gen).t()]
    back = device_to_host(factors)
    assert all(torch.equal(b, f) and b.is_contiguous() for b, f in zip(back, factors))
    assert back[0].untyped_storage().data_ptr() != back[1].untyped_storage().data_ptr()


def test_a_refused_stack_or_anchor_leaves_its_slot_as_it_was_and_names_its_layer():
    """``load_user`` checks every layer's factors (rank, shapes, finiteness: one check over
    all of them) before its first write: a stack refused at its last layer leaves the slot,
    its scale and the tables' versions as they were (a refusal at one layer used to leave
    the layers before it written), and the error names the layer at fault. ``checked``
    skips the finiteness check (the read-ahead checked on its thread) and nothing else."""
    from tests.engine_helpers import random_stack

    eng, _, _ = tiny_engine(n_anchors=2, users=2, b_std=0.2)
    eng.alloc_stacks(2, 2, list(eng.stack_layers))
    eng.load_user(0, random_stack(eng, 1), alpha=2.0)
    held = {n: (ly.stack_A[0].clone(), ly.stack_B[0].clone(), ly.stack_scale[0].clone())
            for n, ly in eng.stack_layers.items()}
    versions, last = eng.stack_versions(), list(eng.stack_layers)[-1]

    def unchanged():
        assert eng.stack_versions() == versions
        for n, ly in eng.stack_layers.items():
            a, b, c = held[n]
            assert torch.equal(ly.stack_A[0], a) and torch.equal(ly.stack_B[0], b) and torch.equal(ly.stack_scale[0], c)

    bad = random_stack(eng, 2)
    bad[last][1][0, 0] = float("nan")
    with pytest.raises(MtaError, match=rf"{re.escape(last)}: adapter weights contain NaN or inf"):
        eng.load_user(0, bad, alpha=4.0)
    unchanged()
    wide = random_stack(eng, 3)
    wide[last] = (wide[last][0], torch.zeros(wide[last][1].shape[0] + 1, 2))
    with pytest.raises(MtaError, match=rf"{re.escape(last)}: shape mismatch"):
        eng.load_user(0, wide, alpha=4.0, checked=True)
    unchanged()
    with pytest.raises(ValueError, match="slot 2 out of range"):
        eng.load_user(2, random_stack(eng, 4), alpha=4.0)
    unchanged()
    good = random_stack(eng, 5)
    eng.load_user(0, good, alpha=4.0, checked=True)  # the same writes as unchecked
    for n, ly in eng.stack_layers.items():
        assert torch.equal(ly.stack_A[0], good[n][0]) and torch.equal(ly.stack_B[0], good[n][1])
        assert float(ly.stack_scale[0]) == 2.0  # alpha / rank
    assert eng.stack_loads(versions) == [0]  # a load the dense tables can catch up on
    # an anchor is loaded the same way: every check first, the bank slot kept on a refusal
    kept = eng.anchor_tensors(1)
    bad_anchor = {n: (a + 1, b) for n, (a, b) in kept.items()}
    last_bank = list(bad_anchor)[-1]
    bad_anchor[last_bank][1][0, 0] = float("inf")
    with pytest.raises(MtaError, match=rf"{re.escape(last_bank)}: adapter weights contain NaN or inf"):
        eng.load_anchor(1, bad_anchor)
    assert all(torch.equal(eng.anchor_tensors(1)[n][0], a) for n, (a, _) in kept.items())
