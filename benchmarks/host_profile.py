"""Where a server's host time goes, sampled from outside the process by py-spy (no GIL
needed, nothing changed in the server): three recorders at once, one of every thread at
every sample (``--idle``: on the CPU or waiting), one of the threads on the CPU only (py-spy's
default) and one of the thread holding the GIL (``--gil``).

Read together they say, for the scheduler's thread, how much of the load's wall time each
phase took (the function `Scheduler._loop` was in), how much of that it held the GIL and
how much it was on the CPU. A thread waiting for the GIL is off the CPU (blocked on a
lock), as it is in a sleep or a blocking system call; one waiting for the device is on it
(CUDA's synchronisation spins by default). So a phase off the CPU for much of its samples
and seldom holding the GIL waits for the GIL, held by the threads the summary names.
Used by ``benchmarks/serve_load.py --profile DIR``; py-spy (pinned with the dev tools) must be
beside the Python running it or on the PATH, and allowed to read the server's memory (root,
or ptrace allowed).

    python benchmarks/host_profile.py DIR/compiled-async-mta   # summarise a recording again

A recording's files may be kept gzipped (``all.txt.gz``: the committed ones are). The summary
also counts the scheduler's samples spent anywhere under work that should never run under
requests (``WATCHED``: Triton timing a kernel's tile configs, torch.compile compiling), by
phase: a leaf frame alone does not show it (the autotuner's time ends in CUDA's launches and
synchronisations, as the decode step's does).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

RECORDINGS = {"all": ("--idle",), "cpu": (), "gil": ("--gil",)}  # file stem -> py-spy's flags
SCHEDULER = "mta-scheduler"  # the scheduler thread's name (mta.serving.scheduler)
LOOP = "Scheduler._loop (mta/serving/scheduler.py"  # its loop's frame; the frame it calls is the phase
SCHEDULER_FILE = "(mta/serving/scheduler.py:"
# work that should be done before a server turns ready, found anywhere in a sample's stack
WATCHED = {"Triton's autotuner": ("(triton/runtime/autotuner.py:",),
           "torch.compile": ("(torch/_dynamo/convert_frame.py:", "(torch/_inductor/compile_fx.py:")}
WRAPPERS = ("(torch/utils/_contextlib.py:", "(contextlib.py:")  # decorators' frames, skipped for the phase
# "thread (TID): NAME;frame;...;leaf COUNT", a frame "function (file:line)"
_LINE = re.compile(r"^thread \((?:0x)?[0-9a-fA-F]+\): ?(?P<name>[^;]*);?(?P<stack>.*) (?P<n>\d+)$")


class ProfileError(RuntimeError):
    pass


def py_spy() -> str:
    """py-spy's executable: beside this Python's (a virtual environment's bin), or on the PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.is_file() else shutil.which("py-spy")
    if found is None:
        raise ProfileError("py-spy is neither beside this Python nor on the PATH (pip install py-spy): "
                           "--profile needs it")
    return found


def check_attach() -> None:
    """A ProfileError unless py-spy can read a process here (this one: it is not changed)."""
    try:
        r = subprocess.run([py_spy(), "dump", "--nonblocking", "--pid", str(os.getpid())], capture_output=True,
                           text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ProfileError(f"py-spy could not run: {e}") from None
    if r.returncode != 0:
        last = (r.stderr.strip() or r.stdout.strip() or "no output").splitlines()[-1]
        raise ProfileError(f"py-spy cannot read another process here ({last}): it needs root or ptrace allowed")


@contextlib.contextmanager
def sampling(pid: int, out: Path, rate: int = 250):
    """Three py-spy recorders of process ``pid`` while the block runs: every thread at every
    sample (``out/all.txt``), the threads on the CPU (``out/cpu.txt``) and the GIL's holder
    (``out/gil.txt``), raw collapsed stacks."""
    exe = py_spy()
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for name, flags in RECORDINGS.items():
        procs.append(subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
                                       "--threads", "--nonblocking", *flags, "--output", str(out / f"{name}.txt")],
                                      stdout=subprocess.DEVNULL, stderr=(out / f"{name}.log").open("w")))
    try:
        yield out
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)  # py-spy writes what it sampled on Ctrl-C
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    for name in RECORDINGS:
        if not (out / f"{name}.txt").exists():
            log = (out / f"{name}.log").read_text().strip().splitlines()
            raise ProfileError(f"py-spy wrote no samples of process {pid}: {log[-1] if log else 'no output'}")


def _recording(out: Path, name: str) -> Path:
    """``out/name.txt``, or its gzipped copy where only that is there."""
    path = out / f"{name}.txt"
    return path if path.exists() or not path.with_suffix(".txt.gz").exists() else path.with_suffix(".txt.gz")


def parse(path: Path) -> Counter:
    """(thread name, frames root first) -> samples, from a raw py-spy recording (.txt or .txt.gz)."""
    stacks: Counter = Counter()
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if m:
            frames = tuple(f for f in m["stack"].split(";") if f)
            stacks[(m["name"].strip(), frames)] += int(m["n"])
    return stacks


