"""The server's per-step host cost of streaming text: each running row's new text after a
decode step, decoded incrementally (``mta.serving.text.TextStream``, tokenizers'
``DecodeStream``) against decoding every row's whole token list again (the reference, what
the scheduler did before), in the same run.

    .venv/bin/python benchmarks/detok.py                         # SmolLM2's tokenizer, 64 rows
    .venv/bin/python benchmarks/detok.py --tokenizer tiny --lengths 16 --rows 4   # a smoke run

For each answer length L it generates ROWS random answers of L tokens (seeded; ids from the
tokenizer's ordinary vocabulary), feeds them one token a step as a decode loop does, and
times the whole text streaming over the L steps; it checks that the incremental text is a
prefix of decoding again at every step (it may trail by a token that ends inside a
character; the share of such steps is reported) and that finished answers are equal.
Prints per-step milliseconds and the ratio; the JSON goes to --out.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mta.serving.text import TextStream  # noqa: E402


def tokenizer(name: str):
    if name == "tiny":
        from mta.models.tiny import tiny_llama
        return tiny_llama(seed=0)[1]
    from transformers import AutoTokenizer

    from mta.models.loading import resolve_model_dir
    return AutoTokenizer.from_pretrained(resolve_model_dir(name, "llm"))


def run(tok, rows: int, length: int, seed: int) -> dict:
    rng = random.Random(seed)
    low = min(200, tok.vocab_size // 4)
    answers = [[rng.randrange(low, tok.vocab_size) for _ in range(length)] for _ in range(rows)]
    def steps(each):  # the rows' token lists growing one token a step, as a decode loop's do
        cur, out = [[] for _ in answers], []
        for n in range(length):
            for c, a in zip(cur, answers):
                c.append(a[n])
            out.append(each(cur))
        return out

    t = time.perf_counter()
    whole = steps(lambda cur: [tok.decode(c, skip_special_tokens=True).rstrip("\ufffd") for c in cur])
    ref = time.perf_counter() - t
    streams = [TextStream(tok) for _ in answers]
    t = time.perf_counter()
    inc = steps(lambda cur: [s.update(c) for s, c in zip(streams, cur)])
    new = time.perf_counter() - t
    # the incremental text may trail by a token that ends inside a character (TextStream)
    if not all(j.startswith(i) for si, sw in zip(inc, whole) for i, j in zip(si, sw)):
        raise SystemExit(f"the incremental text is not a prefix of decoding again at length {length}")
    lag = sum(i != j for si, sw in zip(inc, whole) for i, j in zip(si, sw)) / (rows * length)
    final = all(s.final(a) == tok.decode(a, skip_special_tokens=True) for s, a in zip(streams, answers))
    if not final:
        raise SystemExit("a finished answer differs from the tokenizer's decode")
    return {"rows": rows, "length": length, "reference_ms_per_step": 1000 * ref / length,
            "incremental_ms_per_step": 1000 * new / length, "speedup": ref / new,
            "steps_trailing_share": lag}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", default="smollm2-135m", help="a registry model's tokenizer, or tiny")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--lengths", default="64,128,512")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/detok.json"))
    a = ap.parse_args()
    tok = tokenizer(a.tokenizer)
    rows = [run(tok, a.rows, int(n), a.seed) for n in a.lengths.split(",")]
    print(f"streaming text, {a.rows} rows, tokenizer {a.tokenizer}: host ms per decode step")
    print(f"{'tokens':>7} {'decode again':>13} {'incremental':>12} {'speedup':>8}")
    for r in rows:
        print(f"{r['length']:>7} {r['reference_ms_per_step']:>13.3f} {r['incremental_ms_per_step']:>12.3f} "
              f"{r['speedup']:>7.1f}x")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"tokenizer": a.tokenizer, "rows": rows}, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
