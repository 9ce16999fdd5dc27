"""The iteration-level decode loop: rows that join between steps, and rows that leave,
get exactly the greedy tokens they get alone (tiny model, fp32, CPU)."""

from __future__ import annotations

import torch

from mta.engine.engine import Row
from mta.serving.decode import Decoder, Sequence
from tests.engine_helpers import tiny_backbone


def _alone(bb, prompt: list[int], row: Row, n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = bb.engine.generate([row], ids, torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=bb.tokenizer.pad_token_id, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def test_rows_joining_and_leaving_equal_each_alone():
    bb = tiny_backbone()
    eng = bb.engine
    eng.set_bank(3, 4, 8.0)
    eng.init_bank(seed=0, b_std=0.3)
    eng.add_users(2, 2, 4.0, seed=1, b_std=0.3)
    tok = bb.tokenizer
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in
               ("hello there", "a much longer prompt for the second user", "hi", "mid length one")]
    rows = [Row([0, 1], [0.6, 0.4], user=0), Row([2], [1.0], user=1), Row(active=False), Row([1], [1.0])]
    lengths = [9, 4, 7, 6]
    seqs = [Sequence(p, r, n, frozenset()) for p, r, n in zip(prompts, rows, lengths)]
    dec = Decoder(bb, tok.pad_token_id)
    batch = dec.prefill(seqs[:2])
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


def test_stop_tokens_end_a_row():
    bb = tiny_backbone()
    tok = bb.tokenizer
    p = tok("stop me", add_special_tokens=False)["input_ids"]
    free = _alone(bb, p, Row(active=False), 8)
    k = next(i for i in range(1, 8) if free[i] not in free[:i])  # a token not seen before it
    s = Sequence(p, Row(active=False), 8, frozenset({free[k]}))
    dec = Decoder(bb, tok.pad_token_id)
    b = dec.prefill([s])
    while s.finish is None:
        dec.step(b)
    assert s.finish == "stop" and s.tokens == free[:k]
