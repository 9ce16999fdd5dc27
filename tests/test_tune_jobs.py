"""`mta tune --jobs N`: the trials shared by processes through OUT's trial log (each trial
run once, by the process holding its lock; one whose process died taken up by another),
and each process's share of the device."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch

from mta.cli.main import main
from mta.config import gpu_memory_cap, jobs_gpu_memory
from mta.errors import ConfigError
from mta.evaluation.jobs import share_device
from mta.evaluation.tune import GROUPS, VALUES, TrialBoard

GIB = 2 ** 30
IDENTITY = {"model": "m", "task": "t"}
TINY = ["--model", "tiny-random-llama", "--embedder", "hashing-embedder", "--max-new-tokens", "2"]


def _walk(out: str, keys: list[str], barrier, die_on: str | None = None, seconds: float = 0.3) -> None:
    """One process of a tune's search, its trials stand-ins that note who ran them."""
    board = TrialBoard(Path(out), IDENTITY, "accuracy")

    def run_one(key: str) -> float:
        with open(Path(out) / f"ran-{key}", "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(seconds)
        if key == die_on:
            os._exit(9)  # killed mid-trial: nothing logged, the lock let go by the kernel
        return float(len(key))

    if barrier is not None:
        barrier.wait()
    board.run(keys, run_one, {k: {"group": "g", "override": {}} for k in keys})


def _ran(out: Path, key: str) -> list[str]:
    return (out / f"ran-{key}").read_text().split()


@pytest.mark.integration
def test_two_processes_share_the_trials_and_each_runs_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    keys = [f"k{i}" for i in range(6)]
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_walk, args=(str(tmp_path), keys, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert all(len(_ran(tmp_path, k)) == 1 for k in keys)  # no trial twice
    assert {_ran(tmp_path, k)[0] for k in keys} == {str(p.pid) for p in procs}  # both worked
    log = json.loads((tmp_path / VALUES).read_text())
    assert log["values"] == {k: 2.0 for k in keys} and log["identity"] == IDENTITY
    assert set(log["trials"]) == set(keys)  # no process's write lost another's


@pytest.mark.integration
def test_a_trial_whose_process_died_is_taken_up_by_another(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    dying = ctx.Process(target=_walk, args=(str(tmp_path), ["k0"], None, "k0", 2.0))
    dying.start()
    deadline = time.monotonic() + 60
    while not (tmp_path / "ran-k0").exists() and time.monotonic() < deadline:  # it holds k0 now
        time.sleep(0.05)
    _walk(str(tmp_path), ["k0", "k1"], None, seconds=0.0)  # k1 first, then k0 once its holder is gone
    dying.join(60)
    assert dying.exitcode == 9
    assert _ran(tmp_path, "k0") == [str(dying.pid), str(os.getpid())] and _ran(tmp_path, "k1") == [str(os.getpid())]
    assert json.loads((tmp_path / VALUES).read_text())["values"] == {"k0": 2.0, "k1": 2.0}


def test_one_process_runs_every_trial_in_order_and_skips_the_logged(tmp_path):
    board = TrialBoard(tmp_path, IDENTITY, "accuracy")
    board.record({"b": 0.5}, {"b": {"group": "g"}})
    ran, told = [], []
    values, about = board.run(["a", "b", "c"], lambda k: ran.append(k) or 1.0,
                              {k: {"group": "g", "k": k} for k in "abc"}, lambda v: told.append(len(v)))
    assert ran == ["a", "c"] and values == {"a": 1.0, "b": 0.5, "c": 1.0} and about["c"] == {"group": "g", "k": "c"}
    assert told == [2, 3] and board.read() == (values, about)


def _walk_folds(out: str, barrier) -> None:
    """One process of a search of ONE trial of two folds (a group of fewer trials than
    processes): the folds stand-ins that note who ran them, the trial's run what it found."""
    board = TrialBoard(Path(out), IDENTITY, "accuracy")
    root = Path(out)

    def run_fold(key: str, fold: int) -> None:
        if (root / f"done-{fold}").exists():  # done by another: the board must not hand it out again
            (root / "again").write_text(f"{fold}\n")
            return
        (root / f"ran-fold{fold}").write_text(f"{os.getpid()}\n")
        time.sleep(0.5 + fold)  # the second fold ends last: the trial's run must wait for it
        (root / f"done-{fold}").write_text("")

    def run_one(key: str) -> float:
        with open(root / "ran-trial", "a") as f:
            f.write(f"{os.getpid()} {sorted(p.name for p in root.glob('done-*'))}\n")
        return 1.0

    barrier.wait()
    board.run(["k"], run_one, {"k": {"group": "g", "override": {}}}, None, (run_fold, [0, 1]))


@pytest.mark.integration
def test_two_processes_share_one_trials_folds_and_its_value_waits_for_both(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_walk_folds, args=(str(tmp_path), barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    by = {(tmp_path / f"ran-fold{f}").read_text().split()[0] for f in (0, 1)}
    assert by == {str(p.pid) for p in procs}  # one fold each, side by side
    runs = (tmp_path / "ran-trial").read_text().splitlines()
    assert len(runs) == 1 and runs[0].endswith("['done-0', 'done-1']")  # once, after both folds
    assert not (tmp_path / "again").exists()  # no fold run twice
    assert json.loads((tmp_path / VALUES).read_text())["values"] == {"k": 1.0}


def test_one_process_with_folds_runs_each_unlogged_trials_folds_not_done_then_the_trials(tmp_path):
    board = TrialBoard(tmp_path, IDENTITY, "accuracy")
    board.record({"b": 0.5}, {"b": {"group": "g"}})
    (tmp_path / "locks").mkdir(exist_ok=True)
    (tmp_path / "locks" / "c-fold1.done").touch()  # run to its end before (another process, an earlier run)
    order = []
    board.run(["a", "b", "c"], lambda k: order.append(k) or 1.0, {k: {"group": "g"} for k in "abc"}, None,
              (lambda k, f: order.append((k, f)), [0, 1]))
    assert order == [("a", 0), ("a", 1), ("c", 0), "a", "c"]


def test_jobs_split_the_gpu_memory_evenly_and_refuse_a_share_under_the_model():
    total, held = 80 * GIB, 3 * GIB
    # auto counts each process's model and the working room once
    assert jobs_gpu_memory("auto", total, held, 3) == (3 * held + 24 * GIB) // 3
    assert jobs_gpu_memory("auto", 24 * GIB, held, 2) == int(0.9 * 24 * GIB) // 2  # a small device: most of it
    assert jobs_gpu_memory(str(48 * GIB), total, held, 2) == 24 * GIB
    assert jobs_gpu_memory("0.5", total, held, 4) == gpu_memory_cap("0.5", total, held) // 4
    with pytest.raises(ConfigError, match="leaves each of the 8 processes of --jobs 8 3.0 GiB"):
        jobs_gpu_memory(str(24 * GIB), total, held, 8)


def test_each_process_takes_its_share_of_the_threads_on_a_cpu_and_on_a_gpu(monkeypatch):
    """The processes of ``--jobs`` share the host's cores on either device (on a GPU each
    also takes its share of the device's memory)."""
    class Backbone:  # what share_device reads of a loaded backbone
        device = torch.device("cpu")

        class config:
            gpu_memory = "auto"

    set_to = []
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    assert share_device(Backbone(), 3) == "auto" and set_to == [2]

    class Config:
        gpu_memory = "auto"

        def model_copy(self, update):
            done = Config()
            done.gpu_memory = update["gpu_memory"]
            return done

    class Gpu:
        device = torch.device("cuda", 0)
        config = Config()
        recapped = 0

        def recap_memory(self):
            self.recapped += 1

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"total_memory": 80 * GIB}))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 3 * GIB)
    gpu = Gpu()
    set_to.clear()
    assert share_device(gpu, 2) == str(jobs_gpu_memory("auto", 80 * GIB, 3 * GIB, 2)) == gpu.config.gpu_memory
    assert gpu.recapped == 1 and set_to == [4]


@pytest.mark.integration
def test_tune_with_two_jobs_logs_every_trial_once_and_chooses_as_one_process_does(tmp_path):
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "10", "--queries", "1"]) == 0
    args = ["tune", "--data", str(data), "--dev-fraction", "0.4", "--n-boot", "100", "--space", "learning-rate",
            "--max-user-share", "0.3", "--no-ablation", *TINY]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    one, two = (json.loads((tmp_path / d / VALUES).read_text()) for d in ("one", "two"))
    assert two["values"].keys() == one["values"].keys() and len(one["values"]) == len(GROUPS["learning rate"])
    what = ("group", "method", "override")  # each trial described alike, whoever ran it
    assert all({f: two["trials"][k][f] for f in what} == {f: d[f] for f in what} for k, d in one["trials"].items())
    r1, r2 = (json.loads((tmp_path / d / "recipe.json").read_text()) for d in ("one", "two"))
    assert (r2["bank"], r2["adapt"], r2["baselines"]) == (r1["bank"], r1["adapt"], r1["baselines"])
    assert json.loads((tmp_path / "two" / "config.json").read_text())["jobs"] == 2
    # every bank the trials trained (the helper's among them) holds the weights one process trains
    # (compared as tensors: safetensors writes its metadata in no fixed order, so the bytes differ)
    from safetensors.torch import load_file

    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one" / "banks").rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(tmp_path / "two")
                                     for p in (tmp_path / "two" / "banks").rglob("*.safetensors"))
    for f in files:
        a, b = load_file(tmp_path / "one" / f), load_file(tmp_path / "two" / f)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a), f
    assert "the search is done" in (tmp_path / "two" / "helper-1.log").read_text()


