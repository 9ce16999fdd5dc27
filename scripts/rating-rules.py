#!/usr/bin/env python3
"""A rating task's answers by each rule, method by method: the same run's answers taken as
the mode, the median and the mean of each stored distribution (a run answered with `mta
eval --rating-answer mode|median|mean` keeps them in its outputs; a method that answers
without the model, a prior, answers the same under every rule), beside the generated
answers of a second run of the same evaluation (`--text RUN`, answered with
`--rating-answer text`), with paired person-bootstrap differences (the run's seed and
resamples, as `mta eval` draws them).

    .venv/bin/python scripts/rating-rules.py RUN [--text RUN2] [--data FILE] [--out FILE.json]

Prints the table; --out writes the record docs/results.md renders (`<!-- rules: FILE.json -->`).
The two runs must be one evaluation (data, folds, seed, targets) answered two ways.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mta.data.readers import load_dataset  # noqa: E402
from mta.decoding.scale import RULES, rate, stored_distribution  # noqa: E402
from mta.evaluation.protocol import persons_of, prepare_targets  # noqa: E402
from mta.evaluation.runner import method_stats  # noqa: E402
from mta.evaluation.stats import bootstrap_ci, paired_diff_ci  # noqa: E402
from mta.paths import write_json_atomic  # noqa: E402
from mta.tasks import get_task  # noqa: E402

PAIRS = (("median", "text"), ("median", "mode"), ("mode", "text"))  # the differences reported


def _run(path: Path) -> tuple[dict, dict[str, dict[str, list[str]]]]:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        outputs: dict[str, dict[str, list[str]]] = {}
        for line in (path / "predictions.jsonl").read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            outputs.setdefault(r["method"], {})[r["user_id"]] = r["outputs"]
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"error: {path}: no readable config.json and predictions.jsonl ({e})")
    return cfg, outputs


def _same_evaluation(a: dict, b: dict) -> list[str]:
    """What differs between two runs' evaluations, answering aside."""
    keys = ("task", "seed", "methods")
    differ = [k for k in keys if a.get(k) != b.get(k)]
    return differ + [f"eval.{k}" for k in ("folds", "target_history", "history_queries", "seed")
                     if a["configs"]["eval"].get(k) != b["configs"]["eval"].get(k)]


def measure(run: Path, text_run: Path | None, data: Path | None) -> dict:
    cfg, outputs = _run(run)
    task = get_task(cfg["task"])
    if task.kind != "rating":
        sys.exit(f"error: {run}: task {task.name} is not a rating task")
    text_cfg, text_outputs = _run(text_run) if text_run else (None, {})
    if text_cfg is not None:
        differ = _same_evaluation(cfg, text_cfg)
        if differ:
            sys.exit(f"error: {run} and {text_run} are not one evaluation (different {', '.join(differ)})")
        if text_cfg["configs"]["generate"].get("rating_answer", "text") != "text":
            sys.exit(f"error: {text_run}: not answered with generated text (--rating-answer text)")
    if cfg["configs"]["generate"].get("rating_answer", "text") == "text":
        sys.exit(f"error: {run}: answered with generated text (--rating-answer text): its answers keep no "
                 "distribution; give the run answered from the distribution first")
    ev = cfg["configs"]["eval"]
    ds = load_dataset(data or Path(cfg["data"]), cfg["task"], ev.get("persons"))
    ids = set(next(iter(outputs.values())))
    users = prepare_targets([u for u in ds.users if u.user_id in ids], ev.get("history_queries", 0),
                            ev.get("target_history"), task)
    if len(users) != len(ids):
        sys.exit(f"error: {len(ids) - len(users)} of the run's users are not in the data; pass the run's --data")
    values = [float(v) for v in task.scale]
    metrics = task.metric_names
    rows = []
    for method, by_user in outputs.items():
        probs = {uid: [stored_distribution(o) for o in outs] for uid, outs in by_user.items()}
        kept = [p is not None for ps in probs.values() for p in ps]
        if any(kept) and not all(kept):
            sys.exit(f"error: {run}: some of {method}'s answers keep a distribution and some do not")
        if all(kept):
            preds = {rule: {uid: [rate(p, values, rule) for p in ps] for uid, ps in probs.items()}
                     for rule in RULES[1:]}
        else:  # a method that answers without the model (a prior): the same answers under every rule
            same = {uid: [task.parse(o) for o in outs] for uid, outs in by_user.items()}
            preds = dict.fromkeys(RULES[1:], same)
        if method in text_outputs:
            if set(text_outputs[method]) != ids:
                sys.exit(f"error: {text_run}: {method} answered other users than in {run}")
            preds["text"] = {uid: [task.parse(o) for o in outs] for uid, outs in text_outputs[method].items()}
        stats = {rule: method_stats(task, users, p) for rule, p in preds.items()}
        row = {"method": method, "rules": {}, "diffs": {}}
        for rule, s in stats.items():
            row["rules"][rule] = {}
            for m in metrics:
                v, lo, hi = bootstrap_ci(s, lambda x, m=m: task.metrics_from_stats(x)[m], ev["n_boot"],
                                         seed=cfg["seed"])
                row["rules"][rule][m] = {"value": v, "ci": [lo, hi]}
        for a, b in PAIRS:
            if a in stats and b in stats:
                d, lo, hi = paired_diff_ci(stats[a], stats[b], lambda x: task.metrics_from_stats(x)[metrics[0]],
                                           ev["n_boot"], seed=cfg["seed"])
                row["diffs"][f"{a} - {b}"] = {"value": d, "ci": [lo, hi], "significant": bool(lo > 0 or hi < 0)}
        rows.append(row)
    n_queries = sum(q.gold is not None for u in users for q in u.queries)
    return {"run": str(run), "text_run": str(text_run) if text_run else None, "task": task.name,
            "model": cfg["backbone"]["model"], "metrics": list(metrics), "users": len(users),
            "persons": len(persons_of(users)), "queries": n_queries, "n_boot": ev["n_boot"], "seed": cfg["seed"],
            "rows": rows}


