"""Bootstrap intervals (known answers) and the fold protocol (no self-anchoring, no leaks)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mta.data.synth import synth_users
from mta.errors import MtaError
from mta.evaluation.methods import expand_methods
from mta.evaluation.protocol import make_folds
from mta.evaluation.stats import _counts, bootstrap_ci, paired_diff_ci, user_stats
from mta.examples import loo_examples
from mta.models.tiny import tiny_tokenizer
from mta.tasks import get_task


def acc(s):
    return s[0] / s[1]


def us(preds, golds):
    """Per-user summed accuracy statistics [correct, count]."""
    return user_stats(preds, golds, lambda p, g: [float(p == g), 1.0])


def test_bootstrap_constant_metric_has_zero_width():
    preds = [["a", "b"], ["c"], ["d"]]
    assert bootstrap_ci(us(preds, preds), acc, n_boot=200) == (1.0, 1.0, 1.0)


def test_bootstrap_two_users_known_percentiles():
    # user 0 always right, user 1 always wrong. A resample of 2 users is (0,0) with p=1/4
    # (accuracy 1), (1,1) with p=1/4 (accuracy 0), mixed otherwise (0.5): the 2.5th and
    # 97.5th percentiles are exactly 0 and 1.
    v, lo, hi = bootstrap_ci(us([["x"], ["y"]], [["x"], ["z"]]), acc, n_boot=4000, seed=1)
    assert (v, lo, hi) == (0.5, 0.0, 1.0)


def test_bootstrap_resamples_users_not_queries():
    # one user with 9 right answers, one with 1 wrong: a query-level bootstrap would give a
    # narrow interval; resampling users can give accuracy 1.0 or 0.0 for whole resamples.
    stats = us([["a"] * 9, ["b"]], [["a"] * 9, ["c"]])
    v, lo, hi = bootstrap_ci(stats, acc, n_boot=4000, seed=0)
    assert v == pytest.approx(0.9) and lo == 0.0 and hi == 1.0
    # a resample's value weighs users by their query counts: (user 0 twice) -> 1.0,
    # (user 1 twice) -> 0.0, one each -> 0.9; all three occur in 4000 resamples
    c = _counts(2, 4000, 0) @ stats
    assert set(np.round(c[:, 0] / c[:, 1], 6)) == {0.0, 0.9, 1.0}


def test_paired_difference():
    golds = [["a"]] * 30
    same = paired_diff_ci(us(golds, golds), us(golds, golds), acc, n_boot=300)
    assert same == (0.0, 0.0, 0.0)
    better = [["a"]] * 30
    worse = [["a"]] * 10 + [["b"]] * 20
    d, lo, hi = paired_diff_ci(us(better, golds), us(worse, golds), acc, n_boot=500)
    assert d == pytest.approx(20 / 30) and lo > 0  # significant
    with pytest.raises(ValueError, match="aligned"):
        paired_diff_ci(us(better, golds), us(worse[:3], golds[:3]), acc)


def test_folds_cover_everyone_once_and_never_self_anchor():
    users = synth_users(11, seed=0)
    folds = make_folds(users, 3, seed=4)
    targets = [u.user_id for f in folds for u in f.targets]
    assert sorted(targets) == sorted(u.user_id for u in users)
    for f in folds:
        t = {u.user_id for u in f.targets}
        c = {u.user_id for u in f.candidates}
        assert not t & c and len(t | c) == 11
    assert [u.user_id for u in make_folds(users, 3, seed=4)[0].targets] == [u.user_id for u in folds[0].targets]
    with pytest.raises(MtaError, match="at least 2"):
        make_folds(users, 1, 0)


def test_training_examples_never_contain_the_query():
    tok = tiny_tokenizer()
    task = get_task("synth")
    user = synth_users(1, seed=3)[0]
    q = user.queries[0]
    marker = task.retrieval_text(q.input)
    for ex in loo_examples(task, user, tok, retrieve_k=3):
        text = tok.decode(ex.input_ids)
        assert marker not in text
    # and each example's own answer is never in its retrieved context
    item = user.history[0]
    first = tok.decode(loo_examples(task, user, tok, retrieve_k=9)[0].input_ids)
    assert text.count(item.get("description")) <= 1 and first.count(item.get("description")) == 1


def test_expand_methods():
    assert expand_methods("base,rag,mta") == ["base", "rag-1", "rag-4", "mta"]
    assert expand_methods("rag-2,rag-2") == ["rag-2"]
    with pytest.raises(MtaError, match="unknown method 'magic'"):
        expand_methods("base,magic")


def test_eval_generation_task_official_layout(tmp_path):
    """LaMP-4 (headlines, ROUGE) from a fixture in the official layout, through mta eval."""
    import json

    from mta.cli.main import main

    questions, golds = [], []
    for i in range(4):
        profile = [{"id": f"{i}{j}", "text": f"Story {j} about city council budget vote number {i}.",
                    "title": f"Council votes on budget {j}"} for j in range(3)]
        questions.append({"id": f"q{i}", "profile": profile,
                          "input": f"Generate a headline for the following article: The council met on {i}."})
        golds.append({"id": f"q{i}", "output": f"Council meets on day {i}"})
    d = tmp_path / "lamp4"
    d.mkdir()
    (d / "dev_questions.json").write_text(json.dumps(questions))
    (d / "dev_outputs.json").write_text(json.dumps({"task": "LaMP_4", "golds": golds}))
    out = tmp_path / "eval"
    rc = main(["eval", "--data", str(d), "--methods", "base,rag-1,mta", "--model", "tiny-random-llama",
               "--embedder", "hashing-embedder", "--out", str(out), "--anchors", "1", "--top-k", "1",
               "--min-history", "1", "--bank-epochs", "1", "--max-new-tokens", "3", "--n-boot", "100"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["task"] == "lamp4"
    assert all(set(r["metrics"]) == {"rouge1", "rougeL"} for r in m["results"])
    assert (out / "rouge1_by_method.png").exists()


def _eval_synth(tmp_path, methods: str, name: str, *extra: str):
    from mta.cli.main import main

    data = tmp_path / "data"
    if not data.exists():
        assert main(["data", "synth", "--out", str(data), "--users", "8", "--queries", "1"]) == 0
    out = tmp_path / name
    rc = main(["eval", "--data", str(data), "--out", str(out), "--methods", methods, "--model", "tiny-random-llama",
               "--embedder", "hashing-embedder", "--anchors", "2", "--max-new-tokens", "2", "--n-boot", "100",
               *extra])
    return rc, out


def test_a_diverging_method_is_left_out_and_the_others_reported(tmp_path, monkeypatch, capsys):
    """One method's training diverging (here per-user-lora's, and the bank that mta-fusion
    and mta need) costs those methods, named with their errors, not the evaluation."""
    import json

    import mta.evaluation.runner as runner_mod

    def diverging(what):
        def f(*a, **kw):
            raise MtaError(f"training diverged at step 1: the loss of '{what}' is nan", ("BankConfig.lr",))
        return f

    monkeypatch.setattr(runner_mod, "run_private", diverging("user:x"))
    monkeypatch.setattr(runner_mod, "build_bank", diverging("anchor:y"))
    rc, out = _eval_synth(tmp_path, "rag-1,per-user-lora,mta-fusion,mta-stack,mta", "eval")
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert [r["method"] for r in m["results"]] == ["rag-1", "mta-stack"]
    assert m["failed"] == {"per-user-lora": "training diverged at step 1: the loss of 'user:x' is nan",
                           "mta-fusion": "training diverged at step 1: the loss of 'anchor:y' is nan",
                           "mta": "training diverged at step 1: the loss of 'anchor:y' is nan"}
    assert "diff_vs_rag-1" in m["results"][1]["metrics"]["accuracy"]
    md = (out / "results.md").read_text()
    assert "Not reported: `per-user-lora` diverged (training diverged at step 1" in md
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {p["method"] for p in preds} == {"rag-1", "mta-stack"}
    err = " ".join(capsys.readouterr().err.split())
    assert "not reported: mta diverged (training diverged at step 1: the loss of 'anchor:y' is nan)" in err
    # every method diverging: nothing to report, the one-line error and exit code 2
    rc, _ = _eval_synth(tmp_path, "per-user-lora,mta", "eval2")
    assert rc == 2


def test_mta_run_fails_when_its_mta_diverges(tmp_path, monkeypatch, capsys):
    """`mta run` is for its mta: a diverging bank is its one-line error, not a table of the
    baselines alone."""
    import mta.evaluation.runner as runner_mod
    from mta.cli.main import main

    def diverging(*a, **kw):
        raise MtaError("training diverged at step 1: the loss of 'anchor:y' is nan", ("BankConfig.lr",))

    monkeypatch.setattr(runner_mod, "build_bank", diverging)
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "8", "--queries", "1"]) == 0
    rc = main(["run", "--data", str(data), "--out", str(tmp_path / "run"), "--model", "tiny-random-llama",
               "--embedder", "hashing-embedder", "--anchors", "2", "--max-new-tokens", "2"])
    assert rc == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "training diverged at step 1: the loss of 'anchor:y' is nan" in err
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_unparsed_answers_are_counted_and_noted_under_the_table():
    """A method whose adapter collapsed (empty answers) is counted in metrics.json's row and
    named under results.md's table; a method that answers is not."""
    from mta.evaluation.methods import FoldResult
    from mta.evaluation.report import markdown
    from mta.evaluation.runner import summarise

    task = get_task("synth")
    users = synth_users(6, seed=0, queries=2)
    good = FoldResult(preds={u.user_id: [q.gold for q in u.queries] for u in users})
    bad = FoldResult(preds={u.user_id: [None, u.queries[1].gold if i else None] for i, u in enumerate(users)})
    rows = summarise(task, users, {"good": good, "bad": bad}, [], n_boot=100, seed=0)
    assert [r["unparsed"] for r in rows] == [0, 7] and rows[1]["queries"] == 12
    md = markdown("t", "m", task, rows, [])
    assert "`bad`: 7 of 12 answers could not be parsed or were empty (58%; scored as wrong)." in md
    assert "`good`:" not in md


