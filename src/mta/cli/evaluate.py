"""``mta eval``: score methods on a dataset under one protocol and one base model."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
import typer
from rich.table import Table

from mta import __version__
from mta.cli.common import console, progress
from mta.data.readers import load_dataset
from mta.errors import MtaError
from mta.evaluation.prompting import parse_method, run_prompt_method
from mta.models import load_llm
from mta.paths import write_json_atomic, write_text_atomic
from mta.tasks import get_task


def _markdown(title: str, task, results: list[dict]) -> str:
    m1, m2 = task.metric_names
    lines = [f"# {title}", "", f"| method | {m1} | {m2} | queries | s/user (inference) |",
             "|---|---|---|---|---|"]
    for r in results:
        m = r["metrics"]
        lines.append(f"| {r['method']} | {m.get(m1, float('nan')):.4f} | "
                     f"{m.get(m2, float('nan')):.4f} | {r['scored']} | "
                     f"{r['seconds_per_user_inference']:.2f} |")
    return "\n".join(lines) + "\n"


def eval_cmd(
    data: Path = typer.Option(..., help="Dataset file or directory (any supported layout)."),
    out: Path = typer.Option(..., help="Run directory for metrics.json, results.md, predictions."),
    task: str | None = typer.Option(None, help="Task name (default: detected from the data)."),
    methods: str = typer.Option("base,rag", help="Comma-separated: base, rag (= rag-1), rag-K."),
    model: str = typer.Option("smollm2-135m", help="Registry name or local HF model directory."),
    users: int | None = typer.Option(None, min=1, help="Evaluate only the first N users."),
    seed: int = typer.Option(0, help="Seed (recorded; greedy decoding is deterministic)."),
    batch_size: int = typer.Option(8, min=1, help="Prompts per generation batch."),
    max_new_tokens: int = typer.Option(12, min=1, help="Tokens generated per answer."),
) -> None:
    """Compare methods on the users' queries; write metrics.json, results.md and predictions."""
    method_list = [parse_method(m.strip()) for m in methods.split(",") if m.strip()]
    if not method_list:
        raise MtaError("--methods is empty; name at least one method")
    ds = load_dataset(data, task)
    t = get_task(ds.task)
    selected = ds.users[:users] if users else ds.users
    if not any(q.gold is not None for u in selected for q in u.queries):
        raise MtaError(f"{ds.path}: no query has a gold output; nothing to score")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    llm, tok = load_llm(model)
    results = []
    n_queries = sum(len(u.queries) for u in selected)
    with progress() as bar:
        for m in method_list:
            job = bar.add_task(f"{m.name}", total=n_queries)
            r = run_prompt_method(m, t, selected, llm, tok, max_new_tokens, batch_size,
                                  on_batch=lambda n, j=job: bar.advance(j, n))
            results.append(r)
    tag = "synthetic " if ds.synthetic else ""
    title = f"mta eval: {t.title} on {len(selected)} {tag}users, model {model}"
    config = {
        "data": str(ds.path), "layout": ds.layout, "synthetic": ds.synthetic, "task": t.name,
        "methods": [m.name for m in method_list], "model": model, "users": len(selected),
        "seed": seed, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
        "mta_version": __version__, "torch": torch.__version__, "python": platform.python_version(),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", config)
    preds = "".join(json.dumps({"method": r["method"], **p}) + "\n"
                    for r in results for p in r["predictions"])
    write_text_atomic(out / "predictions.jsonl", preds)
    summary = [{k: v for k, v in r.items() if k != "predictions"} for r in results]
    write_json_atomic(out / "metrics.json", {
        "title": title, "synthetic": ds.synthetic, "config": config, "results": summary,
        "wall_seconds": time.perf_counter() - t0,
    })
    write_text_atomic(out / "results.md", _markdown(title, t, summary))
    m1, m2 = t.metric_names
    table = Table(title=title)
    for col in ("method", m1, m2, "queries", "s/user"):
        table.add_column(col)
    for r in summary:
        mm = r["metrics"]
        table.add_row(r["method"], f"{mm.get(m1, float('nan')):.3f}",
                      f"{mm.get(m2, float('nan')):.3f}", str(r["scored"]),
                      f"{r['seconds_per_user_inference']:.2f}")
    console.print(table)
    console.print(f"wrote {out}/metrics.json, results.md, predictions.jsonl")
