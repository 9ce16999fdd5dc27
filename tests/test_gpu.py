"""The engine on CUDA: mixed-user generation equals one-by-one, and bf16 training tracks
fp32 within the tolerance docs/architecture.md states. Marked ``gpu``: skipped without a
CUDA device (CI has none); run on the GPU machine with ``pytest -m gpu tests/test_gpu.py``."""

from __future__ import annotations

import pytest
import torch

from mta.engine.engine import AdapterEngine, EngineSpec, Row
from mta.engine.train import Job, TrainConfig, train_jobs
from mta.models.tiny import tiny_llama
from tests.engine_helpers import random_examples
from tests.test_engine_train import adapter_effect_gap

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def _engine(dtype: torch.dtype, compute: torch.dtype, users: int = 3) -> tuple[AdapterEngine, object]:
    model, tok = tiny_llama(seed=0, layers=4, hidden=128)
    model.to(CUDA, dtype)
    eng = AdapterEngine(model, EngineSpec(n_anchors=4, rank=4, alpha=8.0, compute_dtype=compute))
    eng.init_bank(seed=0, b_std=0.3)
    if users:
        eng.add_users(users, 2, 4.0, seed=1, b_std=0.3)
    return eng, tok


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_user_generation_on_cuda_equals_one_by_one(dtype):
    eng, tok = _engine(dtype, dtype)
    tok.padding_side = "left"
    prompts = ["hello there", "a much longer prompt for user two", "hi", "short one"]
    rows = [Row([0, 1], [0.6, 0.4], user=0), Row([2], [1.0], user=2), Row(active=False), Row([3], [1.0])]
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(CUDA)
    together = eng.generate(rows, enc["input_ids"], enc["attention_mask"], **kw)
    for b, r in enumerate(rows):
        one = tok([prompts[b]], return_tensors="pt", add_special_tokens=False).to(CUDA)
        alone = eng.generate([r], one["input_ids"], one["attention_mask"], **kw)
        assert together[b, -12:].tolist() == alone[0, one["input_ids"].shape[1]:].tolist(), (dtype, b)


def _train(dtype: torch.dtype, compute: torch.dtype):
    eng, tok = _engine(dtype, compute, users=0)
    eng.init_bank(seed=0)  # B = 0: trained from the PEFT init
    jobs = [Job(0, random_examples(12, seed=3), Row([0], [1.0]), key="a"),
            Job(1, random_examples(10, seed=4), Row([1], [1.0]), key="b")]
    stats = train_jobs(eng, "bank", jobs, TrainConfig(lr=1e-2, epochs=2, batch_size=4), pad_id=tok.pad_token_id)
    return eng, stats


@pytest.mark.parametrize("dtype, compute", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)])
def test_bf16_training_on_cuda_tracks_fp32(dtype, compute):
    """Against the all-fp32 run on the same GPU: every step's loss within 1% (bf16 base) or
    0.5% (bf16 adapter matmuls only; 0.16% measured on the H200, 2026-11-29, where the
    first tolerance of 0.1%, the CPU's, failed), the adapter's effect on the logits within
    10% / 3%."""
    ref, ref_stats = _train(torch.float32, torch.float32)
    eng, stats = _train(dtype, compute)
    assert all(ly.bank_A.dtype == torch.float32 for ly in eng.layers.values())
    loss_tol, effect_tol = (1e-2, 0.10) if dtype == torch.bfloat16 else (5e-3, 0.03)
    for key, losses in stats["losses"].items():
        assert losses == pytest.approx(ref_stats["losses"][key], rel=loss_tol), key
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0)).to(CUDA)
    gap = adapter_effect_gap(ref, eng, Row([0], [1.0]), ids)
    print(f"dtype {dtype}, compute {compute}: adapter effect gap {gap:.4f}")
    assert gap < effect_tol
