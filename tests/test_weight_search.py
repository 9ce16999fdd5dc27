"""Searched fusion weights: the forward-only loss they are scored by equals PEFT's, the
search never ends above the similarity weights on the user's own examples, and
`--fusion-weights searched` stores the weights it found."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from mta.cli.main import main
from mta.config import AdaptConfig
from mta.engine.engine import Row
from mta.engine.train import IGNORE, row_losses
from mta.errors import ConfigError
from mta.mixing import Mixture
from mta.models.tiny import tiny_llama
from mta.store import UserStore
from mta.weight_search import W_MAX, search_weights
from tests.engine_helpers import TARGETS, random_examples, tiny_engine

COMMON = ["--model", "tiny-random-llama", "--embedder", "hashing-embedder", "--max-new-tokens", "2",
          "--n-boot", "100", "--anchors", "3"]


def _peft_loss(eng, anchors, weights, example) -> float:
    """Reference: PEFT's exact weighted sum of the anchors (``cat``), the mean token loss."""
    model, _ = tiny_llama(seed=0)
    pm = get_peft_model(model, LoraConfig(r=eng.spec.rank, lora_alpha=eng.spec.alpha, target_modules=list(TARGETS),
                                          lora_dropout=0.0), adapter_name="a0")
    for k in range(1, len(anchors)):
        pm.add_adapter(f"a{k}", LoraConfig(r=eng.spec.rank, lora_alpha=eng.spec.alpha, target_modules=list(TARGETS),
                                           lora_dropout=0.0))
    with torch.no_grad():
        for k, slot in enumerate(anchors):
            for name, (a, b) in eng.anchor_tensors(slot).items():
                mod = pm.base_model.model.get_submodule(name)
                mod.lora_A[f"a{k}"].weight.copy_(a)
                mod.lora_B[f"a{k}"].weight.copy_(b)
    pm.add_weighted_adapter([f"a{k}" for k in range(len(anchors))], list(weights), "mix", combination_type="cat")
    pm.set_adapter("mix")
    pm.eval()
    ids = torch.tensor([example.input_ids])
    labels = torch.tensor([example.labels])
    with torch.no_grad():
        logits = pm(input_ids=ids).logits[0, :-1].float()
    tgt = labels[0, 1:]
    keep = tgt != IGNORE
    return torch.nn.functional.cross_entropy(logits[keep], tgt[keep]).item()


def test_row_losses_equal_peft_on_the_weighted_sum_of_anchors():
    eng, model, tok = tiny_engine(n_anchors=3, rank=4, alpha=8.0, b_std=0.2)
    ex = random_examples(3, seed=5)
    rows = [(Row((0, 2), (0.7, 0.4)), ex[0]), (Row((1,), (1.3,)), ex[1]), (Row((0, 1, 2), (0.2, 0.5, 1.1)), ex[2])]
    got = row_losses(eng, rows, tok.pad_token_id, max_rows=2)
    for (row, e), g in zip(rows, got):
        assert g == pytest.approx(_peft_loss(eng, row.anchors, row.weights, e), abs=1e-5)
    other = row_losses(eng, [(Row((0, 2), (0.1, 0.1)), ex[0])], tok.pad_token_id)[0]
    assert abs(other - got[0]) > 1e-4  # the weights matter: the engine is not ignoring them