def test_a_writer_waits_for_another_only_inside_wait_for_writers(tmp_path):
    """`mta tune --jobs`: a bank another trial is building is waited for, then found built;
    elsewhere (and after the block) a held bank is refused at once."""
    import threading

    from mta.errors import MtaError
    from mta.paths import wait_for_writers, writer

    held, order = threading.Event(), []

    def hold() -> None:
        with writer(tmp_path, "bank"):
            held.set()
            time.sleep(0.5)
            order.append("first done")

    t = threading.Thread(target=hold)
    t.start()
    held.wait(10)
    with pytest.raises(MtaError, match="being written by another process"), writer(tmp_path, "bank"):
        pass
    with wait_for_writers(True), writer(tmp_path, "bank"):
        order.append("second in")
    t.join()
    assert order == ["first done", "second in"]
    with pytest.raises(MtaError, match="being written"), writer(tmp_path, "bank"), writer(tmp_path, "bank"):
        pass  # the block's setting is gone: refused again


def test_a_helper_logs_to_its_file_alone_and_the_logger_is_as_it_was_after(tmp_path):
    import logging

    from mta.paths import log_to_file

    root = logging.getLogger("mta")
    before = root.level, root.propagate, list(root.handlers)
    with log_to_file(tmp_path / "helper-1.log", alone=True):
        assert not root.propagate  # nothing reaches the terminal's handlers above it
        logging.getLogger("mta.evaluation.jobs").info("the search is done")
    assert "INFO mta.evaluation.jobs: the search is done" in (tmp_path / "helper-1.log").read_text()
    assert (root.level, root.propagate, list(root.handlers)) == before
