"""The task-LoRA and OPPU baselines, and the protocol options the paper's setting needs
(a separate anchor pool, extra queries from history, the answer-length rule, LaMP-1's
query-form training), on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mta import bank as bank_mod
from mta.bank import build_task, read_index
from mta.cli.main import main
from mta.config import AdaptConfig, BankConfig
from mta.data.readers import load_dataset
from mta.data.synth import synth_users
from mta.errors import MtaError
from mta.evaluation.methods import method_config
from mta.evaluation.protocol import history_as_queries, pooled, prepare_targets
from mta.loaded_bank import LoadedBank
from mta.models.tiny import tiny_tokenizer
from mta.store import UserStore
from mta.tasks import get_task
from tests.engine_helpers import tiny_backbone

TASK = get_task("synth")
FAST = dict(min_history=1, epochs=1, batch_size=4, max_length=160)
COMMON = ["--model", "tiny-random-llama", "--embedder", "hashing-embedder", "--max-new-tokens", "2",
          "--n-boot", "100", "--anchors", "2"]


def test_task_lora_never_sees_a_target(tmp_path, monkeypatch):
    """The eval's task LoRA trains on the fold's anchor candidates only: no target's
    history item (and so no query) is in any of its examples."""
    seen: list[str] = []
    real = bank_mod.loo_examples

    def spy(task, user, *a, **k):
        seen.append(user.user_id)
        return real(task, user, *a, **k)

    monkeypatch.setattr(bank_mod, "loo_examples", spy)
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "6", "--queries", "1"]) == 0
    out = tmp_path / "eval"
    assert main(["eval", "--data", str(data), "--out", str(out), "--methods", "rag-1,task-lora", *COMMON]) == 0
    split = json.loads((out / "split.json").read_text())
    for f in split:
        rec = bank_mod.read_index(out / f"fold{f['fold']}" / "task-lora")
        assert rec.kind == "task" and sorted(rec.pooled) == sorted(f["anchor_candidates"])
        assert not set(rec.pooled) & set(f["targets"])
    assert seen and len(seen) == sum(len(f["anchor_candidates"]) for f in split)
    rows = {r["method"]: r for r in json.loads((out / "metrics.json").read_text())["results"]}
    assert "diff_vs_task-lora" in rows["rag-1"]["metrics"]["accuracy"]
    assert "diff_vs_rag-1" in rows["task-lora"]["metrics"]["accuracy"]


def test_oppu_trains_a_user_lora_over_the_frozen_task_lora(tmp_path):
    users = synth_users(6, seed=1)
    backbone = tiny_backbone()
    cfg = BankConfig.make(**FAST)
    build_task(backbone, users[:3], TASK, cfg, tmp_path / "task")
    bank = LoadedBank(backbone, tmp_path / "task", TASK)
    before = {n: t.clone() for n, (a, b) in backbone.engine.anchor_tensors(0).items() for t in (a, b)}
    frozen = {n: (a.clone(), b.clone()) for n, (a, b) in backbone.engine.anchor_tensors(0).items()}
    oppu = method_config("oppu", AdaptConfig(), cfg)
    store = UserStore(tmp_path / "store", create=True)
    bank.adapt(users[3:], oppu, store)
    assert before  # the task LoRA did not move while the users' LoRAs trained
    for n, (a, b) in backbone.engine.anchor_tensors(0).items():
        assert torch.equal(a, frozen[n][0]) and torch.equal(b, frozen[n][1])
    rec = store.meta(users[3].user_id)
    assert rec.anchors == [0] and rec.weights == [1.0] and rec.anchor_users == ["(task)"]
    assert rec.stack.rank == cfg.rank and rec.stack.alpha == cfg.alpha and rec.stack.layers == 0
    assert rec.stack.lr == cfg.lr and rec.stack.losses[-1] != rec.stack.losses[0]
    layers = backbone.engine.stack_selection(None, 0)
    assert len(layers) == len(backbone.engine.layers)  # every linear layer of every block


def test_history_queries_and_anchor_pool():
    users = synth_users(4, seed=2, queries=1)
    u = history_as_queries(users[0], 3, TASK)
    assert len(u.history) == 7 and len(u.queries) == 4
    assert [q.id for q in u.queries[1:]] == [f"history:{it.id}" for it in users[0].history[-3:]]
    assert u.queries[-1].gold == TASK.item_example(users[0].history[-1])[1]
    cut = prepare_targets(users[:1], 3, 5, TASK)[0]
    assert len(cut.history) == 5 and cut.history == users[0].history[:5]
    with pytest.raises(MtaError, match="would leave none"):
        history_as_queries(users[0], 10, TASK)
    fold = pooled(users[:2], users[1:])
    assert [x.user_id for x in fold.targets] == [users[0].user_id, users[1].user_id]
    assert [x.user_id for x in fold.candidates] == [users[2].user_id, users[3].user_id]  # never a target


@pytest.mark.integration
def test_eval_with_anchor_pool_and_history_queries(tmp_path):
    targets, pool = tmp_path / "t", tmp_path / "p"
    assert main(["data", "synth", "--out", str(targets), "--users", "3", "--queries", "1", "--seed", "1"]) == 0
    # the pool's first 3 ids are the targets' ids: they are left out of the candidates
    assert main(["data", "synth", "--out", str(pool), "--users", "7", "--queries", "0", "--seed", "2"]) == 0
    out = tmp_path / "eval"
    assert main(["eval", "--data", str(targets), "--anchor-data", str(pool), "--history-queries", "2", "--out",
                 str(out), "--methods", "rag-1,mta", *COMMON]) == 0
    rows = json.loads((out / "metrics.json").read_text())["results"]
    assert all(r["users"] == 3 and r["queries"] == 3 * 3 for r in rows)
    (split,) = json.loads((out / "split.json").read_text())
    assert len(split["targets"]) == 3 and len(split["anchor_candidates"]) == 4
    assert "extra test queries" in (out / "results.md").read_text()
    # the paired script rebuilds the same targets (history queries included)
    root = Path(__file__).resolve().parents[1]
    got = subprocess.run([sys.executable, "scripts/paired.py", str(out), "mta", "rag-1", "--n-boot", "100"],
                         capture_output=True, text=True, check=True, cwd=root).stdout
    d = rows[1]["metrics"]["accuracy"]["diff_vs_rag-1"]
    assert f"mta - rag-1 = {d['value']:+.3f}" in got


def test_answer_length_covers_the_training_answers():
    tok = tiny_tokenizer()
    users = synth_users(8, seed=0)
    n = TASK.answer_tokens(tok, users)
    longest = max(len(tok(TASK.item_example(it)[1], add_special_tokens=False)["input_ids"])
                  for u in users for it in u.history)
    assert n == longest + 2  # p99 of 80 answers is the longest here
    assert TASK.answer_tokens(tok, []) == TASK.max_new_tokens


def test_lamp1_trains_on_query_form_choices():
    from mta.data.schema import HistoryItem

    t = get_task("lamp1")
    hist = [HistoryItem(id=str(i), title=title, abstract="x") for i, title in
            enumerate(["deep nets for vision", "vision transformers at scale", "soup recipes"])]
    other = [HistoryItem(id="o1", title="a paper of someone else", abstract="y")]
    inp, out = t.training_example(hist[0], hist, other)
    assert inp.startswith("For an author who has written the paper with the title") and out in ("[1]", "[2]")
    assert '"vision transformers at scale"' in inp and '"a paper of someone else"' in inp
    assert t.parse(out) == out and t.retrieval_text(inp)
    # answers are balanced across items by a hash, not always [1]
    many = [HistoryItem(id=str(i), title=f"paper {i} on topic", abstract="z") for i in range(40)]
    answers = {t.training_example(it, many, other)[1] for it in many}
    assert answers == {"[1]", "[2]"}


@pytest.mark.integration
def test_paired_script_pairs_the_reported_users(tmp_path):
    """A run that left dev users out reports users that are not the data's first N:
    scripts/paired.py pairs exactly the users the run predicted for."""
    from mta.data.readers import load_dataset

    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "8", "--queries", "1"]) == 0
    users = load_dataset(data, None).users
    run = tmp_path / "run"
    run.mkdir()
    reported = users[5:]  # e.g. the first five were a recipe's dev users
    (run / "config.json").write_text(json.dumps({"task": "synth", "data": str(data), "seed": 0,
                                                 "users": len(reported), "configs": {"eval": {}}}))
    lines = []
    for i, u in enumerate(reported):  # A right on every query, B right on the first user only
        gold = [q.gold for q in u.queries]
        lines += [json.dumps({"method": "a", "user_id": u.user_id, "parsed": gold}),
                  json.dumps({"method": "b", "user_id": u.user_id, "parsed": gold if i == 0 else ["-"] * len(gold)})]
    (run / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    got = subprocess.run([sys.executable, "scripts/paired.py", str(run), "a", "b", "--n-boot", "200"],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert got.returncode == 0, got.stderr
    assert "accuracy: a - b = +0.667" in got.stdout


def test_each_trained_method_has_its_own_budget_and_the_report_says_its_steps(tmp_path):
    """--task-steps/--user-steps/--oppu-steps/--bank-steps/--stack-steps: each method trains
    with its own number of optimiser steps, and metrics.json and results.md report them."""
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "8", "--queries", "1"]) == 0
    out = tmp_path / "ev"
    assert main(["eval", "--data", str(data), "--out", str(out), "--methods",
                 "task-lora,per-user-lora,oppu,mta-fusion,mta", "--task-steps", "6", "--task-lr", "1e-3",
                 "--user-steps", "3", "--oppu-steps", "4", "--oppu-lr", "1e-4", "--bank-steps", "2",
                 "--stack-steps", "5", *COMMON]) == 0
    rows = {r["method"]: r["optimizer_steps"] for r in json.loads((out / "metrics.json").read_text())["results"]}

    def one(n):
        return {"min": n, "median": float(n), "max": n}

    assert rows == {"task-lora": {"task LoRA": one(6)}, "per-user-lora": {"LoRA": one(3)},
                    "oppu": {"user part": one(4), "task LoRA": one(6)}, "mta-fusion": {"anchors": one(2)},
                    "mta": {"stack": one(5), "anchors": one(2)}}
    assert "| stack 5; anchors 2 |" in (out / "results.md").read_text()
    oppu = UserStore(out / "fold0" / "oppu")
    rec = oppu.meta(oppu.user_ids()[0])
    assert rec.stack.lr == 1e-4 and len(rec.stack.losses) == 4
    assert read_index(out / "fold0" / "task-lora").config.lr == 1e-3
    # per-user LoRAs with their own budget are never copied in as anchors (other recipe)
    assert all(a.reused_from is None for a in read_index(out / "fold0" / "bank").anchors)


def test_an_anchor_copied_from_a_per_user_lora_keeps_its_steps(tmp_path):
    """A bank copies the per-user LoRAs of its anchors instead of training them again; the
    copy carries the steps that LoRA trained for, so the report's anchor steps are complete."""
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "8", "--queries", "1"]) == 0
    out = tmp_path / "ev"
    assert main(["eval", "--data", str(data), "--out", str(out), "--methods", "per-user-lora,mta-fusion",
                 *COMMON]) == 0
    anchors = read_index(out / "fold0" / "bank").anchors
    assert anchors and all(a.reused_from for a in anchors)
    own = {a.user_id: a.steps for f in ("fold0", "fold1") for a in read_index(out / f / "per-user-lora").anchors}
    assert all(a.steps is not None and a.steps == own[a.user_id] for a in anchors)
    rows = {r["method"]: r for r in json.loads((out / "metrics.json").read_text())["results"]}
    assert set(rows["mta-fusion"]["optimizer_steps"]) == {"anchors"}


