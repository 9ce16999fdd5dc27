"""Every command within its memory budget: run one `mta` command, sample the GPU memory its
processes hold (nvidia-smi, per process, the command and every process it starts), and
report the peak against a limit: the byte budget the command was given, or ``--limit``.

    python benchmarks/memory_budget.py --limit 40GiB --out mem.json -- eval --data users.jsonl \\
        --model qwen2.5-coder-1.5b --device cuda ...          # the default cap (auto), held to 40 GiB
    python benchmarks/memory_budget.py --budget 30GiB -- bank build ...   # --gpu-memory 30GiB, held to it

``--budget`` is passed to the command as ``--gpu-memory`` (the command line must not have
one of its own); a budget in bytes is also the limit unless ``--limit`` says otherwise, a
share of the device is that share of the device's memory. Peaks are nvidia-smi's
``used_memory`` per process (the CUDA context, torch's cache and anything else a process
allocates outside torch), sampled every ``--interval`` seconds: a peak shorter than that
can be missed. Prints a table; the JSON (with the samples) goes to ``--out``. Exits with the
command's status when it failed, else 0; the verdict is in the table and the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mta.config import gpu_memory_cap, parse_gpu_memory  # noqa: E402

MIB = 1 << 20


def parse_apps(text: str) -> dict[int, int]:
    """nvidia-smi's ``--query-compute-apps=pid,used_memory --format=csv,noheader,nounits``
    as pid -> bytes (a process on several GPUs: the sum)."""
    out: dict[int, int] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2 or not parts[0].isdigit():
            continue
        try:
            used = int(float(parts[1]) * MIB)
        except ValueError:  # "[N/A]" and the like
            continue
        out[int(parts[0])] = out.get(int(parts[0]), 0) + used
    return out


def parent_map(proc: Path = Path("/proc")) -> dict[int, int]:
    """pid -> parent pid of every process (Linux's /proc)."""
    out = {}
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        out[int(d.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    return out


def descendants(root: int, parents: dict[int, int]) -> set[int]:
    """``root`` and every process below it."""
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


def with_budget(args: list[str], budget: str | None) -> list[str]:
    """The command's arguments with ``--gpu-memory BUDGET`` added (none: unchanged)."""
    if budget is None:
        return list(args)
    if any(a.startswith("--gpu-memory") for a in args):  # (--gpu-memory-share, its old name, too)
        raise SystemExit("memory_budget: the command has its own --gpu-memory; give the budget once, with --budget")
    return [*args, "--gpu-memory", budget]


def limit_bytes(budget: str | None, limit: str | None, total: int) -> int | None:
    """The bytes the peak is held to: ``limit``, else a byte budget, else a share's bytes
    of the device (``total``); None for the default cap without a limit."""
    spec = limit if limit is not None else budget
    if spec is None or spec == "auto":
        return None
    return gpu_memory_cap(spec, total, 0)  # as the command reads it (bytes at most the device)


def smi(query: str) -> str:
    return subprocess.run(["nvidia-smi", f"--query-{query}", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, timeout=30, check=True).stdout


def measure(cmd: list[str], interval: float, timeout: float, log: Path) -> dict:
    """Run ``cmd`` (its output to ``log``) and sample its process tree's GPU memory. Past
    ``timeout``, or told to stop (SIGTERM, e.g. an outer ``timeout``), the command is
    killed and the samples so far are the record (``stopped``: why)."""
    samples: list[tuple[float, int]] = []
    stopped: list[str] = []
    before = signal.signal(signal.SIGTERM, lambda *_: stopped.append("SIGTERM"))
    t0 = time.monotonic()
    with log.open("w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            while p.poll() is None:
                if time.monotonic() - t0 > timeout:
                    stopped.append(f"timeout {timeout:g} s")
                if stopped:
                    p.kill()
                    break
                tree = descendants(p.pid, parent_map())
                used = sum(b for pid, b in parse_apps(smi("compute-apps=pid,used_memory")).items() if pid in tree)
                samples.append((round(time.monotonic() - t0, 2), used))
                time.sleep(interval)
        finally:
            if p.poll() is None:
                p.kill()
            rc = p.wait()
            signal.signal(signal.SIGTERM, before)
    return {"rc": rc, "wall_s": time.monotonic() - t0, "stopped": stopped[0] if stopped else None,
            "samples": samples, "peak_bytes": max((b for _, b in samples), default=0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 usage="%(prog)s [options] -- MTA-COMMAND [ARGS...]")
    ap.add_argument("--budget", help="--gpu-memory for the command: auto, a share (0.3) or bytes (40GiB)")
    ap.add_argument("--limit", help="bytes (40GiB) or a share of the device the peak must stay under "
                    "(default: the budget when it is bytes or a share)")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds before the command is killed")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/memory_budget.json"))
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    args = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not args:
        ap.error("give the mta command after --, e.g. -- eval --data users.jsonl --model qwen2.5-coder-1.5b")
    if a.interval <= 0 or a.timeout <= 0:
        ap.error("--interval and --timeout take positive seconds")
    try:
        budget = parse_gpu_memory(a.budget) if a.budget is not None else None
        limit = parse_gpu_memory(a.limit) if a.limit is not None else None
    except ValueError as e:
        ap.error(f"--budget/--limit: {e}")
    if limit == "auto":
        ap.error("--limit takes bytes or a share of the device, not auto")
    if shutil.which("nvidia-smi") is None:
        sys.exit("memory_budget: nvidia-smi not found: this benchmark reads an NVIDIA GPU's per-process memory")
    total = int(smi("gpu=memory.total").split()[0]) * MIB
    cmd = [sys.executable, "-m", "mta", *with_budget(args, budget)]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    log = a.out.with_suffix(".log")
    env_note = {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES",) if k in os.environ}
    run = measure(cmd, a.interval, a.timeout, log)
    cap = limit_bytes(budget, limit, total)
    within = None if cap is None else run["peak_bytes"] <= cap
    record = {"command": ["mta", *with_budget(args, budget)], "budget": a.budget, "limit_bytes": cap,
              "device_total_bytes": total, "interval_s": a.interval, "env": env_note, **run,
              "peak_share_of_limit": None if cap is None else run["peak_bytes"] / cap,
              "peak_share_of_device": run["peak_bytes"] / total, "within_limit": within, "log": str(log)}
    tmp = a.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(a.out)
    gib = 1 << 30
    stop = f", stopped ({run['stopped']}): the peak of what ran" if run["stopped"] else ""
    print(f"mta {' '.join(args[:2])}: budget {a.budget or 'auto (default)'}, {len(run['samples'])} samples "
          f"every {a.interval:g} s, exit {run['rc']}, {run['wall_s']:.0f} s{stop}")
    print(f"{'peak GiB':>9} {'limit GiB':>10} {'peak/limit':>11} {'device GiB':>11} {'within':>7}")
    print(f"{run['peak_bytes'] / gib:9.1f} {cap / gib if cap else float('nan'):10.1f} "
          f"{record['peak_share_of_limit'] if cap else float('nan'):11.3f} {total / gib:11.1f} "
          f"{'-' if within is None else 'yes' if within else 'NO':>7}")
    print(f"wrote {a.out} (the command's output: {log})")
    if run["rc"] != 0:
        sys.exit(run["rc"])


if __name__ == "__main__":
    main()
