"""Batched training = one-by-one training (same data, seed and AdamW), for the bank and
for users' stacked adapters. Tolerance: 2e-5 absolute on float32 weights after several
steps (differences come only from padding-dependent summation order)."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model

from mta.engine import train as engine_train
from mta.engine.engine import AdapterEngine, EngineSpec, Row
from mta.engine.optim import SlotAdamW, lr_multiplier
from mta.engine.train import Job, TrainConfig, job_batches, pad_batch, row_token_loss, train_jobs
from mta.errors import MtaError
from mta.models.tiny import tiny_llama
from tests.engine_helpers import TARGETS, adapter_effect_gap, random_examples, tiny_engine

TOL = 2e-5
CFG = TrainConfig(lr=5e-3, epochs=2, batch_size=3, warmup_ratio=0.2, seed=7, max_rows=5)


def _peft_alone(init: dict, job: Job, cfg: TrainConfig, rank: int, alpha: float) -> dict:
    """Reference: PEFT LoRA + torch.optim.AdamW on one adapter, the same batches."""
    model, tok = tiny_llama(seed=0)
    pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(TARGETS),
                                          lora_dropout=0.0))
    with torch.no_grad():
        for name, (a, b) in init.items():
            mod = pm.base_model.model.get_submodule(name)
            mod.lora_A["default"].weight.copy_(a)
            mod.lora_B["default"].weight.copy_(b)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, foreach=False)
    batches = job_batches(job, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_multiplier(s, len(batches), cfg.warmup_ratio, cfg.schedule))
    pm.train()
    for batch in batches:
        ids, mask, labels = pad_batch(batch, tok.pad_token_id, "cpu")
        loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
    return {name: (pm.base_model.model.get_submodule(name).lora_A["default"].weight.detach(),
                   pm.base_model.model.get_submodule(name).lora_B["default"].weight.detach())
            for name in init}


def test_bank_batched_equals_each_alone_with_peft():
    eng, model, tok = tiny_engine(n_anchors=3, rank=4, alpha=8.0)
    init = {n: eng.anchor_tensors(n) for n in range(3)}
    # different data sizes: anchors finish at different steps and must then stop moving
    jobs = [Job(n, random_examples(4 + 2 * n, seed=n), Row([n], [1.0]), key=f"anchor-{n}")
            for n in range(3)]
    stats = train_jobs(eng, "bank", jobs, CFG, pad_id=tok.pad_token_id)
    assert stats["steps"] == max(len(job_batches(j, CFG)) for j in jobs)
    for n, job in enumerate(jobs):
        ref = _peft_alone(init[n], Job(n, job.examples, job.row, job.key), CFG, 4, 8.0)
        got = eng.anchor_tensors(n)
        moved = max((got[k][0] - init[n][k][0]).abs().max().item() for k in got)
        assert moved > 1e-3  # training really changed the anchor
        for name in ref:
            torch.testing.assert_close(got[name][0], ref[name][0], atol=TOL, rtol=0)
            torch.testing.assert_close(got[name][1], ref[name][1], atol=TOL, rtol=0)


def test_steps_cycle_the_data_and_train_as_peft_does_over_the_same_batches():
    """``steps``: every job gets exactly that many updates, its examples cycled with a new
    shuffle each pass (a 3-example job and a 7-example one alike), and each still equals
    PEFT trained alone over the same batches."""
    cfg = dataclasses.replace(CFG, steps=5, epochs=1)
    small = Job(0, random_examples(3, seed=0), Row([0], [1.0]), key="a")
    plan = job_batches(small, cfg)
    assert len(plan) == 5 and all(len(b) == 3 for b in plan)  # batch 3 over 3 examples: one pass each
    assert len({tuple(id(e) for e in b) for b in plan}) > 1  # new shuffle each pass
    assert len(job_batches(Job(1, random_examples(7, seed=1), Row([1], [1.0]), key="b"), cfg)) == 5
    assert [len(b) for b in job_batches(small, dataclasses.replace(cfg, steps=None, epochs=2))] == [3, 3]
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TrainConfig(steps=0)
    eng, model, tok = tiny_engine(n_anchors=2, rank=4, alpha=8.0)
    init = {n: eng.anchor_tensors(n) for n in range(2)}
    jobs = [Job(n, random_examples(3 + 4 * n, seed=n), Row([n], [1.0]), key=f"anchor-{n}") for n in range(2)]
    stats = train_jobs(eng, "bank", jobs, cfg, pad_id=tok.pad_token_id)
    assert stats["steps"] == 5 and [len(v) for v in stats["losses"].values()] == [5, 5]
    for n, job in enumerate(jobs):
        ref = _peft_alone(init[n], Job(n, job.examples, job.row, job.key), cfg, 4, 8.0)
        got = eng.anchor_tensors(n)
        for name in ref:
            torch.testing.assert_close(got[name][0], ref[name][0], atol=TOL, rtol=0)
            torch.testing.assert_close(got[name][1], ref[name][1], atol=TOL, rtol=0)


def test_clipping_is_per_adapter_as_torch_clips_each_alone():
    """max_grad_norm clips each anchor's gradient by its own norm, as torch's clip_grad_norm_
    does for that adapter trained alone (a bound low enough to clip every step)."""
    cfg = dataclasses.replace(CFG, max_grad_norm=0.05)
    eng, model, tok = tiny_engine(n_anchors=2, rank=4, alpha=8.0)
    init = {n: eng.anchor_tensors(n) for n in range(2)}
    jobs = [Job(n, random_examples(5 + n, seed=n), Row([n], [1.0]), key=f"anchor-{n}") for n in range(2)]
    train_jobs(eng, "bank", jobs, cfg, pad_id=tok.pad_token_id)
    unclipped, _, _ = tiny_engine(n_anchors=2, rank=4, alpha=8.0)
    train_jobs(unclipped, "bank", [Job(j.slot, j.examples, j.row, j.key) for j in jobs], CFG, pad_id=tok.pad_token_id)
    for n, job in enumerate(jobs):
        ref = _peft_alone(init[n], Job(n, job.examples, job.row, job.key), cfg, 4, 8.0)
        got = eng.anchor_tensors(n)
        for name in ref:
            torch.testing.assert_close(got[name][1], ref[name][1], atol=TOL, rtol=0)
        # and the bound mattered: the unclipped run ends elsewhere
        assert any((got[k][1] - unclipped.anchor_tensors(n)[k][1]).abs().max() > 1e-4 for k in got)


def test_each_row_updates_only_its_anchor():
    eng, model, tok = tiny_engine(n_anchors=3)
    before = {n: eng.anchor_tensors(n) for n in range(3)}
    jobs = [Job(1, random_examples(4, seed=1), Row([1], [1.0]), key="a1")]
    train_jobs(eng, "bank", jobs, CFG, pad_id=tok.pad_token_id)
    for n in (0, 2):
        after = eng.anchor_tensors(n)
        assert all(torch.equal(after[k][0], before[n][k][0]) and torch.equal(after[k][1], before[n][k][1])
                   for k in after)
    assert any(not torch.equal(eng.anchor_tensors(1)[k][0], before[1][k][0]) for k in before[1])


def _stack_alone(init_bank: dict, init_user: dict, job: Job, cfg: TrainConfig) -> dict:
    """Reference: the same engine math with ONE user, trained by torch.optim.AdamW."""
    model, tok = tiny_llama(seed=0)
    eng = AdapterEngine(model, EngineSpec(n_anchors=3, rank=4, alpha=8.0))
    for n, t in init_bank.items():
        eng.load_anchor(n, t)
    eng.add_users(1, 2, 4.0)
    eng.load_user(0, init_user)
    params = eng.trainable("stack")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, foreach=False)
    batches = job_batches(job, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_multiplier(s, len(batches), cfg.warmup_ratio, cfg.schedule))
    row = Row(job.row.anchors, job.row.weights, user=0)
    model.train()
    for batch in batches:
        ids, mask, labels = pad_batch(batch, tok.pad_token_id, "cpu")
        with eng.route([row] * len(batch)):
            logits = model(input_ids=ids, attention_mask=mask).logits
        sums, counts = row_token_loss(logits, labels)
        (sums.sum() / counts.sum()).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return eng.user_tensors(0)


def test_stack_batched_equals_each_alone_and_bank_frozen():
    eng, model, tok = tiny_engine(n_anchors=3, users=3, stack_rank=2)
    bank = {n: eng.anchor_tensors(n) for n in range(3)}
    users0 = {u: eng.user_tensors(u) for u in range(3)}
    mixes = [([0, 1], [0.7, 0.3]), ([2], [1.0]), ([1, 2], [0.5, 0.5])]
    jobs = [Job(u, random_examples(3 + u, seed=10 + u), Row(a, w, user=u), key=f"user-{u}")
            for u, (a, w) in enumerate(mixes)]
    stats = train_jobs(eng, "stack", jobs, CFG, pad_id=tok.pad_token_id)
    # optimiser state exists only for the stack tables
    stack_bytes = sum(p.numel() * p.element_size() for p in eng.stack_parameters())
    assert stats["optimizer_state_bytes"] == 2 * stack_bytes
    for n in range(3):
        assert all(torch.equal(eng.anchor_tensors(n)[k][0], bank[n][k][0]) for k in bank[n])
    for u, job in enumerate(jobs):
        ref = _stack_alone(bank, users0[u], job, CFG)
        got = eng.user_tensors(u)
        for name in ref:
            torch.testing.assert_close(got[name][0], ref[name][0], atol=TOL, rtol=0)
            torch.testing.assert_close(got[name][1], ref[name][1], atol=TOL, rtol=0)


def test_slot_adamw_matches_torch_adamw_with_decay():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 4, 5))
    q = torch.nn.Parameter(p.detach()[1].clone())
    mine = SlotAdamW([p], 3, weight_decay=0.1)
    ref = torch.optim.AdamW([q], lr=0.01, weight_decay=0.1, foreach=False)
    for _ in range(5):
        g = torch.randn(4, 5)
        p.grad = torch.zeros_like(p)
        p.grad[1] = g
        q.grad = g.clone()
        mine.step([1], [0.01])
        ref.step()
    torch.testing.assert_close(p.detach()[1], q.detach(), atol=1e-6, rtol=0)


def test_slot_adamw_every_slot_at_once_matches_torch_adamw():
    """The in-place path (every slot steps, in order) against one torch AdamW per slot, with
    a slot-specific learning rate and then a step that leaves a slot out."""
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(3, 4, 5))
    refs = [torch.nn.Parameter(p.detach()[s].clone()) for s in range(3)]
    lrs = [0.01, 0.02, 0.005]
    mine = SlotAdamW([p], 3, weight_decay=0.1)
    opts = [torch.optim.AdamW([q], lr=lr, weight_decay=0.1, foreach=False) for q, lr in zip(refs, lrs)]
    for step in range(4):
        slots = [0, 1, 2] if step != 2 else [0, 2]
        p.grad = torch.randn(3, 4, 5)
        mine.step(slots, [lrs[s] for s in slots])
        for s in slots:
            refs[s].grad = p.grad[s].clone()
            opts[s].step()
    for s in range(3):
        torch.testing.assert_close(p.detach()[s], refs[s].detach(), atol=1e-6, rtol=0)


def test_slot_adamw_every_slot_alike_matches_torch_adamw():
    """The multi-tensor path (every slot steps, at one rate and step count) against one torch
    AdamW per slot and parameter: two parameters of different shapes, and a third without a
    gradient, which must not move. The path is taken: one multi-tensor call a step for every
    parameter (run Z's bank profile: the update was 9 launches a parameter, docs/performance.md)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(3, 4, 5)), torch.nn.Parameter(torch.randn(3, 6, 2)),
              torch.nn.Parameter(torch.randn(3, 2, 2))]
    idle = params[2].detach().clone()
    refs = [[torch.nn.Parameter(p.detach()[s].clone()) for s in range(3)] for p in params[:2]]
    mine = SlotAdamW(params, 3, weight_decay=0.1)
    opts = [torch.optim.AdamW([refs[0][s], refs[1][s]], lr=0.02, weight_decay=0.1, foreach=False) for s in range(3)]
    for _ in range(4):
        for p, r in zip(params[:2], refs):
            p.grad = torch.randn_like(p)
            for s in range(3):
                r[s].grad = p.grad[s].clone()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            mine.step([0, 1, 2], [0.02, 0.02, 0.02])
        assert sum(e.count for e in prof.key_averages() if e.key == "aten::_foreach_lerp_") == 1
        for o in opts:
            o.step()
    for p, r in zip(params[:2], refs):
        for s in range(3):
            torch.testing.assert_close(p.detach()[s], r[s].detach(), atol=1e-6, rtol=0)
    assert torch.equal(params[2].detach(), idle)


