"""``mta eval``: compare methods on a dataset under one protocol and one base model."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
import typer
from rich.markup import escape
from rich.table import Table

from mta import __version__
from mta.cli.common import console, err_console, progress
from mta.cli.pipeline import _Bars, _models, _run_log
from mta.config import BankConfig, adapt_config
from mta.data.readers import load_dataset
from mta.errors import MtaError
from mta.evaluation import plots
from mta.evaluation.methods import EvalSetup, expand_methods
from mta.evaluation.runner import anchor_map_for, run_eval
from mta.paths import write_json_atomic, write_text_atomic
from mta.tasks import get_task


def _fmt(v: float) -> str:
    return f"{v:.3f}"


def _markdown(title: str, meta: str, task, rows: list[dict]) -> str:
    m1, m2 = task.metric_names
    head = (f"| method | {m1} [95% CI] | {m2} [95% CI] | Δ{m1} vs rag-1 [95% CI] | s/user adapt | "
            "s/user infer | bytes/user | trainable params/user |")
    lines = [f"# {title}", "", meta, "", head, "|" + "---|" * 8]
    for r in rows:
        a, b = r["metrics"][m1], r["metrics"][m2]
        d = a.get("diff_vs_rag-1")
        diff = "-" if d is None else (f"{d['value']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"
                                      + (" *" if d["significant"] else ""))
        lines.append(f"| {r['method']} | {_fmt(a['value'])} [{_fmt(a['ci'][0])}, {_fmt(a['ci'][1])}] | "
                     f"{_fmt(b['value'])} [{_fmt(b['ci'][0])}, {_fmt(b['ci'][1])}] | {diff} | "
                     f"{r['seconds_per_user_adapt']:.2f} | {r['seconds_per_user_inference']:.2f} | "
                     f"{r['bytes_per_user']:,.0f} | {r['trainable_params_per_user']:,} |")
    lines += ["", "`*`: the paired 95% bootstrap interval of the difference excludes 0."]
    return "\n".join(lines) + "\n"


def eval_cmd(
    data: Path = typer.Option(..., help="Dataset file or directory (any supported layout)."),
    out: Path = typer.Option(..., help="Run directory for metrics.json, results.md, plots."),
    task: str | None = typer.Option(None, help="Task name (default: detected from the data)."),
    methods: str = typer.Option("base,rag", help="Comma-separated: base, rag (= rag-1 and rag-4), rag-K, "
                                "per-user-lora, mta-fusion, mta-stack, mta, mta-reference."),
    model: str = typer.Option("smollm2-135m", help="Registry name or local HF model directory."),
    embedder: str = typer.Option("minilm-l6", help="Registry embedder or sentence-transformers directory."),
    seed: int = typer.Option(0, help="Seed of the fold split, k-means, initialisation and bootstrap."),
    folds: int = typer.Option(2, help="User folds: each fold is evaluated with anchors from the others."),
    users: int | None = typer.Option(None, min=2, help="Use only the first N users (quick runs)."),
    anchors: int = typer.Option(8, help="Ablation: anchors per bank."),
    min_history: int = typer.Option(11, help="History items an anchor needs."),
    bank_epochs: int | None = typer.Option(None, min=1, help="Meta-LoRA (and per-user LoRA) epochs "
                                           "(default: docs/defaults.md)."),
    bank_lr: float | None = typer.Option(None, help="Meta-LoRA (and per-user LoRA) learning rate "
                                         "(default: docs/defaults.md)."),
    anchor_items: int | None = typer.Option(None, min=1, help="Anchors (and per-user LoRAs) train on their "
                                            "latest N history items (default: all)."),
    top_k: int | None = typer.Option(None, help="Ablation: anchors mixed per user."),
    merge: str | None = typer.Option(None, help="Ablation: delta, factor or svd (for mta)."),
    stack_rank: int | None = typer.Option(None, help="Ablation: stacked rank."),
    stack_targets: str | None = typer.Option(None, help="Ablation: comma-separated modules with a stack."),
    stack_layers: int | None = typer.Option(None, min=0, help="Ablation: stack only in the last N blocks "
                                            "(0 = all; default: docs/defaults.md)."),
    stack_lr: float | None = typer.Option(None, help="Stacking learning rate."),
    stack_epochs: int | None = typer.Option(None, help="Stacking epochs."),
    retrieve_k: int = typer.Option(1, min=0, help="Ablation: history items in the prompt for adapter methods."),
    target_history: int | None = typer.Option(None, min=1, help="Targets keep only their first N history "
                                              "items (MovieLens protocol: 10)."),
    n_boot: int = typer.Option(1000, min=100, help="Bootstrap resamples."),
    batch_size: int = typer.Option(8, min=1, help="Prompts per generation batch."),
    max_new_tokens: int = typer.Option(12, min=1, help="Tokens generated per answer."),
    dtype: str = typer.Option("fp32", help="fp32 or bf16."),
) -> None:
    """Compare methods under one protocol; write metrics.json, results.md and PNG plots."""
    method_list = expand_methods(methods)
    ds = load_dataset(data, task)
    if users:
        ds.users = ds.users[:users]
    t = get_task(ds.task)
    if not any(q.gold is not None for u in ds.users for q in u.queries):
        raise MtaError(f"{ds.path}: no query has a gold output; nothing to score")
    bank_cfg = BankConfig.make(anchors=anchors, min_history=min_history, epochs=bank_epochs, lr=bank_lr, seed=seed,
                               retrieve_k=retrieve_k, max_items=anchor_items)
    targets = tuple(x.strip() for x in stack_targets.split(",") if x.strip()) if stack_targets else None
    adapt_cfg = adapt_config("default", top_k=top_k, merge=merge, stack_rank=stack_rank, stack_targets=targets,
                             stack_layers=stack_layers,
                             stack_lr=stack_lr, stack_epochs=stack_epochs, retrieve_k=retrieve_k, seed=seed)
    llm, tok, emb = _models(model, embedder, dtype)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with _run_log(out), progress() as bar:
        setup = EvalSetup(llm, tok, emb, embedder, t, bank_cfg, adapt_cfg, retrieve_k, max_new_tokens,
                          batch_size, _Bars(bar))
        res = run_eval(ds, method_list, setup, out, folds, seed, model, target_history, n_boot=n_boot)
    tag = "synthetic " if ds.synthetic else ""
    title = f"mta eval: {t.title}, {len(ds.users)} {tag}users, model {model}"
    meta = (f"Protocol: {folds} folds over users (seed {seed}); each fold's users are targets, the other folds' "
            f"users the anchor candidates; {anchors} anchors per bank; 95% percentile bootstrap over users "
            f"({n_boot} resamples). Wall time {time.perf_counter() - t0:.0f} s"
            + (" (synthetic data)" if ds.synthetic else "") + ".")
    config = {"data": str(ds.path), "synthetic": ds.synthetic, "task": t.name, "methods": method_list,
              "model": model, "embedder": embedder, "seed": seed, "folds": folds, "users": len(ds.users),
              "target_history": target_history, "bank": json.loads(bank_cfg.model_dump_json()),
              "adapt": json.loads(adapt_cfg.model_dump_json()), "n_boot": n_boot, "dtype": dtype,
              "mta_version": __version__, "torch": torch.__version__, "python": platform.python_version()}
    write_json_atomic(out / "config.json", config)
    write_json_atomic(out / "metrics.json", {"title": title, "synthetic": ds.synthetic, "config": config,
                                             "results": res["rows"], "bank_seconds": res["bank_seconds"],
                                             "wall_seconds": res["wall_seconds"]})
    write_text_atomic(out / "results.md", _markdown(title, meta, t, res["rows"]))
    m1 = t.metric_names[0]
    plots.metric_plot(res["rows"], m1, title, out / f"{m1}_by_method.png")
    plots.cost_plot(res["rows"], m1, title, out / "quality_vs_bytes.png")
    anchor_map_for(ds, setup, out, f"anchor map (fold 0): {title}")
    table = Table(title=escape(title))
    for col in ("method", *t.metric_names, "Δ vs rag-1", "bytes/user"):
        table.add_column(col)
    for r in res["rows"]:
        d = r["metrics"][m1].get("diff_vs_rag-1")
        table.add_row(r["method"], *[f"{r['metrics'][m]['value']:.3f}" for m in t.metric_names],
                      "-" if d is None else f"{d['value']:+.3f}" + (" *" if d["significant"] else ""),
                      f"{r['bytes_per_user']:,.0f}")
    console.print(table)
    err_console.print(f"wrote {escape(str(out))}: metrics.json, results.md, {m1}_by_method.png, "
                      "quality_vs_bytes.png, anchor_map.png, predictions.jsonl")
