"""The CLI as a user meets it: exit codes, one-line errors, nothing written on failure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mta.bank import adapter_dir, read_index
from mta.cli.main import main
from mta.engine.peft_io import load_adapter

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mta", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def test_help_everywhere():
    for args in ([], ["data"], ["models"], ["data", "fetch"], ["data", "inspect"], ["eval"],
                 ["models", "fetch"], ["data", "synth"], ["data", "movielens"]):
        assert main([*args, "--help"]) == 0


def test_inspect_shared(lamp2_users, tmp_path, capsys):
    assert main(["data", "inspect", str(lamp2_users), "--json", str(tmp_path / "s.json")]) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert (s["users"], s["history_items"], s["queries"]) == (72, 720, 72)
    assert s["task"] == "lamp2" and s["task_labels"] == 15
    out = capsys.readouterr().out
    assert "LaMP-2 (movie tagging)" in out and "72" in out and "720" in out


@pytest.mark.integration
def test_truncated_json_one_line_exit_2(lamp2_users, tmp_path):
    bad = tmp_path / "trunc.json"
    bad.write_bytes(lamp2_users.read_bytes()[:5000])
    r = run_cli("data", "inspect", str(bad))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "not valid JSON" in lines[0] and "Traceback" not in r.stderr


def test_synth_cli_writes_marked_data(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path), "--users", "6", "--seed", "1"]) == 0
    first = json.loads((tmp_path / "users.jsonl").read_text().splitlines()[0])
    assert first["source"] == "synthetic"
    assert main(["data", "inspect", str(tmp_path)]) == 0
    assert "synthetic" in capsys.readouterr().out


def test_failure_writes_nothing(tmp_path):
    (tmp_path / "movies.csv").write_text("movieId,title,genres\n1,A,B\n")
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,x,1\n")
    out = tmp_path / "out"
    rc = main(["data", "movielens", "--ratings", str(tmp_path / "ratings.csv"), "--movies",
               str(tmp_path / "movies.csv"), "--out", str(out)])
    assert rc == 2 and not (out / "users.jsonl").exists()


def test_bad_option_value_exit_code():
    assert main(["data", "synth", "--out", "/tmp/x", "--users", "0"]) == 2


@pytest.mark.integration
def test_compiled_training_on_the_cpu_is_one_line_before_any_training(tmp_path):
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "6", "--queries", "1"]) == 0
    r = run_cli("--quiet", "bank", "build", "--data", str(data), "--out", str(tmp_path / "bank"), "--anchors", "2",
                "--model", "tiny-random-llama", "--embedder", "hashing-embedder", "--device", "cpu",
                "--compile-training")
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "compiled training needs a CUDA device" in lines[0]
    assert "(--compile-training)" in lines[0]
    assert not (tmp_path / "bank" / "index.json").exists()


def test_models_list_and_missing_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MTA_HOME", str(tmp_path))
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "minilm-l6"):
        assert name in out
    from mta.errors import ModelNotFoundError
    from mta.models import load_llm

    with pytest.raises(ModelNotFoundError, match="run: mta models fetch smollm2-135m"):
        load_llm("smollm2-135m")


@pytest.mark.integration
def test_eval_tiny_model_all_methods(tmp_path):
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "6", "--queries", "1"]) == 0
    out = tmp_path / "eval"
    rc = main(["eval", "--data", str(data), "--methods", "base,rag,per-user-lora,mta-fusion,mta-stack,mta,"
               "mta-reference", "--model", "tiny-random-llama", "--embedder", "hashing-embedder", "--out", str(out),
               "--max-new-tokens", "2", "--anchors", "2", "--bank-epochs", "1", "--n-boot", "100"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["synthetic"] is True
    assert [r["method"] for r in m["results"]] == ["base", "rag-1", "rag-4", "per-user-lora", "mta-fusion",
                                                    "mta-stack", "mta", "mta-reference"]
    for r in m["results"]:
        assert r["users"] == 6 and set(r["metrics"]) == {"accuracy", "f1"}
        lo, hi = r["metrics"]["accuracy"]["ci"]
        assert lo <= r["metrics"]["accuracy"]["value"] <= hi
        if r["method"] != "rag-1":
            assert "diff_vs_rag-1" in r["metrics"]["accuracy"]
    by = {r["method"]: r for r in m["results"]}
    assert by["base"]["bytes_per_user"] == 0 and by["mta-fusion"]["trainable_params_per_user"] == 0
    sizes = [by[m]["bytes_per_user"] for m in ("mta", "mta-reference", "per-user-lora")]
    assert 0 < sizes[0] < sizes[1] < sizes[2]
    for f in ("results.md", "accuracy_by_method.png", "quality_vs_bytes.png", "anchor_map.png", "split.json"):
        assert (out / f).exists(), f
    assert "synthetic" in (out / "results.md").read_text()
    # the protocol: every user a target exactly once, never among their fold's anchor candidates
    split = json.loads((out / "split.json").read_text())
    targets = [t for f in split for t in f["targets"]]
    assert sorted(targets) == sorted(set(targets)) and len(targets) == 6
    assert all(not set(f["targets"]) & set(f["anchor_candidates"]) for f in split)
    # scripts/paired.py reproduces the run's own paired difference (same users, same resamples)
    got = subprocess.run([sys.executable, "scripts/paired.py", str(out), "mta", "rag-1"], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    d = by["mta"]["metrics"]["accuracy"]["diff_vs_rag-1"]
    assert f"accuracy: mta - rag-1 = {d['value']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" in got
    # ... and pairs a method with itself from another run of the same split (--b-run): here the
    # same run, so the difference is exactly 0
    got = subprocess.run([sys.executable, "scripts/paired.py", str(out), "mta", "mta", "--b-run", str(out)],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    assert "accuracy: mta - mta = +0.000 [+0.000, +0.000]" in got
    # an anchor's meta-LoRA is its per-user LoRA (same recipe, same history): copied, not retrained
    for f in split:
        bank = out / f"fold{f['fold']}" / "bank"
        for a in read_index(bank).anchors:
            src = Path(a.reused_from)
            assert src.parent.parent.name == "per-user-lora" and src.parent.parent.parent.name != f"fold{f['fold']}"
            mine, _, meta = load_adapter(adapter_dir(bank, a.slot))
            theirs, _, _ = load_adapter(src)
            assert meta["kind"] == "anchor" and meta["extra"]["user_id"] == a.user_id
            assert all(torch.equal(mine[k][0], theirs[k][0]) and torch.equal(mine[k][1], theirs[k][1])
                       for k in theirs)


def test_eval_bank_trains_anchors_whose_history_differs(tmp_path):
    """With --target-history the per-user LoRAs see a cut history: the bank must train its own."""
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "4", "--queries", "1"]) == 0
    out = tmp_path / "eval"
    assert main(["eval", "--data", str(data), "--methods", "per-user-lora,mta-fusion", "--model",
                 "tiny-random-llama", "--embedder", "hashing-embedder", "--out", str(out), "--max-new-tokens", "2",
                 "--anchors", "1", "--top-k", "1", "--bank-epochs", "1", "--n-boot", "100",
                 "--target-history", "4"]) == 0
    for f in (0, 1):
        anchors = read_index(out / f"fold{f}" / "bank").anchors
        assert anchors and all(a.reused_from is None and a.done for a in anchors)


def test_eval_unknown_method(tmp_path):
    assert main(["eval", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--methods", "magic"]) == 2


@pytest.mark.integration
def test_help_starts_without_torch_and_lists_each_commands_own_summary():
    """`mta --help` imports no command module (nor torch): it lists the summaries kept in
    `mta.cli.main.COMMANDS`, which must be each command's own first help paragraph."""
    import subprocess
    import sys

    from mta.cli.main import COMMANDS, load_command

    code = ("import sys; from mta.cli.main import main; rc = main(['--help']); "
            "print('TORCH', 'torch' in sys.modules, rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "TORCH False 0" in out and all(name in out for name in COMMANDS)
    for name, (_, _, summary) in COMMANDS.items():
        own = (load_command(name).help or "").strip().split("\n\n")[0]
        assert summary == " ".join(own.split()), name


def test_data_commands_never_replace_what_is_there(tmp_path, capsys):
    """`data inspect --json DIR` on a directory and `data synth` into a directory that has
    users.jsonl are one-line errors that leave what was there (both deleted or replaced it)."""
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "4"]) == 0
    before = (data / "users.jsonl").read_bytes()
    assert main(["data", "synth", "--out", str(data), "--users", "6", "--seed", "1"]) == 2
    assert (data / "users.jsonl").read_bytes() == before
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "a.txt").write_text("mine")
    assert main(["data", "inspect", str(data), "--json", str(keep)]) == 2
    assert (keep / "a.txt").read_text() == "mine"
    err = capsys.readouterr().err
    assert "already exists" in err and "is a directory" in err
    assert main(["data", "inspect", str(data), "--json", str(keep / "summary.json")]) == 0
    assert json.loads((keep / "summary.json").read_text())["users"] == 4
