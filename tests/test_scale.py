"""Answers read from the model instead of generated: a rating from its distribution over the
scale (mta.decoding.scale), a label by its likelihood (mta.decoding.labels)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mta.config import GenerateConfig
from mta.decoding.answers import answers
from mta.decoding.batch import generate
from mta.decoding.prompts import chat_prompt
from mta.decoding.scale import rate, rating_text, scale_distribution, scale_tokens, stored_distribution
from mta.engine.engine import Row
from mta.errors import MtaError
from mta.tasks import get_task
from tests.engine_helpers import backbone_with_adapters, tiny_backbone

VALUES = [1.0, 2.0, 3.0, 4.0, 5.0]
PROMPTS = ["What score would this user give?", "a much longer prompt: what score from 1 to 5 would this user "
           "give the movie, just answer with a digit", "score?", "mid length prompt here"]


def test_the_rules_read_a_distribution_as_the_metrics_want():
    bimodal = [0.35, 0.10, 0.10, 0.20, 0.25]
    assert rate(bimodal, VALUES, "mode") == 1.0
    assert rate(bimodal, VALUES, "median") == 3.0  # cumulative 0.35, 0.45, 0.55
    assert rate(bimodal, VALUES, "mean") == pytest.approx(2.9)
    assert rate([0.0, 0.0, 0.5, 0.5, 0.0], VALUES, "median") == 3.0  # half reached at 3
    assert rate([0.1, 0.1, 0.1, 0.1, 0.6], VALUES, "median") == 5.0
    # the median minimises the expected absolute error, the mean the squared one
    for p in (bimodal, [0.05, 0.1, 0.3, 0.35, 0.2], [0.6, 0.0, 0.0, 0.0, 0.4]):
        abs_err = {v: sum(q * abs(v - x) for q, x in zip(p, VALUES)) for v in VALUES}
        assert abs_err[rate(p, VALUES, "median")] == min(abs_err.values())
        m = rate(p, VALUES, "mean")
        assert all(sum(q * (m - x) ** 2 for q, x in zip(p, VALUES)) <= sum(q * (v - x) ** 2 for q, x in zip(p, VALUES))
                   for v in VALUES)
    with pytest.raises(ValueError):
        rate(bimodal, VALUES, "text")
    assert [rating_text(v) for v in (4.0, 3.456)] == ["4", "3.46"]
    kept = rating_text(4.0, bimodal)
    assert kept == "4 (p 0.3500 0.1000 0.1000 0.2000 0.2500)" and stored_distribution(kept) == bimodal
    assert get_task("movielens").parse(kept) == 4.0 and stored_distribution("4") is None


def _alone(bb, prompt: str, row: Row | None, labels) -> tuple[torch.Tensor, float]:
    """Reference: the prompt alone (no padding), one plain forward through its row."""
    tok = bb.tokenizer
    ids = torch.tensor([tok(chat_prompt(tok, prompt), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        if row is None:
            logits = bb.engine.model(input_ids=ids).logits[0, -1]
        else:
            with bb.engine.route([row]):
                logits = bb.engine.model(input_ids=ids).logits[0, -1]
    p = torch.softmax(logits.float(), -1)[scale_tokens(tok, labels)]
    return p / p.sum(), float(p.sum())


@pytest.mark.parametrize("routed", [True, False])
def test_a_batch_of_rows_reads_each_prompts_distribution_as_if_alone(routed):
    bb = backbone_with_adapters()
    labels = get_task("movielens").scale
    rows = [Row([0, 1], [0.6, 0.4], user=0), Row([2], [1.0], user=1), Row(active=False), Row([1], [1.0])]
    held = []  # after each forward: layers still holding their rows' gathered factors (none: one forward each)
    hook = bb.engine.model.register_forward_hook(
        lambda *_: held.append(sum(ly._cache is not None for ly in bb.engine.layers.values())))
    probs, mass = scale_distribution(bb, PROMPTS, rows if routed else None, labels, batch_size=3)
    hook.remove()
    assert held == [0, 0]
    for i, prompt in enumerate(PROMPTS):
        ref, ref_mass = _alone(bb, prompt, rows[i] if routed else None, labels)
        torch.testing.assert_close(probs[i], ref, atol=1e-5, rtol=1e-4)
        assert mass[i].item() == pytest.approx(ref_mass, rel=1e-4)
    assert torch.allclose(probs.sum(-1), torch.ones(len(PROMPTS)))
    if routed:  # the adapters move the distribution: a test that routing is on
        plain, _ = scale_distribution(bb, PROMPTS, None, labels, batch_size=3)
        assert not torch.allclose(plain[0], probs[0], atol=1e-3)


def test_the_mode_is_greedy_generation_restricted_to_the_scale():
    bb = backbone_with_adapters()
    task = get_task("movielens")
    rows = [Row([0, 1], [0.6, 0.4], user=0), Row([2], [1.0], user=1), Row(active=False), Row([1], [1.0])]
    ids = scale_tokens(bb.tokenizer, task.scale)
    banned = [[i] for i in range(bb.engine.model.config.vocab_size) if i not in ids]
    greedy = generate(bb, PROMPTS, rows, 1, batch_size=2, bad_words_ids=banned)
    got = answers(bb, task, PROMPTS, rows, GenerateConfig(rating_answer="mode", batch_size=2), 8)
    assert [task.parse(g) for g in got] == [task.parse(g) for g in greedy]
    assert all(g.split()[0] in task.scale for g in got)
    medians = answers(bb, task, PROMPTS, rows, GenerateConfig(rating_answer="median"), 8)
    means = answers(bb, task, PROMPTS, rows, GenerateConfig(rating_answer="mean"), 8)
    assert all(task.parse(m) in VALUES for m in medians)
    assert all(1.0 <= task.parse(m) <= 5.0 for m in means)


def test_a_rule_needs_a_rating_task_and_one_token_per_score():
    bb = tiny_backbone()
    with pytest.raises(MtaError, match="lamp2 is classification"):
        answers(bb, get_task("lamp2"), PROMPTS[:1], None, GenerateConfig(rating_answer="median"), 8)
    with pytest.raises(MtaError, match="tokens for this tokenizer"):
        scale_tokens(bb.tokenizer, ["10", "hello world"])
    # text keeps generating, for any task
    assert len(answers(bb, get_task("lamp2"), PROMPTS[:1], None, GenerateConfig(), 3)) == 1


def _rating_data(path, users: int = 6):
    """Users of the MovieLens task: 6 rated movies each, one to predict."""
    import json
    import random

    rng = random.Random(0)
    lines = []
    for u in range(users):
        items = [{"id": f"{u}-{i}", "title": f"Movie {u}-{i} (1999)", "genres": rng.choice(["Drama", "Comedy"]),
                  "score": rng.randint(1, 5)} for i in range(6)]
        query = {"id": f"{u}-q", "input": get_task("movielens").query_input(f"Film {u} (2001)", "Drama"),
                 "gold": str(rng.randint(1, 5))}
        lines.append(json.dumps({"user_id": f"u{u}", "task": "movielens", "history": items, "queries": [query]}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.integration
def test_eval_answers_a_rating_task_by_the_rule_asked_and_says_so(tmp_path, capsys):
    import json

    from mta.cli.main import main

    data = _rating_data(tmp_path / "ratings.jsonl")
    out = tmp_path / "ev"
    args = ["eval", "--model", "tiny-random-llama", "--embedder", "hashing-embedder", "--anchors", "2",
            "--bank-epochs", "1", "--n-boot", "100"]
    assert main([*args, "--data", str(data), "--out", str(out), "--methods", "rag-1,mta", "--rating-answer",
                 "median"]) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"rag-1", "mta"}
    assert all(p in VALUES for r in rows for p in r["parsed"])
    # each output keeps the distribution it was read from: taken again by another rule without the model
    probs = [stored_distribution(o) for r in rows for o in r["outputs"]]
    assert all(len(p) == 5 and abs(sum(p) - 1) < 1e-3 for p in probs)
    assert [rate(p, VALUES, "median") for p in probs] == [p for r in rows for p in r["parsed"]]
    root = Path(__file__).resolve().parents[1]
    got = subprocess.run([sys.executable, "scripts/rescore.py", str(out), "--rating-answer", "mean", "--out",
                          str(tmp_path / "mean.md")], capture_output=True, text=True, check=True, cwd=root).stdout
    assert "the mean of its stored distribution" in got and "| mta |" in got
    assert "--rating-answer median" in (out / "results.md").read_text()
    # the rule is part of each result's identity: run again with another, every method runs again
    assert main([*args, "--data", str(data), "--out", str(out), "--methods", "rag-1,mta", "--rating-answer",
                 "mean"]) == 0
    again = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert any(p not in VALUES for r in again for p in r["parsed"])  # expected values, not whole scores
    # ... the same as the first run's distributions taken again by the mean (same adapters, seeds)
    means = {(r["method"], r["user_id"]): [round(rate(stored_distribution(o), VALUES, "mean"), 2)
                                          for o in r["outputs"]] for r in rows}
    assert all(r["parsed"] == means[r["method"], r["user_id"]] for r in again)
    # the same evaluation answered with text, beside the first run's answers by every rule
    text = tmp_path / "text"
    assert main([*args, "--data", str(data), "--out", str(text), "--methods", "rag-1,mta"]) == 0
    got = subprocess.run([sys.executable, "scripts/rating-rules.py", str(out), "--text", str(text), "--out",
                          str(tmp_path / "rules.json")], capture_output=True, text=True, cwd=root)
    assert got.returncode == 0, got.stderr
    record = json.loads((tmp_path / "rules.json").read_text())
    by = {r["method"]: r for r in record["rows"]}
    assert set(by) == {"rag-1", "mta"} and set(by["mta"]["rules"]) == {"text", "mode", "median", "mean"}
    results = json.loads((text / "metrics.json").read_text())["results"]
    own = {r["method"]: r["metrics"]["mae"]["value"] for r in results}
    for m in ("rag-1", "mta"):  # the text rule's MAE is the text run's own
        assert by[m]["rules"]["text"]["mae"]["value"] == pytest.approx(own[m])
    assert "| mta |" in got.stdout and "Δmae median - text" in got.stdout
    # a text run given as the distribution's is refused in one line
    bad = subprocess.run([sys.executable, "scripts/rating-rules.py", str(text)], capture_output=True, text=True,
                         cwd=root)
    assert bad.returncode == 1 and "answered with generated text" in bad.stderr
    # a rule on a task without a scale: one line, exit 2, before anything is written
    synth = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(synth), "--users", "4", "--queries", "1"]) == 0
    assert main([*args, "--data", str(synth), "--out", str(tmp_path / "no"), "--methods", "rag-1",
                 "--rating-answer", "median"]) == 2
    assert not (tmp_path / "no").exists()
    err = capsys.readouterr().err
    assert "--rating-answer median reads a rating scale; task synth is classification" in err


def test_the_server_refuses_a_rating_rule(tmp_path, capsys):
    from mta.cli.main import main

    for flag, rule in (("--rating-answer", "median"), ("--label-answer", "likeliest")):
        assert main(["serve", "--bank", str(tmp_path), "--keys", str(tmp_path / "keys.json"), flag, rule]) == 2
        assert f"{flag} {rule}: the server answers with generated text" in capsys.readouterr().err


def test_the_servers_switch_interval_is_set_only_when_asked(tmp_path, capsys):
    """--switch-interval-ms: the serving process's thread switch interval (absent: Python's
    own, untouched); a value that is no interval is refused in one line."""
    from mta.cli.main import main
    from mta.config import ServeConfig
    from mta.serving.app import switch_interval

    before = sys.getswitchinterval()
    try:
        switch_interval(ServeConfig())
        assert sys.getswitchinterval() == before
        switch_interval(ServeConfig(switch_interval_ms=0.25))
        assert sys.getswitchinterval() == pytest.approx(0.00025)
    finally:
        sys.setswitchinterval(before)
    for bad in ("0", "-1", "nan", "2000"):
        assert main(["serve", "--bank", str(tmp_path), "--keys", str(tmp_path / "keys.json"),
                     "--switch-interval-ms", bad]) == 2
        assert "switch-interval-ms" in capsys.readouterr().err
    assert sys.getswitchinterval() == before


def _label_reference(bb, prompt: str, row: Row | None, label: str) -> float:
    """Reference: log p(label tokens, end of turn | chat prompt), one unpadded forward through ``row``."""
    from mta.decoding.prompts import end_of_turn

    tok = bb.tokenizer
    p = tok(chat_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
    t = tok(label, add_special_tokens=False)["input_ids"] + [end_of_turn(tok)]
    ids = torch.tensor([p + t])
    with torch.no_grad():
        if row is None:
            logits = bb.engine.model(input_ids=ids).logits[0]
        else:
            with bb.engine.route([row]):
                logits = bb.engine.model(input_ids=ids).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    return float(sum(logp[len(p) + j - 1, t[j]] for j in range(len(t))))


@pytest.mark.parametrize("routed", [True, False])
def test_each_labels_likelihood_is_its_whole_answers_through_the_rows_adapters(routed):
    from mta.decoding.labels import label_log_likelihoods

    bb = backbone_with_adapters()
    labels = ["comedy", "dark comedy", "sci-fi", "x"]  # one label a prefix of another; lengths differ
    rows = [Row([0, 1], [0.6, 0.4], user=0), Row([2], [1.0], user=1), Row(active=False), Row([1], [1.0])]
    got = label_log_likelihoods(bb, PROMPTS, rows if routed else None, labels, batch_size=3)
    for i, prompt in enumerate(PROMPTS):
        for j, lab in enumerate(labels):
            assert got[i, j].item() == pytest.approx(_label_reference(bb, prompt, rows[i] if routed else None, lab),
                                                     abs=1e-4)
    task = get_task("lamp2")
    chosen = answers(bb, task, PROMPTS, rows, GenerateConfig(label_answer="likeliest", batch_size=2), 8)
    ll = label_log_likelihoods(bb, PROMPTS, rows, task.labels, batch_size=4)
    assert chosen == [task.labels[k] for k in ll.argmax(-1).tolist()]
    assert all(task.parse(c) == c for c in chosen)


def test_a_label_rule_needs_a_classification_task():
    bb = tiny_backbone()
    with pytest.raises(MtaError, match="movielens is rating without a label set"):
        answers(bb, get_task("movielens"), PROMPTS[:1], None, GenerateConfig(label_answer="likeliest"), 8)


@pytest.mark.integration
def test_eval_answers_a_classification_task_with_its_likeliest_labels(tmp_path, capsys):
    import json

    from mta.cli.main import main

    synth = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(synth), "--users", "6", "--queries", "1"]) == 0
    out = tmp_path / "ev"
    args = ["eval", "--model", "tiny-random-llama", "--embedder", "hashing-embedder", "--anchors", "2",
            "--bank-epochs", "1", "--n-boot", "100", "--methods", "rag-1,mta"]
    assert main([*args, "--data", str(synth), "--out", str(out), "--label-answer", "likeliest"]) == 0
    labels = get_task("synth").labels
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert rows and all(o in labels and p == o for r in rows for o, p in zip(r["outputs"], r["parsed"]))
    assert "--label-answer likeliest" in (out / "results.md").read_text()
    assert all(r["unparsed"] == 0 for r in json.loads((out / "metrics.json").read_text())["results"])
    # a label rule on a rating task: one line, exit 2, nothing written
    data = _rating_data(tmp_path / "ratings.jsonl")
    assert main([*args, "--data", str(data), "--out", str(tmp_path / "no"), "--label-answer", "likeliest"]) == 2
    assert not (tmp_path / "no").exists()
    assert "--label-answer likeliest chooses among a task's labels" in capsys.readouterr().err


def test_a_batch_out_of_memory_is_tried_again_in_halves_and_one_prompt_out_of_memory_is_one_line(monkeypatch, caplog):
    """Generation and scoring near a memory cap (a tune's processes sharing a device): a batch
    out of device memory runs again at half its size, the batches after it too, and gives
    what smaller batches give; out of memory with one prompt is one line naming the
    settings."""
    import mta.decoding.batch as batch_mod
    from mta.errors import ResourceError

    bb = backbone_with_adapters()
    rows = [Row([0, 1], [0.6, 0.4], user=0), Row([2], [1.0], user=1), Row(active=False), Row([1], [1.0])]
    labels = get_task("movielens").scale
    want_text = generate(bb, PROMPTS, rows, max_new_tokens=3, batch_size=1)
    want_probs, _ = scale_distribution(bb, PROMPTS, rows, labels, batch_size=1)
    seen: list[int] = []

    def over(limit):
        real_gen, real_model = batch_mod.hf_generate, bb.engine.model.forward

        def gen(engine, batch_rows, ids, *a, **kw):
            seen.append(ids.shape[0])
            if ids.shape[0] > limit:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real_gen(engine, batch_rows, ids, *a, **kw)

        def forward(*a, input_ids=None, **kw):
            seen.append(input_ids.shape[0])
            if input_ids.shape[0] > limit:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real_model(*a, input_ids=input_ids, **kw)
        return gen, forward

    gen, forward = over(1)
    monkeypatch.setattr(batch_mod, "hf_generate", gen)
    with caplog.at_level("WARNING", logger="mta.decoding.batch"):
        got = generate(bb, PROMPTS, rows, max_new_tokens=3, batch_size=4)
    assert got == want_text and seen == [4, 2, 1, 1, 1, 1]  # halved twice, then one at a time
    assert "out of cpu memory generating 4 prompts" in caplog.text and "again 2 at a time" in caplog.text
    seen.clear()
    monkeypatch.setattr(bb.engine.model, "forward", forward)
    probs, _ = scale_distribution(bb, PROMPTS, rows, labels, batch_size=3)
    torch.testing.assert_close(probs, want_probs, atol=1e-5, rtol=1e-4)
    assert seen[:2] == [3, 1]
    gen, forward = over(0)
    monkeypatch.setattr(batch_mod, "hf_generate", gen)
    with pytest.raises(ResourceError, match="out of cpu memory generating a batch of 1 prompts .* lower the "
                                            "generation batch size or the prompt length"):
        generate(bb, PROMPTS, rows, max_new_tokens=3, batch_size=2)