def _train_once(compute_dtype=torch.float32, checkpointing=False, token_budget=None, max_rows=16, hook=None,
                compile=False):
    """Two anchors trained together (6 optimiser steps each); ``hook`` (grad -> grad) is put
    on the first adapted layer's bank B table, which holds both anchors' slots."""
    model, tok = tiny_llama(seed=0)
    eng = AdapterEngine(model, EngineSpec(n_anchors=2, rank=4, alpha=8.0, compute_dtype=compute_dtype))
    eng.init_bank(seed=0)
    if hook is not None:
        table = next(iter(eng.bank_layers.values())).bank_B
        table.requires_grad_(True)  # a hook needs it; the hook stays while training toggles it
        table.register_hook(hook)
    jobs = [Job(0, random_examples(6, seed=3), Row([0], [1.0]), key="a"),
            Job(1, random_examples(5, seed=4), Row([1], [1.0]), key="b")]
    cfg = TrainConfig(lr=1e-2, epochs=2, batch_size=2, gradient_checkpointing=checkpointing,
                      token_budget=token_budget, max_rows=max_rows, compile=compile)
    stats = train_jobs(eng, "bank", jobs, cfg, pad_id=tok.pad_token_id)
    return eng, stats


def _updates(eng) -> dict:
    return {(s, n): b.double() @ a.double() for s in range(eng.n_anchors)
            for n, (a, b) in eng.anchor_tensors(s).items()}


