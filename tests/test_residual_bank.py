"""A residual bank (`--bank-base task`): a task LoRA trained first on the candidate pool,
frozen under every anchor, which trains as a residual; every adapted row, the weight
search and the export carry the task LoRA."""

from __future__ import annotations

import json

import pytest
import torch

from mta.bank import BASE_DIR, adapter_dir, base_adapter, build_bank, build_task, read_index
from mta.cli.main import main
from mta.config import AdaptConfig, BankConfig
from mta.data.synth import synth_users
from mta.engine.peft_io import WEIGHTS
from mta.errors import MtaError
from mta.loaded_bank import LoadedBank, Plan
from mta.paths import sha256_file
from mta.store import UserStore
from mta.tasks import get_task
from tests.engine_helpers import peft_logits, tiny_backbone

TASK = get_task("synth")
FAST = dict(anchors=2, min_history=1, epochs=1, batch_size=4, max_length=160, group_size=2)
ADAPT = dict(batch_size=4, max_length=160)
COMMON = ["--model", "tiny-random-llama", "--embedder", "hashing-embedder", "--max-new-tokens", "2",
          "--n-boot", "100", "--anchors", "2"]


def _weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / WEIGHTS))


def test_the_base_is_the_task_lora_and_stays_frozen_under_residual_anchors(tmp_path):
    users = synth_users(8, seed=3)
    backbone = tiny_backbone()
    cfg = BankConfig.make(**FAST, bank_base="task")
    rec = build_bank(backbone, users, TASK, cfg, tmp_path / "bank")
    assert rec.base_sha256 == sha256_file(base_adapter(tmp_path / "bank") / WEIGHTS)
    assert read_index(tmp_path / "bank" / BASE_DIR).kind == "task"
    # the base is exactly the task-lora baseline's adapter (same pool, same recipe)
    build_task(tiny_backbone(), users, TASK, cfg.model_copy(update={"bank_base": "none"}), tmp_path / "task")
    base, task = _weights(base_adapter(tmp_path / "bank")), _weights(adapter_dir(tmp_path / "task", 0))
    assert base.keys() == task.keys() and all(torch.equal(base[k], task[k]) for k in base)
    # the anchors trained ON TOP of it: not the anchors a from-scratch bank trains
    scratch = build_bank(tiny_backbone(), users, TASK, BankConfig.make(**FAST), tmp_path / "scratch")
    assert [a.user_id for a in scratch.anchors] == [a.user_id for a in rec.anchors]
    for a in rec.anchors:
        ours, theirs = _weights(adapter_dir(tmp_path / "bank", a.slot)), _weights(adapter_dir(tmp_path / "scratch",
                                                                                              a.slot))
        assert any(not torch.equal(ours[k], theirs[k]) for k in ours)
        assert a.first_loss != scratch.anchors[a.slot].first_loss  # its first forward already had the base
    assert rec.bank_id != scratch.bank_id


def test_rows_search_and_export_carry_the_task_lora(tmp_path):
    users = synth_users(8, seed=3)
    backbone = tiny_backbone()
    build_bank(backbone, users, TASK, BankConfig.make(**FAST, bank_base="task"), tmp_path / "bank")
    bank = LoadedBank(backbone, tmp_path / "bank", TASK)
    assert bank.base_slot == 2 and bank.backbone.engine.n_anchors == 3
    row = bank.rows([Plan((1, 0), (0.6, 0.4))])[0]
    assert tuple(row.anchors) == (1, 0, 2) and tuple(row.weights) == (0.6, 0.4, 1.0)
    assert not bank.rows([Plan()])[0].active  # the base model stays the base model
    store = UserStore(tmp_path / "store", create=True)
    cfg = AdaptConfig.make(**ADAPT, fusion_weights="searched", search_evals=6)
    bank.adapt(users[:2], cfg, store)
    rec = store.meta(users[0].user_id)
    assert len(rec.anchors) == 2 and len(rec.weights) == 2  # the task LoRA is the bank's, not stored per user
    out = bank.export(users[0].user_id, store, tmp_path / "u")
    cfg_json = json.loads((out / "adapter_config.json").read_text())
    assert cfg_json["r"] == 3 * 8 + 2  # task LoRA + 2 residual anchors (rank 8) + the rank-2 stack
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(5))
    slot = bank.stacks.ensure({users[0].user_id: rec}, store)[users[0].user_id]
    with bank.backbone.engine.route(bank.rows([Plan(tuple(rec.anchors), tuple(rec.weights), stack=slot)]) * 2), \
            torch.no_grad():
        ours = bank.backbone.model(ids).logits
    torch.testing.assert_close(peft_logits(out, ids), ours, atol=1e-5, rtol=0)
    with pytest.raises(MtaError, match="delta merge only"):
        bank.adapt(users[2:3], AdaptConfig.make(**ADAPT, merge="factor"), store)


def test_eval_with_a_residual_bank_shares_the_task_lora_and_keeps_reference_from_scratch(tmp_path):
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "8", "--queries", "1"]) == 0
    out = tmp_path / "ev"
    assert main(["eval", "--data", str(data), "--out", str(out), "--methods", "task-lora,mta,mta-reference",
                 "--bank-base", "task", *COMMON]) == 0
    fold = out / "fold0"
    # the baseline's task LoRA, trained once, IS the bank's base (copied in, the same bytes)
    assert read_index(fold / "bank").base_sha256 == sha256_file(adapter_dir(fold / "task-lora", 0) / WEIGHTS)
    assert read_index(fold / "bank-reference").base_sha256 is None
    rows = {r["method"]: r["optimizer_steps"] for r in json.loads((out / "metrics.json").read_text())["results"]}
    assert set(rows["mta"]) == {"stack", "anchors", "task LoRA"} and set(rows["mta-reference"]) == {"stack",
                                                                                                    "anchors"}