def test_an_evaluation_run_again_into_its_directory_takes_the_methods_it_finished(tmp_path, monkeypatch):
    """A stopped `mta eval` run again into the same directory does not run again what it
    finished: each method's result on a fold is kept beside its adapters with what it
    depends on (method, model, every stage's config, the fold's targets and candidates),
    and read back, so the report is the same; a changed configuration runs them again."""
    import json
    import shutil

    import mta.evaluation.runner as runner
    from mta.cli.main import main

    bank_builder = runner.build_bank

    rc, out = _eval_synth(tmp_path, "rag-1,per-user-lora,mta", "ev")
    assert rc == 0 and all((out / "fold0" / m / "result.json").is_file() for m in ("rag-1", "per-user-lora", "mta"))
    first = json.loads((out / "metrics.json").read_text())["results"]
    calls = []
    real, private = runner._run_method, runner.run_private
    monkeypatch.setattr(runner, "_run_method", lambda setup, m, *a, **k: calls.append(m) or real(setup, m, *a, **k))
    monkeypatch.setattr(runner, "run_private", lambda *a, **k: calls.append("per-user-lora") or private(*a, **k))
    builds = []
    monkeypatch.setattr(runner, "build_bank", lambda *a, **k: builds.append(1))
    # only the results carried (another machine): the banks are not needed, so not trained again
    for fold in ("fold0", "fold1"):
        shutil.rmtree(out / fold / "bank")
    rc, again = _eval_synth(tmp_path, "rag-1,per-user-lora,mta", "ev")
    assert rc == 0 and again == out and calls == [] and builds == []
    monkeypatch.setattr(runner, "build_bank", bank_builder)
    # (two folds of three methods, each said in the run's log)
    assert (out / "run.log").read_text().count("finished by an earlier run of this evaluation") == 6
    second = json.loads((out / "metrics.json").read_text())["results"]
    assert [(r["method"], r["metrics"], r["optimizer_steps"], r["bytes_per_user"]) for r in second] == \
        [(r["method"], r["metrics"], r["optimizer_steps"], r["bytes_per_user"]) for r in first]
    # another generation length: every method's result depends on it, so each runs again
    rc = main(["eval", "--data", str(tmp_path / "data"), "--out", str(out), "--methods", "rag-1,per-user-lora,mta",
               "--model", "tiny-random-llama", "--embedder", "hashing-embedder", "--anchors", "2",
               "--max-new-tokens", "3", "--n-boot", "100"])
    assert rc == 0 and sorted(calls) == sorted(["mta", "per-user-lora", "rag-1"] * 2)


