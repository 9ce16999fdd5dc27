"""`mta tune` on the tiny model: a recipe chosen on dev users, then used (and its dev
users left out) by the commands that take --recipe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mta.cli.evaluate as evaluate_mod
import mta.evaluation.tune as tune_mod
from mta.bank import read_index
from mta.cli.main import main
from mta.errors import MtaError
from mta.evaluation.tune import GROUPS, NO_TRAINING, SPACES
from mta.recipes import read_recipe

TINY = ["--model", "tiny-random-llama", "--embedder", "hashing-embedder", "--max-new-tokens", "2"]


def _diverging_when(monkeypatch, tmp_path, when, message):
    """Synthetic data, and run_eval raising a divergence whenever ``when(methods, setup)``."""
    real = tune_mod.run_eval

    def diverging(ds, methods, setup, *a, **kw):
        if when(methods, setup):
            raise MtaError(message, ("BankConfig.lr",))
        return real(ds, methods, setup, *a, **kw)

    monkeypatch.setattr(tune_mod, "run_eval", diverging)
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "10", "--queries", "1"]) == 0
    return data


def test_tune_then_use_the_recipe(tmp_path, monkeypatch):
    # as Qwen2.5-Coder-0.5B did on the H200 at lr 1e-4
    data = _diverging_when(monkeypatch, tmp_path, lambda methods, setup: setup.bank_cfg.lr == 1e-4,
                           "training diverged at step 6: the loss of 'anchor:x' is nan")
    out = tmp_path / "tune"
    # the tiny model has 2 blocks: the default stack (rank 2 in them all) stores a quarter of
    # a per-user LoRA, so the bytes budget is raised to 30% here
    assert main(["tune", "--data", str(data), "--out", str(out), "--dev-fraction", "0.4", "--n-boot", "100",
                 "--anchors", "2", "--max-user-share", "0.3", "--dev-split", "balanced", *TINY]) == 0
    r = read_recipe(out / "recipe.json")
    # the dev persons drawn across the ranking of their own histories, and the check kept
    from mta.data.readers import load_dataset
    from mta.evaluation.tune import dev_check, dev_split
    from mta.tasks import get_task

    users, synth = load_dataset(data).users, get_task("synth")
    assert r.dev_users == dev_split(users, 0.4, 0, "balanced", synth) != dev_split(users, 0.4, 0)
    assert r.dev_split == "balanced" and r.dev_check == dev_check(users, r.dev_users, synth)
    written = json.loads((out / "config.json").read_text())  # kept from the start, before any trial
    assert (written["dev_split"], written["dev_check"], written["dev_users"]) == ("balanced", r.dev_check, r.dev_users)
    over = [t["override"]["adapt"] for t in r.trials if "over the budget" in t.get("skipped", "")]
    assert over == [{"stack_rank": 4, "stack_layers": 4}, {"stack_rank": 4, "stack_layers": 0},
                    {"stack_rank": 8, "stack_layers": 0}] and r.max_user_share == 0.3
    assert r.adapt["stack_rank"] in (1, 2)
    assert r.model == "tiny-random-llama" and r.metric == "accuracy" and len(r.dev_users) == 4
    assert len(r.trials) <= sum(len(GROUPS[g]) for g in SPACES["quick"])
    failed = [t for t in r.trials if "failed" in t]  # recorded, and the search went on without it
    assert [t["override"]["bank"]["lr"] for t in failed] == [1e-4] and r.bank["lr"] != 1e-4
    assert {"lr", "epochs"} <= set(r.bank) and {"stack_lr", "top_k"} <= set(r.adapt)
    assert [row["method"] for row in r.ablation] == ["rag-1", "user-prior", "item-prior", "task-lora",
                                                      "per-user-lora", "oppu", "mta-fusion", "mta-stack", "mta"]
    # the banks of trials with the same bank settings are shared
    assert len(list((out / "banks").iterdir())) <= 5  # 4 learning rates, 1 more anchor training
    # eval with the recipe: its settings are defaults, its dev users are never reported
    ev = tmp_path / "eval"
    assert main(["eval", "--data", str(data), "--out", str(ev), "--recipe", str(out / "recipe.json"),
                 "--methods", "mta", "--n-boot", "100", *TINY]) == 0
    m = json.loads((ev / "metrics.json").read_text())
    assert m["results"][0]["users"] == 6 and "users of the dev persons" in (ev / "results.md").read_text()
    # the table says how alike the dev persons were to its own
    said = f"(their own-history agreement {r.dev_check['dev']:.3f}, these persons' {r.dev_check['others']:.3f}"
    assert said in m["protocol"]
    assert m["config"]["configs"]["bank"]["lr"] == r.bank["lr"]
    split = json.loads((ev / "split.json").read_text())
    assert not {t for f in split for t in f["targets"]} & set(r.dev_users)
    # a bank built with the recipe records its adapt settings for `mta adapt`
    bank = tmp_path / "bank"
    assert main(["bank", "build", "--data", str(data), "--out", str(bank), "--recipe", str(out / "recipe.json"),
                 "--anchors", "2", "--model", "tiny-random-llama", "--embedder", "hashing-embedder"]) == 0
    assert read_index(bank).recipe == r.adapt
    store = tmp_path / "store"
    assert main(["adapt", "--bank", str(bank), "--data", str(data), "--out", str(store), "--users",
                 "synth-0000", "--stack-rank", "3"]) == 0
    cfg = json.loads((store / "config.json").read_text())["configs"]["adapt"]
    assert cfg["stack_rank"] == 3 and cfg["top_k"] == r.adapt["top_k"]  # a flag beats the recipe


def test_bad_recipe_is_one_line(tmp_path):
    bad = tmp_path / "r.json"
    bad.write_text("{}")
    assert main(["eval", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--recipe", str(bad)]) == 2



def test_stack_share_is_the_share_of_stored_parameters():
    """`stack_share` against the parameters the engine really allocates for one user."""
    from mta.config import AdaptConfig, BankConfig
    from mta.evaluation.tune import stack_share
    from tests.engine_helpers import tiny_engine

    eng, _, _ = tiny_engine()
    bank = BankConfig(rank=8)

    def stored(rank, layers, modules=None):
        eng.add_users(1, rank, 2.0 * rank, modules=modules, last_layers=layers)
        return sum(p.numel() for p in eng.stack_parameters())

    full = stored(8, 0)  # a per-user LoRA: rank 8 everywhere
    for rank, layers, modules in ((2, 1, None), (1, 0, None), (4, 1, ("q_proj", "v_proj"))):
        ac = AdaptConfig.make(stack_rank=rank, stack_layers=layers, stack_targets=modules)
        assert stack_share(eng, bank, ac) == stored(rank, layers, modules) / full


def test_tune_refuses_a_budget_nothing_fits_in_one_line(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "10", "--queries", "1"]) == 0
    rc = main(["tune", "--data", str(data), "--out", str(tmp_path / "t"), "--dev-fraction", "0.4", "--n-boot", "100",
               "--anchors", "2", *TINY])  # default budget 10%: no stack shape of the 2-block model fits
    err = capsys.readouterr().err
    assert rc == 2 and "over the budget of 10%" in err and "--max-user-share" in err
    assert not (tmp_path / "t" / "recipe.json").exists()


def test_a_baseline_diverging_in_the_final_ablation_keeps_the_recipe(tmp_path, monkeypatch, capsys):
    """As Qwen2.5-Coder-1.5B's per-user LoRA did at lr 3e-4 on the H200: the search's result
    is written, the ablation keeps every other method's row and records the failure."""
    import mta.evaluation.runner as runner_mod

    def diverging(*a, **kw):
        raise MtaError("training diverged at step 2: the loss of 'user:x' is nan", ("BankConfig.lr",))

    monkeypatch.setattr(runner_mod, "run_private", diverging)
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "10", "--queries", "1"]) == 0
    out = tmp_path / "tune"
    assert main(["tune", "--data", str(data), "--out", str(out), "--dev-fraction", "0.4", "--n-boot", "100",
                 "--anchors", "2", "--space", "anchor-training", "--max-user-share", "0.3", *TINY]) == 0
    r = read_recipe(out / "recipe.json")
    message = "training diverged at step 2: the loss of 'user:x' is nan"
    # every other method's row is kept, with its paired differences; the failure is a row too
    assert [row.get("method") for row in r.ablation] == ["rag-1", "user-prior", "item-prior", "task-lora", "oppu",
                                                          "mta-fusion", "mta-stack", "mta", "per-user-lora"]
    assert r.ablation[-1] == {"method": "per-user-lora", "error": message}
    assert "diff_vs_task-lora" in r.ablation[7]["metrics"]["accuracy"]
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "anchor_training" in r.bank and f"the final ablation: per-user-lora diverged: {message}" in err