def test_checkpointing_and_micro_batching_change_nothing_but_rounding():
    ref, _ = _train_once()
    for kw in ({"checkpointing": True}, {"token_budget": 30}, {"max_rows": 1}):
        eng, _ = _train_once(**kw)
        for k, v in _updates(eng).items():
            torch.testing.assert_close(v, _updates(ref)[k], atol=1e-6, rtol=1e-5)


def test_compiled_layers_train_the_same_adapters_in_one_graph_each_and_are_restored():
    """TrainConfig.compile: the decoder blocks through torch.compile (aot_eager on the CPU:
    dynamo's capture and AOTAutograd's joint graph, without inductor's code generation) give
    the eager run's updates; every block is captured whole (no graph break, which would
    quietly split it into eager pieces); the blocks are eager again afterwards."""
    from torch._dynamo.utils import counters

    from mta.engine.train import decoder_layers

    torch._dynamo.reset()
    counters.clear()
    ref, ref_stats = _train_once()
    eng, stats = _train_once(compile="aot_eager", max_rows=3)  # several micro-batch shapes
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1
    for k, v in _updates(eng).items():
        torch.testing.assert_close(v, _updates(ref)[k], atol=1e-6, rtol=1e-5)
    for key, losses in stats["losses"].items():
        assert losses == pytest.approx(ref_stats["losses"][key], rel=1e-5)
    layers = decoder_layers(eng.model)
    assert len(layers) == eng.model.config.num_hidden_layers
    assert all(ly._compiled_call_impl is None for ly in layers)
    with pytest.raises(ValueError, match="compile must be True, False or a dynamo backend's name"):
        TrainConfig(compile="")
    with pytest.raises(ValueError, match="compiled training with inductor is for CUDA models"):
        _train_once(compile=True)