def table(record: dict) -> str:
    """The record as markdown: per method, the first metric under each rule [95% CI], the
    second metric's value, then the paired differences of the first."""
    m1, m2 = record["metrics"]
    rules = [r for r in ("text", *RULES[1:]) if any(r in row["rules"] for row in record["rows"])]
    pairs = [f"{a} - {b}" for a, b in PAIRS if any(f"{a} - {b}" in row["diffs"] for row in record["rows"])]
    lines = [f"{record['task']}, model {record['model']}: {record['users']} users ({record['persons']} persons), "
             f"{record['queries']} queries; {m1} [95% person-bootstrap interval, {record['n_boot']} resamples, "
             f"seed {record['seed']}] and {m2} by answer rule; Δ{m1} paired on the same resamples (`*`: the "
             "interval excludes 0).", "",
             "| method | " + " | ".join(f"{m1} {r}" for r in rules) + " | " + " | ".join(f"{m2} {r}" for r in rules)
             + " | " + " | ".join(f"Δ{m1} {p}" for p in pairs) + " |",
             "|---|" + "---|" * (2 * len(rules) + len(pairs))]

    def ci(x) -> str:
        return "-" if x is None else f"{x['value']:.3f} [{x['ci'][0]:.3f}, {x['ci'][1]:.3f}]"

    for row in record["rows"]:
        r = row["rules"]
        first = [ci(r[k][m1]) if k in r else "-" for k in rules]
        second = [f"{r[k][m2]['value']:.3f}" if k in r else "-" for k in rules]
        diffs = []
        for p in pairs:
            d = row["diffs"].get(p)
            diffs.append("-" if d is None else f"{d['value']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"
                         + (" *" if d["significant"] else ""))
        lines.append(f"| {row['method']} | " + " | ".join(first + second + diffs) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="an `mta eval` run answered from the distribution")
    ap.add_argument("--text", type=Path, help="the same evaluation answered with generated text")
    ap.add_argument("--data", type=Path, help="the runs' data, where the path in config.json is not on this machine")
    ap.add_argument("--out", type=Path, help="write the record (JSON) for docs/results.md")
    a = ap.parse_args()
    record = measure(a.run, a.text, a.data)
    if a.out:
        write_json_atomic(a.out, record)
    print(table(record), end="")


if __name__ == "__main__":
    main()