def test_a_final_ablation_that_fails_whole_keeps_the_recipe(tmp_path, monkeypatch):
    """The whole final evaluation diverging (here every run of more than one method): the
    recipe is written with the failure as its ablation."""
    data = _diverging_when(monkeypatch, tmp_path, lambda methods, setup: len(methods) > 1,
                           "training diverged at step 1: the loss of 'user:x' is nan")
    out = tmp_path / "tune"
    assert main(["tune", "--data", str(data), "--out", str(out), "--dev-fraction", "0.4", "--n-boot", "100",
                 "--anchors", "2", "--space", "anchor-training", "--max-user-share", "0.3", *TINY]) == 0
    r = read_recipe(out / "recipe.json")
    assert r.ablation == [{"error": "training diverged at step 1: the loss of 'user:x' is nan"}]


def test_tune_takes_the_eval_protocol_it_can_and_refuses_what_it_cannot(tmp_path, monkeypatch, capsys):
    """--target-history and --users reach the dev evaluations; --methods and --anchor-data,
    which tune chooses itself, are a one-line error rather than silently ignored."""
    seen = []
    real = tune_mod.run_eval

    def spy(ds, methods, setup, *a, **kw):
        seen.append((len(ds.users), kw.get("target_history")))
        return real(ds, methods, setup, *a, **kw)

    monkeypatch.setattr(tune_mod, "run_eval", spy)
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "10", "--queries", "1"]) == 0
    args = ["tune", "--data", str(data), "--dev-fraction", "0.5", "--n-boot", "100", "--anchors", "2",
            "--space", "anchor-training", "--max-user-share", "0.3", *TINY]
    assert main([*args, "--out", str(tmp_path / "t1"), "--target-history", "3", "--users", "8"]) == 0
    assert seen and all(s == (4, 3) for s in seen)  # half of the first 8 users are dev users
    for extra in (["--methods", "mta"], ["--anchor-data", str(data)], ["--variants", "top-k=1"]):
        assert main([*args, "--out", str(tmp_path / "t2"), *extra]) == 2
        assert f"{extra[0]} is an `mta eval` option" in " ".join(capsys.readouterr().err.split())
    assert main([*args, "--out", str(tmp_path / "t2"), "--dev-split", "even"]) == 2
    assert "--dev-split must be one of auto, balanced, random, not 'even'" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "t2").exists()


def test_a_space_of_named_groups(tmp_path, capsys):
    """``--space stack-shape,top-k``: only those groups (on the model's registered recipe);
    named spaces among them add their groups; a name that is neither is one line before
    anything loads."""
    from mta.evaluation.tune import space_groups

    assert space_groups("quick") == SPACES["quick"]
    assert space_groups("stack-shape, top-k,stack-shape") == ["stack shape", "top-k"]
    # a named space among the groups: its groups in place, each group once
    assert space_groups("budgets-quick,stack-stop") == [*SPACES["budgets-quick"], "stack stop"]
    assert space_groups("top-k,quick") == ["top-k", "learning rate", "anchor training", "stack shape"]
    assert main(["tune", "--data", str(tmp_path), "--out", str(tmp_path / "t"), "--space", "stack-shape,lr",
                 *TINY]) != 0
    err = " ".join(capsys.readouterr().err.split())
    assert "unknown search space 'stack-shape,lr'" in err and "learning-rate" in err


