"""Each logged trial of one budget part of an `mta tune` against that part's best trial: the
paired person-bootstrap difference the tune's `--select least` tests (the same function,
resamples and seed), from the trial log alone.

    .venv/bin/python scripts/trial-diff.py OUT/trial-values.json per-user-lora [--n-boot 200]

PART is a budget's name as the log describes it (task-lora, oppu, per-user-lora, anchor,
stack); trials logged before the log kept person statistics are left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mta.evaluation.stats import paired_diff_ci  # noqa: E402
from mta.tasks import get_task  # noqa: E402


def diffs(log: dict, part: str, n_boot: int = 200) -> list[tuple[dict, float, float, float, float]]:
    """(the trial's budget, its value, and its paired difference to the part's best with the
    95% interval) for each trial of ``part``'s budget with person statistics; the best first."""
    task = get_task(log["identity"]["task"])
    metric = task.metric_names[0]
    lower = task.kind == "rating"
    trials = [(d, log["values"][k]) for k, d in log.get("trials", {}).items()
              if d.get("budget", {}).get("part") == f"{part} budget" and "person_stats" in d
              and isinstance(log["values"].get(k), float)]
    if not trials:
        raise SystemExit(f"error: no trial of the {part!r} budget with person statistics in the log")
    best = min(trials, key=lambda t: t[1] if lower else -t[1])
    ref = np.asarray(best[0]["person_stats"])
    out = []
    for d, v in [best] + [t for t in trials if t is not best]:
        diff, lo, hi = paired_diff_ci(np.asarray(d["person_stats"]), ref,
                                      lambda s: task.metrics_from_stats(s)[metric], n_boot=n_boot,
                                      seed=log["identity"]["seed"])
        out.append((d["budget"], v, diff, lo, hi))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("log", type=Path)
    ap.add_argument("part")
    ap.add_argument("--n-boot", type=int, default=200, help="resamples (the tune's default: 200)")
    a = ap.parse_args()
    rows = diffs(json.loads(a.log.read_text()), a.part, a.n_boot)
    for i, (b, v, d, lo, hi) in enumerate(rows):
        what = "the best" if i == 0 else f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" + (
            " (significant)" if lo > 0 or hi < 0 else "")
        print(f"lr {b['lr']:g} x {b['steps']} steps: {v:.3f}  {what}")


if __name__ == "__main__":
    main()