@pytest.mark.parametrize("stop", ["held-out", "refit"])
def test_stack_stop_stops_every_per_user_part_alike_and_anchors_are_not_copied_from_stopped_loras(tmp_path, stop):
    """`--stack-stop held-out` in `mta eval`: MTA's stacks, OPPU's user parts and the per-user
    LoRAs are each kept at their best checked step on their user's held-out last item (the
    steps column reports the kept steps); the from-scratch bank's anchors are then trained,
    not copied from those stopped LoRAs (a bank's anchors train to their last step).
    `refit`: the same, each part trained again on every item for the steps chosen."""
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "8", "--queries", "1"]) == 0
    out = tmp_path / "ev"
    assert main(["eval", "--data", str(data), "--out", str(out), "--methods", "per-user-lora,oppu,mta",
                 "--stack-stop", stop, "--stack-steps", "4", "--user-steps", "4", "--oppu-steps", "4",
                 *COMMON]) == 0
    private = read_index(out / "fold0" / "per-user-lora")
    assert private.config.stop == stop
    history = {u.user_id: len(u.history) for u in load_dataset(data).users}
    for a in private.anchors:
        assert a.stopped_at is not None and len(a.held_out_losses) == 5
        assert a.steps == (4 if stop == "held-out" else a.stopped_at)
        # held-out: trained without the user's last item; refit: on every item
        assert a.examples == history[a.user_id] - (stop == "held-out")
    for name in ("oppu", "mta"):
        store = UserStore(out / "fold0" / name)
        recs = [store.meta(u).stack for u in store.user_ids()]
        assert recs and all(r.stopped_at is not None and len(r.held_out_losses) == 5 for r in recs)
        assert all(r.refit == (stop == "refit") for r in recs)
        if stop == "refit":  # the stored stack trained its chosen steps on every item, no more
            assert all(len(r.losses) == r.stopped_at == r.kept_steps for r in recs)
    bank = read_index(out / "fold0" / "bank")
    assert bank.config.stop == "none" and all(a.reused_from is None and a.stopped_at is None for a in bank.anchors)
    rows = {r["method"]: r["optimizer_steps"] for r in json.loads((out / "metrics.json").read_text())["results"]}
    kept = [a.stopped_at for f in ("fold0", "fold1") for a in read_index(out / f / "per-user-lora").anchors]
    assert rows["per-user-lora"]["LoRA"]["max"] == max(kept) and rows["per-user-lora"]["LoRA"]["min"] == min(kept)


