"""The engine over transformers' static KV cache with pinned routing (the decode path
that compiles): greedy tokens identical to the eager engine's, on the tiny model on the
CPU, eager and compiled; a second batch of users with the same shape refills the same
buffers and reuses the compiled step (no second graph)."""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig

from mta.decoding import routing
from mta.decoding.batch import hf_generate, static_generate
from mta.engine.engine import Row
from tests.engine_helpers import decode_engine

PROMPTS = ["hello there", "a much longer prompt for user two", "hi", "short one"]
FIRST = [Row([0, 1], [0.6, 0.4], user=0), Row([2], [1.0], user=2), Row(active=False), Row([3], [1.0])]
SECOND = [Row([3], [1.0], user=1), Row([1, 2], [0.5, 0.5]), Row([0], [1.0], user=2), Row(active=False)]
KW = dict(max_new_tokens=12, do_sample=False, eos_token_id=None)


@pytest.fixture(scope="module")
def setup():
    eng, tok = decode_engine()
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    return eng, tok, enc


def _eager(eng, tok, enc, rows):
    return hf_generate(eng, rows, enc["input_ids"], enc["attention_mask"], pad_token_id=tok.pad_token_id, **KW)


def test_static_cache_with_pinned_routing_equals_the_eager_engine(setup):
    eng, tok, enc = setup
    for rows in (FIRST, SECOND):
        want = _eager(eng, tok, enc, rows)
        for width in (None, 16):  # padded rank directions are zeros: exact
            got = static_generate(eng, rows, enc["input_ids"], enc["attention_mask"], width=width,
                                      pad_token_id=tok.pad_token_id, **KW)
            assert torch.equal(got, want), (rows, width)
    base = hf_generate(eng, None, enc["input_ids"], enc["attention_mask"], pad_token_id=tok.pad_token_id, **KW)
    assert not torch.equal(base, _eager(eng, tok, enc, FIRST))  # the adapters matter: the check can fail
    assert eng.backend is routing.GATHERED  # unpinned after the call: the eager path is back
    with pytest.raises(ValueError, match="rank directions"):
        static_generate(eng, FIRST, enc["input_ids"], enc["attention_mask"], width=2, pad_token_id=0, **KW)


def test_compiled_decode_equals_eager_and_is_reused_for_new_users(setup):
    from torch._dynamo.utils import counters

    eng, tok, enc = setup
    cc = CompileConfig(fullgraph=False, mode="default")
    cc._compile_all_devices = True  # transformers compiles only on accelerators unless told
    torch._dynamo.reset()
    counters.clear()
    layer = next(iter(eng.layers.values()))
    got = static_generate(eng, FIRST, enc["input_ids"], enc["attention_mask"], width=16, compile_config=cc,
                              pad_token_id=tok.pad_token_id, **KW)
    assert torch.equal(got, _eager(eng, tok, enc, FIRST))
    graphs, buffer = counters["stats"]["unique_graphs"], layer.pin_A.data_ptr()
    assert graphs >= 1
    got = static_generate(eng, SECOND, enc["input_ids"], enc["attention_mask"], width=16, compile_config=cc,
                              pad_token_id=tok.pad_token_id, **KW)
    assert torch.equal(got, _eager(eng, tok, enc, SECOND))
    assert counters["stats"]["unique_graphs"] == graphs  # the same compiled step, refilled buffers
    assert layer.pin_A.data_ptr() == buffer
