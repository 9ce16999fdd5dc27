"""GPU benchmark of the engine against the base model and PEFT at Llama-3-8B shape.

One script, several measurements in one call, all ratios against references measured in
the same run (random bf16 weights: speed depends only on shape; nothing is downloaded):

1. mixed-user generation: 64 rows, each a distinct user with its own top-2 mixture of a
   50-anchor rank-8 bank plus its own rank-2 stacked adapter, against the base model,
   PEFT with one shared adapter and PEFT's mixed batch (64 adapters, ``adapter_names``),
   all in HF ``generate``; and the base and the engine (pinned and dense routing) in the
   new loop (mta.decoding.step.GraphDecoder), whole runs and decode steps alone (with
   ``--compile``, the new loop's step through torch.compile's inductor before capture);
2. bank building: 50 anchors x 64 samples x 256 tokens, rank 8, one pass, against PEFT
   training the anchors one after another (a few timed, the rest extrapolated);
3. new-user adaptation: fusion + rank-2 stack for 256 users, against the reference
   procedure (add_weighted_adapter, merge, train a rank-4 LoRA, unmerge) on a few users;
4. per-user cost: bytes stored, time to load a user into a running batch and evict it;
5. memory: peak memory of mixed-user decoding (GraphDecoder) at two batch sizes, hence the
   bytes per concurrent user and the most users that decode at once on this device.

    python benchmarks/gpu.py [--out DIR]        # on the H200 (device tool)
    python benchmarks/gpu.py --tiny             # smoke run on CPU, tiny shape, < 1 minute
    python benchmarks/gpu.py --compile --sections gen --loop-only   # the new loop's rows alone (the
                                                # offline yardstick of benchmarks/serve_load.py)
    python benchmarks/gpu.py --sections bank --profile --profile-only [--anchors 8 --profile-host]
                                                # the bank build's profile alone (host operators too:
                                                # which code launches each kernel, on a smaller bank)
    python benchmarks/gpu.py --sections bank --liger   # the same with Liger Kernel's fused RMSNorm,
                                                # SwiGLU and RoPE in the model's blocks (CUDA only)
    python benchmarks/gpu.py --sections bank --shape qwen2.5-1.5b --anchors 24
                                                # 24 rank-8 LoRAs at Qwen2.5-1.5B's shape trained at once:
                                                # the per-user LoRAs of an evaluation, against PEFT
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mta.config import AdaptConfig  # noqa: E402
from mta.decoding import fixed  # noqa: E402
from mta.engine import kernels  # noqa: E402
from mta.engine.config import LLAMA_TARGETS, TrainConfig  # noqa: E402
from mta.engine.engine import AdapterEngine, EngineSpec, Row  # noqa: E402
from mta.engine.peft_io import load_adapter, save_user  # noqa: E402
from mta.engine.train import Example, Job, train_jobs  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256)
# Qwen2.5-Coder-1.5B's block shape (the model of the evaluations and tunes; a Llama block of
# its sizes: no attention biases, untied head, which move its speed by little): for the
# per-user trainings a tune spends its time in, `--sections bank --shape qwen2.5-1.5b`
QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936)
SHAPES = {"llama3-8b": LLAMA3_8B, "qwen2.5-1.5b": QWEN25_15B}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512)
DEFAULT_STACK_LAYERS = AdaptConfig().stack_layers  # the stack's default placement (the last N blocks)


@contextlib.contextmanager
def dense_kernel(on: bool):
    """The dense layout through the Triton kernel (``on``) or torch's ops, then as before."""
    was, kernels.ENABLED = kernels.ENABLED, on
    try:
        yield
    finally:
        kernels.ENABLED = was


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def wall(fn, dev, repeats=1):
    fn()
    sync(dev)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(dev)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def make_model(shape, dev, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, max_position_embeddings=4096)
    cfg.pad_token_id = 0
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(prev)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def fuse_with_liger(model) -> dict:
    """Liger Kernel's Triton kernels for the Llama blocks' RMSNorm, SwiGLU and rotary
    embedding, patched into ``model`` the way the product's ``--fused-kernels liger`` does
    (`mta.fused`; the rotary function process-wide, so the PEFT reference of the same run
    trains with them too; the loss is left as it is). What the eager bank build's non-matmul
    device time (docs/performance.md, the bank row) loses when those elementwise passes are
    fused."""
    from mta.errors import MtaError
    from mta.fused import apply_fused_kernels

    try:
        return apply_fused_kernels(model, "liger", torch.device("cuda"))
    except MtaError as e:
        sys.exit(f"--liger: {e}")


def bandwidth(dev) -> float | None:
    if dev.type != "cuda":
        return None
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    t = wall(lambda: y.copy_(x), dev, repeats=5)
    return 2 * 2 * 1024**3 / t  # bytes read + written per second


def device_events(events) -> list:
    """The device's own events (kernels, copies, memsets), as torch's profiler table totals
    them. Each operator's ``self_device_time_total`` is the time of the kernels it launched,
    which are events of their own too: summing both counts that time twice (runs A, C and F
    did, docs/performance.md)."""
    return [e for e in events if e.device_type != DeviceType.CPU and not getattr(e, "is_user", False)]


