#!/usr/bin/env python3
"""The users of the dev persons `mta tune` sets aside (its dev split: the same share of
persons, the same seed), written as canonical JSONL: for an `mta eval` on dev persons
alone, where a choice is made that a later table reports on the other persons (which
`mta eval --recipe` keeps apart from these). For a rating or classification task it also
prints the dev persons' mean own-history agreement and the other persons'
(`mta.evaluation.tune.dev_check`).

    .venv/bin/python scripts/dev-users.py DATA --out FILE [--dev-fraction 0.3333] [--seed 0] [--task T]
        [--dev-split auto|balanced|random --history-queries N --target-history N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mta.data.readers import load_dataset, write_jsonl  # noqa: E402
from mta.errors import MtaError  # noqa: E402
from mta.evaluation.tune import dev_check, dev_split  # noqa: E402
from mta.tasks import get_task  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dev-fraction", type=float, default=1 / 3, help="as `mta tune --dev-fraction` (default 1/3)")
    ap.add_argument("--seed", type=int, default=0, help="as `mta tune --seed` (default 0)")
    ap.add_argument("--task")
    ap.add_argument("--persons", type=Path, help="as `mta tune --persons`")
    ap.add_argument("--dev-split", default="auto", help="as `mta tune --dev-split` (default auto)")
    ap.add_argument("--history-queries", type=int, default=0, help="as `mta tune --history-queries` (a balanced "
                    "split reads only the history items that stay history)")
    ap.add_argument("--target-history", type=int, help="as `mta tune --target-history`")
    a = ap.parse_args()
    if a.out.exists():
        sys.exit(f"error: {a.out} exists; give a new file")
    try:
        ds = load_dataset(a.data, a.task, a.persons)
        dev = set(dev_split(ds.users, a.dev_fraction, a.seed, a.dev_split, get_task(ds.task), a.history_queries,
                            a.target_history))
    except MtaError as e:
        sys.exit(f"error: {e}")
    write_jsonl([u for u in ds.users if u.user_id in dev], a.out)
    print(f"wrote {len(dev)} users of the dev persons to {a.out}")
    check = dev_check(ds.users, dev, get_task(ds.task), a.history_queries, a.target_history)
    if check:  # what `mta tune` prints and keeps in recipe.json
        print(f"own-history agreement: the dev persons {check['dev']:.3f}, the other persons {check['others']:.3f}")


if __name__ == "__main__":
    main()
