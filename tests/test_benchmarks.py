"""Smoke runs of the benchmarks on CPU, so that they cannot rot between GPU sessions.
They check the scripts run and write their JSON; they assert no timing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # subprocesses, servers, Ray, benchmarks: the integration tier

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)


def test_gpu_benchmark_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    r = _run("gpu.py", "--tiny", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert [g["config"].split(":")[0] for g in res["generation"]] == ["base model", "new loop (GraphDecoder)",
                                                                      "mta engine", "new loop", "new loop", "new loop",
                                                                      "peft", "peft"]
    assert "dense routing" in res["generation"][4]["config"]
    assert res["generation"][5]["role"] == "loop_dense_last8" and "last 8 blocks" in res["generation"][5]["config"]
    for g in res["generation"][3:6]:  # pinned and dense routing (stacks everywhere, the default's) in the new loop
        # reported, not judged: on a busy CPU a difference of two timings may even be negative
        assert all(math.isfinite(g[k]) for k in ("ratio_to_base_same_loop", "step_ratio_to_base_same_loop",
                                                 "decode_step_seconds"))
    assert res["bank"]["anchors"] == 6 and res["adapt"]["users"] == 8
    assert [c["rows"] for c in res["memory"]["configs"]] == [2, 8]  # peak bytes only on CUDA
    assert res["adapt"]["stored_bytes_per_user_fp32"] > 0
    assert "engine vs PEFT mixed batch" in r.stdout and "vs HF generate's base" in r.stdout


def test_gpu_benchmark_bank_profile_only_profiles_without_the_timings(tmp_path):
    out = tmp_path / "gpu.json"
    r = _run("gpu.py", "--tiny", "--sections", "bank", "--profile", "--profile-only", "--anchors", "5",
             "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    bank = json.loads(out.read_text())["bank"]
    assert bank["profile_only"] and bank["anchors"] == 5 and bank["profile"]["top"]  # the ops, by self time on a CPU
    assert "ours_seconds" not in bank and "speedup" not in bank  # nothing timed
    assert "profile: bank building, 5 anchors" in r.stdout


def test_gpu_benchmark_loop_only_times_the_new_loops_rows_alone(tmp_path):
    """--loop-only (the server's yardstick in less device time): the new loop's base and dense
    rows with their same-loop ratios; no transformers generate, pinned or PEFT row, and
    no ratio to them."""
    out = tmp_path / "gpu.json"
    r = _run("gpu.py", "--tiny", "--sections", "gen", "--loop-only", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    gen = json.loads(out.read_text())["generation"]
    assert [g["role"] for g in gen] == ["loop_base", "loop_dense", "loop_dense_last8"]
    assert all(g["ratio_to_base"] is None for g in gen)
    assert all(g["ratio_to_hf_dynamic_base"] is None and math.isfinite(g["ratio_to_base_same_loop"]) for g in gen[1:])
    assert "engine vs PEFT" not in r.stdout and "vs HF generate" not in r.stdout and "engine vs base" in r.stdout


def test_decode_parts_benchmark_tiny_on_cpu(tmp_path):
    out = tmp_path / "hf-decode.json"
    r = _run("hf_decode.py", "--tiny", "--device", "cpu", "--sections", "graph,parts,compiled", "--rows", "4",
             "--prompt", "8", "--new", "6", "--anchors", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    saving = "what folding saves (not folded minus folded)"
    assert set(res["parts"]) == {"base self_attn", "base mlp", "adapter A side (dense, not folded)",
                                 "adapter B side (dense)", "whole adapter, A columns folded (dense)", saving}
    for name, p in res["parts"].items():  # costs are differences of CPU timings: reported, not judged
        assert math.isfinite(p["ms"]) and (p["bytes"] > 0 or name == saving)
    assert not any("error" in c for c in res["configs"]), res["configs"]
    compiled = [c for c in res["configs"] if c["config"].startswith("GraphDecoder compiled")]
    assert len(compiled) == 3 and all(c["dynamo_graphs_so_far"] >= 1 for c in compiled)


def test_engine_cpu_benchmark_quick(tmp_path):
    out = tmp_path / "engine.json"
    r = _run("engine_cpu.py", "--quick", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    configs = [x["config"] for x in res["results"]]
    assert configs[0] == "base" and len(configs) == 5
    assert all(x["gen_ratio"] > 0 for x in res["results"])


def test_precision_benchmark_tiny_on_cpu(tmp_path):
    out = tmp_path / "precision.json"
    r = _run("precision.py", "--tiny", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(x["base"], x["adapter_compute"]) for x in rows] == [("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16")]
    assert rows[0]["max_loss_rel_diff"] == 0 and rows[0]["adapter_effect_gap"] == 0


def test_integrity_benchmark_runs(tmp_path):
    out = tmp_path / "integrity.json"
    r = _run("integrity.py", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(json.loads(out.read_text())["rows"]) == 4


def test_serve_load_benchmark_tiny_open_loop(tmp_path):
    """The open-loop load (a server per decoder: the slot decoder, then the same with its host
    a step behind): per-user and base rows, each with its streamed latencies and no error,
    the async rows against the synchronous ones; with --warm-users no user's stack is read
    from the store during the timed load (each was before it)."""
    from mta.serving.metrics import PHASES

    out = tmp_path / "serve.json"
    r = _run("serve_load.py", "--model", "tiny-random-llama", "--requests", "12", "--clients", "4", "--users", "3",
             "--rate", "20", "--decoder", "graph,graph-async", "--max-tokens", "6", "--out", str(out), "--work",
             str(tmp_path / "work"), "--warm-users", "--server-arg=--switch-interval-ms", "--server-arg=2")
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads(out.read_text())
    rows = record["rows"]
    assert record["server_args"] == ["--switch-interval-ms", "2"]  # the record says how its servers ran
    assert [(x["decoder"], x["model"]) for x in rows] == [("graph", "mta"), ("graph", "mta-base"),
                                                          ("graph-async", "mta"), ("graph-async", "mta-base")]
    assert all(x["tokens_vs_sync"] > 0 for x in rows[2:]) and "graph-async / graph tokens/s" in r.stdout
    # (the console wraps the start-up line: compared with its whitespace joined)
    logs = {d: " ".join((tmp_path / "work" / f"serve-b4-{d}.log").read_text().split())
            for d in ("graph", "graph-async")}
    assert "decode loop graph, async steps; thread switch interval 2 ms)" in logs["graph-async"]
    assert "decode loop graph; thread switch interval 2 ms)" in logs["graph"]
    for x in rows:
        assert x["errors"] == 0 and x["tokens_per_s"] > 0
        assert 0 < x["ttft_p50_s"] <= x["ttft_p99_s"] and 0 < x["itl_p50_s"] <= x["itl_p99_s"]
        itl, step = x["server_itl"], x["server_step"]  # the server's own histograms, this run's share
        assert itl["count"] >= 12 and 0 < itl["mean_s"] and itl["p50_le_s"] <= itl["p99_le_s"]
        assert 0 < step["mean_s"] and step["count"] >= 5
        phase = x["server_phase_s"]  # where the server's time went: its scheduler's phases, its joins
        assert sorted(phase) == sorted(PHASES) and phase["step"] > 0 and phase["load"] == 0 and x["warm_users"]
        assert 0 < sum(phase.values()) and x["server_joins"] >= 1 and 0 <= x["server_fed"] <= 12
        # warm users: no stack loaded in the timed load; a join not fed ran a prefill forward
        assert x["server_stack_loads"] == 0 == x["server_stack_reads_ahead"]
        assert x["server_prefill_forwards"] >= (1 if x["server_fed"] < 12 else 0)
        assert x["server_warm_up_s"] > 0  # the slot loop's warm-up before the server turned ready
    assert "mta / mta-base tokens/s" in r.stdout and "joins" in r.stdout and " fed" in r.stdout
    assert "warm-up before ready" in r.stdout
    bad = _run("serve_load.py", "--decoder", "graph,eager", "--rate", "1")
    assert bad.returncode == 2 and "one of generate, graph, compiled" in bad.stderr
    bad = _run("serve_load.py", "--warm-users")
    assert bad.returncode == 2 and "--warm-users goes with --rate" in bad.stderr
    # a set-up step that fails says which and why (its own last line), not a traceback
    bad = _run("serve_load.py", "--model", "no-such-model", "--work", str(tmp_path / "bad"))
    assert bad.returncode == 1 and "set-up step `mta bank` failed (exit 2): " in bad.stderr
    assert "no-such-model" in bad.stderr and "Traceback" not in bad.stderr


def test_scale_model_from_the_measured_run():
    run = ROOT / "docs" / "gpu-run-2026-11-29.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "scale.py"), str(run)], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| 1e+")]
    assert len(rows) == 3 and "0.317 s of adaptation per user" in r.stdout


def test_dense_mix_benchmark_tiny_in_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "dense-mix.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dense_mix.py"), "--tiny", "--dtypes", "bf16,fp32",
                        "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(x["dtype"], x["out"]) for x in rows] == [("bf16", 96), ("bf16", 130), ("fp32", 96), ("fp32", 130)]
    assert all(x["max_rel_err"] <= 2 ** -6 for x in rows) and all(x["max_rel_err"] <= 1e-5 for x in rows[2:])


def test_profile_counts_each_kernel_once():
    # an operator's self device time IS its kernels' time, which the profiler also lists as
    # events of their own; the busy total counts kernels (and device copies) only, as
    # torch's profiler table does, not user annotations on the device
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu

    def ev(device, us, user=False):
        return SimpleNamespace(device_type=device, self_device_time_total=us, is_user=user)

    events = [ev(DeviceType.CPU, 3000.0), ev(DeviceType.CUDA, 2000.0), ev(DeviceType.CUDA, 1000.0),
              ev(DeviceType.CUDA, 500.0, user=True), ev(DeviceType.CPU, 0.0)]
    assert gpu.device_seconds(events) == 3000.0 / 1e6
    assert [e.self_device_time_total for e in gpu.device_events(events)] == [2000.0, 1000.0]


def test_the_bank_profile_keeps_the_host_operators_only_when_asked(monkeypatch):
    """``--profile-only`` records the device's kernels alone, ``--profile-host`` (for a bank
    small enough to read its whole trace) the host's operators too; ``--profile-host``
    without ``--profile-only`` is refused in one line."""
    import argparse

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu

    asked = []
    monkeypatch.setattr(gpu, "train_jobs", lambda *a, **kw: None)
    monkeypatch.setattr(gpu, "_profile_bank", lambda eng, data, cfg, dev, a, kernels_only: asked.append(kernels_only))
    eng = type("E", (), {"init_bank": lambda self: None, "remove": lambda self: None})()
    cfg = type("C", (), {"batch_size": 2})()
    for host in (False, True):
        a = argparse.Namespace(anchors=3, profile_host=host)
        assert gpu._bank_profile_only(eng, [[1, 2, 3]] * 3, cfg, gpu.torch.device("cpu"), a)["anchors"] == 3
    assert asked == [True, False]
    r = _run("gpu.py", "--tiny", "--sections", "bank", "--profile-host")
    assert r.returncode == 2 and "--profile-host goes with --profile --profile-only" in r.stderr


def test_a_kernels_only_profile_asks_the_profiler_for_the_device_alone(monkeypatch):
    """The bank's ``--profile-only`` profile on CUDA records the device's kernels alone (its
    whole trace, host operators and all, was not read in 164 s in run X); other profiles,
    and any on a CPU, keep the host's operators."""
    import contextlib

    import torch.profiler
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu

    asked = []

    @contextlib.contextmanager
    def fake(activities):
        asked.append(set(activities))
        yield type("P", (), {"key_averages": lambda self: [
            type("E", (), {"device_type": DeviceType.CUDA, "self_device_time_total": 1000.0, "key": "k",
                           "count": 1, "self_cpu_time_total": 0.0})()]})()

    monkeypatch.setattr(torch.profiler, "profile", fake)
    monkeypatch.setattr(gpu, "sync", lambda dev: None)
    cuda = gpu.torch.device("cuda")
    p = gpu.profile(lambda: None, cuda, kernels_only=True)
    assert p["kernels_only"] and p["top_ops"] == [] and p["device_busy_s"] == 1e-3
    gpu.profile(lambda: None, cuda)
    gpu.profile(lambda: None, gpu.torch.device("cpu"), kernels_only=True)
    assert asked == [{ProfilerActivity.CUDA}, {ProfilerActivity.CPU, ProfilerActivity.CUDA}, {ProfilerActivity.CPU}]