def test_variants_are_mta_again_with_one_setting_changed_against_mta(tmp_path, capsys):
    """`mta eval --variants`: the ablation rows, each `mta` on the same folds with one
    setting changed and its paired interval against `mta`; a variant that changes nothing
    pairs to exactly 0; one that changes only adaptation reuses the main run's bank; one
    that changes the bank trains its own; bad variants are refused before anything trains."""
    import json

    from mta.cli.main import main

    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "8", "--queries", "1"]) == 0
    out = tmp_path / "eval"
    common = ["eval", "--data", str(data), "--model", "tiny-random-llama", "--embedder", "hashing-embedder",
              "--anchors", "2", "--max-new-tokens", "2", "--n-boot", "100"]
    rc = main([*common, "--out", str(out), "--methods", "rag-1,mta",
               "--variants", "merge=delta,stack_steps=2,--bank-base=task,bank-lr=1e-3"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    rows = {r["variant"]: r for r in m["variants"]}
    assert list(rows) == ["merge=delta", "stack-steps=2", "bank-base=task", "bank-lr=1e-3"]  # by their flags
    same = rows["merge=delta"]["metrics"]["accuracy"]["diff_vs_mta"]  # mta itself, run again: no difference
    assert same["value"] == 0.0 and same["ci"] == [0.0, 0.0] and not same["significant"]
    for r in rows.values():
        d = r["metrics"]["accuracy"]["diff_vs_mta"]
        assert d["ci"][0] <= d["value"] <= d["ci"][1] and r["persons"] == m["results"][0]["persons"]
    assert rows["stack-steps=2"]["optimizer_steps"]["stack"]["max"] == 2
    variants = out / "variants"
    assert not (variants / "stack-steps=2" / "fold0" / "bank").exists()  # the main run's bank, reused
    assert (variants / "bank-base=task" / "fold0" / "bank" / "index.json").is_file()  # its own (residual) bank
    index = json.loads((variants / "bank-lr=1e-3" / "fold0" / "bank" / "index.json").read_text())
    assert index["config"]["lr"] == 1e-3  # the flag --bank-lr sets the bank's lr
    assert "variant stack-steps=2: fold 0" in " ".join(capsys.readouterr().err.split())  # its own progress lines
    md = (out / "results.md").read_text()
    assert "Ablation: `mta` with one setting changed" in md and "| stack-steps=2 |" in md
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "results_table", Path(__file__).resolve().parents[1] / "scripts" / "results-table.py")
    results_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results_table)
    assert "| bank-base=task |" in results_table.table(out)  # docs/results.md's tables carry it too
    for bad, why in ((["--methods", "rag-1", "--variants", "merge=delta"], "add mta to --methods"),
                     (["--methods", "mta", "--variants", "nothing=1"], "--nothing is not a bank or adaptation option"),
                     (["--methods", "mta", "--variants", "lr=1e-3"], "--lr is not a bank or adaptation option"),
                     (["--methods", "mta", "--variants", "bank-base=bogus"], "bank_base")):
        capsys.readouterr()
        assert main([*common, "--out", str(tmp_path / "bad"), *bad]) == 2
        assert why in " ".join(capsys.readouterr().err.split())
        assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_variants_are_skipped_when_mta_itself_diverged(tmp_path, monkeypatch):
    """With mta's bank diverging, the run reports the other methods as usual and runs no
    variant (each is compared with mta's result, which there is not)."""
    import json

    import mta.evaluation.runner as runner_mod

    nan = MtaError("training diverged at step 1: the loss of 'anchor:y' is nan", ("BankConfig.lr",))
    monkeypatch.setattr(runner_mod, "build_bank", lambda *a, **kw: (_ for _ in ()).throw(nan))
    rc, out = _eval_synth(tmp_path, "rag-1,mta", "eval", "--variants", "stack-steps=2")
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert [r["method"] for r in m["results"]] == ["rag-1"] and "mta" in m["failed"] and "variants" not in m
    assert not (out / "variants").exists()