@pytest.mark.parametrize("first,then", [("mta", "task-lora,oppu"), ("task-lora", "mta-fusion")])
def test_the_task_lora_is_trained_once_whichever_method_asks_first(tmp_path, monkeypatch, first, then):
    """A run (a tune's trial) that needs the task LoRA after another run into the same place
    trained it, as the baseline's or as a residual bank's base, trains none: the baselines
    take the bank's base, a new bank copies the baseline's in (the same bytes)."""
    import mta.bank as bank_mod

    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "8", "--queries", "1"]) == 0
    out = tmp_path / "ev"
    args = ["eval", "--data", str(data), "--out", str(out), "--bank-base", "task", *COMMON]
    assert main([*args, "--methods", first]) == 0
    real, kinds = bank_mod.train_group, []

    def counting(backbone, rec, *a, **kw):
        kinds.append(rec.kind)
        return real(backbone, rec, *a, **kw)

    monkeypatch.setattr(bank_mod, "train_group", counting)
    assert main([*args, "--methods", then]) == 0
    assert "task" not in kinds  # no task LoRA trained again (only the new bank's anchors, if any)
    assert kinds == (["bank", "bank"] if then == "mta-fusion" else [])  # its anchors: one group a fold
    for fold in (out / "fold0", out / "fold1"):
        own = fold / "task-lora" if first == "task-lora" else fold / "bank" / BASE_DIR
        assert read_index(fold / "bank").base_sha256 == sha256_file(adapter_dir(own, 0) / WEIGHTS)


def test_a_bank_copies_in_only_the_very_task_lora_it_would_train(tmp_path, monkeypatch):
    """``base_from``: a finished task bank of the same recipe and pool is copied in as the
    base (no training); one of another learning rate, of other users, or none there is
    not: the bank trains its own base (the same bytes as the copy, trained alike)."""
    import mta.bank as bank_mod

    users = synth_users(8, seed=3)
    cfg = BankConfig.make(**FAST, bank_base="task")
    task_cfg = cfg.model_copy(update={"bank_base": "none"})
    build_task(tiny_backbone(), users, TASK, task_cfg, tmp_path / "task")
    build_task(tiny_backbone(), users, TASK, task_cfg.model_copy(update={"lr": task_cfg.lr / 3}), tmp_path / "slow")
    build_task(tiny_backbone(), users[:6], TASK, task_cfg, tmp_path / "fewer")
    theirs = sha256_file(adapter_dir(tmp_path / "task", 0) / WEIGHTS)
    real, kinds = bank_mod.train_group, []

    def counting(backbone, rec, *a, **kw):
        kinds.append(rec.kind)
        return real(backbone, rec, *a, **kw)

    monkeypatch.setattr(bank_mod, "train_group", counting)
    for name, copied in (("task", True), ("slow", False), ("fewer", False), ("missing", False)):
        kinds.clear()
        rec = build_bank(tiny_backbone(), users, TASK, cfg, tmp_path / f"bank-{name}", base_cfg=task_cfg,
                         base_from=tmp_path / name)
        assert kinds.count("task") == (0 if copied else 1), name
        assert rec.base_sha256 == sha256_file(base_adapter(tmp_path / f"bank-{name}") / WEIGHTS)
        assert rec.base_sha256 == theirs or not copied  # the very file when copied
        ours, task = _weights(base_adapter(tmp_path / f"bank-{name}")), _weights(adapter_dir(tmp_path / "task", 0))
        assert all(torch.equal(ours[k], task[k]) for k in task)  # the same adapter either way
        assert bank_mod.finished_task(tmp_path / f"bank-{name}" / BASE_DIR, tiny_backbone(), TASK, task_cfg, users)
    assert not bank_mod.finished_task(tmp_path / "slow", tiny_backbone(), TASK, task_cfg, users)


def test_mta_and_mta_fusion_share_one_search_per_fold_and_each_counts_its_time(tmp_path, monkeypatch):
    """Searched weights in `mta eval`: `mta-fusion` and `mta` search alike, so each fold
    searches once (RUN/searched) and both store the same weights; the search's seconds are
    in each method's adaptation time."""
    import mta.loaded_bank as lb

    seconds, real = [], lb.search_weights

    def timed(*a, **kw):
        found, info = real(*a, **kw)
        seconds.append(info["seconds"])
        return found, info

    monkeypatch.setattr(lb, "search_weights", timed)
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "8", "--queries", "1"]) == 0
    out = tmp_path / "ev"
    assert main(["eval", "--data", str(data), "--out", str(out), "--methods", "mta-fusion,mta", "--bank-base",
                 "task", "--fusion-weights", "searched", "--search-evals", "4", *COMMON]) == 0
    assert len(seconds) == 2 and len(list((out / "searched").glob("*.json"))) == 2  # one search a fold
    for fold, searched in zip(("fold0", "fold1"), seconds):
        stores = {m: UserStore(out / fold / m) for m in ("mta-fusion", "mta")}
        ids = stores["mta"].user_ids()
        assert ids and all(stores["mta"].meta(u).weights == stores["mta-fusion"].meta(u).weights for u in ids)
        for m in stores:
            adapt = json.loads((out / fold / m / "result.json").read_text())["result"]["adapt_seconds"]
            assert adapt >= searched  # the search's time, counted by the method that took it too
