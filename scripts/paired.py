"""Paired bootstrap difference between two methods of a finished `mta eval` run (the run
itself reports every method against rag-1 only).

    .venv/bin/python scripts/paired.py RUN_DIR METHOD_A METHOD_B [--n-boot 1000] [--seed 0]

Reads RUN_DIR/config.json (data, task, seed, protocol) and RUN_DIR/predictions.jsonl, resamples
users exactly as `mta eval` does, and prints A - B per metric with its 95% interval.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mta.data.readers import load_dataset  # noqa: E402
from mta.evaluation.protocol import prepare_targets  # noqa: E402
from mta.evaluation.runner import method_stats  # noqa: E402
from mta.evaluation.stats import paired_diff_ci  # noqa: E402
from mta.tasks import get_task  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--n-boot", type=int, default=1000)
    a = ap.parse_args()
    cfg = json.loads((a.run / "config.json").read_text())
    task = get_task(cfg["task"])
    ds = load_dataset(Path(cfg["data"]), cfg["task"])
    if cfg.get("users"):
        ds.users = ds.users[:cfg["users"]]
    preds: dict[str, dict[str, list]] = {}
    for line in (a.run / "predictions.jsonl").read_text().splitlines():
        r = json.loads(line)
        preds.setdefault(r["method"], {})[r["user_id"]] = r["parsed"]
    for m in (a.a, a.b):
        if m not in preds:
            sys.exit(f"error: method {m!r} is not in {a.run} (has: {', '.join(preds)})")
    # the run's targets, shaped as the run shaped them, in the data's order (as `mta eval` resamples them)
    ev = cfg.get("configs", {}).get("eval", {})
    users = prepare_targets([u for u in ds.users if u.user_id in preds[a.a]], ev.get("history_queries", 0),
                            ev.get("target_history"), task)
    sa, sb = method_stats(task, users, preds[a.a]), method_stats(task, users, preds[a.b])
    for name in task.metric_names:
        d, lo, hi = paired_diff_ci(sa, sb, lambda s, n=name: task.metrics_from_stats(s)[n], n_boot=a.n_boot,
                                   seed=cfg["seed"])
        sig = " (significant)" if lo > 0 or hi < 0 else ""
        print(f"{name}: {a.a} - {a.b} = {d:+.3f} [{lo:+.3f}, {hi:+.3f}]{sig}")


if __name__ == "__main__":
    main()
