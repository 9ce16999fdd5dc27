"""Paired bootstrap difference between two methods of a finished `mta eval` run (the run
itself reports every method against rag-1 only).

    .venv/bin/python scripts/paired.py RUN_DIR METHOD_A METHOD_B [--n-boot 1000] [--seed 0]
    .venv/bin/python scripts/paired.py RUN_DIR METHOD_A METHOD_B --b-run OTHER_RUN   # B from another run
    .venv/bin/python scripts/paired.py RUN_DIR METHOD_A METHOD_B --data FILE   # a run made on another machine

Reads RUN_DIR/config.json (data, task, seed, protocol) and RUN_DIR/predictions.jsonl, resamples
persons exactly as `mta eval` does, and prints A - B per metric with its 95% interval. With
--b-run, METHOD_B's predictions come from OTHER_RUN, which must have the same data, seed and
split (checked): e.g. one method under two settings.
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
    ap.add_argument("--b-run", type=Path, help="take METHOD_B from this run (same data, seed and split)")
    ap.add_argument("--data", type=Path, help="the run's data file, where the path in its config.json is not on "
                    "this machine (a run made elsewhere); used for both runs")
    a = ap.parse_args()
    cfg = json.loads((a.run / "config.json").read_text())
    task = get_task(cfg["task"])
    persons = cfg["configs"].get("eval", {}).get("persons")  # its persons
    ds = load_dataset(a.data or Path(cfg["data"]), cfg["task"], persons)
    def read(run: Path) -> dict[str, dict[str, list]]:
        out: dict[str, dict[str, list]] = {}
        for line in (run / "predictions.jsonl").read_text().splitlines():
            r = json.loads(line)
            out.setdefault(r["method"], {})[r["user_id"]] = r["parsed"]
        return out

    preds = read(a.run)
    other = preds
    if a.b_run is not None:
        ocfg = json.loads((a.b_run / "config.json").read_text())
        # a path relative to the repo; with --data both runs are taken to have read that file
        same_data = a.data is not None or Path(ocfg["data"]).resolve() == Path(cfg["data"]).resolve()
        if not same_data or ocfg["seed"] != cfg["seed"] or \
                (a.b_run / "split.json").read_text() != (a.run / "split.json").read_text():
            sys.exit(f"error: {a.b_run} has other data, seed or split than {a.run}; the pairs would not match")
        other = read(a.b_run)
    for m, run, have in ((a.a, a.run, preds), (a.b, a.b_run or a.run, other)):
        if m not in have:
            sys.exit(f"error: method {m!r} is not in {run} (has: {', '.join(have)})")
    # the run's targets (the users it predicted for: its --users cut and any recipe's dev users
    # already applied), shaped as the run shaped them, in the data's order (as `mta eval`
    # resamples them). config.json's top-level "users" is how many were reported, not a cut.
    ev = cfg.get("configs", {}).get("eval", {})
    users = prepare_targets([u for u in ds.users if u.user_id in preds[a.a]], ev.get("history_queries", 0),
                            ev.get("target_history"), task)
    sa, sb = method_stats(task, users, preds[a.a]), method_stats(task, users, other[a.b])
    for name in task.metric_names:
        d, lo, hi = paired_diff_ci(sa, sb, lambda s, n=name: task.metrics_from_stats(s)[n], n_boot=a.n_boot,
                                   seed=cfg["seed"])
        sig = " (significant)" if lo > 0 or hi < 0 else ""
        print(f"{name}: {a.a} - {a.b} = {d:+.3f} [{lo:+.3f}, {hi:+.3f}]{sig}")


if __name__ == "__main__":
    main()
