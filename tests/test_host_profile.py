"""benchmarks/host_profile.py: py-spy's raw recordings of a server read into where the
scheduler thread's time went (its phases, how much of each it held the GIL) and who held
the GIL; and serve_load.py --profile end to end on the CPU where py-spy can attach."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("host_profile", ROOT / "benchmarks" / "host_profile.py")
hp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hp)

BOOT = "Thread._bootstrap (threading.py:1002);Thread.run (threading.py:982)"
LOOP = "Scheduler._loop (mta/serving/scheduler.py:283)"
NO_GRAD = "context_decorator.<locals>.decorate_context (torch/utils/_contextlib.py:124)"


def _line(tid: int, name: str, frames: list[str], n: int) -> str:
    return f"thread ({tid}): {name};{';'.join(frames)} {n}"


def test_a_recording_is_summed_by_the_schedulers_phase_and_the_gils_holders(tmp_path):
    step = [BOOT, LOOP, NO_GRAD, "SlotDecoder.step (mta/decoding/slots.py:310)",
            "GraphDecoder.advance (mta/decoding/step.py:256)"]
    prefill = [BOOT, LOOP, "Scheduler._admit (mta/serving/scheduler.py:326)",
               "Scheduler._prefill_some (mta/serving/scheduler.py:402)",
               "Scheduler._prefill_some.<locals>.<dictcomp> (mta/serving/scheduler.py:400)",
               "dense_forward (mta/decoding/routing.py:296)"]
    merge = [BOOT, LOOP, "Scheduler._prefill_some (mta/serving/scheduler.py:420)",
             "SlotDecoder.merge (mta/decoding/slots.py:200)"]
    loop = [BOOT, LOOP]
    (tmp_path / "all.txt").write_text("\n".join([
        _line(7, "mta-scheduler", step, 50), _line(7, "mta-scheduler", prefill, 30),
        _line(7, "mta-scheduler", merge, 10), _line(7, "mta-scheduler", loop, 10),
        _line(1, "MainThread", ["<module> (x.py:1)", "run (uvicorn/server.py:9)"], 100),
        "not a sample line", ""]))
    (tmp_path / "cpu.txt").write_text("\n".join([
        _line(7, "mta-scheduler", step, 50), _line(7, "mta-scheduler", prefill, 6),
        _line(7, "mta-scheduler", merge, 10), _line(1, "MainThread", ["<module> (x.py:1)"], 70)]))
    (tmp_path / "gil.txt").write_text("\n".join([
        _line(7, "mta-scheduler", step, 5), _line(7, "mta-scheduler", prefill, 3),
        _line(7, "mta-scheduler", merge, 10), _line(7, "mta-scheduler", loop, 2),
        _line(1, "MainThread", ["<module> (x.py:1)", "run (uvicorn/server.py:9)"], 60)]))
    s = hp.summarise(tmp_path, rate=250)
    assert s["scheduler_samples"] == 100 and s["scheduler_holding_gil"] == 20 and s["gil_samples"] == 80
    assert s["scheduler_on_cpu"] == 66
    assert s["gil_by_thread"] == {"MainThread": 60, "mta-scheduler": 20}
    # a phase is the innermost of the scheduler's own methods (the prefill run from _admit is
    # the prefill's; a comprehension inside it is the method's), past the no_grad wrapper
    assert s["phases"] == {"SlotDecoder.step": {"samples": 50, "on_cpu": 50, "holding_gil": 5},
                           "Scheduler._prefill_some": {"samples": 40, "on_cpu": 16, "holding_gil": 13},
                           "Scheduler._loop": {"samples": 10, "on_cpu": 0, "holding_gil": 2}}
    assert s["scheduler_leaves_without_gil"]["GraphDecoder.advance (mta/decoding/step.py:256)"] == 45
    assert s["scheduler_leaves_without_gil"]["dense_forward (mta/decoding/routing.py:296)"] == 27
    assert s["scheduler_leaves_without_gil"]["SlotDecoder.merge (mta/decoding/slots.py:200)"] == 0
    text = hp.report(s)
    assert "on the CPU in 66% of them, holding the GIL in 20%" in text
    assert "Scheduler._prefill_some 40.0% CPU 40% GIL 32%" in " ".join(text.split())
    assert "MainThread 75%" in text and "45.0%  GraphDecoder.advance" in text
    assert "SlotDecoder.merge" not in text.split("without the GIL")[1]  # (no sample without the GIL)


@pytest.mark.integration  # (runs host_profile.py as a command too)
def test_work_that_belongs_before_ready_is_counted_wherever_it_is_in_the_stack(tmp_path):
    # Triton timing tile configs under a prefill (docs/serving.md, run S) ends in CUDA's
    # launches, as a decode step does: only the frames above the leaf tell them apart
    import gzip

    tuned = [BOOT, LOOP, "Scheduler._prefill_some (mta/serving/scheduler.py:402)",
             "SlotDecoder.advance (mta/decoding/slots.py:330)", "Autotuner.run (triton/runtime/autotuner.py:240)",
             "do_bench (triton/testing.py:182)", "synchronize (torch/cuda/__init__.py:1162)"]
    compiled = [BOOT, LOOP, NO_GRAD, "SlotDecoder.step (mta/decoding/slots.py:310)",
                "_compile (torch/_dynamo/convert_frame.py:900)", "compile_fx (torch/_inductor/compile_fx.py:10)"]
    plain = [BOOT, LOOP, NO_GRAD, "SlotDecoder.step (mta/decoding/slots.py:310)",
             "synchronize (torch/cuda/__init__.py:1162)"]
    lines = [_line(7, "mta-scheduler", tuned, 30), _line(7, "mta-scheduler", compiled, 5),
             _line(7, "mta-scheduler", plain, 65)]
    for name in ("all", "cpu", "gil"):  # kept gzipped, as the committed recordings are
        (tmp_path / f"{name}.txt.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    s = hp.summarise(tmp_path)
    assert s["scheduler_samples"] == 100
    assert s["scheduler_watched"] == {"Triton's autotuner": {"Scheduler._prefill_some": 30},
                                      "torch.compile": {"SlotDecoder.step": 5}}
    assert not any(s["scheduler_leaves_without_gil"].values())  # (every sample held the GIL here)
    text = hp.report(s)
    assert "under Triton's autotuner: 30.0% of its samples (Scheduler._prefill_some 30.0%)" in text
    assert "under torch.compile: 5.0% of its samples (SlotDecoder.step 5.0%)" in text
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_profile.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "under Triton's autotuner: 30.0%" in r.stdout, r.stderr


def test_without_py_spy_the_profile_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(hp.shutil, "which", lambda name: None)
    monkeypatch.setattr(hp.sys, "executable", str(tmp_path / "python"))
    with pytest.raises(hp.ProfileError, match="py-spy is neither beside"):
        hp.py_spy()


def test_a_py_spy_that_cannot_read_processes_is_a_clear_error(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(hp, "py_spy", lambda: "py-spy")
    monkeypatch.setattr(hp.subprocess, "run", lambda *a, **k: SimpleNamespace(
        returncode=1, stdout="", stderr="Error: Permission Denied\nOperation not permitted (os error 1)"))
    with pytest.raises(hp.ProfileError, match=r"cannot read another process here \(Operation not permitted"):
        hp.check_attach()


def _can_attach() -> str | None:
    """Why py-spy cannot sample a process here (None: it can)."""
    try:
        hp.check_attach()
    except hp.ProfileError as e:
        return str(e)
    return None


@pytest.mark.integration
def test_serve_load_profiles_each_servers_threads_during_the_load(tmp_path):
    why = _can_attach()
    if why:
        pytest.skip(why)
    out, prof = tmp_path / "serve.json", tmp_path / "prof"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--model", "tiny-random-llama",
                        "--device", "cpu", "--requests", "24", "--clients", "4", "--users", "3", "--rate", "40",
                        "--decoder", "graph-async", "--max-tokens", "6", "--out", str(out), "--work",
                        str(tmp_path / "w"), "--profile", str(prof)], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    for row in rows:
        s = row["host_profile"]
        assert (prof / f"graph-async-{row['model']}" / "all.txt").stat().st_size > 0
        assert s["scheduler_samples"] > 0 and "mta-scheduler" in s["gil_by_thread"]
        assert any(name.startswith(("Scheduler.", "SlotDecoder.")) for name in s["phases"])
    assert "scheduler thread:" in r.stdout and "GIL held by:" in r.stdout


@pytest.mark.integration
def test_profile_without_the_open_loop_is_refused(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--model", "tiny-random-llama",
                        "--profile", str(tmp_path / "p")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--profile goes with --rate" in r.stderr
    assert not (tmp_path / "p").exists()
