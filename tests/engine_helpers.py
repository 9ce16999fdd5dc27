"""Helpers for engine tests: a tiny model with an engine whose adapters are NOT identity."""

from __future__ import annotations

import random

import torch

from mta.decoding.batch import hf_generate
from mta.engine.engine import AdapterEngine, EngineSpec, Row
from mta.engine.train import IGNORE, Example
from mta.models.tiny import tiny_llama

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_engine(n_anchors=4, rank=4, alpha=8.0, users=0, stack_rank=2, seed=0, b_std=0.05):
    model, tok = tiny_llama(seed=0)
    eng = AdapterEngine(model, EngineSpec(n_anchors=n_anchors, rank=rank, alpha=alpha))
    eng.init_bank(seed=seed, b_std=b_std)
    if users:
        eng.add_users(users, stack_rank, 2.0 * stack_rank, seed=seed + 1, b_std=b_std)
    return eng, model, tok


def decode_engine():
    """A 4-block tiny model whose adapters clearly move greedy tokens (4 anchors of rank 4,
    3 users with rank-2 stacks), with a left-padding tokenizer: the decode-path tests."""
    model, tok = tiny_llama(seed=0, layers=4, hidden=128)
    eng = AdapterEngine(model, EngineSpec(n_anchors=4, rank=4, alpha=8.0))
    eng.init_bank(seed=0, b_std=0.3)
    eng.add_users(3, 2, 4.0, seed=1, b_std=0.3)
    tok.padding_side = "left"
    return eng, tok


def tiny_backbone(seed: int = 0, **cfg):
    """The tiny random model (seeded) with the hashing embedder, on the CPU in fp32."""
    from mta.backbone import Backbone
    from mta.config import BackboneConfig
    from mta.models import load_embedder

    model, tok = tiny_llama(seed=seed)
    return Backbone.wrap(model, tok, load_embedder("hashing-embedder"), "tiny-random-llama", "hashing-embedder",
                         BackboneConfig(device="cpu", **cfg))


def backbone_with_adapters():
    """The tiny backbone with 3 rank-4 anchors and 2 users' rank-2 stacks that move tokens."""
    bb = tiny_backbone()
    bb.engine.set_bank(3, 4, 8.0)
    bb.engine.init_bank(seed=0, b_std=0.3)
    bb.engine.add_users(2, 2, 4.0, seed=1, b_std=0.3)
    return bb


def random_examples(n: int, seed: int, vocab: int = 250, lo: int = 5, hi: int = 14) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        cut = rng.randint(1, length - 2)
        out.append(Example(tuple(ids), tuple([IGNORE] * cut + ids[cut:])))
    return out


def peft_logits(path, ids):
    """Reference: the saved PEFT adapter at ``path`` loaded by plain ``peft`` onto the tiny
    model (seed 0), its logits for ``ids``."""
    import torch
    from peft import PeftModel

    base, _ = tiny_llama(seed=0)
    pm = PeftModel.from_pretrained(base, str(path))
    pm.eval()
    with torch.no_grad():
        return pm(ids).logits


def run_through_slots(dec, seqs, slots: int) -> int:
    """Drive a SlotDecoder as the server's scheduler does (``SlotDecoder.run``: rows join as
    slots free up, finished rows leave) until every row is done. Returns how often the
    shared write position moved back (a cache shift). ``slots``: the decoder's."""
    assert dec.n == slots
    shifts, last = [0], [dec.t]

    def step():
        shifts[0] += dec.t < last[0]
        last[0] = dec.t

    dec.run(seqs, on_step=step)
    return shifts[0]


def adapter_effect_gap(eng_a, eng_b, row, ids) -> float:
    """|| (logits_a - base_a) - (logits_b - base_b) || / || logits_a - base_a ||: how far two
    trainings of the same adapter (on the same or differently rounded bases) differ in
    what the adapter does to the output."""
    effects = []
    with torch.no_grad():
        for eng in (eng_a, eng_b):
            with eng.route([row] * len(ids)):
                tuned = eng.model(ids).logits.double()
            with eng.route([Row(active=False)] * len(ids)):
                base = eng.model(ids).logits.double()
            effects.append(tuned - base)
    return float((effects[0] - effects[1]).norm() / effects[0].norm())


# the decode tests' prompts and rows (test_graph_decode, kernel_check)
PROMPTS = ["hello there", "a much longer prompt for user two", "hi", "short one"]
OTHER = ["another batch", "of four prompts here", "x", "the last of them, longer than the rest"]
FIRST = [Row([0, 1], [0.6, 0.4], user=0), Row([2], [1.0], user=2), Row(active=False), Row([3], [1.0])]
SECOND = [Row([3], [1.0], user=1), Row([1, 2], [0.5, 0.5]), Row([0], [1.0], user=2), Row(active=False)]
NEW = 12


def _enc(tok, prompts):
    return tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)


def _hf(eng, tok, enc, rows, **kw):
    kw = {"max_new_tokens": NEW, "do_sample": False, "eos_token_id": None, **kw}
    return hf_generate(eng, rows, enc["input_ids"], enc["attention_mask"], pad_token_id=tok.pad_token_id, **kw)


def random_stack(eng, seed: int, rank: int = 2, a_scale: float = 1.0) -> dict:
    """A user's stacked factors for ``load_user`` (random, not identity), on the engine's device."""
    gen = torch.Generator().manual_seed(seed)
    return {n: ((torch.randn(rank, ly.in_features, generator=gen) * a_scale).to(eng.device),
                torch.randn(ly.out_features, rank, generator=gen).to(eng.device))
            for n, ly in eng.stack_layers.items()}


def join_after_a_stack_load(dec, eng, tok, batch, running):
    """While ``running`` decodes: a new stack loaded into user slot 1 (the server's admission
    of a user not resident), a row of that user joining, both decoded to their ends.
    Returns the joining row."""
    from mta.decoding.eager import Sequence

    eng.load_user(1, random_stack(eng, 7, a_scale=0.3), alpha=6.0)
    joining = Sequence(tok("hi there", add_special_tokens=False)["input_ids"], Row([2], [1.0], user=1), 8, frozenset())
    batch = dec.merge(batch, dec.prefill([joining]))
    while any(s.finish is None for s in (running, joining)):
        batch = dec.keep(batch, [k for k, s in enumerate(batch.seqs) if s.finish is None])
        dec.step(batch)
    return joining