def _tune_faked(tmp_path, monkeypatch, fake, space: str, *extra: str):
    """`mta tune` over synthetic users with searched fusion weights, every evaluation
    replaced by ``fake``; returns (the data, the tune's OUT)."""
    monkeypatch.setattr(tune_mod, "run_eval", fake)
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "10", "--queries", "1"]) == 0
    out = tmp_path / "tune"
    assert main(["tune", "--data", str(data), "--out", str(out), "--dev-fraction", "0.4", "--n-boot", "100",
                 "--space", space, "--max-user-share", "0.3", "--fusion-weights", "searched", *extra, *TINY]) == 0
    return data, out


def test_budgets_give_every_trained_method_its_own_lr_and_steps_with_equal_trials(tmp_path, monkeypatch):
    """The budgets space: each part searched over the same grid, scored by its own method;
    run_eval is replaced by a scorer whose best (lr, steps) differs per method, so the test
    checks what the search chose, not what the tiny model learnt."""
    best = {"task-lora": ("baselines", "task", 1e-3, 128), "oppu": ("baselines", "oppu", 3e-4, 32),
            "per-user-lora": ("baselines", "user", 1e-4, 8), "mta-fusion": ("bank", "", 3e-3, 128),
            "mta": ("adapt", "stack", 1e-3, 32)}
    seen: list[tuple[str, str]] = []

    def fake(ds, methods, setup, out, folds, *a, place=None, **kw):
        rows = []
        for m in methods:
            got = None
            if m in best:
                section, part, lr, steps = best[m]
                cfg = {"baselines": setup.baselines, "bank": setup.bank_cfg, "adapt": setup.adapt_cfg}[section]
                lr_f, steps_f = {"task": ("task_lr", "task_steps"), "oppu": ("oppu_lr", "oppu_steps"),
                                 "user": ("user_lr", "user_steps"), "": ("lr", "steps"),
                                 "stack": ("stack_lr", "stack_steps")}[part]
                got = (getattr(cfg, lr_f), getattr(cfg, steps_f))
                seen.append((m, str(place(0, "task-lora" if m in ("task-lora", "oppu") else "bank"))))
            value = 0.9 if got == best.get(m, (0, 0, 0, 0))[2:] else 0.1
            rows.append({"method": m, "metrics": {"accuracy": {"value": value, "ci": [0, 1]}}})
        return {"rows": rows, "failed": {}}

    data, out = _tune_faked(tmp_path, monkeypatch, fake, "budgets", "--bank-base", "task")
    r = read_recipe(out / "recipe.json")
    per_group = {g: sum(t["group"] == g for t in r.trials) for g in SPACES["budgets"]}
    # 4 learning rates x 3 step counts for every part; the two user parts on a shared part
    # (the stack, OPPU's) also a "no training" trial, scored by the same method
    assert per_group == {g: 12 + (g in NO_TRAINING) for g in SPACES["budgets"]}
    assert [t["override"] for t in r.trials if t["group"] == "stack budget"][0] == {"adapt": {"stack_steps": 0}}
    assert {t["group"]: t["method"] for t in r.trials} == {
        "task-lora budget": "task-lora", "oppu budget": "oppu", "per-user-lora budget": "per-user-lora",
        "anchor budget": "mta-fusion", "stack budget": "mta"}
    assert r.baselines == {"task_lr": 1e-3, "task_steps": 128, "oppu_lr": 3e-4, "oppu_steps": 32,
                           "user_lr": 1e-4, "user_steps": 8}
    assert r.bank == {"lr": 3e-3, "steps": 128} and r.adapt == {"stack_lr": 1e-3, "stack_steps": 32}
    # a task LoRA trained with other settings lives elsewhere: trials never share a wrong adapter
    task_dirs = {d for m, d in seen if m == "task-lora"}
    assert len(task_dirs) == 12
    # the flags the search ran under are recorded, and `mta eval --recipe` reproduces all of it
    assert r.start["bank"]["bank_base"] == "task" and r.start["adapt"]["fusion_weights"] == "searched"
    got = {}
    monkeypatch.setattr(evaluate_mod, "_evaluate", lambda command, ds, out, cfg, *a, **kw: got.update(cfg=cfg))
    assert main(["eval", "--data", str(data), "--out", str(tmp_path / "eval"), "--recipe", str(out / "recipe.json"),
                 "--user-steps", "16", *TINY]) == 0
    cfg = got["cfg"]
    assert (cfg.bank.bank_base, cfg.bank.lr, cfg.bank.steps) == ("task", 3e-3, 128)
    assert (cfg.adapt.fusion_weights, cfg.adapt.stack_lr, cfg.adapt.stack_steps) == ("searched", 1e-3, 32)
    assert (cfg.baselines.task_lr, cfg.baselines.oppu_steps) == (1e-3, 32)
    assert (cfg.baselines.user_lr, cfg.baselines.user_steps) == (1e-4, 16)  # a flag still wins


