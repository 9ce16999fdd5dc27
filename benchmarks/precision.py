"""Which dtypes the adapters compute in, chosen by measurement: training a bank in one
pass with the base model and the adapter matmuls in fp32 or bf16 (adapter master
weights always fp32), against the all-fp32 run of the same data in the same process.

    python benchmarks/precision.py --model smollm2-135m --device cuda --out runs/bench/precision.json
    python benchmarks/precision.py --tiny            # CPU smoke run (seconds)

For each configuration: training tokens/s (and the ratio to fp32), peak memory, the
largest relative difference of any step's loss from the fp32 run, and the adapter
effect gap: || (logits - base logits) - (the same in fp32) || / || the fp32 effect || on
held-out sequences, i.e. how far the trained adapters differ in what they do.
The defaults in mta.config.BackboneConfig follow this table (docs/architecture.md).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mta.engine.engine import AdapterEngine, EngineSpec, Row  # noqa: E402
from mta.engine.train import IGNORE, Example, Job, TrainConfig, train_jobs  # noqa: E402

CONFIGS = [("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16")]  # (base, adapter compute)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def examples(n: int, length: int, vocab: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(10, vocab) for _ in range(length)]
        cut = length - max(4, length // 8)  # the last eighth is the target, as a short answer
        out.append(Example(tuple(ids), tuple([IGNORE] * cut + ids[cut:])))
    return out


def load(model: str, dtype: torch.dtype, device: torch.device):
    if model == "tiny":
        from mta.models.tiny import tiny_llama

        m, tok = tiny_llama(seed=0, layers=4, hidden=128)
        return m.to(device, dtype), tok
    from mta.models import load_llm

    return load_llm(model, dtype=dtype, device=device)


def run(a, base: str, compute: str, device: torch.device) -> dict:
    model, tok = load(a.model, DTYPES[base], device)
    eng = AdapterEngine(model, EngineSpec(n_anchors=a.anchors, rank=8, alpha=16.0, compute_dtype=DTYPES[compute]))
    eng.init_bank(seed=0)
    vocab = model.config.vocab_size
    jobs = [Job(j, examples(a.examples, a.length, vocab, seed=j), Row([j], [1.0]), key=f"a{j}")
            for j in range(a.anchors)]
    cfg = TrainConfig(lr=a.lr, epochs=1, batch_size=a.batch, max_rows=None if device.type == "cuda" else 8)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    stats = train_jobs(eng, "bank", jobs, cfg, pad_id=tok.pad_token_id)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    held = torch.tensor([e.input_ids for e in examples(4, a.length, vocab, seed=999)], device=device)
    effects = []
    with torch.no_grad():
        for j in range(min(a.anchors, 4)):
            with eng.route([Row([j], [1.0])] * len(held)):
                tuned = model(held).logits.double()
            with eng.route([Row(active=False)] * len(held)):
                plain = model(held).logits.double()
            effects.append((tuned - plain).cpu())
    return {"base": base, "compute": compute, "seconds": seconds, "tokens": stats["tokens"],
            "tokens_per_s": stats["tokens"] / seconds, "losses": stats["losses"], "effects": effects,
            "peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="registry LLM, or 'tiny'")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--anchors", type=int, default=16)
    ap.add_argument("--examples", type=int, default=32, help="examples per anchor")
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, few examples")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/precision.json"))
    a = ap.parse_args()
    if a.tiny:
        a.model, a.device, a.anchors, a.examples, a.length, a.batch = "tiny", "cpu", 2, 4, 32, 2
    device = torch.device(a.device)
    results = [run(a, base, compute, device) for base, compute in CONFIGS]
    ref = results[0]
    rows = []
    for r in results:
        loss_gap = max(abs(x - y) / abs(y) for k in ref["losses"] for x, y in zip(r["losses"][k], ref["losses"][k]))
        effect_gap = max(float((e - f).norm() / f.norm()) for e, f in zip(r["effects"], ref["effects"]))
        rows.append({"base": r["base"], "adapter_compute": r["compute"], "tokens_per_s": r["tokens_per_s"],
                     "speed_vs_fp32": r["tokens_per_s"] / ref["tokens_per_s"], "peak_gib":
                     None if r["peak_bytes"] is None else r["peak_bytes"] / 2**30,
                     "max_loss_rel_diff": loss_gap, "adapter_effect_gap": effect_gap})
    print(f"model {a.model} on {device}: {a.anchors} anchors x {a.examples} examples x {a.length} tokens, one pass")
    head = ("base", "compute", "tok/s", "x fp32", "peak GiB", "loss diff", "effect gap")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (5, 8, 10, 7, 9, 10, 11))))
    for r in rows:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        print(f"{r['base']:>5} {r['adapter_compute']:>8} {r['tokens_per_s']:>10.0f} {r['speed_vs_fp32']:>7.2f} "
              f"{peak:>9} {r['max_loss_rel_diff']:>10.2e} {r['adapter_effect_gap']:>11.3f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": a.model, "device": str(device), "anchors": a.anchors, "examples": a.examples, "length": a.length,
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    a.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
