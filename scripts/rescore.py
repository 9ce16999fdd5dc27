"""Score a finished `mta eval` run again from its raw outputs, with today's parsers: the
generations are the run's, only their parsing (and so the metrics) is redone.

    .venv/bin/python scripts/rescore.py RUN_DIR [--data PATH] [--out FILE]

Reads RUN_DIR/config.json (data, task, seed, protocol) and RUN_DIR/predictions.jsonl,
writes the re-scored table as Markdown to --out (default RUN_DIR/results-rescored.md) and
prints it. Use it when a parser was fixed after a costly run; say so beside the numbers.

``--rating-answer mode|median|mean``: a rating task's run answered from the scale's
distribution (`mta eval --rating-answer` other than text) keeps each distribution in its
outputs; its answers are taken again by this rule (every method; the model is not run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mta.data.readers import load_dataset  # noqa: E402
from mta.decoding.scale import RULES, rate, rating_text, stored_distribution  # noqa: E402
from mta.evaluation.methods import FoldResult  # noqa: E402
from mta.evaluation.protocol import prepare_targets  # noqa: E402
from mta.evaluation.report import markdown  # noqa: E402
from mta.evaluation.runner import references, summarise  # noqa: E402
from mta.tasks import get_task  # noqa: E402


def again(text: str, task, rule: str) -> str:
    """A recorded rating answer taken again by ``rule`` from the distribution it keeps."""
    probs = stored_distribution(text)
    if probs is None:
        sys.exit(f"error: an answer without a stored distribution ({text[:40]!r}): the run generated its "
                 "answers (--rating-answer text); only a run answered from the distribution can be taken again")
    return rating_text(rate(probs, [float(v) for v in task.scale], rule), probs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--data", type=Path, help="the run's data (default: the path in its config.json)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--rating-answer", choices=RULES[1:], help="take each answer again from its stored distribution")
    a = ap.parse_args()
    cfg = json.loads((a.run / "config.json").read_text())
    task = get_task(cfg["task"])
    ds = load_dataset(a.data or Path(cfg["data"]), cfg["task"], cfg["configs"].get("eval", {}).get("persons"))
    old = {r["method"]: r for r in json.loads((a.run / "metrics.json").read_text())["results"]}
    results: dict[str, FoldResult] = {}
    for line in (a.run / "predictions.jsonl").read_text().splitlines():
        r = json.loads(line)
        res = results.setdefault(r["method"], FoldResult())
        outputs = [again(t, task, a.rating_answer) for t in r["outputs"]] if a.rating_answer else r["outputs"]
        res.preds[r["user_id"]] = [task.parse(t) for t in outputs]
        res.outputs[r["user_id"]] = outputs
    for name, res in results.items():  # costs are the run's own
        o = old[name]
        n = len(res.preds)
        res.adapt_seconds, res.infer_seconds = o["seconds_per_user_adapt"] * n, o["seconds_per_user_inference"] * n
        res.bytes_per_user = dict.fromkeys(res.preds, o["bytes_per_user"])
        res.trainable_params_per_user = o["trainable_params_per_user"]
    ev = cfg.get("configs", {}).get("eval", {})
    first = next(iter(results.values()))
    users = prepare_targets([u for u in ds.users if u.user_id in first.preds], ev.get("history_queries", 0),
                            ev.get("target_history"), task)
    methods = list(results)
    rows = summarise(task, users, results, references(methods), ev.get("n_boot", 1000), cfg["seed"])
    how = (f"Each answer taken again as the {a.rating_answer} of its stored distribution over the scores"
           if a.rating_answer else "Parsed again with the current parsers")
    text = markdown(f"{cfg['command']} re-scored from its outputs: {a.run}", f"{how} (scripts/rescore.py); "
                    "generations, costs and protocol are the run's.", task, rows, references(methods))
    out = a.out or a.run / "results-rescored.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