def test_budgets_quick_searches_each_part_by_rate_then_steps_in_six_evaluations(tmp_path, monkeypatch):
    """budgets-quick: each part's four rates at its middle step count, then its step counts
    at the rate chosen (the middle one not evaluated again): 6 evaluations a part, the same
    for every part, each scored by its own method. The scorer is separable (rate and steps
    act apart) with a best off the middle step count, which the search must reach."""
    import math

    best = {"task-lora": ("baselines", "task_lr", "task_steps", 1e-3, 512),
            "oppu": ("baselines", "oppu_lr", "oppu_steps", 3e-4, 8),
            "per-user-lora": ("baselines", "user_lr", "user_steps", 1e-4, 128),
            "mta-fusion": ("bank", "lr", "steps", 3e-3, 32), "mta": ("adapt", "stack_lr", "stack_steps", 1e-3, 128)}
    evaluated: dict[str, list[tuple[float, int]]] = {m: [] for m in best}

    def fake(ds, methods, setup, out, folds, *a, place=None, **kw):
        rows = []
        for m in methods:
            value = 0.0
            if m in best:
                section, lr_f, steps_f, lr, steps = best[m]
                cfg = {"baselines": setup.baselines, "bank": setup.bank_cfg, "adapt": setup.adapt_cfg}[section]
                got = (getattr(cfg, lr_f), getattr(cfg, steps_f))
                evaluated[m].append(got)
                value = 1.0 - abs(math.log10(got[0] / lr)) - (abs(math.log2(got[1] / steps)) / 10 if got[1] else 1)
            rows.append({"method": m, "metrics": {"accuracy": {"value": value, "ci": [0, 1]}}})
        return {"rows": rows, "failed": {}}

    _, out = _tune_faked(tmp_path, monkeypatch, fake, "budgets-quick", "--bank-base", "task")
    r = read_recipe(out / "recipe.json")
    # OPPU's user part and the stack also run their "no training" trial (0 steps) with the steps
    no_training = {"oppu", "mta"}
    assert {m: len(set(v)) for m, v in evaluated.items() if m in best} == {m: 6 + (m in no_training) for m in best}
    for m, (*_, lr, _steps) in best.items():
        mid = {"task-lora": 128}.get(m, 32)
        assert evaluated[m][:4] == [(x, mid) for x in (3e-3, 1e-3, 3e-4, 1e-4)]  # the rates first
        assert {n for _, n in evaluated[m][4:]} | {mid} == ({32, 128, 512} if m == "task-lora" else
                                                           {8, 32, 128} | ({0} if m in no_training else set()))
        assert {x for x, _ in evaluated[m][4:]} == {lr}  # the steps at the rate chosen
    assert r.baselines == {"task_lr": 1e-3, "task_steps": 512, "oppu_lr": 3e-4, "oppu_steps": 8,
                           "user_lr": 1e-4, "user_steps": 128}
    assert r.bank == {"lr": 3e-3, "steps": 32} and r.adapt == {"stack_lr": 1e-3, "stack_steps": 128}
    assert {t["group"] for t in r.trials} == set(SPACES["budgets-quick"])


def test_a_stopped_tune_goes_on_where_it_was(tmp_path, monkeypatch, capsys):
    """Each finished trial's value is logged in OUT/trial-values.json; a tune run again into
    the same OUT, or into a new one holding only that log, evaluates no trial twice and
    chooses the same; a log of another tune (other dev users) is refused in one line."""
    calls: list[list[str]] = []
    stop = [3]

    def fake(ds, methods, setup, out, folds, *a, place=None, **kw):
        calls.append(list(methods))
        if len(calls) == stop[0]:
            stop[0] = 0
            raise KeyboardInterrupt  # the session ends in the third trial
        value = 0.9 if setup.bank_cfg.lr == 3e-4 else 0.1
        return {"rows": [{"method": m, "metrics": {"accuracy": {"value": value, "ci": [0, 1]}}} for m in methods],
                "failed": {}}

    monkeypatch.setattr(tune_mod, "run_eval", fake)
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "10", "--queries", "1"]) == 0
    out = tmp_path / "tune"
    args = ["tune", "--data", str(data), "--out", str(out), "--dev-fraction", "0.4", "--n-boot", "100",
            "--space", "learning-rate", "--max-user-share", "0.3", *TINY]
    assert main(args) != 0  # interrupted
    log = json.loads((out / tune_mod.VALUES).read_text())
    logged = log["values"]
    assert len(logged) == 2 and not (out / "recipe.json").exists()
    # the log says what each trial was, on its own
    assert log["trials"].keys() == logged.keys()
    assert [d["override"] for d in log["trials"].values()] == GROUPS["learning rate"][:2]
    assert {d["group"] for d in log["trials"].values()} == {"learning rate"}
    calls.clear()
    assert main(args) == 0
    trials = [c for c in calls if len(c) == 1]
    assert len(trials) == len(GROUPS["learning rate"]) - 2  # the two logged trials were not run again
    r = read_recipe(out / "recipe.json")
    assert r.bank["lr"] == 3e-4 and len(r.trials) == len(GROUPS["learning rate"])
    # the log alone, carried to a new OUT (another machine): no trial runs again there
    moved = tmp_path / "moved"
    moved.mkdir()
    full = json.loads((out / tune_mod.VALUES).read_text())
    older = {k: v for k, v in full.items() if k != "trials"}  # a log written before trials were described
    (moved / tune_mod.VALUES).write_text(json.dumps(older))
    calls.clear()
    assert main([str(moved) if a == str(out) else a for a in args]) == 0
    assert not [c for c in calls if len(c) == 1] and read_recipe(moved / "recipe.json").bank["lr"] == 3e-4
    # described as it went; the intervals the older log did not keep stay unknown
    assert all(d["ci"] == [0, 1] for d in full["trials"].values())
    assert json.loads((moved / tune_mod.VALUES).read_text())["trials"] == {
        k: {f: v for f, v in d.items() if f != "ci"} for k, d in full["trials"].items()}
    other = tmp_path / "other"  # the log beside anything else: not a tune's directory
    other.mkdir()
    (other / tune_mod.VALUES).write_bytes((out / tune_mod.VALUES).read_bytes())
    (other / "notes.txt").write_text("mine")
    assert main([str(other) if a == str(out) else a for a in args]) == 2
    assert "not empty and not an mta run directory" in " ".join(capsys.readouterr().err.split())
    assert main([("0.6" if a == "0.4" else a) for a in args]) == 2
    assert "holds the trials of another tune (different dev_users)" in " ".join(capsys.readouterr().err.split())


