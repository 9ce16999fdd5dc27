"""`mta tune --jobs N`: the search's trials evaluated by N processes at once, each with its
own copy of the model, on one device (a tune alone leaves a GPU mostly idle: its steps
are short and its host work long; docs/evaluation.md, "What a tune costs").

The command's process is one of the N; it starts N - 1 helpers (`helpers`), each running
the same search (`mta.evaluation.tune.tune`, without the final table) on the same data and
OUT. They share the work through OUT's trial log (`TrialBoard`): a trial is run by the
process that takes its lock, every process waits for the group's last trial before it
chooses, and all choose alike from the same log. Adapters shared between trials (a bank, a
task LoRA) are built by the first process that needs them while the others wait for its
lock (`mta.paths.wait_for_writers`). The device's memory is split evenly
(`mta.config.jobs_gpu_memory`), and its share of the host's threads.

A helper logs to OUT/helper-I.log and ends with the search; one that fails leaves its
trial's lock, which another process then takes up (the same error then stops that one).
A helper whose parent has gone ends itself.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from mta import config as c
from mta.backbone import Backbone
from mta.data.readers import load_dataset
from mta.errors import MtaError
from mta.evaluation.methods import EvalSetup
from mta.evaluation.tune import tune
from mta.paths import log_to_file, wait_for_writers
from mta.tasks import get_task

log = logging.getLogger(__name__)
HELPER_LOG = "helper-{}.log"
PARENT_POLL_S = 2.0  # how often a helper checks that the tune's process is still there


def share_device(backbone, jobs: int) -> str:
    """Give this process its share of the device for ``jobs`` processes: the GPU memory cap
    (recapped here; the spec to give each helper is returned) and the host's threads, on a
    GPU too: the processes share the host's cores either way, and a parallel region of
    torch's CPU work waits for its slowest thread, which with every process on every core
    waits for a time slice (a stored stack's host buffer: ``mta.engine.engine.flat_host``)."""
    spec = backbone.config.gpu_memory
    if backbone.device.type == "cuda":
        total = torch.cuda.get_device_properties(backbone.device).total_memory
        held = torch.cuda.memory_reserved(backbone.device)
        spec = str(c.jobs_gpu_memory(spec, total, held, jobs))
        backbone.config = backbone.config.model_copy(update={"gpu_memory": spec})
        backbone.recap_memory()
    torch.set_num_threads(max(1, torch.get_num_threads() // jobs))
    return spec


@contextlib.contextmanager
def helpers(count: int, payload: dict) -> Iterator[list]:
    """Run ``count`` helper processes (``payload``: what `helper_main` needs) while the block
    runs; at its end wait for them (they end with the search), or, when it raised, stop them."""
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA state inherited
    procs = [ctx.Process(target=helper_main, args=({**payload, "index": i + 1, "parent": os.getpid()},),
                         name=f"mta-tune-helper-{i + 1}") for i in range(count)]
    for p in procs:
        p.start()
    try:
        yield procs
    except BaseException:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(10)
        raise
    for i, p in enumerate(procs, 1):
        p.join()
        if p.exitcode:
            log.warning("tune helper %d ended with status %s (its log: %s)", i, p.exitcode,
                        Path(payload["out"]) / HELPER_LOG.format(i))


def _watch_parent(parent: int) -> None:
    """End this helper when the tune's process is gone (killed: it could not stop us)."""
    while True:
        if os.getppid() != parent:
            os._exit(3)
        time.sleep(PARENT_POLL_S)


def helper_main(payload: dict) -> None:
    """One helper: load the data and the model as the tune's process did, then run the
    search alone (no final table), sharing OUT's trial log."""
    threading.Thread(target=_watch_parent, args=(payload["parent"],), daemon=True).start()
    out = Path(payload["out"])
    # the file only: the terminal is the tune's process's
    with log_to_file(out / HELPER_LOG.format(payload["index"]), alone=True):
        _helper_search(payload, out)


def _helper_search(payload: dict, out: Path) -> None:
    """`helper_main`'s work, in its log; an error is one line on the terminal and the exit code."""
    try:
        d = payload["configs"]  # each config's dump, by section
        bb, bank, adapt = (c.BackboneConfig.build(d["backbone"]), c.BankConfig.build(d["bank"]),
                           c.AdaptConfig.build(d["adapt"]))
        gen, ev, base = (c.GenerateConfig.build(d["generate"]), c.EvalConfig.build(d["eval"]),
                         c.BaselineConfig.build(d["baselines"]))
        ds = load_dataset(payload["data"], payload["task"], payload["persons"])
        if payload["users"]:
            ds.users = ds.users[:payload["users"]]
        if payload["threads"]:
            torch.set_num_threads(payload["threads"])
        backbone = Backbone.load(bb)
        setup = EvalSetup(backbone, get_task(ds.task), bank, adapt, gen, None, baselines=base).resolve(ds.users)
        with wait_for_writers(True):
            tune(ds, setup, out, payload["dev"], payload["space"], ev.folds, ev.history_queries, ev.n_boot, None,
                 payload["max_user_share"], ev.target_history, leak_check=False, ablation=False,
                 select=payload["select"], split_folds=True)
        log.info("tune helper %d: the search is done", payload["index"])
    except MtaError as e:
        log.error("tune helper %d: %s", payload["index"], e)
        print(f"mta tune helper {payload['index']}: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except BaseException:
        log.exception("tune helper %d failed", payload["index"])
        raise