def _phase(frames: tuple[str, ...]) -> str:
    """The scheduler's phase at a sample: the innermost of its own methods under its loop
    (`_admit` runs the first prefill chunk: `_prefill_some`), then what that called (the
    decoder's step, ...); the thread's leaf frame outside the loop."""
    for i, f in enumerate(frames):
        if f.startswith(LOOP):
            inner = [g for g in frames[i + 1:] if not any(w in g for w in WRAPPERS)]
            own = [k for k, g in enumerate(inner) if g.startswith("Scheduler.") and SCHEDULER_FILE in g]
            if own:
                return inner[own[-1]].split(" (")[0].split(".<locals>")[0]
            return inner[0].split(" (")[0] if inner else "Scheduler._loop"
    return "(outside the loop)"


def _leaf(frames: tuple[str, ...]) -> str:
    return frames[-1] if frames else "(no frame)"


def summarise(out: Path, rate: int | None = None, top: int = 12) -> dict:
    """The recordings in ``out`` summed up: each thread's share of the GIL samples; the
    scheduler thread's samples by phase, all and with the GIL held; its leaf frames where it
    spent most samples without the GIL."""
    every, cpu, gil = (parse(_recording(out, name)) for name in RECORDINGS)
    threads: Counter = Counter()
    for (name, _), n in gil.items():
        threads[name] += n
    mine = {k: n for k, n in every.items() if k[0] == SCHEDULER}
    mine_gil = {k: n for k, n in gil.items() if k[0] == SCHEDULER}
    mine_cpu = {k: n for k, n in cpu.items() if k[0] == SCHEDULER}
    phases: dict[str, dict[str, int]] = {}
    for source, key in ((mine, "samples"), (mine_cpu, "on_cpu"), (mine_gil, "holding_gil")):
        for (_, frames), n in source.items():
            ph = phases.setdefault(_phase(frames), {"samples": 0, "on_cpu": 0, "holding_gil": 0})
            ph[key] += n
    leaves_all, leaves_gil = Counter(), Counter()
    for (_, frames), n in mine.items():
        leaves_all[_leaf(frames)] += n
    for (_, frames), n in mine_gil.items():
        leaves_gil[_leaf(frames)] += n
    waiting = Counter({leaf: n - leaves_gil.get(leaf, 0) for leaf, n in leaves_all.items()})
    watched: dict[str, dict[str, int]] = {}
    for (_, frames), n in mine.items():
        for what, marks in WATCHED.items():
            if any(m in f for f in frames for m in marks):
                by_phase = watched.setdefault(what, {})
                by_phase[_phase(frames)] = by_phase.get(_phase(frames), 0) + n
    total = sum(mine.values())
    return {"scheduler_samples": total, "scheduler_on_cpu": sum(mine_cpu.values()),
            "scheduler_holding_gil": sum(mine_gil.values()),
            "gil_samples": sum(threads.values()), "rate_per_s": rate,
            "gil_by_thread": dict(threads.most_common()),
            "phases": dict(sorted(phases.items(), key=lambda kv: -kv[1]["samples"])),
            "scheduler_leaves_without_gil": dict(waiting.most_common(top)),
            "scheduler_watched": watched,
            "scheduler_leaves": dict(leaves_all.most_common(top))}


def report(s: dict, indent: str = "  ") -> str:
    """The summary as text: the scheduler thread's phases, the GIL's holders, its waits."""
    total = s["scheduler_samples"] or 1
    lines = [f"{indent}scheduler thread: {s['scheduler_samples']} samples, on the CPU in "
             f"{s['scheduler_on_cpu'] / total:.0%} of them, holding the GIL in "
             f"{s['scheduler_holding_gil'] / total:.0%}; by phase (share of its samples; of those, on the "
             "CPU and holding the GIL: three samplers apart, so a phase of few samples can pass 100%):"]
    for name, ph in s["phases"].items():
        n = ph["samples"] or 1
        lines.append(f"{indent}  {name:<32} {ph['samples'] / total:>6.1%}  CPU {ph['on_cpu'] / n:>5.0%}  "
                     f"GIL {ph['holding_gil'] / n:>5.0%}")
    g = s["gil_samples"] or 1
    lines.append(f"{indent}GIL held by: " + ", ".join(f"{t or '?'} {n / g:.0%}"
                                                         for t, n in list(s["gil_by_thread"].items())[:6]))
    lines.append(f"{indent}scheduler thread without the GIL, by frame (share of its samples):")
    for leaf, n in s["scheduler_leaves_without_gil"].items():
        if n > 0:
            lines.append(f"{indent}  {n / total:>6.1%}  {leaf}")
    for what, by_phase in s.get("scheduler_watched", {}).items():
        lines.append(f"{indent}scheduler thread under {what}: {sum(by_phase.values()) / total:.1%} of its samples ("
                     + ", ".join(f"{ph} {n / total:.1%}" for ph, n in sorted(by_phase.items(), key=lambda kv: -kv[1]))
                     + ")")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) != 2 or not all(_recording(Path(sys.argv[1]), name).exists() for name in RECORDINGS):
        sys.exit("usage: host_profile.py DIR (a directory holding a recording's all.txt, cpu.txt and gil.txt, "
                 "or their .txt.gz)")
    s = summarise(Path(sys.argv[1]))
    print(report(s))
    print(json.dumps(s, indent=1))


if __name__ == "__main__":
    main()