def test_a_tunes_log_names_its_data_by_content(tmp_path, monkeypatch, capsys):
    """The trial log goes on with the same data at another path (another machine); data of
    other content at the same path is refused; a log written before the content was named
    (no ``data_sha256``) matches by its path alone, and says where the data must be."""
    calls: list[list[str]] = []

    def fake(ds, methods, setup, out, folds, *a, place=None, **kw):
        calls.append(list(methods))
        return {"rows": [{"method": m, "metrics": {"accuracy": {"value": 0.5, "ci": [0, 1]}}} for m in methods],
                "failed": {}}

    monkeypatch.setattr(tune_mod, "run_eval", fake)
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "10", "--queries", "1"]) == 0
    out = tmp_path / "tune"

    def tune(data_dir: Path, out_dir: Path) -> int:
        calls.clear()
        return main(["tune", "--data", str(data_dir), "--out", str(out_dir), "--dev-fraction", "0.4", "--n-boot",
                     "100", "--space", "top-k", "--max-user-share", "0.3", *TINY])

    assert tune(data, out) == 0
    log = json.loads((out / tune_mod.VALUES).read_text())
    assert len(log["values"]) == len(GROUPS["top-k"]) and len(log["identity"]["data_sha256"]) == 64
    moved = tmp_path / "elsewhere" / "data"
    moved.parent.mkdir()
    data.rename(moved)
    carried = tmp_path / "carried"
    carried.mkdir()
    (carried / tune_mod.VALUES).write_text(json.dumps(log))
    assert tune(moved, carried) == 0 and not [c for c in calls if len(c) == 1]  # every trial read from the log
    users = moved / "users.jsonl"
    lines = users.read_text().splitlines()
    first = json.loads(lines[0])
    first["history"] = first["history"][:-1]
    users.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    again = tmp_path / "again"
    again.mkdir()
    (again / tune_mod.VALUES).write_text(json.dumps(log))
    assert tune(moved, again) == 2
    assert "another tune (different data_sha256)" in " ".join(capsys.readouterr().err.split())
    # a log from before: matched by the path it names
    old = {"identity": {k: v for k, v in log["identity"].items() if k != "data_sha256"}, "values": log["values"]}
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / tune_mod.VALUES).write_text(json.dumps(old))
    assert tune(moved, legacy) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "(different data); it was written before data were named by content: give the data at" in err
    assert str(data) in err


def test_trial_keys_of_logs_written_before_a_field_existed_still_match():
    from mta.config import AdaptConfig, BankConfig

    # the key this trial had at befadcf, before AdaptConfig.stack_stop existed: a tune
    # resumed from a log of then must not run its finished trials again
    assert tune_mod._key(AdaptConfig.make(stack_lr=1e-3, stack_steps=32)) == "a9ce209decba"
    assert tune_mod._key(BankConfig()) == "4ee7f9508e1c"  # (before BankConfig.stop existed)
    assert tune_mod._key(AdaptConfig.make(stack_lr=1e-3, stack_steps=32, stack_stop="held-out")) != "a9ce209decba"
    assert [o["adapt"]["stack_stop"] for o in GROUPS["stack stop"]] == ["none", "held-out", "refit"]


def test_every_trial_shares_one_cache_of_searched_weights_under_out(tmp_path, monkeypatch):
    """The stack's budget trials search each user once: every trial's evaluation gets the
    tune's cache of searched fusion weights, OUT/searched (what a hit returns is tested in
    test_weight_search); the final table searches again (its adaptation times are whole)."""
    roots = []

    def fake(ds, methods, setup, out, folds, *a, place=None, **kw):
        roots.append(setup.search_cache.root if setup.search_cache else None)
        return {"rows": [{"method": m, "metrics": {"accuracy": {"value": 0.5, "ci": [0, 1]}}} for m in methods],
                "failed": {}}

    _, out = _tune_faked(tmp_path, monkeypatch, fake, "stack-learning-rate")
    assert roots == [out / "searched"] * len(GROUPS["stack learning rate"]) + [None]


def test_each_trial_shows_its_own_progress(tmp_path, monkeypatch, capsys):
    """A trial's evaluation reports its stages (banks, users, prompts) under the trial's
    name, as the final table's does (a tune on a CPU went 40 minutes without a line)."""
    def fake(ds, methods, setup, out, folds, *a, place=None, **kw):
        setup.progress("fold 0 mta users", 1, 2)
        return {"rows": [{"method": m, "metrics": {"accuracy": {"value": 0.5, "ci": [0, 1]}}} for m in methods],
                "failed": {}}

    _tune_faked(tmp_path, monkeypatch, fake, "top-k")
    err = capsys.readouterr().err
    trials = len(GROUPS["top-k"])
    for name in [f"{i:02d}" for i in range(trials)] + ["final"]:
        assert f"trial {name}: fold 0 mta users: 1/2 (50%)" in err, err[-2000:]


def test_no_ablation_writes_the_recipe_when_the_search_ends(tmp_path, monkeypatch, capsys):
    """--no-ablation: the search's trials alone (one method each), no dev table of every
    method after them; the recipe is the search's choice with an empty ablation."""
    calls: list[list[str]] = []

    def fake(ds, methods, setup, out, folds, *a, place=None, **kw):
        calls.append(list(methods))
        value = 0.9 if setup.adapt_cfg.top_k == 1 else 0.1
        return {"rows": [{"method": m, "metrics": {"accuracy": {"value": value, "ci": [0, 1]}}} for m in methods],
                "failed": {}}

    _, out = _tune_faked(tmp_path, monkeypatch, fake, "top-k", "--no-ablation")
    r = read_recipe(out / "recipe.json")
    assert r.adapt["top_k"] == 1 and r.ablation == [] and len(r.trials) == len(GROUPS["top-k"])
    assert calls and all(len(c) == 1 for c in calls)  # no evaluation of every method
    assert "no dev table" in capsys.readouterr().out
    calls.clear()
    _, out = _tune_faked(tmp_path / "again", monkeypatch, fake, "top-k")
    assert len(calls[-1]) > 1 and read_recipe(out / "recipe.json").ablation  # the default runs it


