"""Non-LLM reference points for a rating task: a constant score, and each user's own mean
of their first N history ratings (rounded half up, as `mta eval --methods user-prior`
answers), scored like `mta eval` on every query.

    .venv/bin/python scripts/rating-baselines.py runs/movielens/users.jsonl --target-history 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mta.data.readers import load_dataset  # noqa: E402
from mta.evaluation.methods import prior_answer  # noqa: E402
from mta.tasks import get_task  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--task", default="movielens")
    ap.add_argument("--target-history", type=int, default=10)
    a = ap.parse_args()
    task = get_task(a.task)
    if task.kind != "rating":
        sys.exit(f"error: {a.task} is not a rating task")
    ds = load_dataset(a.data, a.task)
    pairs = [(u, q) for u in ds.users for q in u.queries if q.gold is not None]
    golds = [q.gold for _, q in pairs]
    rows = {f"constant {c}": [float(c)] * len(pairs) for c in (3, 4)}
    rows[f"user mean of first {a.target_history}"] = [
        task.parse(prior_answer(task, u.history[:a.target_history])) for u, _ in pairs]
    print(f"{len(pairs)} queries of {len(ds.users)} users")
    for name, preds in rows.items():
        m = task.score(preds, golds)
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))


if __name__ == "__main__":
    main()