def test_bf16_adapter_compute_keeps_fp32_masters_and_tracks_fp32():
    """bf16 adapter matmuls (the CUDA default on a bf16 base) with fp32 master weights:
    the masters stay fp32, every step's loss is within 0.1% of the all-fp32 run, and the
    trained adapter's effect on the logits within 3% (the tolerance stated in
    docs/architecture.md; benchmarks/precision.py measures the same on the GPU)."""
    ref, ref_stats = _train_once()
    eng, stats = _train_once(compute_dtype=torch.bfloat16)
    assert all(ly.bank_A.dtype == torch.float32 for ly in eng.layers.values())
    for key, losses in stats["losses"].items():
        assert losses == pytest.approx(ref_stats["losses"][key], rel=1e-3)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    gap = adapter_effect_gap(ref, eng, Row([0], [1.0]), ids)
    assert 0 < gap < 0.03, gap


def test_micro_batches_respect_rows_and_tokens():
    from mta.engine.budget import micro_batches

    assert micro_batches([10, 9, 8, 3], max_rows=2, token_budget=None) == [[0, 1], [2, 3]]
    assert micro_batches([10, 9, 8, 3], max_rows=None, token_budget=20) == [[0, 1], [2, 3]]
    assert micro_batches([50, 9], max_rows=None, token_budget=20) == [[0], [1]]  # too long: alone