def test_a_budget_grid_renders_from_the_trial_log_alone(tmp_path, monkeypatch):
    """scripts/results-doc.py's ``tune`` tables: one part's rates by step counts, each cell the
    value its trial logged (the log describes its trials), cells no trial ran said so."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("results_doc", Path(__file__).resolve().parents[1] / "scripts"
                                                  / "results-doc.py")
    results_doc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results_doc)

    def fake(ds, methods, setup, out, folds, *a, place=None, **kw):  # OPPU best at 3e-4 x 8
        b = setup.baselines
        value = 1.0 - abs(b.oppu_lr - 3e-4) * 100 - (b.oppu_steps or 0) / 1000
        ci = [value - 0.125, value + 0.125]
        return {"rows": [{"method": m, "metrics": {"accuracy": {"value": value, "ci": ci}}} for m in methods],
                "failed": {}}

    _, out = _tune_faked(tmp_path, monkeypatch, fake, "oppu-budget-rate,oppu-budget-steps", "--bank-base", "task",
                         "--no-ablation")
    # each trial's dev interval is kept with it: in the log's descriptions and the recipe's trials
    log = json.loads((out / tune_mod.VALUES).read_text())
    assert all(d["ci"] == [log["values"][k] - 0.125, log["values"][k] + 0.125] for k, d in log["trials"].items())
    assert all(t["ci"][1] - t["ci"][0] == 0.25 for t in read_recipe(out / "recipe.json").trials)
    grid = results_doc.tune_grid(f"{out / tune_mod.VALUES}#oppu-budget")
    rows = {line.split(" | ")[0].strip("| "): line.strip("| \n").split(" | ")[1:] for line in grid.splitlines()
            if line.startswith("| ") and "e-" in line.split(" | ")[0]}
    assert list(rows) == ["3e-3", "1e-3", "3e-4", "1e-4"] and "`oppu`'s accuracy" in grid
    assert all(r[1] != "(not run)" for r in rows.values())  # every rate at the middle step count
    assert "(not run)" not in rows["3e-4"] and rows["1e-3"][0] == rows["1e-3"][2] == "(not run)"
    value = {k: [float(c.split()[0]) if c != "(not run)" else None for c in r] for k, r in rows.items()}
    assert value["3e-4"][0] > value["3e-4"][1] > value["3e-4"][2]  # fewer steps scored higher
    assert rows["3e-4"][0] == f"{value['3e-4'][0]:.3f} [{value['3e-4'][0] - 0.125:.3f}, {value['3e-4'][0] + 0.125:.3f}]"
    assert "[95% person-bootstrap interval]" in grid
    none = log["values"][next(k for k, d in log["trials"].items() if d["budget"]["steps"] == 0)]  # OPPU's 0 steps
    assert f"No training (0 steps: the part left out): {none:.3f} [{none - 0.125:.3f}, {none + 0.125:.3f}]." in grid
    with pytest.raises(SystemExit, match="name a budget after '#'"):
        results_doc.tune_grid(f"{out / tune_mod.VALUES}#stack")
    # a part whose name has a hyphen of its own is found (this log has no trial of it)
    with pytest.raises(SystemExit, match="no described trial of 'task-lora budget'"):
        results_doc.tune_grid(f"{out / tune_mod.VALUES}#task-lora-budget")


def test_select_least_trains_least_among_the_trials_within_noise_of_the_best(tmp_path, monkeypatch):
    """--select least: in a budget's groups, the trial with the fewest steps (then the
    lowest rate) whose dev score is not significantly worse than the best's (paired person
    bootstrap over the per-person statistics each trial keeps in the log); a significantly
    worse one is never taken; --select best (the default) keeps the best."""
    zero_wrong = [True]  # the "no training" trial: significantly worse (then within noise, below)

    def fake(ds, methods, setup, out, folds, *a, place=None, **kw):
        ac = setup.adapt_cfg
        users = [u for u in ds.users if any(u in f.targets for f in folds)]
        if ac.stack_lr == 3e-3 or (ac.stack_steps == 0 and zero_wrong[0]):
            wrong = len(users)            # every answer wrong: significantly worse
        elif ac.stack_steps == 128:
            wrong = 0                     # the best
        else:
            wrong = 1                     # one person's answer wrong: within noise of the best
        preds = {u.user_id: [("zzz" if i < wrong else q.gold) for q in u.queries] for i, u in enumerate(users)}
        from mta.evaluation.runner import method_stats

        stats = method_stats(setup.task, users, preds)  # (persons, d), as run_eval returns them
        acc = float(stats.sum(0)[0] / sum(len(u.queries) for u in users))
        return {"rows": [{"method": m, "metrics": {"accuracy": {"value": acc, "ci": [0, 1]}}} for m in methods],
                "failed": {}, "person_stats": {m: stats for m in methods}}

    space = "stack-budget-rate,stack-budget-steps"
    _, out = _tune_faked(tmp_path / "best", monkeypatch, fake, space, "--no-ablation")
    best = read_recipe(out / "recipe.json")
    assert (best.adapt["stack_lr"], best.adapt["stack_steps"], best.select) == (1e-3, 128, "best")
    log = json.loads((out / tune_mod.VALUES).read_text())
    assert all(len(d["person_stats"]) == 4 for d in log["trials"].values())  # the 4 dev persons, per trial
    _, out = _tune_faked(tmp_path / "least", monkeypatch, fake, space, "--no-ablation", "--select", "least")
    least = read_recipe(out / "recipe.json")
    # the rates at 32 steps tie but for 3e-3 (all wrong): the lowest; then 8 steps, one answer short of 128's
    assert (least.adapt["stack_lr"], least.adapt["stack_steps"], least.select) == (1e-4, 8, "least")
    # no training within noise of the best: least leaves the stack out (0 steps), best does not
    zero_wrong[0] = False
    stops: list[str] = []
    real = fake

    def fake(ds, methods, setup, out, folds, *a, **kw):  # noqa: F811 (the same, counting stack-stop trials)
        stops.append(setup.adapt_cfg.stack_stop)
        return real(ds, methods, setup, out, folds, *a, **kw)

    _, out = _tune_faked(tmp_path / "none", monkeypatch, fake, space + ",stack-stop", "--no-ablation",
                         "--select", "least")
    none = read_recipe(out / "recipe.json")
    assert none.adapt["stack_steps"] == 0
    # with the stack left out, the stack's stopping has nothing to search: no trial of it ran
    assert set(stops) == {"none"} and not [t for t in none.trials if t["group"] == "stack stop"]
    _, out = _tune_faked(tmp_path / "none-best", monkeypatch, fake, space, "--no-ablation")
    assert read_recipe(out / "recipe.json").adapt["stack_steps"] == 128
    assert main(["tune", "--data", str(tmp_path / "least" / "data"), "--out", str(tmp_path / "bad"),
                 "--select", "fewest", *TINY]) == 2


@pytest.mark.integration
def test_dev_users_script_writes_the_tunes_dev_persons(tmp_path):
    import subprocess
    import sys

    from mta.data.readers import load_dataset
    from mta.evaluation.tune import dev_split
    from mta.tasks import get_task

    data = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(data), "--users", "12", "--queries", "1"]) == 0
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "dev.jsonl"
    r = subprocess.run([sys.executable, "scripts/dev-users.py", str(data), "--out", str(out), "--seed", "3"],
                       capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr
    users = load_dataset(data).users
    want = dev_split(users, 1 / 3, 3, "auto", get_task("synth"))  # as `mta tune`: balanced on a label task
    got = load_dataset(out).users
    assert sorted(u.user_id for u in got) == want and len(want) < len(users)
    assert [u.model_dump() for u in got] == [u.model_dump() for u in users if u.user_id in set(want)]
    again = subprocess.run([sys.executable, "scripts/dev-users.py", str(data), "--out", str(out)],
                           capture_output=True, text=True, cwd=root)
    assert again.returncode == 1 and "exists" in again.stderr
    balanced = tmp_path / "balanced.jsonl"
    r = subprocess.run([sys.executable, "scripts/dev-users.py", str(data), "--out", str(balanced), "--seed", "3",
                        "--dev-split", "balanced", "--history-queries", "1"], capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr
    assert sorted(u.user_id for u in load_dataset(balanced).users) == dev_split(users, 1 / 3, 3, "balanced",
                                                                                get_task("synth"), 1)


def test_a_trial_stopped_in_its_last_fold_goes_on_from_its_finished_folds_elsewhere(tmp_path, monkeypatch):
    """A trial's finished folds are kept as they finish (OUT/trials/NN/foldF/METHOD/result.json,
    as `mta eval` keeps them): carried to a new OUT with the tune's config.json and trial
    log (another machine), the tune runs only the trial's unfinished fold, and logs the
    same value as a tune that was never stopped."""
    import mta.evaluation.runner as runner_mod

    real = runner_mod._run_method
    ran: list[tuple[str, str]] = []  # (trial, fold) of each mta evaluation that ran
    stop_at = [4]  # the session ends in the second trial's second fold

    def counting(setup, m, targets, where, *a, **kw):
        ran.append((where.parent.parent.name, where.parent.name))
        if len(ran) == stop_at[0]:
            raise KeyboardInterrupt
        return real(setup, m, targets, where, *a, **kw)

    monkeypatch.setattr(runner_mod, "_run_method", counting)
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "10", "--queries", "1"]) == 0
    out = tmp_path / "tune"
    args = ["tune", "--data", str(data), "--out", str(out), "--dev-fraction", "0.4", "--n-boot", "100",
            "--anchors", "2", "--space", "anchor-training", "--max-user-share", "0.3", "--no-ablation", *TINY]
    assert main(args) != 0  # interrupted
    assert ran == [("00", "fold0"), ("00", "fold1"), ("01", "fold0"), ("01", "fold1")]
    assert len(json.loads((out / tune_mod.VALUES).read_text())["values"]) == 1
    kept = sorted(p.relative_to(out) for p in (out / "trials").rglob(runner_mod.RESULT))
    assert [str(p) for p in kept] == ["trials/00/fold0/mta/result.json", "trials/00/fold1/mta/result.json",
                                      "trials/01/fold0/mta/result.json"]
    # carried: config.json, the log and the finished folds' results; no adapter, no bank
    moved = tmp_path / "moved"
    for rel in [Path("config.json"), Path(tune_mod.VALUES), *kept]:
        (moved / rel).parent.mkdir(parents=True, exist_ok=True)
        (moved / rel).write_bytes((out / rel).read_bytes())
    ran.clear()
    stop_at[0] = 0
    assert main([str(moved) if a == str(out) else a for a in args]) == 0
    assert ran[0] == ("01", "fold1") and ("01", "fold0") not in ran and all(t != "00" for t, _ in ran)
    # a kept result of other settings (another version's identity) is run again and replaced
    stale = tmp_path / "stale"
    for rel in [Path("config.json"), Path(tune_mod.VALUES), *kept]:
        (stale / rel).parent.mkdir(parents=True, exist_ok=True)
        (stale / rel).write_bytes((out / rel).read_bytes())
    doc = json.loads((stale / kept[-1]).read_text())
    (stale / kept[-1]).write_text(json.dumps({**doc, "identity": "other"}))
    ran.clear()
    assert main([str(stale) if a == str(out) else a for a in args]) == 0
    assert ran[:2] == [("01", "fold0"), ("01", "fold1")]
    assert json.loads((stale / kept[-1]).read_text())["identity"] == doc["identity"]
    # the same value as a tune never stopped (the same seeds: the same adapters and answers)
    ran.clear()
    whole = tmp_path / "whole"
    assert main([str(whole) if a == str(out) else a for a in args]) == 0
    values = [json.loads((d / tune_mod.VALUES).read_text())["values"] for d in (moved, stale, whole)]
    assert values[0] == values[1] == values[2]


def test_trial_diff_script_gives_each_trial_against_its_parts_best_from_the_log():
    """scripts/trial-diff.py, on run U's LaMP-2 log (committed): the paired differences the
    docs cite for the per-user LoRAs' budget, by the tune's own test."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("trial_diff", root / "scripts" / "trial-diff.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    log = json.loads((root / "results/gpu-2026-12-06g/lamp2-tune/trial-values.json").read_text())
    rows = mod.diffs(log, "per-user-lora")
    assert rows[0][0] == {"part": "per-user-lora budget", "lr": 1e-4, "steps": 32} and rows[0][2] == 0
    eight = [r for r in rows if r[0]["steps"] == 8]
    assert [round(x, 3) for x in eight[0][2:]] == [-0.177, -0.375, -0.042]
    assert all(hi < 0 for _, _, _, _, hi in rows[1:])  # every other trial significantly below the best
    with pytest.raises(SystemExit, match="no trial of the 'anchor' budget"):
        mod.diffs(log, "anchor")