def test_folds_run_apart_then_read_back_make_the_whole_run(tmp_path, monkeypatch, capsys):
    """`mta eval --only-folds`: each fold run by itself (another process or machine) writes
    that fold's results and a table of its targets alone; its results are those the whole
    run gets (a fold's training does not depend on which folds ran before it in the
    process); an eval of every fold into a directory holding each fold's results reads them
    back and runs nothing. Bad fold lists are refused in one line."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file

    import mta.evaluation.runner as runner

    # (not per-user-lora: a whole run's bank copies the per-user LoRAs that earlier folds
    # trained for its anchors, docs/evaluation.md)
    methods = "rag-1,task-lora,mta"
    rc, whole = _eval_synth(tmp_path, methods, "whole")
    assert rc == 0
    parts = {}
    for i in (1, 0):  # fold 1 first: nothing before it in its process
        rc, parts[i] = _eval_synth(tmp_path, methods, f"part{i}", "--only-folds", str(i))
        assert rc == 0 and not (parts[i] / f"fold{1 - i}").exists()
        m = json.loads((parts[i] / "metrics.json").read_text())
        assert m["title"].startswith(f"mta eval, fold {i} of 2 only: ")
        assert f"this run: fold {i} only (--only-folds)" in m["protocol"]
        ids = {p["user_id"] for p in map(json.loads, (parts[i] / "predictions.jsonl").read_text().splitlines())}
        assert ids == set(json.loads((whole / "split.json").read_text())[i]["targets"])
        # (the tiny model's answers are all empty: the adapters themselves are compared)
        tensors = {d: {p.relative_to(d): load_file(p) for p in sorted((d / f"fold{i}").rglob("*.safetensors"))}
                   for d in (parts[i], whole)}
        assert len(tensors[whole]) >= 4 and tensors[parts[i]].keys() == tensors[whole].keys()
        for k, v in tensors[whole].items():
            assert v.keys() == tensors[parts[i]][k].keys()
            assert all(torch.equal(v[n], tensors[parts[i]][k][n]) for n in v), k
    shutil.copytree(parts[1] / "fold1", parts[0] / "fold1")
    calls = []
    monkeypatch.setattr(runner, "_run_method", lambda *a, **k: calls.append(a[1]))
    rc, joined = _eval_synth(tmp_path, methods, "part0")
    assert rc == 0 and calls == []
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (joined, whole))
    assert got["title"] == want["title"]
    # the joined table's wall time is the reading's: its protocol says every result was read back
    assert "(every result of a method on a fold read back from an earlier run" in got["protocol"]
    assert "read back" not in want["protocol"]
    assert json.loads((joined / "split.json").read_text()) == json.loads((whole / "split.json").read_text())
    assert [(r["method"], r["metrics"]) for r in got["results"]] == [(r["method"], r["metrics"])
                                                                     for r in want["results"]]
    capsys.readouterr()
    for bad, said in (("2", "there are 2 folds (0 to 1); --only-folds named 2"), ("0,0", "a fold is named twice"),
                      ("-1", "fold indices start at 0"), ("x", "`only_folds.0` input should be a valid integer")):
        rc, out = _eval_synth(tmp_path, methods, "bad", "--only-folds", bad)
        assert rc == 2 and not out.exists()
        assert said in " ".join(capsys.readouterr().err.split()), bad
    rc, out = _eval_synth(tmp_path, methods, "bad", "--only-folds", "0", "--anchor-data", str(tmp_path / "data"))
    assert rc == 2 and not out.exists()
    assert "with --anchor-data there is one fold" in " ".join(capsys.readouterr().err.split())
    from mta.cli.main import main

    rc = main(["tune", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "tune"), "--model",
               "tiny-random-llama", "--embedder", "hashing-embedder", "--only-folds", "0"])
    assert rc == 2 and not (tmp_path / "tune").exists()
    assert "--only-folds is an `mta eval` option" in " ".join(capsys.readouterr().err.split())


def test_an_evaluations_stack_table_holds_its_folds_targets_not_a_servers_256(tmp_path, monkeypatch):
    """Answering a fold's targets loads their stacks into the engine's stack table, sized to
    those targets: the bank's default (a server's 256 resident users) held 8.8 GiB of
    OPPU's rank-8 stacks at 1.5B for 29 users (docs/architecture.md)."""
    import json

    from mta.engine.engine import AdapterEngine

    sizes = []
    real = AdapterEngine.alloc_stacks
    monkeypatch.setattr(AdapterEngine, "alloc_stacks",
                        lambda self, n, *a, **k: sizes.append(n) or real(self, n, *a, **k))
    rc, out = _eval_synth(tmp_path, "oppu,mta-stack,mta", "ev")
    assert rc == 0
    targets = [len(f["targets"]) for f in json.loads((out / "split.json").read_text())]
    assert sizes and max(sizes) <= max(targets) and all(n >= 1 for n in sizes)


