"""CPU benchmark of the adapter engine against the base model and PEFT, in one run.

For each shape (tiny, SmolLM2-135M's shape with random weights: speed depends only on
shape) it times, with the same rows and tokens:

- forward+backward (gradients flow through every layer to the input embeddings, as in
  LoRA training) and
- greedy generation (KV cache, time per generated token, all rows together),

for: the bare base model; the engine with one adapter on every row; the engine with
16 rows of 16 different users, each mixing a top-2 of a 16-anchor bank plus its own
rank-2 stacked adapter; PEFT with one LoRA; PEFT's mixed batch (``adapter_names``,
16 distinct adapters). Ratios are to the base model measured in the same run.

    .venv/bin/python benchmarks/engine_cpu.py [--out runs/bench/engine_cpu.json] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from rich.console import Console
from rich.table import Table
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mta.engine.config import LLAMA_TARGETS  # noqa: E402
from mta.engine.engine import AdapterEngine, EngineSpec, Row  # noqa: E402

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=260),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True),
}
ROWS, RANK, STACK_RANK, ANCHORS = 16, 8, 2, 16


def make_model(shape: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048)
    cfg.pad_token_id = 0
    m = LlamaForCausalLM(cfg).float().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def timed(fn, repeats: int, min_seconds: float = 1.0) -> float:
    """Median wall time of ``fn`` after one warm-up; at least ``repeats`` runs and at
    least ``min_seconds`` in total (fast configurations get more runs)."""
    fn()
    out: list[float] = []
    while len(out) < repeats or (sum(out) < min_seconds and len(out) < 50):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def fwd_bwd(model, ids, ctx=contextlib.nullcontext):
    def run():
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with ctx():
            loss = model(inputs_embeds=emb, use_cache=False).logits.float().logsumexp(-1).mean()
            loss.backward()
        for p in model.parameters():
            p.grad = None
    return run


def generate(model, ids, new_tokens, ctx=contextlib.nullcontext, **kw):
    mask = torch.ones_like(ids)

    def run():
        with torch.no_grad(), ctx():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kw)
    return run


def bench_shape(shape: str, seq: int, prompt: int, new_tokens: int, repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    vocab = SHAPES[shape]["vocab_size"]
    ids = torch.randint(3, vocab, (ROWS, seq), generator=g)
    pids = torch.randint(3, vocab, (ROWS, prompt), generator=g)
    per_tok = ROWS * new_tokens
    results = []

    def record(name, fb, gen, note=""):
        results.append({"shape": shape, "config": name, "fwd_bwd_s": fb,
                        "gen_s_per_token": None if gen is None else gen / per_tok, "note": note})

    model = make_model(shape)
    record("base", timed(fwd_bwd(model, ids), repeats), timed(generate(model, pids, new_tokens), repeats))

    eng = AdapterEngine(model, EngineSpec(n_anchors=1, rank=RANK, alpha=2 * RANK))
    eng.init_bank(b_std=0.01)
    eng.trainable("bank")
    one = [Row([0], [1.0])] * ROWS
    ctx = lambda: eng.route(one)  # noqa: E731
    record("mta engine, one adapter", timed(fwd_bwd(model, ids, ctx), repeats),
           timed(generate(model, pids, new_tokens, ctx), repeats))
    eng.remove()

    eng = AdapterEngine(model, EngineSpec(n_anchors=ANCHORS, rank=RANK, alpha=2 * RANK))
    eng.init_bank(b_std=0.01)
    eng.add_users(ROWS, STACK_RANK, 2.0 * STACK_RANK, b_std=0.01)
    eng.trainable("stack")
    mixed = [Row([u % ANCHORS, (u + 5) % ANCHORS], [0.6, 0.4], user=u) for u in range(ROWS)]
    ctx = lambda: eng.route(mixed)  # noqa: E731
    record(f"mta engine, {ROWS} users x top-2 of {ANCHORS} + stack",
           timed(fwd_bwd(model, ids, ctx), repeats), timed(generate(model, pids, new_tokens, ctx), repeats))
    eng.remove()

    lcfg = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(LLAMA_TARGETS), lora_dropout=0.0)
    pm = get_peft_model(model, lcfg, adapter_name="a0")
    record("peft, one adapter", timed(fwd_bwd(pm, ids), repeats),
           timed(generate(pm, pids, new_tokens), repeats))
    for i in range(1, ROWS):
        pm.add_adapter(f"a{i}", lcfg)
    names = [f"a{i}" for i in range(ROWS)]
    pm.eval()
    try:
        fb = timed(lambda: _peft_mixed_fwd_bwd(pm, ids, names), repeats)
        note = ""
    except ValueError as e:  # PEFT refuses adapter_names in training mode
        fb, note = None, f"fwd+bwd refused by PEFT: {str(e).splitlines()[0][:80]}"
    record(f"peft mixed batch ({ROWS} adapters)", fb,
           timed(generate(pm, pids, new_tokens, adapter_names=names), repeats), note)
    return results


def _peft_mixed_fwd_bwd(pm, ids, names):
    pm.train()
    try:
        emb = pm.get_input_embeddings()(ids).detach().requires_grad_(True)
        pm(inputs_embeds=emb, adapter_names=names).logits.float().logsumexp(-1).mean().backward()
    finally:
        pm.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench/engine_cpu.json"))
    ap.add_argument("--quick", action="store_true", help="tiny shape only, 1 repeat (smoke test)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    shapes = ["tiny"] if args.quick else list(SHAPES)
    for shape in shapes:
        seq, prompt, new = (32, 16, 8) if shape == "tiny" else (64, 32, 8)
        rows += bench_shape(shape, seq, prompt, new, 1 if args.quick else args.repeats)
    for r in rows:
        base = next(b for b in rows if b["shape"] == r["shape"] and b["config"] == "base")
        r["fwd_bwd_ratio"] = None if r["fwd_bwd_s"] is None else r["fwd_bwd_s"] / base["fwd_bwd_s"]
        r["gen_ratio"] = r["gen_s_per_token"] / base["gen_s_per_token"]
    threads = torch.get_num_threads()
    table = Table(title=f"engine on CPU ({threads} threads), {ROWS} rows; ratio = time / base")
    for col in ("shape", "config", "fwd+bwd ms", "ratio", "gen ms/token", "ratio"):
        table.add_column(col)
    for r in rows:
        fb = "n/a" if r["fwd_bwd_s"] is None else f"{1e3 * r['fwd_bwd_s']:.1f}"
        fr = "n/a" if r["fwd_bwd_ratio"] is None else f"{r['fwd_bwd_ratio']:.2f}x"
        table.add_row(r["shape"], r["config"], fb, fr, f"{1e3 * r['gen_s_per_token']:.2f}",
                      f"{r['gen_ratio']:.2f}x")
    Console().print(table)
    for r in rows:
        if r["note"]:
            print(f"note ({r['shape']}, {r['config']}): {r['note']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "rows": ROWS, "rank": RANK, "stack_rank": STACK_RANK, "anchors": ANCHORS,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
        "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