def _tagged(user_id: str, person: str, tags: list[str], field: str = "tag"):
    from mta.data.schema import HistoryItem, User

    return User(user_id=user_id, person=person,
                history=[HistoryItem(id=f"{user_id}-{i}", description=f"film {user_id} {i}", **{field: t})
                         for i, t in enumerate(tags)])


def test_own_agreement_answers_each_kept_history_item_by_the_users_other_items():
    """A person's own-history agreement, by hand: each item the target keeps answered by the
    user-prior of its other items (the most frequent label, the first seen of a tie; the mean
    score rounded half up), averaged over the person's items; the items that become test
    queries are never read."""
    from mta.evaluation.tune import own_agreement
    from mta.tasks import get_task

    lamp2 = get_task("lamp2")
    users = [_tagged("a1", "A", ["x", "x", "x", "y"]), _tagged("a2", "A", ["x", "y", "z", "w"]),
             _tagged("b1", "B", ["y", "z", "w", "v"])]
    # A: 3 of 4 (the y is answered x) and 0 of 4 (ties answer the first seen other label); B: 0
    assert own_agreement(users, lamp2) == {"A": 3 / 8, "B": 0.0}
    # the last item becomes a test query: its label is not read, whatever it is
    for last in ("x", "y", "q"):
        held = [_tagged("a1", "A", ["x", "x", "x", "y", last])]
        assert own_agreement(held, lamp2, history_queries=1) == {"A": 0.75}
    # target_history keeps the first items only: [x, x] answers each x by x
    assert own_agreement(users[:1], lamp2, target_history=2) == {"A": 1.0}
    movielens = get_task("movielens")
    rated = [_tagged("c", "C", ["3", "3", "3"], "score"), _tagged("d", "D", ["1", "5", "3"], "score")]
    # D: 1 answered by round(4.0) = 4, 5 by 2, 3 by 3: errors 3, 3, 0
    assert own_agreement(rated, movielens) == {"C": 0.0, "D": -2.0}
    # a person with no item to score (one item) takes the median of the others
    one = [*rated, _tagged("e", "E", ["2"], "score")]
    assert own_agreement(one, movielens)["E"] == -1.0
    with pytest.raises(MtaError, match="needs a rating or classification task; lamp4 is generation"):
        own_agreement(users, get_task("lamp4"))


