"""The server's incremental text (mta.serving.text): after every token it is the text the
tokenizer gives for all of them, whole characters only, and at the end exactly
``tokenizer.decode`` (tiny byte-level tokenizer, random ids: invalid UTF-8 included)."""

from __future__ import annotations

import random

from mta.models.tiny import tiny_llama
from mta.serving.text import TextStream


def test_incremental_text_equals_decoding_every_token_again():
    _, tok = tiny_llama(seed=0)
    assert tok.is_fast
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        ts = TextStream(tok)
        for n in range(1, len(ids) + 1):
            assert ts.update(ids[:n]) == tok.decode(ids[:n], skip_special_tokens=True).rstrip("\ufffd"), ids[:n]
        assert ts.final(ids) == tok.decode(ids, skip_special_tokens=True)
    ids = tok("héllo wörld, ça va? 日本語", add_special_tokens=False)["input_ids"]
    ts = TextStream(tok)
    assert [ts.update(ids[:n]) for n in range(1, len(ids) + 1)][-1] == "héllo wörld, ça va? 日本語"


def test_a_slow_tokenizer_decodes_the_whole_list():
    class Slow:
        is_fast = False
        calls = 0

        def decode(self, ids, skip_special_tokens=True):
            Slow.calls += 1
            return "".join(chr(97 + i) for i in ids) + ("\ufffd" if ids[-1] == 25 else "")

    ts = TextStream(Slow())
    assert ts.update([0, 1]) == "ab" and ts.update([0, 1, 25]) == "abz" and Slow.calls == 2
    assert ts.final([0, 1, 25]) == "abz\ufffd"
