"""benchmarks/memory_budget.py's parts on the CPU: nvidia-smi's per-process lines, the
process tree from /proc, the budget added to the command, the limit, and one measured run
of a short command with nvidia-smi's answer faked."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("memory_budget", ROOT / "benchmarks" / "memory_budget.py")
mb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mb)


def test_nvidia_smi_lines_per_process_summed_over_gpus_and_odd_lines_skipped():
    text = "123, 1024\n456, [N/A]\n123, 512\n\nNo running processes found\n789, 2.5\n"
    assert mb.parse_apps(text) == {123: 1536 << 20, 789: int(2.5 * (1 << 20))}


def test_the_process_tree_from_proc(tmp_path):
    for pid, comm, ppid in ((10, "python3", 1), (11, "mta (worker) x", 10), (12, "ray::Adapt", 11),
                            (13, "other", 1)):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(f"{pid} ({comm}) S {ppid} 1 1 0 -1\n")
    (tmp_path / "self").mkdir()
    parents = mb.parent_map(tmp_path)
    assert parents == {10: 1, 11: 10, 12: 11, 13: 1}
    assert mb.descendants(10, parents) == {10, 11, 12} and mb.descendants(13, parents) == {13}


def test_the_budget_goes_to_the_command_once_and_sets_the_limit():
    assert mb.with_budget(["eval", "--data", "x"], "42949672960") == ["eval", "--data", "x", "--gpu-memory",
                                                                        "42949672960"]
    assert mb.with_budget(["eval"], None) == ["eval"]
    with pytest.raises(SystemExit, match="its own --gpu-memory"):
        mb.with_budget(["eval", "--gpu-memory-share", "0.3"], "0.5")
    total = 100 << 30
    assert mb.limit_bytes("42949672960", None, total) == 40 << 30
    assert mb.limit_bytes("0.25", None, total) == 25 << 30
    assert mb.limit_bytes("auto", "42949672960", total) == 40 << 30
    assert mb.limit_bytes("auto", None, total) is None and mb.limit_bytes(None, None, total) is None


@pytest.mark.integration  # a child process
def test_a_short_command_measured_with_nvidia_smi_faked(tmp_path, monkeypatch):
    """The child's lines count, another process's do not; the samples and the peak come back."""
    def fake(query):
        kids = [pid for pid, ppid in mb.parent_map().items() if ppid == os.getpid()]
        return "".join(f"{pid}, 512\n" for pid in kids) + "1, 9999\n"
    monkeypatch.setattr(mb, "smi", fake)
    run = mb.measure([sys.executable, "-c", "import time; time.sleep(1.2)"], 0.2, 30, tmp_path / "out.log")
    assert run["rc"] == 0 and len(run["samples"]) >= 2 and run["peak_bytes"] == 512 << 20


@pytest.mark.integration  # a child process
def test_a_command_stopped_by_its_timeout_or_sigterm_leaves_the_record_of_what_ran(tmp_path, monkeypatch):
    """Past --timeout, or told to stop (an outer `timeout` sends SIGTERM), the command is
    killed and the samples so far come back with why it stopped (before, an outer timeout
    killed the benchmark itself and no record was written)."""
    import signal
    import threading
    import time

    monkeypatch.setattr(mb, "smi", lambda query: "".join(
        f"{pid}, 256\n" for pid, ppid in mb.parent_map().items() if ppid == os.getpid()))
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
    t0 = time.monotonic()
    run = mb.measure(sleeper, 0.1, 1.0, tmp_path / "a.log")
    assert run["stopped"] == "timeout 1 s" and run["rc"] != 0 and time.monotonic() - t0 < 10
    assert run["samples"] and run["peak_bytes"] == 256 << 20
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    run = mb.measure(sleeper, 0.1, 60, tmp_path / "b.log")
    assert run["stopped"] == "SIGTERM" and run["rc"] != 0 and run["peak_bytes"] == 256 << 20
    assert signal.getsignal(signal.SIGTERM) is not None and "measure" not in repr(signal.getsignal(signal.SIGTERM))


@pytest.mark.integration  # the script in child processes
def test_bad_input_and_no_gpu_are_one_line_errors(tmp_path):
    script = str(ROOT / "benchmarks" / "memory_budget.py")
    r = subprocess.run([sys.executable, script, "--budget", "lots", "--", "eval"], capture_output=True, text=True)
    assert r.returncode == 2 and "--budget/--limit" in r.stderr
    r = subprocess.run([sys.executable, script, "--budget", "40GiB"], capture_output=True, text=True)
    assert r.returncode == 2 and "give the mta command after --" in r.stderr
    env = {**os.environ, "PATH": str(tmp_path)}  # no nvidia-smi on it
    r = subprocess.run([sys.executable, script, "--budget", "40GiB", "--", "eval"], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 1 and r.stderr.strip().endswith("per-process memory") and len(r.stderr.splitlines()) == 1