def test_zero_steps_train_no_per_user_part(tmp_path):
    """--stack-steps 0 and --oppu-steps 0 (a tune's "no training" trial): `mta` is then the
    fused anchors alone and answers as `mta-fusion` does, OPPU is the task LoRA alone and
    answers as `task-lora` does, neither stores a stack, and `mta-stack` (the stack alone,
    here none: it would adapt nothing) is not run, the report says why."""
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "8", "--queries", "1"]) == 0
    out = tmp_path / "ev"
    assert main(["eval", "--data", str(data), "--out", str(out), "--methods",
                 "rag-1,task-lora,oppu,mta-fusion,mta-stack,mta", "--stack-steps", "0", "--oppu-steps", "0",
                 "--task-steps", "3", "--bank-steps", "2", *COMMON]) == 0
    preds: dict[str, dict] = {}
    for line in (out / "predictions.jsonl").read_text().splitlines():
        p = json.loads(line)
        preds.setdefault(p["method"], {})[p["user_id"]] = p["outputs"]
    assert preds["mta"] == preds["mta-fusion"] and preds["oppu"] == preds["task-lora"]
    assert "mta-stack" not in preds and not (out / "fold0" / "mta-stack").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["left_out"]) == {"mta-stack"}
    assert "Not run: `mta-stack`: the recipe trains no stack" in (out / "results.md").read_text()
    for name in ("mta", "oppu"):
        store = UserStore(out / "fold0" / name)
        assert store.user_ids() and all(store.meta(u).stack is None for u in store.user_ids())
    rows = {r["method"]: r for r in metrics["results"]}
    assert "stack" not in rows["mta"]["optimizer_steps"] and "user part" not in rows["oppu"]["optimizer_steps"]
    # the config still refuses a run that adapts nothing
    with pytest.raises(MtaError, match="leaves nothing to adapt"):
        AdaptConfig.make(top_k=0, stack_steps=0)