def test_search_never_ends_above_the_similarity_weights_and_keeps_the_anchors():
    eng, model, tok = tiny_engine(n_anchors=4, rank=4, alpha=8.0, b_std=0.3)
    mixes = [Mixture((0, 1), (0.6, 0.4), (0.9, 0.6)), Mixture((3, 2), (0.5, 0.5), (0.4, 0.4)),
             Mixture((1,), (1.0,), (0.8,))]
    examples = [random_examples(4, seed=s) for s in (1, 2, 3)]
    found, rec = search_weights(eng, mixes, examples, evals=16, pad_id=tok.pad_token_id, seed=0, max_rows=8)
    assert [m.anchors for m in found] == [m.anchors for m in mixes]
    assert [m.similarities for m in found] == [m.similarities for m in mixes]
    for m, ex, before, after in zip(found, examples, rec["loss_before"], rec["loss_after"]):
        assert after <= before
        assert all(0.0 <= w <= W_MAX for w in m.weights)
        mine = row_losses(eng, [(Row(m.anchors, m.weights), e) for e in ex], tok.pad_token_id)
        assert sum(mine) / len(mine) == pytest.approx(after, abs=1e-6)  # the stored weights give that loss
    assert any(a < b - 1e-6 for a, b in zip(rec["loss_after"], rec["loss_before"]))  # it found better weights
    assert all(16 <= n <= 16 + 8 for n in rec["evals"]) and rec["seconds"] > 0


def test_searched_weights_need_the_exact_merge():
    with pytest.raises(ConfigError, match="delta merge"):
        AdaptConfig.build({"fusion_weights": "searched", "merge": "factor"})


def test_eval_with_searched_weights_stores_them(tmp_path):
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "8", "--queries", "1"]) == 0
    out = tmp_path / "ev"
    assert main(["eval", "--data", str(data), "--out", str(out), "--methods", "mta-fusion", "--fusion-weights",
                 "searched", "--search-evals", "8", *COMMON]) == 0
    store = UserStore(out / "fold0" / "mta-fusion")
    recs = [store.meta(u) for u in store.user_ids()]
    assert recs and all(r.adapt.fusion_weights == "searched" and len(r.weights) == 2 for r in recs)
    # not the similarity weights (those sum to 1): the search moved them
    assert any(abs(sum(r.weights) - 1.0) > 1e-6 for r in recs)
    row = json.loads((out / "metrics.json").read_text())["results"][0]
    assert row["method"] == "mta-fusion" and row["seconds_per_user_adapt"] > 0


def test_a_search_cache_returns_what_the_search_would_and_only_for_the_same_search(tmp_path, monkeypatch):
    import mta.loaded_bank as lb
    from mta.bank import build_bank
    from mta.config import BankConfig
    from mta.data.synth import synth_users
    from mta.loaded_bank import LoadedBank
    from mta.tasks import get_task
    from mta.weight_search import SearchCache
    from tests.engine_helpers import tiny_backbone

    task = get_task("synth")
    users = synth_users(8, seed=3)
    backbone = tiny_backbone()
    build_bank(backbone, users, task, BankConfig.make(anchors=3, min_history=1, epochs=1, batch_size=4,
                                                      max_length=160), tmp_path / "bank")
    bank = LoadedBank(backbone, tmp_path / "bank", task)
    calls = []
    real = lb.search_weights
    monkeypatch.setattr(lb, "search_weights", lambda *a, **k: calls.append(1) or real(*a, **k))
    common = dict(batch_size=4, max_length=160, fusion_weights="searched", search_evals=6)
    cache = SearchCache(tmp_path / "searched")

    def weights(name, cache, **over):
        store = UserStore(tmp_path / name, create=True)
        bank.adapt(users[:3], AdaptConfig.make(**{**common, **over}), store, search_cache=cache)
        return [store.meta(u.user_id).weights for u in users[:3]]

    first = weights("a", cache, stack_lr=3e-3)
    assert len(calls) == 1 and len(list((tmp_path / "searched").glob("*.json"))) == 1
    # another stack budget: the same search, read back, not run
    assert weights("b", cache, stack_lr=1e-3, stack_steps=3) == first and len(calls) == 1
    # its seconds come with it: a run that takes it counts them as its own
    (key,) = [f.stem for f in (tmp_path / "searched").glob("*.json")]
    searched_s = cache.get(key, 3)[1]
    stats = bank.adapt(users[:3], AdaptConfig.make(**common, stack_lr=1e-3), UserStore(tmp_path / "b2", create=True),
                       search_cache=cache)
    assert searched_s > 0 and stats["search_seconds_reused"] == searched_s <= stats["fusion_seconds"]
    # the same settings with the user's last item held out of the search: another search
    weights("g", cache, stack_stop="held-out")
    assert len(calls) == 2
    calls.pop()
    # what a run without the cache stores: the cached weights are exactly the search's
    assert weights("c", None, stack_lr=1e-3, stack_steps=3) == first and len(calls) == 2
    # a setting the search reads (its evaluations) or other users: searched again
    weights("d", cache, search_evals=8)
    assert len(calls) == 3
    store = UserStore(tmp_path / "e", create=True)
    bank.adapt(users[1:4], AdaptConfig.make(**common), store, search_cache=cache)
    assert len(calls) == 4 and len(list((tmp_path / "searched").glob("*.json"))) == 4  # a, g, d, e
    # a damaged file is searched again and rewritten, not trusted
    for f in (tmp_path / "searched").glob("*.json"):
        f.write_text("{")
    assert weights("f", cache, stack_lr=3e-3) == first and len(calls) == 5


