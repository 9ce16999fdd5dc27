"""What each method of a finished `mta eval` run answered: the parsed answers per method
(None = nothing parseable), and against another method how many raw and parsed answers differ.

    .venv/bin/python scripts/answers.py RUN_DIR [--against rag-1] [--by-fold]
    .venv/bin/python scripts/answers.py RUN_DIR --against-run OTHER_RUN

--by-fold: the same counts for each fold's targets apart (the run's split.json), e.g. to
see whether one fold's adapter collapsed. --against-run: each method against the same
method in another run of the same users (e.g. the same evaluation answered by another
rule) instead of against one method of this run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path


def _read(run: Path) -> dict[str, dict[str, dict]]:
    """method -> user id -> its predictions.jsonl row."""
    by: dict[str, dict[str, dict]] = {}
    try:
        lines = (run / "predictions.jsonl").read_text().splitlines()
    except OSError as e:
        sys.exit(f"error: {run}: no readable predictions.jsonl ({e})")
    for line in lines:
        r = json.loads(line)
        by.setdefault(r["method"], {})[r["user_id"]] = r
    return by


def _counts(rows) -> str:
    return ", ".join(f"{k} x{v}" for k, v in Counter(str(p) for r in rows for p in r["parsed"]).most_common())


def _differ(rows: dict[str, dict], ref: dict[str, dict], name: str) -> str:
    pairs = [(o, ro, p, rp) for u, r in rows.items() if u in ref
             for o, ro, p, rp in zip(r["outputs"], ref[u]["outputs"], r["parsed"], ref[u]["parsed"])]
    return (f" | vs {name}: {sum(o != ro for o, ro, _, _ in pairs)} of {len(pairs)} raw answers differ, "
            f"{sum(p != rp for _, _, p, rp in pairs)} parsed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--against", default="rag-1")
    ap.add_argument("--against-run", type=Path, help="compare each method with the same method of this run")
    ap.add_argument("--by-fold", action="store_true", help="count each fold's targets apart (split.json)")
    a = ap.parse_args()
    if a.by_fold and a.against_run:
        ap.error("--by-fold counts one run's answers per fold; it does not compare with --against-run")
    by = _read(a.run)
    if a.by_fold:
        try:
            split = json.loads((a.run / "split.json").read_text())
        except (OSError, ValueError) as e:
            sys.exit(f"error: {a.run}: no readable split.json ({e})")
        for m, rows in by.items():
            for f in split:
                print(f"{m} fold {f['fold']}: " + _counts(rows[u] for u in f["targets"] if u in rows))
        return
    other = _read(a.against_run) if a.against_run else None
    for m, rows in by.items():
        line = f"{m}: " + _counts(rows.values())
        if other is not None:
            line += _differ(rows, other.get(m, {}), f"{m} of {a.against_run}")
        elif by.get(a.against) and m != a.against:
            line += _differ(rows, by[a.against], a.against)
        print(line)


if __name__ == "__main__":
    main()
