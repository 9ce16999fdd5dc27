"""What transformers' own fast decode paths give at Llama-3-8B shape (random bf16 weights),
the first measurement issue 14 asks for before any loop of our own is written.

    python3 benchmarks/hf_decode.py --out hf-decode.json          # on a GPU (8B shape)
    .venv/bin/python benchmarks/hf_decode.py --tiny --device cpu  # a smoke run

Workload: B rows x (P prompt + N new tokens), greedy, all rows the same length. Each
configuration's decode step is (t(N new) - t(1 new)) / (N - 1), so prefill is left out;
its floor is the bytes one step must read (weights + the mean KV cache) over the copy
bandwidth measured in the same run. Configurations: HF ``generate`` with the dynamic
cache, with the static cache (eager, and auto-compiled as transformers does it),
``generate_batch`` (continuous batching) with its defaults and with CUDA graphs asked
for, and the mta engine (every row its own user: top-2 of the bank + a rank-2 stack)
with the dynamic and the static cache, and compiled with its routing pinned (then a new
batch of other users through the same compiled step). A configuration that fails is reported with its
error, not left out. ``--sections parts``: GraphDecoder's captured step with a part left out
(attention, the MLP; the engine's adapter B side; the dense layout's A columns as a GEMM of
their own instead of folded into the base matmul), each part's cost the difference of two
steps, against the bytes that part must read: where a step's time over its floor goes.
``--sections compiled``: GraphDecoder with ``compile=True`` (inductor's fused kernels
captured in the graph), base and engine (pinned and dense routing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
# benchmarks/gpu.py is a sibling script; ruff would sort it as first- or third-party depending
# on whether an (ignored) gpu/ folder exists at the root, so the order is fixed by hand.
# isort: off
from gpu import LLAMA3_8B, TINY, bandwidth, make_model, print_profile, profile, sync  # noqa: E402
from mta.engine.engine import AdapterEngine, EngineSpec, Row  # noqa: E402
from mta.decoding.fixed import captured_buffers  # noqa: E402
from mta.decoding.step import GraphDecoder  # noqa: E402
from mta.decoding import fixed  # noqa: E402
# isort: on


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny shape (a smoke run)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--anchors", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path("hf-decode.json"))
    ap.add_argument("--sections", default="hf,batch,engine,graph",
                    help="hf: generate's caches; batch: generate_batch (CUDA only); engine: the mta engine; "
                         "graph: mta's GraphDecoder (the step captured in a CUDA graph), base and engine; "
                         "parts: GraphDecoder's step with parts left out (what each part costs, against its "
                         "bytes); compiled: GraphDecoder's step through torch.compile (inductor), base and "
                         "engine")
    ap.add_argument("--profile", action="store_true",
                    help="also profile 8 new tokens of HF generate (dynamic cache) and of each GraphDecoder config")
    a = ap.parse_args()
    sections = set(a.sections.split(","))
    if not sections <= {"hf", "batch", "engine", "graph", "parts", "compiled"}:
        ap.error(f"unknown sections in {a.sections!r} (hf, batch, engine, graph, parts, compiled)")
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = make_model(TINY if a.tiny else LLAMA3_8B, dev, dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (a.rows, a.prompt), generator=g).to(dev)
    mask = torch.ones_like(ids)
    rows_out = []
    bw = bandwidth(dev)
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    floor_bytes = weights + a.rows * (a.prompt + a.new / 2) * kv_token
    floor_ms = 1e3 * floor_bytes / bw if bw else None

    def dump() -> None:  # after every configuration: a run cut short keeps what it measured
        import transformers

        for r in rows_out:
            if floor_ms and "ms_per_step" in r:
                r["x_floor"] = r["ms_per_step"] / floor_ms
        result = {"shape": "tiny" if a.tiny else "llama3-8b", "device": str(dev),
                  "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                  "rows": a.rows, "prompt": a.prompt, "new": a.new, "copy_bandwidth_Bps": bw,
                  "floor_ms_per_step": floor_ms, "configs": rows_out, "transformers": transformers.__version__,
                  "profiles_of_9_new_tokens": profiles, "parts": parts}
        a.out.write_text(json.dumps(result, indent=2))

    def timed(fn) -> float:
        fn()  # warm-up (and compilation, where there is any)
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        return time.perf_counter() - t

    def gen(ctx=contextlib.nullcontext, **kw):
        def run(new):
            def f():
                with torch.no_grad(), ctx():
                    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                   do_sample=False, pad_token_id=0, **kw)
            return f
        return run

    def batch(cb_kw: dict | None):
        from transformers import GenerationConfig

        def run(new):
            cfg = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                                   eos_token_id=-1)
            extra = {}
            if cb_kw is not None:
                from transformers.generation import ContinuousBatchingConfig
                extra["continuous_batching_config"] = ContinuousBatchingConfig(**cb_kw)
            inputs = ids.tolist()

            def f():
                with torch.no_grad():
                    model.generate_batch(inputs=inputs, generation_config=cfg, progress_bar=False, **extra)
            return f
        return run

    profiles = {}
    parts = {}  # the parts section's costs: measured step differences against their byte floors

    def profiled(name, run):
        if a.profile:
            run(9)()  # warm-up (and the capture) outside the profile
            profiles[name] = profile(run(9), dev)
            print_profile(name, profiles[name])
            dump()

    def measure(name, run, note=""):
        t0 = time.perf_counter()
        try:
            full, one = timed(run(a.new)), timed(run(1))
            step = (full - one) / (a.new - 1)
            rows_out.append({"config": name, "ms_per_step": 1e3 * step, "prefill_s": one, "total_s": full,
                             "tokens_per_s": a.rows * a.new / full, "note": note})
        except Exception as e:  # noqa: BLE001 - a failing configuration is a result
            rows_out.append({"config": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                             "note": note})
        if "compiled" in name:  # dynamo's graphs so far: a compile that fell back to eager would not add one
            from torch._dynamo.utils import counters
            rows_out[-1]["dynamo_graphs_so_far"] = counters["stats"]["unique_graphs"]
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
        dump()

    if "hf" in sections:
        measure("HF generate, dynamic cache", gen())
        profiled("HF generate, dynamic cache", gen())
        measure("HF generate, static cache, eager", gen(cache_implementation="static", disable_compile=True))
        measure("HF generate, static cache, auto-compiled", gen(cache_implementation="static"),
                "transformers compiles the forward itself when the cache is static")

    def graph(dec, pin=None):
        def run(new):
            def f():
                with torch.no_grad(), (pin() if pin else contextlib.nullcontext()):
                    if pin:
                        dec.buffers = captured_buffers(eng)
                    dec.generate(ids, mask, new)
            return f
        return run

    if "graph" in sections:  # the plain model, before the engine wraps its layers
        base_dec = GraphDecoder(model, a.rows, a.prompt + a.new)
        measure("GraphDecoder (step in a CUDA graph), base", graph(base_dec),
                "mta.decoding.step: static cache, argmax and buffer updates inside the graph")
        profiled("GraphDecoder, base", graph(base_dec))
        del base_dec
    if "parts" in sections:
        parts.update(base_parts(model, a, graph, measure, rows_out, bw, kv_token))
    if "compiled" in sections:
        base_dec = GraphDecoder(model, a.rows, a.prompt + a.new, compile=True)
        measure("GraphDecoder compiled, base", graph(base_dec),
                "the step through torch.compile (inductor), then captured")
        profiled("GraphDecoder compiled, base", graph(base_dec))
        del base_dec
    if dev.type == "cuda" and "batch" in sections:
        model.set_attn_implementation("paged|sdpa")
        measure("HF generate_batch, defaults", batch(None))
        measure("HF generate_batch, CUDA graphs, 64 requests per batch",
                batch({"use_cuda_graph": True, "max_requests_per_batch": a.rows}))
        model.set_attn_implementation("sdpa")
    if sections & {"engine", "graph", "parts", "compiled"}:
        # as the product builds it (mta.backbone): fp32 master tables, adapter matmuls in the
        # base's dtype. Runs before 2026-12-01 (second session) left them in fp32 (fp32 GEMMs
        # in the engine's profile): their engine rows are not the product's.
        eng = AdapterEngine(model, EngineSpec(n_anchors=a.anchors, rank=8, alpha=16, dtype=torch.float32,
                                              compute_dtype=dtype))
        eng.init_bank(b_std=0.01)
        eng.add_users(a.rows, 2, 4.0, b_std=0.01)
        rng = torch.Generator().manual_seed(2)
        routes = [Row(torch.randperm(a.anchors, generator=rng)[:2].tolist(), [0.6, 0.4], user=u) for u in range(a.rows)]
        width = 2 * 8 + 2  # top-2 of rank 8 + the rank-2 stack: every batch of this kind pins to it
        if "graph" in sections:
            dec = GraphDecoder(model, a.rows, a.prompt + a.new)
            measure("GraphDecoder, mta engine, pinned routing",
                    graph(dec, lambda: fixed.pinned(eng, routes, width=width)),
                    f"{a.rows} users, top-2 of {a.anchors} + own rank-2 stack")
            profiled("GraphDecoder, mta engine", graph(dec, lambda: fixed.pinned(eng, routes, width=width)))
            later = [Row(r.anchors, r.weights, user=(r.user + 7) % a.rows) for r in routes]
            measure("GraphDecoder, mta engine, a NEW batch of users",
                    graph(dec, lambda: fixed.pinned(eng, later, width=width)),
                    "refills the pinned buffers; 'captures' 1 = the first capture was reused")
            rows_out[-1]["captures"] = dec.captures
            del dec
        if "compiled" in sections:
            for layout, on in (("dense", lambda: fixed.dense(eng, routes)),
                               ("pinned", lambda: fixed.pinned(eng, routes, width=width))):
                dec = GraphDecoder(model, a.rows, a.prompt + a.new, compile=True)
                measure(f"GraphDecoder compiled, mta engine, {layout} routing", graph(dec, on),
                        f"{a.rows} users, top-2 of {a.anchors} + own rank-2 stack")
                if layout == "dense":
                    profiled("GraphDecoder compiled, mta engine, dense", graph(dec, on))
                del dec
        if "parts" in sections:
            parts.update(engine_parts(model, eng, routes, a, graph, measure, rows_out, bw))
        if "engine" not in sections:
            eng.remove()
    if "engine" in sections:
        measure("mta engine, dynamic cache", gen(lambda: eng.route(routes)), f"{a.rows} users, top-2 of {a.anchors}")
        measure("mta engine, static cache, eager", gen(lambda: eng.route(routes), cache_implementation="static",
                                                       disable_compile=True))
        measure("mta engine, static cache, auto-compiled, pinned routing",
                gen(lambda: fixed.pinned(eng, routes, width=width), cache_implementation="static"),
                "routing in fixed buffers (mta.decoding.fixed.pinned)")
        routes[:] = [Row(torch.randperm(a.anchors, generator=rng)[:2].tolist(), [0.5, 0.5], user=(u + 7) % a.rows)
                     for u in range(a.rows)]
        measure("mta engine, compiled, a NEW batch of users (same shape)",
                gen(lambda: fixed.pinned(eng, routes, width=width), cache_implementation="static"),
                "refills the pinned buffers; the compiled step is reused")
        eng.remove()

    dump()
    for name, p in parts.items():
        if "error" in p:
            print(f"part {name}: {p['error']}")
        elif p.get("x_floor"):
            print(f"part {name}: {p['ms']:.2f} ms a step, its bytes {p['floor_ms']:.2f} ms at the copy bandwidth "
                  f"({p['x_floor']:.2f}x)")
        else:
            print(f"part {name}: {p['ms']:.2f} ms a step")
    print(f"{'config':<48} {'ms/step':>8} {'x floor':>8} {'tok/s':>9}")
    for r in rows_out:
        if "error" in r:
            print(f"{r['config']:<48} failed: {r['error'][:80]}")
        else:
            xf = f"{r['x_floor']:.2f}" if "x_floor" in r else "-"
            print(f"{r['config']:<48} {r['ms_per_step']:>8.2f} {xf:>8} {r['tokens_per_s']:>9.0f}")


def _step_ms(rows_out, name: str) -> float | None:
    r = next((r for r in rows_out if r["config"] == name), None)
    return r.get("ms_per_step") if r else None


def _part(full: float | None, without: float | None, nbytes: float, bw: float | None) -> dict:
    """A part's cost: the step with it minus the step without it, against its bytes' floor."""
    if full is None or without is None:
        return {"error": "a variant failed"}
    ms = full - without
    floor = 1e3 * nbytes / bw if bw else None
    return {"ms": ms, "bytes": nbytes, "floor_ms": floor, "x_floor": ms / floor if floor else None}


@contextlib.contextmanager
def _patched(objs, attr: str, make):
    """Each obj's ``attr`` replaced by ``make(obj)`` (an instance attribute), then restored."""
    for o in objs:
        setattr(o, attr, make(o))
    try:
        yield
    finally:
        for o in objs:
            delattr(o, attr)