def test_held_out_stopping_keeps_the_last_item_out_of_the_search_and_the_stack(tmp_path, monkeypatch, capsys):
    import mta.loaded_bank as lb
    import mta.stacking as st
    from mta.bank import build_bank
    from mta.config import BankConfig, BaselineConfig
    from mta.data.synth import synth_users
    from mta.evaluation.methods import method_config
    from mta.loaded_bank import LoadedBank
    from mta.tasks import get_task
    from tests.engine_helpers import tiny_backbone

    task = get_task("synth")
    users = synth_users(8, seed=3)
    bank_cfg = BankConfig.make(anchors=3, min_history=1, epochs=1, batch_size=4, max_length=160)
    build_bank(tiny_backbone(), users, task, bank_cfg, tmp_path / "bank")
    bank = LoadedBank(tiny_backbone(), tmp_path / "bank", task)
    searched, trained = [], []
    real_search, real_train = lb.search_weights, st.train_jobs
    monkeypatch.setattr(lb, "search_weights", lambda eng, mixes, ex, *a, **k: searched.append(
        [len(e) for e in ex]) or real_search(eng, mixes, ex, *a, **k))
    monkeypatch.setattr(st, "train_jobs", lambda eng, what, jobs, *a, **k: trained.append(
        ([len(j.examples) for j in jobs], k.get("held_out"))) or real_train(eng, what, jobs, *a, **k))
    cfg = AdaptConfig.make(batch_size=4, max_length=160, fusion_weights="searched", search_evals=6,
                           stack_steps=4, stack_stop="held-out")
    store = UserStore(tmp_path / "s", create=True)
    bank.adapt(users[:3], cfg, store)
    sizes = [len(u.history) for u in users[:3]]
    assert searched == [[n - 1 for n in sizes]]
    assert trained[0][0] == [n - 1 for n in sizes] and [len(h) for h in trained[0][1]] == [1, 1, 1]
    for u in users[:3]:
        rec = store.meta(u.user_id).stack
        assert rec.stopped_at in (0, 1, 2, 3, 4) and len(rec.held_out_losses) == 5 and len(rec.losses) == 4
    capsys.readouterr()
    assert main(["store", "list", str(tmp_path / "s")]) == 0  # the kept step of each stopped stack
    listed = " ".join(capsys.readouterr().out.split())
    kept = [store.meta(u.user_id).stack.stopped_at for u in users[:3]]
    assert "stack steps" in listed and all(f"kept {k} of 4" in listed for k in kept), listed
    # without it: every item searches and trains, nothing is recorded of a stop
    store2 = UserStore(tmp_path / "s2", create=True)
    bank.adapt(users[:3], cfg.model_copy(update={"stack_stop": "none"}), store2)
    assert searched[-1] == sizes and trained[-1] == (sizes, None)
    assert store2.meta(users[0].user_id).stack.stopped_at is None
    # OPPU's user part is stopped as MTA's stack is (the same guard for both)
    assert method_config("oppu", cfg, bank_cfg, BaselineConfig()).stack_stop == "held-out"
