"""What each method of a finished `mta eval` run answered: the parsed answers per method
(None = nothing parseable), and against another method how many raw and parsed answers differ.

    .venv/bin/python scripts/answers.py RUN_DIR [--against rag-1] [--by-fold]

--by-fold: the same counts for each fold's targets apart (the run's split.json), e.g. to
see whether one fold's adapter collapsed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--against", default="rag-1")
    ap.add_argument("--by-fold", action="store_true", help="count each fold's targets apart (split.json)")
    a = ap.parse_args()
    by: dict[str, dict[str, dict]] = {}
    for line in (a.run / "predictions.jsonl").read_text().splitlines():
        r = json.loads(line)
        by.setdefault(r["method"], {})[r["user_id"]] = r
    if a.by_fold:
        try:
            split = json.loads((a.run / "split.json").read_text())
        except (OSError, ValueError) as e:
            sys.exit(f"error: {a.run}: no readable split.json ({e})")
        for m, rows in by.items():
            for f in split:
                parsed = Counter(str(p) for u in f["targets"] if u in rows for p in rows[u]["parsed"])
                print(f"{m} fold {f['fold']}: " + ", ".join(f"{k} x{v}" for k, v in parsed.most_common()))
        return
    ref = by.get(a.against, {})
    for m, rows in by.items():
        parsed = Counter(str(p) for r in rows.values() for p in r["parsed"])
        line = f"{m}: " + ", ".join(f"{k} x{v}" for k, v in parsed.most_common())
        if ref and m != a.against:
            pairs = [(o, ro, p, rp) for u, r in rows.items()
                     for o, ro, p, rp in zip(r["outputs"], ref[u]["outputs"], r["parsed"], ref[u]["parsed"])]
            line += (f" | vs {a.against}: {sum(o != ro for o, ro, _, _ in pairs)} of {len(pairs)} raw answers"
                     f" differ, {sum(p != rp for _, _, p, rp in pairs)} parsed")
        print(line)


if __name__ == "__main__":
    main()