def device_seconds(events) -> float:
    """Seconds the device was busy over ``events`` (``key_averages()``): kernels only."""
    return sum(float(e.self_device_time_total) for e in device_events(events)) / 1e6


def profile(fn, dev, top: int = 15, kernels_only: bool = False) -> dict:
    """Run ``fn`` once under torch's profiler: how busy the device was over the wall time
    (kernel time over wall seconds: well under 1 means the host, not the GPU, sets the pace),
    the kernels that took the most device time (``top``) and the operators whose kernels did
    (``top_ops``: an operator's kernels, not again the same time); on a CPU the operators by
    self CPU time. The profiler's own overhead lengthens the wall time: read the fraction as
    a lower bound. ``kernels_only`` (on CUDA): the device's activity alone, no host operators
    (no ``top_ops``): a trace a few times smaller, for runs whose trace is too large to read
    in time (the bank profile of 50 anchors in run X: profiled in 35.9 s, not read in 164)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = dev.type == "cuda"
    acts = ([] if cuda and kernels_only else [ProfilerActivity.CPU]) + ([ProfilerActivity.CUDA] if cuda else [])
    sync(dev)
    t = time.perf_counter()
    with torch_profile(activities=acts) as prof:
        fn()
        sync(dev)
    wall_s = time.perf_counter() - t
    # (runs U and W met their limits with no line saying where)
    print(f"profiled in {wall_s:.1f} s; reading the trace", flush=True)
    t = time.perf_counter()
    events = prof.key_averages()
    print(f"trace read in {time.perf_counter() - t:.1f} s", flush=True)

    def row(e) -> dict:
        return {"name": e.key[:120], "calls": e.count, "self_device_ms": float(e.self_device_time_total) / 1e3,
                "self_cpu_ms": e.self_cpu_time_total / 1e3}

    if not cuda:
        ranked = sorted(events, key=lambda e: float(e.self_cpu_time_total), reverse=True)[:top]
        return {"wall_s": wall_s, "device_busy_s": None, "busy_fraction": None, "top": [row(e) for e in ranked]}

    def ranked(evs) -> list[dict]:
        return [row(e) for e in sorted(evs, key=lambda e: float(e.self_device_time_total), reverse=True)[:top]]

    busy = device_seconds(events)
    ops = [e for e in events if e.device_type == DeviceType.CPU and e.self_device_time_total > 0]
    return {"wall_s": wall_s, "device_busy_s": busy, "busy_fraction": busy / wall_s,
            "top": ranked(device_events(events)), "top_ops": ranked(ops), "kernels_only": cuda and kernels_only}


def print_profile(title: str, p: dict) -> None:
    frac = "-" if p["busy_fraction"] is None else f"{p['busy_fraction']:.2f}"
    print(f"profile: {title}: wall {p['wall_s']:.3f} s, device busy {frac} of it", flush=True)
    for r in p["top"][:8]:
        print(f"  {r['self_device_ms']:9.2f} ms dev {r['self_cpu_ms']:9.2f} ms cpu {r['calls']:6d}x  {r['name'][:70]}")


def linear_sizes(model) -> int:
    """Sum over targeted linear layers of (in + out): LoRA bytes per rank = this x dtype size."""
    return sum(m.in_features + m.out_features for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in LLAMA_TARGETS)


# ---------------------------------------------------------------------------------------------
def gen_section(model, dev, a) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (a.rows, a.prompt), generator=g).to(dev)
    mask = torch.ones_like(ids)
    out = []

    def run(m, new, ctx=contextlib.nullcontext, **kw):
        def f():
            with torch.no_grad(), ctx():
                m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0, **kw)
        return f

    def rec(name, sec, new, note=""):
        out.append({"config": name, "seconds": sec, "new_tokens": new, "tokens_per_s": a.rows * new / sec,
                    "note": note})

    from mta.decoding.fixed import captured_buffers
    from mta.decoding.step import GraphDecoder

    def graphed(dec, pin=None, new=a.new):
        def f():
            with torch.no_grad(), (pin() if pin else contextlib.nullcontext()):
                if pin:
                    dec.buffers = captured_buffers(eng)
                dec.generate(ids, mask, new)
        return f

    def loop_rec(name, pin=None, note="", mode=None, role=None):
        """The new loop over the whole run, and its decode step alone: (t(new) - t(1)) / (new - 1),
        the prefill and first token taken out (as benchmarks/hf_decode.py measures a step).
        With --profile, a few captured steps under the profiler too (the kernels the graph
        replays: where a step's time goes)."""
        dec = GraphDecoder(model, a.rows, a.prompt + a.new, compile=a.compile or mode is not None,
                           compile_mode=mode)
        whole = wall(graphed(dec, pin), dev)
        first = wall(graphed(dec, pin, 1), dev)
        rec(name, whole, a.new, note)
        out[-1]["decode_step_seconds"] = (whole - first) / (a.new - 1)
        out[-1]["role"] = role
        if a.profile and dev.type == "cuda":
            with torch.no_grad(), (pin() if pin else contextlib.nullcontext()):
                if pin:
                    dec.buffers = captured_buffers(eng)
                dec.prefill(ids, mask)
                dec.advance()  # captured (again, if the fill moved a buffer) before the profile
                out[-1]["profile"] = profile(lambda: [dec.advance() for _ in range(16)], dev)
            print_profile(f"16 decode steps: {name}", out[-1]["profile"])

    if not a.loop_only:
        rec("base model", wall(run(model, a.new), dev), a.new)
        out[-1]["role"] = "hf_base"
    loop = "new loop (GraphDecoder, compiled)" if a.compile else "new loop (GraphDecoder)"
    loop_rec(f"{loop}: base model", note="the decode step captured in a CUDA graph (mta.decoding.step)" +
             (", after torch.compile (inductor)" if a.compile else ""), role="loop_base")
    tuned = "max-autotune-no-cudagraphs"
    if a.autotune:
        loop_rec("new loop, compiled max-autotune: base model", mode=tuned, role="tuned_base",
                 note=f"the step through torch.compile mode {tuned} before capture")
    eng = AdapterEngine(model, EngineSpec(n_anchors=a.anchors, rank=8, alpha=16, dtype=a.adapter_dtype))
    eng.init_bank(b_std=0.01)
    eng.add_users(a.rows, 2, 4.0, b_std=0.01)
    rng = torch.Generator().manual_seed(2)
    rows = []
    for u in range(a.rows):
        pair = torch.randperm(a.anchors, generator=rng)[:2].tolist()
        rows.append(Row(pair, [0.6, 0.4], user=u))
    if not a.loop_only:
        rec(f"mta engine: {a.rows} users, top-2 of {a.anchors} + own rank-2 stack",
            wall(run(model, a.new, lambda: eng.route(rows)), dev), a.new)
        out[-1]["role"] = "hf_engine"
        loop_rec(f"new loop: mta engine, {a.rows} users, top-2 of {a.anchors} + own rank-2 stack",
                 lambda: fixed.pinned(eng, rows, width=2 * 8 + 2), "pinned routing", role="loop_pinned")
    with dense_kernel(False):  # torch's ops; the kernel's row below (the product's default on CUDA)
        loop_rec(f"new loop: mta engine, {a.rows} users, dense routing", lambda: fixed.dense(eng, rows),
                 "every table as columns of two dense matmuls, each row's coefficients over them", role="loop_dense")
    if a.kernel_compare:  # the same layout through the Triton kernel (mta.engine.kernels)
        with dense_kernel(True):
            loop_rec(f"new loop: mta engine, {a.rows} users, dense routing, Triton kernel",
                     lambda: fixed.dense(eng, rows),
                     "dense routing with the mixing, the B side and the add in one Triton kernel",
                     role="loop_dense_kernel")
    if a.autotune:
        with dense_kernel(False):  # inductor's own kernels for the whole step
            loop_rec(f"new loop, compiled max-autotune: mta engine, {a.rows} users, dense routing",
                     lambda: fixed.dense(eng, rows), f"dense routing, the step through torch.compile mode {tuned}",
                     mode=tuned, role="tuned_dense")

    def adapter_bytes() -> int:
        return sum(p.numel() * p.element_size() for p in eng.bank_parameters() + eng.stack_parameters())

    bank_bytes = adapter_bytes()
    # the product's default placement of the stacks (``AdaptConfig.stack_layers``: the last 8
    # blocks), which `mta serve` decodes with: the server's yardstick, beside every block above
    eng.add_users(a.rows, 2, 4.0, b_std=0.01, last_layers=DEFAULT_STACK_LAYERS)
    with dense_kernel(False):
        loop_rec(f"new loop: mta engine, {a.rows} users, dense routing, stacks in the last {DEFAULT_STACK_LAYERS} "
                 "blocks", lambda: fixed.dense(eng, rows), "dense routing; each user's stack in the last "
                 f"{DEFAULT_STACK_LAYERS} blocks (the product's default)", role="loop_dense_last8")
    last8_bytes = adapter_bytes()  # fewer stack tables: its own floor
    eng.remove()
    if not a.loop_only:
        _peft_rows(model, dev, a, run, rec, out)
    by = {r["role"]: r for r in out}
    hf_base = by.get("hf_base")
    for r in out:
        r["ratio_to_base"] = r["tokens_per_s"] / hf_base["tokens_per_s"] if hf_base else None
    if "hf_engine" in by and "peft_mixed" in by:
        by["hf_engine"]["ratio_to_peft_mixed"] = by["hf_engine"]["tokens_per_s"] / by["peft_mixed"]["tokens_per_s"]
    # the two decode ratios: the engine against the base in the SAME (new) loop, and
    # the new loop's engine against HF generate's base with the dynamic cache (when timed)
    pairs = [("loop_pinned", "loop_base"), ("loop_dense", "loop_base"), ("loop_dense_kernel", "loop_base"),
             ("loop_dense_last8", "loop_base"), ("tuned_dense", "tuned_base")]
    for eng_role, base_role in pairs:
        if eng_role not in by:
            continue
        r, base = by[eng_role], by[base_role]
        r["ratio_to_base_same_loop"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["ratio_to_hf_dynamic_base"] = r["tokens_per_s"] / hf_base["tokens_per_s"] if hf_base else None
        r["step_ratio_to_base_same_loop"] = base["decode_step_seconds"] / r["decode_step_seconds"]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * \
        (model.config.hidden_size // model.config.num_attention_heads) * 2
    avg_ctx = a.prompt + a.new / 2
    kv = a.rows * avg_ctx * kv_per_token
    for r in out:
        engine = r["role"] in ("hf_engine", "loop_pinned", "loop_dense", "loop_dense_kernel", "loop_dense_last8",
                                "tuned_dense")
        adapters = last8_bytes if r["role"] == "loop_dense_last8" else bank_bytes
        r["bytes_per_step_floor"] = weights + kv + (adapters if engine else 0)
    return out


def _peft_rows(model, dev, a, run, rec, out) -> None:
    """PEFT's rows: one shared adapter, then a mixed batch of one adapter per row."""
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=8, lora_alpha=16, target_modules=list(LLAMA_TARGETS), lora_dropout=0.0)
    pm = get_peft_model(model, lcfg, adapter_name="a0")
    pm.to(dev)
    pm.eval()
    rec("peft: one shared adapter", wall(run(pm, a.new), dev), a.new)
    out[-1]["role"] = "peft_shared"
    for i in range(1, a.rows):
        pm.add_adapter(f"a{i}", lcfg)
    pm.to(dev)
    pm.eval()  # PEFT refuses adapter_names in training mode; add_adapter may leave it training
    names = [f"a{i}" for i in range(a.rows)]
    new = a.peft_mixed_new
    rec(f"peft: mixed batch, {a.rows} adapters", wall(run(pm, new, adapter_names=names), dev), new,
        f"timed over {new} new tokens (it is slow); throughput per token is comparable")
    out[-1]["role"] = "peft_mixed"
    pm.unload()


def _examples(n, length, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        cut = length // 2
        out.append(Example(tuple(ids), tuple([-100] * cut + ids[cut:])))
    return out


def bank_section(model, dev, a, compile=False, ref=None) -> dict:
    """``compile``: the decoder blocks through torch.compile while training
    (TrainConfig.compile); ``ref``: an earlier bank section's result whose PEFT timing
    (same run) the ratio uses, instead of timing PEFT again."""
    from peft import LoraConfig, get_peft_model

    vocab = model.config.vocab_size
    data = [_examples(a.samples, a.seq, vocab, s) for s in range(a.anchors)]
    cfg = TrainConfig(lr=1e-4, epochs=1, batch_size=8, warmup_ratio=0.1, max_rows=a.max_rows,
                      gradient_checkpointing=a.checkpointing, compile=compile)
    # fp32 master weights, matmuls in the base's dtype: what `mta bank build` runs on CUDA
    # (BackboneConfig.adapter_compute auto); runs before 2026-12-01 left the matmuls in fp32
    eng = AdapterEngine(model, EngineSpec(n_anchors=a.anchors, rank=8, alpha=16, compute_dtype=a.adapter_dtype))
    eng.init_bank()
    jobs = [Job(i, data[i], Row([i], [1.0]), key=f"a{i}") for i in range(a.anchors)]
    if a.profile and a.profile_only:
        return _bank_profile_only(eng, data, cfg, dev, a)
    warm = None
    if compile and a.warm_compile:  # the compile (and the recompile with symbolic sizes) before the clock
        few = [Job(i, data[i], Row([i], [1.0]), key=f"w{i}") for i in range(min(4, a.anchors))]
        sync(dev)
        t = time.perf_counter()
        train_jobs(eng, "bank", few, cfg, pad_id=0)
        sync(dev)
        warm = time.perf_counter() - t
        eng.init_bank()
    sync(dev)
    t = time.perf_counter()
    stats = train_jobs(eng, "bank", jobs, cfg, pad_id=0)
    sync(dev)
    ours = time.perf_counter() - t
    prof = None
    if a.profile:
        prof = _profile_bank(eng, data, cfg, dev, a)
    eng.remove()
    tokens = a.anchors * a.samples * a.seq
    mine = {"anchors": a.anchors, "tokens": tokens, "ours_seconds": ours, "ours_tokens_per_s": tokens / ours,
            "compiled_layers": compile, "warm_up_seconds": warm,
            "optimizer_state_bytes": stats["optimizer_state_bytes"], "profile": prof}
    if ref is not None:  # PEFT's timing from the eager section of this run
        single_tps = ref["peft_single_tokens_per_s"]
        return {**mine, "peft_total_seconds_extrapolated": ref["peft_total_seconds_extrapolated"],
                "speedup": ref["peft_total_seconds_extrapolated"] / ours, "peft_single_tokens_per_s": single_tps,
                "tokens_per_s_ratio_to_single_peft": tokens / ours / single_tps, "reference": "the bank section's"}
    # reference: PEFT, one adapter after another, model loaded once
    lcfg = LoraConfig(r=8, lora_alpha=16, target_modules=list(LLAMA_TARGETS), lora_dropout=0.0)
    pm = get_peft_model(model, lcfg)
    pm.to(dev)
    if a.checkpointing:
        pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        pm.enable_input_require_grads()
    pm.train()
    times = []
    for i in range(a.peft_anchors):
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        sync(dev)
        t = time.perf_counter()
        for s in range(0, a.samples, 8):
            batch = data[i][s:s + 8]
            ids = torch.tensor([e.input_ids for e in batch], device=dev)
            labels = torch.tensor([e.labels for e in batch], device=dev)
            loss = pm(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        sync(dev)
        times.append(time.perf_counter() - t)
    model = pm.unload()
    per_anchor = statistics.median(times[1:] if len(times) > 1 else times)  # the first carries warm-up
    peft_total = per_anchor * a.anchors
    single_tps = a.samples * a.seq / per_anchor
    return {**mine, "peft_seconds_per_anchor": per_anchor, "peft_anchors_timed": a.peft_anchors,
            "peft_total_seconds_extrapolated": peft_total, "speedup": peft_total / ours,
            "peft_single_tokens_per_s": single_tps, "tokens_per_s_ratio_to_single_peft": tokens / ours / single_tps}


def _profile_bank(eng, data, cfg, dev, a, kernels_only: bool = False) -> dict:
    """Two steps of the timed training's shape (every anchor) under the profiler; before
    2026-12-06 two anchors only, a step far smaller than the timed one's (docs/performance.md, run P)."""
    few = [Job(i, data[i][:2 * cfg.batch_size], Row([i], [1.0]), key=f"p{i}") for i in range(a.anchors)]
    prof = profile(lambda: train_jobs(eng, "bank", few, cfg, pad_id=0), dev, kernels_only=kernels_only)
    print_profile(f"bank building, {a.anchors} anchors x {2 * cfg.batch_size} samples (two steps)", prof)
    return prof


def _bank_profile_only(eng, data, cfg, dev, a) -> dict:
    """``--profile --profile-only``: the bank section's profile without its timings (run U's
    whole section met its 240 s limit on an H100): one untimed step of 4 anchors first (the
    first kernels' set-up), then the section's profile, of the device's kernels alone on
    CUDA (run X read no whole trace of it in 164 s), or with ``--profile-host`` the host's
    operators too."""
    warm = [Job(i, data[i][:cfg.batch_size], Row([i], [1.0]), key=f"w{i}") for i in range(min(4, a.anchors))]
    t = time.perf_counter()
    train_jobs(eng, "bank", warm, cfg, pad_id=0)
    print(f"bank profile: the untimed step of {len(warm)} anchors in {time.perf_counter() - t:.1f} s", flush=True)
    eng.init_bank()
    # (run X: the whole trace of 50 anchors was not read in time; with --profile-host, a smaller
    # bank's, operators and all: run Y's kernels-only trace named no code)
    prof = _profile_bank(eng, data, cfg, dev, a, kernels_only=not a.profile_host)
    eng.remove()
    return {"anchors": a.anchors, "profile_only": True, "profile": prof}


def adapt_section(model, dev, a, compile=False, ref=None, last_layers=None) -> dict:
    """``compile`` and ``ref`` as in ``bank_section`` (the reference procedure's timing);
    ``last_layers``: the stack only in the last N blocks (the product's default recipe is
    rank 2 in the last 8, AdaptConfig.stack_layers; the issue's workload and runs A-F: all)."""
    from peft import LoraConfig, get_peft_model

    vocab = model.config.vocab_size
    eng = AdapterEngine(model, EngineSpec(n_anchors=a.anchors, rank=8, alpha=16, compute_dtype=a.adapter_dtype))
    eng.init_bank(b_std=0.01)
    eng.add_users(a.users, 2, 4.0, last_layers=last_layers)
    rng = torch.Generator().manual_seed(3)
    jobs = []
    for u in range(a.users):
        pair = torch.randperm(a.anchors, generator=rng)[:2].tolist()
        jobs.append(Job(u, _examples(10, a.seq, vocab, 1000 + u), Row(pair, [0.6, 0.4], user=u), key=f"u{u}"))
    cfg = TrainConfig(lr=1e-4, epochs=1, batch_size=10, warmup_ratio=0.0, max_rows=a.max_rows,
                      gradient_checkpointing=a.checkpointing, compile=compile)
    warm = None
    if compile and a.warm_compile:  # the compile before the clock: 16 users trained untimed, then reset
        sync(dev)
        t = time.perf_counter()
        train_jobs(eng, "stack", jobs[:16], cfg, pad_id=0)
        sync(dev)
        warm = time.perf_counter() - t
        eng.add_users(a.users, 2, 4.0, last_layers=last_layers)  # fresh stacks for every user
    sync(dev)
    t = time.perf_counter()
    train_jobs(eng, "stack", jobs, cfg, pad_id=0)
    sync(dev)
    ours = time.perf_counter() - t
    prof = None
    if a.profile:
        prof = profile(lambda: train_jobs(eng, "stack", jobs[:16], cfg, pad_id=0), dev)
        print_profile("new-user adaptation, 16 users", prof)
    per_user = ours / a.users
    with tempfile.TemporaryDirectory() as tmp:  # what one user stores, and its tensors as a load reads them
        save_user(eng, 0, Path(tmp) / "u0")
        stored = sum(p.stat().st_size for p in (Path(tmp) / "u0").rglob("*") if p.is_file())
        tensors, _, _ = load_adapter(Path(tmp) / "u0")
    if ref is not None:  # the reference procedure's timing from the eager section of this run
        eng.remove()
        return {"users": a.users, "ours_seconds": ours, "ours_seconds_per_user": per_user, "compiled_layers": compile,
                "stack_last_layers": last_layers, "warm_up_seconds": warm,
                "reference_seconds_per_user": ref["reference_seconds_per_user"],
                "speedup": ref["reference_seconds_per_user"] / per_user, "reference": "the adapt section's",
                "stored_bytes_per_user_fp32": stored, "profile": prof}
    # per-user cost in place: load into a running batch, evict

    def load():
        eng.load_user(a.users - 1, tensors)

    load_s = wall(load, dev, repeats=5)

    def evict():
        with torch.no_grad():
            for ly in eng.stack_layers.values():
                ly.stack_A[a.users - 1].zero_()
                ly.stack_B[a.users - 1].zero_()

    evict_s = wall(evict, dev, repeats=5)
    anchors = {n: [(ly.bank_A[i].detach().to(model.dtype), ly.bank_B[i].detach().to(model.dtype))
                   for i in range(2)] for n, ly in eng.layers.items()}
    eng.remove()
    # reference procedure on a few users
    lcfg = LoraConfig(r=8, lora_alpha=16, target_modules=list(LLAMA_TARGETS), lora_dropout=0.0)
    pm = get_peft_model(model, lcfg, adapter_name="anchor0")
    pm.add_adapter("anchor1", lcfg)
    with torch.no_grad():
        for n, pairs in anchors.items():
            mod = pm.base_model.model.get_submodule(n)
            for i, (A, B) in enumerate(pairs):
                mod.lora_A[f"anchor{i}"].weight.copy_(A)
                mod.lora_B[f"anchor{i}"].weight.copy_(B)
    pm.to(dev)
    times = []
    for u in range(a.ref_users):
        sync(dev)
        t = time.perf_counter()
        pm.add_weighted_adapter(["anchor0", "anchor1"], [0.6, 0.4], "fused", combination_type="cat")
        pm.set_adapter("fused")
        pm.merge_adapter()
        pm.add_adapter("stack", LoraConfig(r=4, lora_alpha=8, target_modules=list(LLAMA_TARGETS), lora_dropout=0.0))
        pm.set_adapter("stack")
        pm.to(dev)
        pm.train()
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=5e-5)
        data = _examples(10, a.seq, vocab, 1000 + u)
        for s in range(0, 10, 8):
            batch = data[s:s + 8]
            ids = torch.tensor([e.input_ids for e in batch], device=dev)
            labels = torch.tensor([e.labels for e in batch], device=dev)
            pm(input_ids=ids, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
        pm.set_adapter("fused")
        pm.unmerge_adapter()
        pm.delete_adapter("stack")
        pm.delete_adapter("fused")
        sync(dev)
        times.append(time.perf_counter() - t)
    pm.unload()
    ref = statistics.median(times[1:] if len(times) > 1 else times)
    return {"users": a.users, "compiled_layers": compile, "ours_seconds": ours, "ours_seconds_per_user": per_user,
            "reference_seconds_per_user": ref, "reference_users_timed": a.ref_users, "speedup": ref / per_user,
            "stored_bytes_per_user_fp32": stored, "stored_bytes_per_user_bf16": stored // 2,
            "load_user_seconds": load_s, "evict_user_seconds": evict_s, "profile": prof}


def memory_section(model, dev, a) -> dict:
    """Peak memory of mixed-user decoding (GraphDecoder over a static cache, the engine with
    an ``a.anchors``-anchor rank-8 bank, each row its own user with a rank-2 stack, top-2
    pinned) at two batch sizes; the slope is what one more concurrent user costs (KV cache,
    stack, activations), the intercept what the batch shares (weights, bank, workspace), and
    their ratio against the device's memory the largest number of users decoding at once."""
    from mta.decoding.fixed import captured_buffers
    from mta.decoding.step import GraphDecoder

    g = torch.Generator().manual_seed(3)
    sizes = (a.rows // 4, a.rows)
    eng = AdapterEngine(model, EngineSpec(n_anchors=a.anchors, rank=8, alpha=16, dtype=a.adapter_dtype))
    eng.init_bank(b_std=0.01)
    eng.add_users(max(sizes), 2, 4.0, b_std=0.01)
    rows_out = []
    for b in sizes:
        ids = torch.randint(3, model.config.vocab_size, (b, a.prompt), generator=g).to(dev)
        rows = [Row(torch.randperm(a.anchors, generator=g)[:2].tolist(), [0.6, 0.4], user=u) for u in range(b)]
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        dec = GraphDecoder(model, b, a.prompt + a.new)
        with fixed.pinned(eng, rows, width=2 * 8 + 2):
            dec.buffers = captured_buffers(eng)
            dec.generate(ids, torch.ones_like(ids), a.new)
        sync(dev)
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        rows_out.append({"rows": b, "peak_bytes": peak})
        del dec
    eng.remove()
    res = {"context_tokens": a.prompt + a.new, "anchors": a.anchors, "configs": rows_out}
    if dev.type == "cuda":
        (b0, p0), (b1, p1) = [(r["rows"], r["peak_bytes"]) for r in rows_out]
        per_row = (p1 - p0) / (b1 - b0)
        shared = p0 - b0 * per_row
        total = torch.cuda.get_device_properties(dev).total_memory
        res.update({"bytes_per_concurrent_user": per_row, "shared_bytes": shared, "device_bytes": total,
                    "max_concurrent_users": int((total - shared) // per_row)})
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny shape")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/gpu.json"))
    ap.add_argument("--sections", default="gen,bank,adapt,memory")
    ap.add_argument("--profile", action="store_true", help="profile a few training steps of bank and adapt")
    ap.add_argument("--profile-only", action="store_true",
                    help="with --profile: the bank section profiles only (a warm-up step, then the profile; no "
                         "timed build, no PEFT reference): what a short quiet window on the device allows")
    ap.add_argument("--compile", action="store_true",
                    help="the new decode loop's step through torch.compile (inductor) before it is captured")
    ap.add_argument("--autotune", action="store_true",
                    help="also the base and the dense engine with the step compiled in inductor's max-autotune mode")
    ap.add_argument("--kernel-compare", action="store_true",
                    help="also the dense layout through the Triton kernel (MTA_DENSE_KERNEL=0 turns it off elsewhere)")
    ap.add_argument("--warm-compile", action="store_true",
                    help="bank-compiled / adapt-compiled: train 4 anchors / 16 users untimed first, so the timed "
                         "run excludes the compile")
    ap.add_argument("--loop-only", action="store_true",
                    help="gen: only the new loop's rows (the base, dense routing with the stacks on every block "
                         "and in the last 8, and --kernel-compare / --autotune ones): no transformers generate, "
                         "pinned routing or PEFT rows (their ratios are left out)")
    ap.add_argument("--max-rows-cap", type=int, default=None,
                    help="cap rows per training micro-batch (default: the measured token budget decides)")
    ap.add_argument("--anchors", type=int, default=None, dest="anchors_arg",
                    help="anchors in every section (default 50; --tiny 6): a smaller bank's profile, whose whole "
                         "trace can be read")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b",
                    help="the model's block sizes (random weights): Llama-3-8B's, or Qwen2.5-1.5B's")
    ap.add_argument("--liger", action="store_true",
                    help="patch Liger Kernel's fused RMSNorm, SwiGLU and RoPE into the model first (CUDA only)")
    ap.add_argument("--profile-host", action="store_true",
                    help="with --profile-only: record the host's operators too (which code launches each kernel), "
                         "not the device's kernels alone; for a bank small enough (--anchors) to read its trace")
    a = ap.parse_args()
    if a.anchors_arg is not None and a.anchors_arg < 2:
        ap.error("--anchors must be at least 2 (the sections mix two anchors a row)")
    if a.profile_host and not (a.profile and a.profile_only):
        ap.error("--profile-host goes with --profile --profile-only")
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    if a.tiny and a.shape != "llama3-8b":
        ap.error("--shape sizes the full run's model; --tiny has its own")
    if a.liger and dev.type != "cuda":
        ap.error("--liger runs on CUDA only (Liger's kernels are Triton kernels)")
    if a.tiny:
        shape, dtype = TINY, torch.float32
        a.rows, a.prompt, a.new, a.peft_mixed_new, a.anchors = 8, 16, 8, 4, 6
        a.samples, a.seq, a.max_rows, a.peft_anchors, a.users, a.ref_users = 16, 32, 16, 2, 8, 2
        a.adapter_dtype, a.checkpointing = torch.float32, False
    else:
        shape, dtype = SHAPES[a.shape], torch.bfloat16
        a.rows, a.prompt, a.new, a.peft_mixed_new, a.anchors = 64, 256, 128, 8, 50
        a.samples, a.seq, a.peft_anchors, a.users, a.ref_users = 64, 256, 3, 256, 3
        # rows per training micro-batch: the product's default (None: the token budget measured
        # on the device decides); runs before 2026-11-30 capped it at 16
        a.max_rows = a.max_rows_cap
        a.adapter_dtype, a.checkpointing = torch.bfloat16, False
    if a.anchors_arg is not None:
        a.anchors = a.anchors_arg
    t0 = time.perf_counter()
    model = make_model(shape, dev, dtype)
    fused = fuse_with_liger(model) if a.liger else None
    print(f"model built in {time.perf_counter() - t0:.1f} s" + (f", {fused['library']} {fused['version']} patched in"
                                                               if fused else ""), flush=True)
    res = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "python": platform.python_version(), "shape": shape, "shape_name": "tiny" if a.tiny else a.shape,
           "dtype": str(dtype),
           "bandwidth_bytes_per_s": bandwidth(dev), "model_build_seconds": time.perf_counter() - t0,
           "train_max_rows": a.max_rows, "compiled_decode_loop": a.compile,
           "autotuned_decode_loop": a.autotune, "kernel_compare": a.kernel_compare, "fused_kernels": fused}
    try:
        import peft
        import transformers
        res["peft"], res["transformers"] = peft.__version__, transformers.__version__
    except ImportError:
        pass
    secs = a.sections.split(",")
    a.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every section: a later section's failure keeps the earlier ones
        if dev.type == "cuda":
            res["max_memory_allocated"] = torch.cuda.max_memory_allocated()
        a.out.write_text(json.dumps(res, indent=2, default=str))

    sections = {"gen": (gen_section, _print_gen), "bank": (bank_section, None),
                "adapt": (adapt_section, None), "memory": (memory_section, None),
                # training with the decoder blocks compiled (TrainConfig.compile), against the
                # references the eager sections timed in this run
                "bank-compiled": (lambda m, d, a: bank_section(m, d, a, True, res.get("bank")), None),
                "adapt-compiled": (lambda m, d, a: adapt_section(m, d, a, True, res.get("adapt")), None),
                # the product's default stack (rank 2 in the last 8 blocks): the backward pass
                # stops at the first block holding a trainable adapter
                "adapt-last8": (lambda m, d, a: adapt_section(m, d, a, False, res.get("adapt"), last_layers=8), None),
                "adapt-last8-compiled": (lambda m, d, a: adapt_section(m, d, a, True, res.get("adapt"),
                                                                       last_layers=8), None)}
    failed = []
    for name, (fn, show) in sections.items():
        if name not in secs:
            continue
        key = {"gen": "generation"}.get(name, name.replace("-", "_"))
        try:
            res[key] = fn(model, dev, a)
        except Exception as e:  # noqa: BLE001 - recorded; the other sections still run
            res[key] = {"error": f"{type(e).__name__}: {e}"}
            failed.append(name)
            print(f"section {name} failed: {type(e).__name__}: {e}", flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        else:
            if show:
                show(res)
            else:
                print(json.dumps(res[key], indent=1), flush=True)
        save()
    print(f"wrote {a.out} in {time.perf_counter() - t0:.0f} s")
    if failed:
        sys.exit(f"sections failed: {', '.join(failed)} (their errors are in {a.out})")


def _print_gen(res):
    bw = res["bandwidth_bytes_per_s"]
    print(f"{'configuration':58s} {'tok/s':>9s} {'x base':>7s} {'ms/step':>8s} {'floor ms':>9s}")
    for r in res["generation"]:
        step = 1e3 * r["seconds"] / r["new_tokens"]
        floor = "-" if not bw else f"{1e3 * r['bytes_per_step_floor'] / bw:.2f}"
        ratio = "-" if r["ratio_to_base"] is None else f"{r['ratio_to_base']:.3f}"
        print(f"{r['config'][:58]:58s} {r['tokens_per_s']:9.0f} {ratio:>7s} {step:8.2f} {floor:>9s}")
    for r in res["generation"]:
        if "decode_step_seconds" in r:
            floor = "" if not bw else f", {r['decode_step_seconds'] * bw / r['bytes_per_step_floor']:.2f}x its floor"
            print(f"decode step alone, {r['config'][:40]}: {1e3 * r['decode_step_seconds']:.2f} ms{floor}")
    by = {r.get("role"): r for r in res["generation"]}
    if "ratio_to_peft_mixed" in by.get("hf_engine", {}):
        print(f"engine vs PEFT mixed batch: {by['hf_engine']['ratio_to_peft_mixed']:.1f}x", flush=True)
    for loop in res["generation"]:
        if "ratio_to_base_same_loop" in loop:
            hf = loop["ratio_to_hf_dynamic_base"]
            print(f"{loop['config'][:60]}: engine vs base {loop['ratio_to_base_same_loop']:.3f}x (decode steps "
                  f"alone {loop['step_ratio_to_base_same_loop']:.3f}x)"
                  + ("" if hf is None else f", vs HF generate's base {hf:.2f}x"), flush=True)


if __name__ == "__main__":
    main()