def test_profile_bounds_of_the_old_records():
    # run F's compiled adaptation window was recorded "busy 1.32 of the wall time": kernel time
    # counted twice; its bounds fall below 1, and the captured decode steps (kernels only, no
    # operator above them) keep their recorded fraction
    run = ROOT / "results" / "gpu-2026-12-01d" / "gpu-8b.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile-bounds.py"), str(run)], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = {ln.split("  ")[1].split(":")[0]: ln for ln in r.stdout.splitlines()}
    assert "recorded busy 1.32, true busy 0.66-0.76" in lines[".adapt_compiled.profile"]
    assert "recorded busy 0.56, true busy 0.55-0.56" in lines[".generation[1].profile"]
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile-bounds.py"), "nowhere.json"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and "nowhere.json: cannot read" in bad.stderr


def test_detok_benchmark_tiny(tmp_path):
    """The server's text streaming, incremental against decoding again: both rows timed, the
    texts checked by the script itself (a prefix at every step, equal at the end)."""
    out = tmp_path / "detok.json"
    r = _run("detok.py", "--tokenizer", "tiny", "--lengths", "8,16", "--rows", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [x["length"] for x in rows] == [8, 16]
    assert all(x["reference_ms_per_step"] > 0 and x["incremental_ms_per_step"] > 0 for x in rows)
    assert "decode again" in r.stdout


def test_stack_load_benchmark_tiny(tmp_path):
    """A stack load three ways (one layer at a time, the reference; load_user; load_user
    after the read-ahead's check), each leaving the same tables (the script exits non-zero
    otherwise), timed per load with its ratio to the reference; bad --blocks a usage error."""
    out = tmp_path / "stack_load.json"
    r = _run("stack_load.py", "--blocks", "2", "--loads", "5", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert [x["way"] for x in rec["rows"]] == ["one layer at a time (reference)", "load_user",
                                              "load_user, read ahead (checked)"]
    assert rec["layers"] == 14 and all(x["ms_per_load"] > 0 for x in rec["rows"])
    assert rec["rows"][0]["x_faster_than_reference"] == 1.0 and "x reference" in r.stdout
    bad = _run("stack_load.py", "--blocks", "33")
    assert bad.returncode == 2 and "--blocks 33: the model has 32 blocks" in bad.stderr


def test_join_benchmark_tiny(tmp_path):
    """A join's cost (base rows, mta rows through the dense tables, through the gathered
    routing, then base and mta rows fed through the decode steps, then mta rows after a
    stack write and after a stack load, then users' first requests): every configuration
    timed with its next step, the fed ones without a prefill forward, a first request
    prefilled whole (nothing cached); a bad --rows or --first-prompt is a one-line usage error."""
    out = tmp_path / "join.json"
    r = _run("join.py", "--slots", "8", "--rows", "2", "--users", "4", "--joins", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert len(rec["ms_per_join"]) == 9 and all(v > 0 for v in rec["ms_per_join"].values())
    assert rec["first_prompt"] == 128 and rec["first_request_vs_base"] > 0
    assert rec["dense_vs_gathered"] > 0 and rec["fed_vs_dense"] > 0 and "x base" in r.stdout
    assert rec["after_load_caught_up_vs_refilled"] > 0 and all(p["step"] > 0 for p in rec["ms_by_part"].values())
    assert rec["gc"] == "freeze" and rec["tracked_objects"] > 10_000 and len(rec["collections"]["count"]) == 3
    parts = rec["ms_by_part"]  # counts, not timings: a fed join runs no prefill forward, a prefilled one does
    count = {name: p["per_join"] for name, p in parts.items()}
    assert count["mta rows, fed (the server)"]["forwards"] == 0 == count["base model rows, fed"]["forwards"]
    assert count["mta rows, dense tables"]["forwards"] >= 1 and count["mta rows, dense tables"]["cached"] > 0
    # a user's first request: its whole prompt prefilled, nothing taken from the prefix cache
    first = count["mta rows, first, after a load (128 tok)"]
    assert first["forwards"] >= 1 and first["cached"] == 0 < count["mta rows after a stack load (server)"]["cached"]
    bad = _run("join.py", "--slots", "4", "--rows", "4")
    assert bad.returncode == 2 and "--rows must be between 1 and --slots - 1 (3)" in bad.stderr
    bad = _run("join.py", "--first-prompt", "-1")
    assert bad.returncode == 2 and "--first-prompt must be 0 (off) or a number of tokens, not -1" in bad.stderr


def test_liger_goes_through_the_product_s_patch_and_is_refused_off_cuda(monkeypatch):
    """``--liger`` patches the model with the product's own ``mta.fused.apply_fused_kernels``
    (what it hands Liger is tested in tests/test_fused.py) and returns what it applied; a
    refusal there ends the benchmark in one line, and off CUDA it is refused before a
    model is built."""
    import torch

    from mta.errors import MtaError

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu

    calls, applied = [], {"library": "liger-kernel", "version": "9.9", "kernels": ["rms_norm"]}

    def fake_apply(model, kind, device):
        calls.append((model, kind, device))
        if model == "refused":
            raise MtaError("--fused-kernels liger needs the liger-kernel package", ("BackboneConfig.fused_kernels",))
        return applied

    monkeypatch.setattr("mta.fused.apply_fused_kernels", fake_apply)
    assert gpu.fuse_with_liger("model") is applied
    assert calls == [("model", "liger", torch.device("cuda"))]
    with pytest.raises(SystemExit, match="--liger: --fused-kernels liger needs the liger-kernel package"):
        gpu.fuse_with_liger("refused")
    r = _run("gpu.py", "--tiny", "--sections", "bank", "--liger")
    assert r.returncode == 2 and "--liger runs on CUDA only" in r.stderr


def test_the_qwen_shape_is_qwen2_5_1_5b_s_blocks_and_not_the_tiny_runs():
    """``--shape qwen2.5-1.5b`` builds Llama blocks of Qwen2.5-1.5B's sizes (the per-user
    trainings of the evaluations); ``--tiny`` keeps its own shape and refuses another."""
    from transformers import LlamaConfig

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu

    cfg = LlamaConfig(**gpu.SHAPES["qwen2.5-1.5b"])
    assert (cfg.hidden_size // cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (128, 2, 28)
    blocks = cfg.num_hidden_layers * (2 * cfg.hidden_size * cfg.hidden_size + 2 * cfg.hidden_size * 256
                                      + 3 * cfg.hidden_size * cfg.intermediate_size)
    # Qwen2.5-1.5B: 1.31e9 parameters besides the embedding, 1.54e9 with it
    assert 1.30e9 < blocks < 1.32e9 and 1.53e9 < blocks + cfg.vocab_size * cfg.hidden_size < 1.55e9
    r = _run("gpu.py", "--tiny", "--shape", "qwen2.5-1.5b")
    assert r.returncode == 2 and "--shape sizes the full run's model; --tiny has its own" in r.stderr


def test_host_concat_benchmark_tiny(tmp_path):
    """``host_concat.py`` times ``torch.cat`` against ``flat_host`` alone and beside busy
    processes, and writes both rows with their ratio; bad counts are refused in one line."""
    out = tmp_path / "hc.json"
    r = _run("host_concat.py", "--tiny", "--busy", "1", "--busy-threads", "1", "--repeats", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert [row["condition"] for row in res["rows"]] == ["alone", "beside 1 busy processes"]
    for row in res["rows"]:
        ratio = row["torch.cat_seconds"] / row["flat_host_seconds"]
        assert row["ratio_reference_over_flat_host"] == pytest.approx(ratio)
    assert res["factors"] == 8 and "flat_host ms" in r.stdout
    bad = _run("host_concat.py", "--tiny", "--busy", "0")
    assert bad.returncode == 2 and "must be at least 1" in bad.stderr
