"""How busy a GPU was over a window of a run, from an nvidia-smi log (the GPU drivers'
``nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 10``, the
`smi.log` of a run's records): the samples in the window, their mean utilisation and the
most memory in use.

    .venv/bin/python scripts/smi-summary.py results/gpu-2026-12-06e/smi.log --from 10:14:30
    .venv/bin/python scripts/smi-summary.py LOG --from 07:20:00 --to 07:33:36   # one phase of a run

``--from`` and ``--to`` are times of day as the log writes them (UTC on the GPU machine),
inclusive; without them, the whole log.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def samples(path: Path) -> list[tuple[str, float, float]]:
    """(time of day, MiB in use, utilisation %) per sample line of the log."""
    out = []
    with path.open(newline="") as f:
        for row in csv.reader(f):
            if len(row) != 3 or not row[0].strip()[:1].isdigit():
                continue  # the header, and anything else that is not a sample
            stamp, mem, util = (x.strip() for x in row)
            try:
                out.append((stamp.split()[-1][:8], float(mem.split()[0]), float(util.split()[0])))
            except (ValueError, IndexError):
                continue  # "[N/A]" and the like
    return out


def summary(rows: list[tuple[str, float, float]], start: str | None, end: str | None) -> dict:
    picked = [r for r in rows if (start is None or r[0] >= start) and (end is None or r[0] <= end)]
    if not picked:
        raise SystemExit("error: no sample in that window")
    return {"samples": len(picked), "mean_utilisation_pct": sum(r[2] for r in picked) / len(picked),
            "peak_memory_mib": max(r[1] for r in picked), "first": picked[0][0], "last": picked[-1][0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", type=Path)
    ap.add_argument("--from", dest="start", help="first time of day, HH:MM:SS")
    ap.add_argument("--to", dest="end", help="last time of day, HH:MM:SS")
    a = ap.parse_args()
    if not a.log.is_file():
        sys.exit(f"error: {a.log}: no such file")
    s = summary(samples(a.log), a.start, a.end)
    print(f"{a.log}: {s['samples']} samples from {s['first']} to {s['last']}: utilisation "
          f"{s['mean_utilisation_pct']:.0f}% on average, at most {s['peak_memory_mib']:,.0f} MiB in use "
          f"({s['peak_memory_mib'] / 1024:.1f} GiB)")


if __name__ == "__main__":
    main()