def test_diverging_loss_names_the_learning_rate():
    model, tok = tiny_llama(seed=0)
    eng = AdapterEngine(model, EngineSpec(n_anchors=1, rank=4, alpha=8.0))
    eng.init_bank(seed=0)
    jobs = [Job(0, random_examples(4, seed=3), Row([0], [1.0]), key="a")]
    with pytest.raises(MtaError, match=r"diverged.*lower the learning rate \(`BankConfig.lr` = 1e\+30\)") as e:
        train_jobs(eng, "bank", jobs, TrainConfig(lr=1e30, epochs=3, batch_size=1, lr_field="BankConfig.lr"),
                   pad_id=tok.pad_token_id)
    assert e.value.fields == ("BankConfig.lr",)
    # and says where the NaN came from: here one step of lr 1e30 left huge but finite weights
    assert re.search(r"adapter weights are finite, largest \|w\| [0-9.]+e\+(2[4-9]|3\d): the forward pass overflowed",
                     str(e.value)), str(e.value)


def _poison_slot_1(steps):
    """A gradient hook making anchor slot 1's gradient NaN at the given (1-based) backward calls
    (one per optimiser step here: every step's rows fit one micro-batch)."""
    calls = {"n": 0}

    def hook(g):
        calls["n"] += 1
        if calls["n"] in steps:
            g = g.clone()
            g[1] = float("nan")
        return g
    return hook


def test_a_non_finite_gradient_skips_that_adapters_update_and_nothing_else(caplog):
    ref, ref_stats = _train_once()
    eng, stats = _train_once(hook=_poison_slot_1({1}))
    assert ref_stats["skipped_steps"] == {}
    assert stats["skipped_steps"] == {"b": 1}
    first = next(iter(eng.bank_layers))  # the poisoned table, B of the first adapted layer
    assert (f"step 1: the gradient of 'b' is not finite (1 of {2 * len(eng.bank_layers)} tables; the last in the "
            f"model, where the backward pass met it: {first} bank B, NaN); its update is skipped") in caplog.text
    # anchor a trained exactly as without the NaN; b trained on its 5 other steps, finite
    for name, (a, b) in ref.anchor_tensors(0).items():
        assert torch.equal(eng.anchor_tensors(0)[name][0], a) and torch.equal(eng.anchor_tensors(0)[name][1], b)
    got, want = eng.anchor_tensors(1), ref.anchor_tensors(1)
    assert all(torch.isfinite(t).all() for pair in got.values() for t in pair)
    assert any(not torch.allclose(got[n][1], want[n][1]) for n in got)
    assert len(stats["losses"]["b"]) == 6 and all(map(math.isfinite, stats["losses"]["b"]))


def test_an_adapter_whose_every_gradient_is_non_finite_is_an_error():
    with pytest.raises(MtaError, match=r"every gradient of 'b' was NaN or inf, so it never trained; lower the "
                                       r"learning rate"):
        _train_once(hook=_poison_slot_1(set(range(1, 7))))