def test_answering_that_met_the_gpu_memory_cap_says_how_often(tmp_path, monkeypatch):
    """The allocator's retries at the cap during a method's answering (torch's
    ``num_alloc_retries``, CUDA only: here a stand-in counter) are logged with its time, so
    a slow answering in a GPU run's log says whether it ran at the cap."""
    import itertools

    from mta.evaluation import methods

    count = itertools.count(0, 3)
    monkeypatch.setattr(methods, "alloc_retries", lambda device: next(count))
    rc, out = _eval_synth(tmp_path, "task-lora", "ev")
    assert rc == 0
    text = (out / "run.log").read_text()
    assert "task-lora: answering met the GPU memory cap 3 times" in text
    assert re.search(r"task-lora: 4 queries answered in [0-9.]+ s, 0 stored stacks loaded in 0\.0 s of it", text)


def test_answering_reports_its_start_so_its_time_counts_from_there(tmp_path, capsys):
    """Each method's answering stage is reported at 0 answered before its first batch: the
    plain progress lines' clock (and the heartbeat's "working" lines) start when answering
    does, not after the first batch."""
    rc, _ = _eval_synth(tmp_path, "rag-1,task-lora", "ev")
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 0
    for m in ("rag-1", "task-lora"):
        assert f"fold 0 {m}: 0/4 (0%)" in err and f"fold 0 {m}: 4/4 (100%)" in err


def test_the_protocol_counts_the_results_read_back_with_the_variants():
    """A table joined from earlier runs says how many of its method-fold results it read
    back (the main methods' and the variants' together), and nothing when it read none."""
    from mta.cli.evaluate import _read_back

    assert _read_back({"read_back": [0, 6]}) == ""
    assert _read_back({"read_back": [0, 6], "variants": [{"read_back": [0, 2]}]}) == ""
    said = _read_back({"read_back": [6, 6], "variants": [{"read_back": [1, 2]}, {"error": "diverged"}]})
    assert said.startswith(" (7 of 8 results of a method on a fold read back from an earlier run")
    assert _read_back({"read_back": [6, 6], "variants": [{"read_back": [2, 2]}]}).startswith(" (every result ")