def base_parts(model, a, graph, measure, rows_out, bw, kv_token) -> dict:
    """The base step with attention, then the MLP, left out of every block (each module's
    forward passes its input through: no kernel), each captured afresh. Attention's bytes:
    its four projections and the mean KV cache; the MLP's: its three projections."""
    layers = model.model.layers
    nbytes = {k: sum(p.numel() * p.element_size() for ly in layers for p in getattr(ly, k).parameters())
              for k in ("self_attn", "mlp")}
    nbytes["self_attn"] += a.rows * (a.prompt + a.new / 2) * kv_token
    full = "GraphDecoder (step in a CUDA graph), base"
    if _step_ms(rows_out, full) is None:
        measure(full, graph(GraphDecoder(model, a.rows, a.prompt + a.new)))
    skips = {"self_attn": lambda m: (lambda hidden_states, *args, **kw: (hidden_states, None)),
             "mlp": lambda m: (lambda x: x)}
    out = {}
    for k, make in skips.items():
        name = f"parts: base without {k} (its input passed through)"
        with _patched([getattr(ly, k) for ly in layers], "forward", make):
            measure(name, graph(GraphDecoder(model, a.rows, a.prompt + a.new)))
        out[f"base {k}"] = _part(_step_ms(rows_out, full), _step_ms(rows_out, name), nbytes[k], bw)
    return out


