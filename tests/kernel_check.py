"""Run by tests/test_kernels.py in a process of its own with TRITON_INTERPRET=1 (Triton reads
it when the kernel is defined): the dense layout's kernel on the CPU through Triton's
interpreter, against torch. Prints one line per check; exits non-zero on a mismatch."""

from __future__ import annotations

import sys

import torch

from mta.decoding import fixed
from mta.decoding.step import GraphDecoder
from mta.engine import kernels
from tests.engine_helpers import FIRST, NEW, PROMPTS, SECOND, _enc, _hf, decode_engine


def main() -> int:
    assert kernels.HAVE_TRITON and kernels.INTERPRET, "needs triton and TRITON_INTERPRET=1"
    kernels.ENABLED = True  # whatever MTA_DENSE_KERNEL says
    g = torch.Generator().manual_seed(0)
    # odd sizes: rows, outputs and columns off every tile size; tokens > 1 (a prompt's rows)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2 ** -6)):
        for m, out_f, cols, tokens in ((8, 40, 37, 1), (70, 96, 130, 1), (12, 33, 20, 3)):
            full = torch.randn(m, out_f + cols, generator=g).to(dtype)
            w = torch.randn(-(-m // tokens), cols, generator=g).to(dtype)
            b = (0.1 * torch.randn(out_f, cols, generator=g)).to(dtype)
            err, config = kernels.worst_error(full, w, b, tokens)
            if not err <= tol:
                print(f"FAIL {dtype} {m}x{out_f}x{cols} tokens {tokens} config {config}: error {err:.2e}")
                return 1
            print(f"ok {dtype} {m}x{out_f}x{cols} tokens {tokens}: every config within {tol:g}")
    # the layer uses it: the dense layout's decode gives generate's greedy tokens
    calls = [0]
    inner = kernels.launch

    def counted(*a, **k):
        calls[0] += 1
        return inner(*a, **k)
    kernels.launch = counted
    eng, tok = decode_engine()
    dec = GraphDecoder(eng.model, batch=4, max_len=64)
    enc = _enc(tok, PROMPTS)
    for rows in (FIRST, SECOND):
        with fixed.dense(eng, rows):
            got = dec.generate(enc["input_ids"], enc["attention_mask"], NEW, pad_token_id=tok.pad_token_id)
        if not torch.equal(got, _hf(eng, tok, enc, rows)):
            print("FAIL the dense layout's tokens through the kernel differ from generate's")
            return 1
    if not calls[0]:
        print("FAIL the dense layout never called the kernel")
        return 1
    print(f"ok dense decode through the kernel ({calls[0]} calls) equals generate")
    # a compiled step calls it as the custom op (aot_eager: dynamo's tracing, no code generation)
    before = calls[0]
    dec = GraphDecoder(eng.model, batch=4, max_len=64, compile="aot_eager")
    with fixed.dense(eng, FIRST):
        got = dec.generate(enc["input_ids"], enc["attention_mask"], NEW, pad_token_id=tok.pad_token_id)
    if not torch.equal(got, _hf(eng, tok, enc, FIRST)) or calls[0] == before:
        print("FAIL the compiled step through the custom op differs from generate, or never called it")
        return 1
    print("ok the compiled dense step through the custom op equals generate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
