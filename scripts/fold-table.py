#!/usr/bin/env python3
"""The table of a stopped `mta eval` run's finished part: the methods with a result on every
fold named, scored on those folds' targets alone, with the run's own statistics (person
bootstrap, paired differences to its reference methods).

    .venv/bin/python scripts/fold-table.py RUN_DIR --folds 0 --data FILE [--out DIR]

An evaluation stopped part-way (its device time spent) keeps each finished method's result
per fold (RUN/fold<i>/<method>/result.json) and writes no metrics.json. This reads those
results, the run's config.json and the data (for the golds and persons; --data where the
path in config.json is not on this machine), and prints the table; with --out it also writes
DIR/metrics.json, so docs/results.md can name DIR in a `<!-- table: ... -->` block, and
DIR/predictions.jsonl (what scripts/answers.py reads). The
title and protocol say which folds it covers: such a table is not the run's table (one
fold's targets are fewer persons, and anchors came from the other folds only).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mta.config import GenerateConfig  # noqa: E402
from mta.data.readers import load_dataset  # noqa: E402
from mta.decoding.answers import rule_of  # noqa: E402
from mta.evaluation.methods import FoldResult  # noqa: E402
from mta.evaluation.protocol import persons_of, prepare_targets  # noqa: E402
from mta.evaluation.report import markdown  # noqa: E402
from mta.evaluation.runner import RESULT, merge, references, summarise  # noqa: E402
from mta.paths import write_json_atomic, write_text_atomic  # noqa: E402
from mta.tasks import get_task  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--folds", required=True, help="comma-separated fold indices, e.g. 0")
    ap.add_argument("--data", type=Path, help="the run's data file, where the path in its config.json is not on "
                    "this machine")
    ap.add_argument("--out", type=Path, help="also write DIR/metrics.json (for docs/results.md)")
    a = ap.parse_args()
    try:
        cfg = json.loads((a.run / "config.json").read_text(encoding="utf-8"))
        folds = sorted({int(f) for f in a.folds.split(",")})
    except (OSError, ValueError) as e:
        sys.exit(f"error: {a.run}: no readable config.json, or --folds not integers ({e})")
    ev = cfg["configs"]["eval"]
    if any(f < 0 or f >= ev["folds"] for f in folds):
        sys.exit(f"error: the run has folds 0 to {ev['folds'] - 1}; asked for {a.folds}")
    task = get_task(cfg["task"])
    rule = rule_of(task, GenerateConfig(**cfg["configs"].get("generate", {})))  # None: generated answers
    results: dict[str, FoldResult] = {}
    for m in cfg["methods"]:
        parts = [a.run / f"fold{f}" / m / RESULT for f in folds]
        if not all(p.is_file() for p in parts):
            continue
        for p in parts:
            results[m] = merge(results.get(m), FoldResult(**json.loads(p.read_text(encoding="utf-8"))["result"]))
    if not results:
        sys.exit(f"error: no method of {a.run} finished on fold(s) {a.folds}")
    ds = load_dataset(a.data or Path(cfg["data"]), cfg["task"], ev.get("persons"))
    ids = set.intersection(*(set(r.preds) for r in results.values()))
    if any(set(r.preds) != ids for r in results.values()):
        sys.exit("error: the methods' results cover different users; they are not one run's folds")
    users = prepare_targets([u for u in ds.users if u.user_id in ids], ev.get("history_queries", 0),
                            ev.get("target_history"), task)
    if len(users) != len(ids):
        sys.exit(f"error: {len(ids) - len(users)} of the results' users are not in the data; pass the run's --data")
    refs = references(list(results))
    rows = summarise(task, users, results, refs, ev["n_boot"], ev["seed"])
    missing = [m for m in cfg["methods"] if m not in results]
    which = ", ".join(map(str, folds))
    title = (f"mta eval, fold {which} of {ev['folds']} only (a stopped run): {task.title}, {len(users)} users, "
             f"model {cfg['backbone']['model']}")
    protocol = (f"Protocol: fold(s) {which} of {ev['folds']} folds over persons (seed {ev['seed']}): "
                f"{len(persons_of(users))} target persons, anchor candidates from the other folds"
                + (f"; targets keep their first {ev['target_history']} history items" if ev.get("target_history")
                   else "")
                + f"; {cfg['configs']['bank']['anchors']} anchors requested per bank; 95% percentile bootstrap over "
                  f"persons ({ev['n_boot']} resamples)"
                + (f"; {rule}" if rule else "")
                + f". Not run on these folds: {', '.join(missing) or 'none'}.")
    print(markdown(title, protocol, task, rows, refs, level=3), end="")
    if a.out is not None:
        try:
            kept = json.loads((a.out / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            kept = {}
        if kept and "folds_reported" not in kept:  # a finished run's own table: never overwritten
            sys.exit(f"error: {a.out}/metrics.json is a finished run's table; give another --out")
        write_json_atomic(a.out / "metrics.json", {
            "title": title, "protocol": protocol, "references": refs, "synthetic": cfg.get("synthetic", False),
            "config": cfg, "results": rows, "folds_reported": folds, "failed": {}})
        # the answers as an evaluation keeps them (scripts/answers.py, scripts/paired.py read them)
        write_text_atomic(a.out / "predictions.jsonl", "".join(
            json.dumps({"method": m, "user_id": uid, "outputs": r.outputs.get(uid), "parsed": r.preds[uid]},
                       default=str) + "\n" for m, r in results.items() for uid in r.preds))


if __name__ == "__main__":
    main()
