"""Where early stopping of the stack gains or loses: each trial's right answers per user,
grouped by the step the held-out run kept for that user (step 0, between, the last).

    .venv/bin/python scripts/stop-groups.py --data users.jsonl --kept store-list.txt \\
        none=trials/00/predictions.jsonl held-out=trials/01/predictions.jsonl ...

``--kept``: the `mta store list` output of a held-out trial's stores (its "kept N of M"
column; a refit trial's list says "kept N of N"); the data file gives each query's gold
answer. Prints, per group, the users' queries and each trial's right answers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mta.data.readers import load_dataset  # noqa: E402

KEPT = re.compile(r"│ (\S+)\s+│.*│ kept (\d+) of (\d+)\s+│")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--kept", type=Path, required=True, help="`mta store list` output of the held-out trial")
    ap.add_argument("trials", nargs="+", help="NAME=predictions.jsonl")
    a = ap.parse_args()
    kept, steps = {}, set()
    for line in a.kept.read_text(encoding="utf-8").splitlines():
        m = KEPT.match(line)
        if m:
            kept[m.group(1)] = int(m.group(2))
            steps.add(int(m.group(3)))
    if not kept or len(steps) != 1:
        ap.error(f"{a.kept}: no 'kept N of M' rows of one run's M (steps seen: {sorted(steps)})")
    last = steps.pop()
    gold = {u.user_id: [q.gold for q in u.queries] for u in load_dataset(a.data).users}
    trials = {}
    for spec in a.trials:
        name, _, path = spec.partition("=")
        if not path:
            ap.error(f"a trial is NAME=predictions.jsonl, not {spec!r}")
        rows = [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
        trials[name] = {r["user_id"]: r["parsed"] for r in rows}
    groups = {"step 0": lambda k: k == 0, f"1-{last - 1}": lambda k: 0 < k < last, f"all {last}": lambda k: k == last}
    print(f"{'kept step':<10} {'users':>5} {'queries':>7} " + " ".join(f"{n:>9}" for n in trials))
    for label, test in groups.items():
        users = [u for u, k in kept.items() if test(k)]
        queries = sum(len(gold[u]) for u in users)
        right = [sum(a == g for u in users for a, g in zip(t.get(u, []), gold[u])) for t in trials.values()]
        print(f"{label:<10} {len(users):>5} {queries:>7} " + " ".join(f"{r:>9}" for r in right))


if __name__ == "__main__":
    main()
