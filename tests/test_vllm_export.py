"""`mta export --all --format vllm`: one PEFT adapter per user, laid out for vLLM's
runtime loading, each giving the logits of the user's row in our engine."""

from __future__ import annotations

import json

import torch
from peft import PeftModel

from mta.bank import build_bank
from mta.cli.main import main
from mta.config import AdaptConfig, BankConfig
from mta.data.synth import synth_users
from mta.engine.peft_io import SERVING_RANKS
from mta.loaded_bank import LoadedBank, Request
from mta.models.tiny import tiny_llama
from mta.store import UserStore
from mta.tasks import get_task
from tests.engine_helpers import tiny_backbone

TASK = get_task("synth")
FAST = dict(batch_size=4, max_length=160)
VLLM_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_vllm_export_layout_and_logits(tmp_path):
    backbone = tiny_backbone()
    build_bank(backbone, synth_users(4, seed=9), TASK, BankConfig.make(anchors=2, min_history=1, **FAST),
               tmp_path / "bank")
    bank = LoadedBank(backbone, tmp_path / "bank", TASK)
    store = UserStore(tmp_path / "store", create=True)
    users = [u.model_copy(update={"user_id": i}) for u, i in zip(synth_users(3, seed=2), ["alice", "a/b", ".."])]
    bank.adapt(users[:2], AdaptConfig.make(**FAST), store)
    bank.adapt(users[2:], AdaptConfig.make(merge="factor", stack_rank=3, stack_layers=0, **FAST), store)
    out = tmp_path / "vllm"
    assert main(["export", "--bank", str(tmp_path / "bank"), "--store", str(tmp_path / "store"), "--all", "--format",
                 "vllm", "--out", str(out), "--served-model", "my/base", "--model", "tiny-random-llama"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base_model_name"] == "my/base"
    assert {e["user_id"] for e in manifest["users"]} == {"alice", "a/b", ".."}
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(3))
    plans, _, _ = bank.plans([Request(e["user_id"], "") for e in manifest["users"]], store)
    rows = bank.rows(plans)
    for e, row in zip(manifest["users"], rows):
        d = out / e["lora_name"]
        cfg = json.loads((d / "adapter_config.json").read_text())
        assert e["lora_name"].startswith("u-") and "/" not in e["lora_name"]
        assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == "my/base"
        assert cfg["r"] in SERVING_RANKS and cfg["r"] <= manifest["max_lora_rank"]
        assert set(cfg["target_modules"]) <= VLLM_LORA_MODULES and not cfg.get("layers_to_transform")
        with bank.backbone.engine.route([row] * 2), torch.no_grad():
            ours = bank.backbone.model(ids).logits
        base, _ = tiny_llama(seed=0)
        pm = PeftModel.from_pretrained(base, str(d)).eval()
        with torch.no_grad():
            torch.testing.assert_close(pm(ids).logits, ours, atol=2e-5, rtol=0)
    # what docs/scale.md tells a vLLM user: the adapters name the served model, and with no
    # --served-model the bank's model id (mta's registry name); files readable by the group
    # and others under the usual umask (vLLM may run as another user)
    for p in out.rglob("*"):
        assert p.stat().st_mode & 0o777 == (0o777 if p.is_dir() else 0o666) & ~_umask(), p
    # a second export replaces ours; a foreign directory is refused
    assert main(["export", "--bank", str(tmp_path / "bank"), "--store", str(tmp_path / "store"), "--all", "--format",
                 "vllm", "--out", str(out), "--model", "tiny-random-llama"]) == 0
    assert json.loads((out / "manifest.json").read_text())["base_model_name"] == "tiny-random-llama"
    assert all(json.loads((d / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-random-llama"
               for d in out.iterdir() if d.is_dir())
    assert main(["export", "--bank", str(tmp_path / "bank"), "--store", str(tmp_path / "store"), "--all", "--format",
                 "vllm", "--out", str(tmp_path / "bank"), "--model", "tiny-random-llama"]) == 2
    # a directory with a manifest.json of its own, or ours with a file added, is not replaced (data loss before)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text("{}")
    (mine / "notes.txt").write_text("keep me")
    (out / "notes.txt").write_text("keep me too")
    for target in (mine, out):
        assert main(["export", "--bank", str(tmp_path / "bank"), "--store", str(tmp_path / "store"), "--all",
                     "--format", "vllm", "--out", str(target), "--model", "tiny-random-llama"]) == 2
    assert (mine / "notes.txt").read_text() == "keep me" and (out / "notes.txt").read_text() == "keep me too"


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