def test_train_config_names_bad_fields():
    with pytest.raises(ValueError, match=r"lr must be a positive number, got -1.*epochs must be >= 1"):
        TrainConfig(lr=-1, epochs=0)


def test_all_finite_finds_one_bad_element():
    from mta.engine.train import all_finite

    good = [torch.randn(3, 4), torch.zeros(0), torch.randn(2, 2, 2, dtype=torch.bfloat16)]
    assert all_finite(good) and all_finite([])
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.randn(5, 6)
        t[3, 2] = bad
        assert not all_finite(good + [t])


def test_measured_budget_keeps_to_its_cap_on_a_shared_gpu(monkeypatch):
    """Two jobs on one GPU: with a cap (--gpu-memory), the measured token budget plans into
    it, not into all the memory another job has not taken yet."""
    from mta.engine.budget import Budget
    from mta.engine.config import TrainConfig

    gib = 1024 ** 3
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (100 * gib, 140 * gib))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 10 * gib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 12 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: 10 * gib + 1024 * 1024)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    dev = torch.device("cuda")
    sizes = {}
    for cap in (None, 35 * gib):
        b = Budget(TrainConfig(memory_cap=cap), dev)
        assert b.auto and not b.measured
        b.end_probe(10 * gib, tokens=1)  # 1 MiB per token
        sizes[cap] = b.value
    assert sizes[None] == int(0.7 * (100 + 2) * 1024)     # free + this process's cache
    assert sizes[35 * gib] == int(0.7 * (35 - 12) * 1024)  # its cap (--gpu-memory), less what it reserved
    with pytest.raises(ValueError, match="memory_cap"):
        TrainConfig(memory_cap=0)


def test_an_out_of_memory_step_halves_the_budget_and_says_where_memory_stood(monkeypatch, caplog):
    from mta.engine.budget import Budget
    from mta.engine.config import TrainConfig

    gib = 1024 ** 3
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 23 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: 21 * gib)
    b = Budget(TrainConfig(memory_cap=24 * gib), torch.device("cuda"))
    b.value = 3000
    with caplog.at_level("WARNING", logger="mta.engine.budget"):
        assert b.halve(longest=1000) and b.value == 1500
        assert not b.halve(longest=1000) and b.value == 1500  # under the longest row: the error is raised
    assert "23.0 GiB reserved, 21.0 GiB peak in use, cap 24.0 GiB" in caplog.text