def engine_parts(model, eng, routes, a, graph, measure, rows_out, bw) -> dict:
    """The engine's step in the dense layout (the cheaper of the two here): as the product
    runs it (the A columns folded into the base matmuls), not folded (x by the A columns as
    a GEMM of its own), and not folded with the adapter's second half (the B matmul and its
    add) left out of every adapted layer: the A side and the B side against their bytes,
    and what the folding saves."""
    lys = list(eng.layers.values())

    def a_side(ly):
        def fwd(x):
            y = ly.base(x)
            z = x.to(ly.dense_A.dtype) @ ly.dense_A.t()
            z * (ly.dense_W if x.dim() == 2 else ly.dense_W[:, None, :])  # computed, not added
            return y
        return fwd

    folded = "parts: mta engine, dense routing (A columns folded into the base matmul)"
    plain = "parts: mta engine, dense routing, not folded"
    a_only = "parts: mta engine, dense routing, not folded, the A side alone"

    def on():
        return fixed.dense(eng, routes)
    measure(folded, graph(GraphDecoder(model, a.rows, a.prompt + a.new), on))
    for ly in lys:
        ly.fold_dense = False
    try:
        measure(plain, graph(GraphDecoder(model, a.rows, a.prompt + a.new), on))
        with _patched(lys, "forward", a_side):
            measure(a_only, graph(GraphDecoder(model, a.rows, a.prompt + a.new), on))
    finally:
        for ly in lys:
            ly.fold_dense = True
    with fixed.dense(eng, routes):
        a_bytes = sum(ly.dense_A.numel() * ly.dense_A.element_size() + ly.dense_W.numel() * ly.dense_W.element_size()
                      for ly in lys)
        b_bytes = sum(ly.dense_B.numel() * ly.dense_B.element_size() for ly in lys)
    base = _step_ms(rows_out, "GraphDecoder (step in a CUDA graph), base")
    return {"adapter A side (dense, not folded)": _part(_step_ms(rows_out, a_only), base, a_bytes, bw),
            "adapter B side (dense)": _part(_step_ms(rows_out, plain), _step_ms(rows_out, a_only), b_bytes, bw),
            "whole adapter, A columns folded (dense)": _part(_step_ms(rows_out, folded), base, a_bytes + b_bytes, bw),
            "what folding saves (not folded minus folded)": _part(_step_ms(rows_out, plain),
                                                                  _step_ms(rows_out, folded), 0, None)}


if __name__ == "__main__":
    main()
