"""PEFT file format: round trips, PEFT's own loader, logits parity, user export.
Logit tolerance: 1e-5 absolute in float32 (PEFT and the engine sum in different orders)."""

from __future__ import annotations

import json

import pytest
import torch

from mta.engine.engine import Row
from mta.engine.fingerprint import model_fingerprint
from mta.engine.peft_io import (
    export_user,
    load_adapter,
    load_anchor,
    load_user,
    save_anchor,
    save_user,
)
from mta.errors import MtaError
from mta.models.tiny import tiny_llama
from tests.engine_helpers import peft_logits, tiny_engine

IDS = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(5))
TOL = 1e-5


def _peft_logits(path, ids=IDS):
    return peft_logits(path, ids)


def test_anchor_round_trip_and_peft_parity(tmp_path):
    eng, model, _ = tiny_engine(n_anchors=3, b_std=0.2)
    save_anchor(eng, 1, tmp_path / "a1")
    cfg = json.loads((tmp_path / "a1" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    with eng.route([Row([1], [1.0])] * 2), torch.no_grad():
        ours = model(IDS).logits
    torch.testing.assert_close(_peft_logits(tmp_path / "a1"), ours, atol=TOL, rtol=0)
    # load into another slot of a fresh engine: identical tensors
    eng2, _, _ = tiny_engine(n_anchors=3, seed=9)
    load_anchor(eng2, 0, tmp_path / "a1")
    for k, (a, b) in eng.anchor_tensors(1).items():
        assert torch.equal(eng2.anchor_tensors(0)[k][0], a) and torch.equal(eng2.anchor_tensors(0)[k][1], b)


def test_stacked_user_round_trip(tmp_path):
    eng, _, _ = tiny_engine(n_anchors=2, users=2, b_std=0.2)
    save_user(eng, 1, tmp_path / "u1")
    eng2, _, _ = tiny_engine(n_anchors=2, users=2, seed=4)
    load_user(eng2, 0, tmp_path / "u1")
    for k, (a, b) in eng.user_tensors(1).items():
        assert torch.equal(eng2.user_tensors(0)[k][0], a) and torch.equal(eng2.user_tensors(0)[k][1], b)
    pm_logits = _peft_logits(tmp_path / "u1")
    with eng.route([Row(user=1)] * 2), torch.no_grad():
        ours = eng.model(IDS).logits
    torch.testing.assert_close(pm_logits, ours, atol=TOL, rtol=0)


def test_stack_on_last_blocks_only(tmp_path):
    """A stack in the last block only: that block's modules alone carry it, the file says
    so in PEFT's terms (layers_to_transform), and PEFT's loader gives the engine's logits."""
    eng, model, _ = tiny_engine(n_anchors=2)
    eng.add_users(2, 2, 4.0, seed=3, b_std=0.2, last_layers=1)
    assert eng.stack_layers and all(".layers.1." in n for n in eng.stack_layers)
    assert len(eng.stack_layers) == 7
    save_user(eng, 1, tmp_path / "u1")
    cfg = json.loads((tmp_path / "u1" / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [1] and cfg["layers_pattern"] == "layers"
    with eng.route([Row(user=1)] * 2), torch.no_grad():
        ours = model(IDS).logits
    torch.testing.assert_close(_peft_logits(tmp_path / "u1"), ours, atol=TOL, rtol=0)
    for everything in (0, None, 2, 30):  # 0, None or >= the block count: all blocks
        eng.add_users(1, 2, 4.0, last_layers=everything)
        assert len(eng.stack_layers) == 14
    with pytest.raises(ValueError, match=">= 0"):
        eng.add_users(1, 2, 4.0, last_layers=-1)


@pytest.mark.parametrize("mode, pad", [("delta", None), ("delta", "serving"), ("factor", None),
                                       ("svd", 16)])
def test_exported_user_equals_engine(tmp_path, mode, pad):
    eng, model, _ = tiny_engine(n_anchors=4, users=2, b_std=0.2)
    anchors, weights = [2, 0], [0.7, 0.3]
    kw = {"svd_rank": 8} if mode == "svd" else {}
    export_user(eng, anchors, weights, tmp_path / "u", mode=mode, user=1, pad_to=pad, **kw)
    cfg = json.loads((tmp_path / "u" / "adapter_config.json").read_text())
    if mode == "delta":
        # exact by concatenation: k*r + r_s = 2*4 + 2 = 10; the next rank vLLM accepts is 16
        assert cfg["r"] == (16 if pad == "serving" else 10)
    if mode == "delta":
        row = Row(anchors, weights, user=1)
    else:
        eng.install_fused([(anchors, weights)], mode, svd_rank=8)
        row = Row(fused=0, user=1)
    with eng.route([row] * 2), torch.no_grad():
        ours = model(IDS).logits
    torch.testing.assert_close(_peft_logits(tmp_path / "u"), ours, atol=TOL, rtol=0)


def test_fingerprint_mismatch_refused(tmp_path):
    eng, _, _ = tiny_engine(n_anchors=1, b_std=0.1)
    save_anchor(eng, 0, tmp_path / "a")
    other, _ = tiny_llama(seed=1)  # same shapes, different weights
    with pytest.raises(MtaError, match="different base model.*weights_sha256"):
        load_adapter(tmp_path / "a", model_fingerprint(other))
    bigger, _ = tiny_llama(seed=0, layers=3)
    with pytest.raises(MtaError, match="num_hidden_layers 2 != 3"):
        load_adapter(tmp_path / "a", model_fingerprint(bigger))
    # the fingerprint is the same with and without an engine injected
    plain, _ = tiny_llama(seed=0)
    assert model_fingerprint(plain) == model_fingerprint(eng.model)


def test_corrupt_and_wrong_files_refused(tmp_path):
    eng, _, _ = tiny_engine(n_anchors=1, b_std=0.1)
    save_anchor(eng, 0, tmp_path / "a")
    w = tmp_path / "a" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    with pytest.raises(MtaError, match="corrupt or unreadable"):
        load_adapter(tmp_path / "a")
    pickled = tmp_path / "p"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text("{}")
    torch.save({"x": torch.zeros(1)}, pickled / "adapter_model.bin")
    with pytest.raises(MtaError, match=r"not a PEFT adapter.*adapter_model.bin"):
        load_adapter(pickled)


def test_rank_mismatch_refused(tmp_path):
    eng, _, _ = tiny_engine(n_anchors=1, rank=4, b_std=0.1)
    save_anchor(eng, 0, tmp_path / "a")
    eng8, _, _ = tiny_engine(n_anchors=1, rank=8)
    with pytest.raises(MtaError, match="do not match the bank"):
        load_anchor(eng8, 0, tmp_path / "a")


def test_nan_weights_refused(tmp_path):
    eng, _, _ = tiny_engine(n_anchors=1, b_std=0.1)
    with torch.no_grad():
        next(iter(eng.layers.values())).bank_A[0, 0, 0] = float("nan")
    with pytest.raises(MtaError, match=r"\.\w+_proj: refusing to save NaN or inf weights"):
        save_anchor(eng, 0, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_a_stored_adapter_with_an_inf_is_refused_naming_its_file_and_module(tmp_path):
    from safetensors.torch import load_file, save_file

    eng, _, _ = tiny_engine(n_anchors=1, b_std=0.1)
    save_anchor(eng, 0, tmp_path / "a")
    w = tmp_path / "a" / "adapter_model.safetensors"
    state = load_file(w)
    key = sorted(k for k in state if k.endswith(".lora_B.weight"))[-1]
    state[key][0, 0] = float("inf")
    save_file(state, w, metadata={"format": "pt"})
    module = key[len("base_model.model."):-len(".lora_B.weight")]
    with pytest.raises(MtaError, match=rf"adapter_model.safetensors: {module}: holds NaN or inf weights"):
        load_adapter(tmp_path / "a")