def test_the_skip_message_locates_where_a_non_finite_gradient_entered(caplog):
    """A NaN entering the backward pass at one layer's output reaches every table below it,
    none above: the message names that layer's table as the last non-finite one."""
    model, tok = tiny_llama(seed=0)
    eng = AdapterEngine(model, EngineSpec(n_anchors=2, rank=4, alpha=8.0))
    eng.init_bank(seed=0)
    names = list(eng.bank_layers)
    where = names[len(names) // 2]  # a layer in the middle: tables above it stay finite
    calls = {"n": 0}

    def poison(module, args, out):
        calls["n"] += 1
        if calls["n"] == 1 and out.requires_grad:  # the first step's forward only
            out.register_hook(lambda g: torch.full_like(g, float("nan")))
    handle = model.get_submodule(where).register_forward_hook(poison)
    jobs = [Job(0, random_examples(4, seed=3), Row([0], [1.0]), key="a"),
            Job(1, random_examples(4, seed=4), Row([1], [1.0]), key="b")]
    try:
        stats = train_jobs(eng, "bank", jobs, TrainConfig(lr=1e-2, epochs=2, batch_size=4), pad_id=tok.pad_token_id)
    finally:
        handle.remove()
    assert stats["skipped_steps"] == {"a": 1, "b": 1}
    below = names.index(where) + 1  # this layer and every one before it: A and B each
    assert (f"({2 * below} of {2 * len(names)} tables; the last in the model, where the backward pass met it: "
            f"{where} bank B, NaN)") in caplog.text


def test_run_peak_survives_the_probes_resets(monkeypatch):
    """A micro-batch probe resets torch's peak counters; the run's peak (what `mta eval`
    reports) is still the largest seen before any reset, allocated and reserved alike."""
    from mta.engine import budget as train

    counters = {"allocated": 30, "reserved": 50}
    monkeypatch.setattr(train, "_PEAKS", {})
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: counters["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: counters["reserved"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: counters.update(allocated=1, reserved=2))
    dev = torch.device("cuda", 0)
    train.reset_peak(dev)
    assert counters == {"allocated": 1, "reserved": 2}
    assert train.run_peak(dev) == (30, 50)
    counters.update(allocated=40, reserved=45)  # a later, larger allocation; less reserved
    assert train.run_peak(dev) == (40, 50)


def test_an_eval_record_carries_its_peaks_and_its_cap():
    from mta.evaluation.runner import peak_fields

    assert peak_fields(None) == {"peak_gpu_memory_bytes": None, "peak_gpu_reserved_bytes": None,
                                 "gpu_memory_cap_bytes": None}
    assert peak_fields({"allocated": 1, "reserved": 2, "cap": 3}) == {
        "peak_gpu_memory_bytes": 1, "peak_gpu_reserved_bytes": 2, "gpu_memory_cap_bytes": 3}


def test_check_steps_cover_the_start_the_end_and_even_steps_between():
    assert engine_train.check_steps(16, 8) == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    assert engine_train.check_steps(3, 8) == [0, 1, 2, 3]
    assert engine_train.check_steps(10, 4) == [0, 3, 6, 9, 10]


def test_held_out_stopping_keeps_each_stack_at_its_best_checked_step():
    eng, model, tok = tiny_engine(n_anchors=3, users=3, stack_rank=2)
    cfg = TrainConfig(lr=3e-2, steps=8, batch_size=2, warmup_ratio=0.0, seed=7, max_rows=5)
    train = [random_examples(4, seed=20 + u) for u in range(3)]
    # user 0 is judged on an example it trains on (its loss falls: it keeps a late step);
    # user 1 on unrelated tokens at a rate that overfits (it keeps an early one); user 2 has none
    held = [train[0][:1], random_examples(1, seed=99), []]
    jobs = [Job(u, train[u], Row((u,), (1.0,), user=u), key=f"user-{u}") for u in range(3)]
    snaps = {0: {u: eng.user_tensors(u) for u in range(3)}}
    stats = train_jobs(eng, "stack", jobs, cfg, pad_id=tok.pad_token_id, held_out=held, checks=4,
                       on_step=lambda s, t: snaps.__setitem__(s, {u: eng.user_tensors(u) for u in range(3)}))
    stopped, losses = stats["stopped_at"], stats["held_out_losses"]
    assert set(stopped) == set(losses) == {"user-0", "user-1"}  # user 2: nothing held out
    assert all(len(v) == len(engine_train.check_steps(8, 4)) for v in losses.values())
    for u in (0, 1):
        key = f"user-{u}"
        at = engine_train.check_steps(8, 4)
        assert stopped[key] == at[losses[key].index(min(losses[key]))]  # the lowest held-out loss
        got, want = eng.user_tensors(u), snaps[stopped[key]][u]
        assert all(torch.equal(got[n][0], want[n][0]) and torch.equal(got[n][1], want[n][1]) for n in got)
        # the kept loss is what the kept stack gives on the held-out examples now
        again = engine_train.row_losses(eng, [(jobs[u].row, e) for e in held[u]], tok.pad_token_id)
        assert sum(again) / len(again) == pytest.approx(min(losses[key]), abs=1e-6)
    assert stopped["user-0"] > 0 and losses["user-0"][-1] < losses["user-0"][0]
    got, want = eng.user_tensors(2), snaps[8][2]  # no held-out examples: its last step
    assert all(torch.equal(got[n][1], want[n][1]) for n in got)
    # the checks only read: the same run without them ends where this one's last step was
    eng2, _, _ = tiny_engine(n_anchors=3, users=3, stack_rank=2)
    train_jobs(eng2, "stack", [Job(u, train[u], Row((u,), (1.0,), user=u), key=f"user-{u}") for u in range(3)],
               cfg, pad_id=tok.pad_token_id)
    for u in range(3):
        a, b = eng2.user_tensors(u), snaps[8][u]
        assert all(torch.equal(a[n][1], b[n][1]) for n in a)


@pytest.mark.parametrize("refit", [False, True])
def test_a_stack_that_only_hurts_its_held_out_item_is_kept_at_step_zero(refit):
    """(refit: the held-out run chooses step 0, so no second run trains it: as initialised)"""
    eng, model, tok = tiny_engine(n_anchors=2, users=1, stack_rank=2)
    init = eng.user_tensors(0)
    cfg = TrainConfig(lr=5e-2, steps=6, batch_size=2, warmup_ratio=0.0, seed=7, max_rows=5)
    prompt = (11, 42, 97, 150, 7)
    # it trains to answer 60 to the prompt; the held-out item answers 61 to the same prompt
    def answer(t):
        return engine_train.Example(prompt + (t,), (engine_train.IGNORE,) * len(prompt) + (t,))

    job = Job(0, [answer(60)] * 4, Row((0,), (1.0,), user=0), key="user-0")
    stats = train_jobs(eng, "stack", [job], cfg, pad_id=tok.pad_token_id, held_out=[[answer(61)]], refit=refit)
    assert stats["stopped_at"] == {"user-0": 0}
    assert min(stats["held_out_losses"]["user-0"][1:]) > stats["held_out_losses"]["user-0"][0]
    if refit:
        assert stats["losses"] == {"user-0": []} and len(stats["first_run_losses"]["user-0"]) == 6
    got = eng.user_tensors(0)
    assert all(torch.equal(got[n][0], init[n][0]) and torch.equal(got[n][1], init[n][1]) for n in got)


def test_a_refit_trains_each_job_again_on_every_example_for_the_steps_its_held_out_run_chose():
    """``refit``: the held-out run only chooses each job's steps; every job then starts again
    from its initial values and trains on its examples and its held-out ones for that many
    steps, as it would alone (a job without held-out examples: its whole plan again; one
    whose choice is step 0: as initialised, no step)."""
    cfg = TrainConfig(lr=3e-2, steps=8, batch_size=2, warmup_ratio=0.0, seed=7, max_rows=5)
    train = [random_examples(4, seed=20 + u) for u in range(3)]
    held = [train[0][:1], random_examples(1, seed=5), []]  # user 1 keeps a step between the ends

    def jobs():
        return [Job(u, train[u], Row((u,), (1.0,), user=u), key=f"user-{u}") for u in range(3)]

    eng, _, tok = tiny_engine(n_anchors=3, users=3, stack_rank=2)
    chose = train_jobs(eng, "stack", jobs(), cfg, pad_id=tok.pad_token_id, held_out=held, checks=4)["stopped_at"]
    eng, _, tok = tiny_engine(n_anchors=3, users=3, stack_rank=2)
    stats = train_jobs(eng, "stack", jobs(), cfg, pad_id=tok.pad_token_id, held_out=held, checks=4, refit=True)
    assert stats["stopped_at"] == chose and chose["user-0"] > 0 and 0 < chose["user-1"] < 8
    assert stats["held_out_losses"].keys() == {"user-0", "user-1"}
    for u in range(3):
        key = f"user-{u}"
        alone, _, _ = tiny_engine(n_anchors=3, users=3, stack_rank=2)
        steps = chose.get(key)
        if steps != 0:
            job = Job(u, [*train[u], *held[u]], Row((u,), (1.0,), user=u), key=key, steps=steps)
            train_jobs(alone, "stack", [job], cfg, pad_id=tok.pad_token_id)
        assert len(stats["losses"][key]) == (8 if steps is None else steps)
        got, want = eng.user_tensors(u), alone.user_tensors(u)
        for n in got:
            torch.testing.assert_close(got[n][0], want[n][0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[n][1], want[n][1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="refit needs held-out examples"):
        train_jobs(eng, "stack", jobs(), cfg, pad_id=tok.pad_token_id, refit=True)