def test_a_balanced_dev_split_takes_one_person_from_each_run_of_the_ranking():
    """`--dev-split balanced`: the persons ranked by their own-history agreement and cut into
    as many runs as there are dev persons, one drawn from each (seeded): the dev side spans
    the range a random draw of few persons can miss. The dev check says how alike the sides are."""
    from mta.evaluation.tune import dev_check, dev_split, own_agreement
    from mta.tasks import get_task

    lamp2 = get_task("lamp2")
    # 12 persons (two users each) whose 13 items are m x's, then labels seen once, m = 2..13:
    # each x is answered x, each other label x, so they agree m/13, all differ
    users = []
    for p in range(12):
        tags = ["x"] * (p + 2) + [f"t{p}-{i}" for i in range(11 - p)]
        users += [_tagged(f"p{p}-u{k}", f"P{(7 * p) % 12:02d}", tags) for k in range(2)]
    score = own_agreement(users, lamp2)
    ranked = sorted(score, key=score.get)
    assert sorted(score.values()) == [m / 13 for m in range(2, 14)]
    seen = set()
    for seed in range(8):
        dev = dev_split(users, 1 / 3, seed, "balanced", lamp2)
        persons = {u.person_id for u in users if u.user_id in set(dev)}
        assert len(persons) == 4 and len(dev) == 8  # every user of a chosen person
        # one person from each run of three neighbours in the ranking
        assert sorted(ranked.index(p) // 3 for p in persons) == [0, 1, 2, 3], (seed, persons)
        assert dev == dev_split(users, 1 / 3, seed, "balanced", lamp2)
        seen.add(frozenset(persons))
        check = dev_check(users, dev, lamp2)
        assert check["dev"] == pytest.approx(np.mean([score[p] for p in persons]))
        assert check["others"] == pytest.approx(np.mean([score[p] for p in score if p not in persons]))
    assert len(seen) > 1  # the seed draws within the runs
    # random stays the seeded draw it was (trial logs name their dev users)
    assert dev_split(users, 1 / 3, 0) == dev_split(users, 1 / 3, 0, "random", lamp2)
    with pytest.raises(MtaError, match="--dev-split must be one of auto, balanced, random, not 'even'"):
        dev_split(users, 1 / 3, 0, "even", lamp2)
    with pytest.raises(MtaError, match="a balanced dev split needs the task"):
        dev_split(users, 1 / 3, 0, "balanced")
    # auto: balanced where the prior is defined, random on a generation task
    assert dev_split(users, 1 / 3, 5, "auto", lamp2) == dev_split(users, 1 / 3, 5, "balanced", lamp2)
    assert dev_split(users, 1 / 3, 5, "auto", get_task("lamp4")) == dev_split(users, 1 / 3, 5)
    assert dev_check(users, dev, get_task("lamp4")) is None
