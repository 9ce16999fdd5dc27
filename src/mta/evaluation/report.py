"""The one place that writes an evaluation's results: metrics.json, results.md and the
plots, for `mta eval` and `mta run` alike."""

from __future__ import annotations

from pathlib import Path

from mta.evaluation import plots
from mta.paths import write_json_atomic, write_text_atomic

UNPARSED_NOTE = 0.1  # a method with at least this share of unparseable answers gets a note under the table


def _fmt(v: float) -> str:
    return f"{v:.3f}"


def _diff(d: dict | None) -> str:
    if d is None:
        return "-"
    return f"{d['value']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" + (" *" if d["significant"] else "")


def steps_cell(row: dict) -> str:
    """"stack 8; anchors 2-5": each trained part's optimiser steps per adapter (a range
    over the adapters where they differ); "-" for a method that trains nothing."""
    parts = []
    for part, s in (row.get("optimizer_steps") or {}).items():
        parts.append(f"{part} {s['min']}" + (f"-{s['max']}" if s["max"] != s["min"] else ""))
    return "; ".join(parts) or "-"


def variants_markdown(task, variants: list[dict]) -> list[str]:
    """The ablation table (`mta eval --variants`): `mta` with one setting changed per row,
    against `mta` itself (paired intervals over the same persons)."""
    m1, m2 = task.metric_names
    lines = ["", "Ablation: `mta` with one setting changed (`--variants`), each against `mta` above on the same "
             "folds and persons.", "",
             f"| variant | {m1} [95% CI] | {m2} [95% CI] | Δ{m1} vs mta [95% CI] | s/user adapt | bytes/user | "
             "optimiser steps per adapter |", "|---|---|---|---|---|---|---|"]
    for r in variants:
        if "error" in r:
            lines.append(f"| {r['variant']} | diverged: {r['error']} | - | - | - | - | - |")
            continue
        a, b = r["metrics"][m1], r["metrics"][m2]
        lines.append(f"| {r['variant']} | {_fmt(a['value'])} [{_fmt(a['ci'][0])}, {_fmt(a['ci'][1])}] | "
                     f"{_fmt(b['value'])} [{_fmt(b['ci'][0])}, {_fmt(b['ci'][1])}] | {_diff(a.get('diff_vs_mta'))} | "
                     f"{r['seconds_per_user_adapt']:.2f} | {r['bytes_per_user']:,.0f} | {steps_cell(r)} |")
    return lines


def markdown(title: str, meta: str, task, rows: list[dict], references: list[str],
             failed: dict[str, str] | None = None, level: int = 1, variants: list[dict] | None = None,
             left_out: dict[str, str] | None = None) -> str:
    """The run's table in Markdown under a heading of ``level``; ``scripts/results-table.py``
    renders docs/results.md's tables with it from each run's metrics.json."""
    m1, m2 = task.metric_names
    diffs = "".join(f" Δ{m1} vs {r} [95% CI] |" for r in references)
    head = (f"| method | {m1} [95% CI] | {m2} [95% CI] |{diffs} s/user adapt | s/user infer | bytes/user | "
            "trainable params/user | optimiser steps per adapter |")
    lines = [f"{'#' * level} {title}", "", meta, "", head, "|" + "---|" * (8 + len(references))]
    for r in rows:
        a, b = r["metrics"][m1], r["metrics"][m2]
        ds = "".join(f" {_diff(a.get('diff_vs_' + ref))} |" for ref in references)
        lines.append(f"| {r['method']} | {_fmt(a['value'])} [{_fmt(a['ci'][0])}, {_fmt(a['ci'][1])}] | "
                     f"{_fmt(b['value'])} [{_fmt(b['ci'][0])}, {_fmt(b['ci'][1])}] |{ds} "
                     f"{r['seconds_per_user_adapt']:.2f} | {r['seconds_per_user_inference']:.2f} | "
                     f"{r['bytes_per_user']:,.0f} | {r['trainable_params_per_user']:,} | {steps_cell(r)} |")
    lines += ["", "`*`: the paired 95% bootstrap interval of the difference excludes 0."]
    for r in rows:
        if r.get("unparsed", 0) >= UNPARSED_NOTE * r["queries"]:
            lines += ["", f"`{r['method']}`: {r['unparsed']} of {r['queries']} answers could not be parsed or "
                          f"were empty ({r['unparsed'] / r['queries']:.0%}; {task.unparsed_scoring})."]
    for m, e in (failed or {}).items():
        lines += ["", f"Not reported: `{m}` diverged ({e})."]
    for m, why in (left_out or {}).items():
        lines += ["", f"Not run: `{m}`: {why}."]
    if variants:
        lines += variants_markdown(task, variants)
    return "\n".join(lines) + "\n"


def write_report(out: Path, title: str, meta: str, task, res: dict, config: dict, synthetic: bool,
                 references: list[str]) -> list[str]:
    """Write metrics.json, results.md and the metric and cost plots; return the file names."""
    m1 = task.metric_names[0]
    write_json_atomic(out / "metrics.json", {
        "title": title, "protocol": meta, "references": references, "synthetic": synthetic, "config": config,
        "results": res["rows"],
        "bank_seconds": res["bank_seconds"], "wall_seconds": res["wall_seconds"],
        "peak_gpu_memory_bytes": res.get("peak_gpu_memory_bytes"),
        "peak_gpu_reserved_bytes": res.get("peak_gpu_reserved_bytes"),
        "gpu_memory_cap_bytes": res.get("gpu_memory_cap_bytes"), "failed": res.get("failed", {}),
        **({"left_out": res["left_out"]} if res.get("left_out") else {}),
        **({"variants": res["variants"]} if res.get("variants") else {})})
    write_text_atomic(out / "results.md", markdown(title, meta, task, res["rows"], references, res.get("failed"),
                                                   variants=res.get("variants"), left_out=res.get("left_out")))
    plots.metric_plot(res["rows"], m1, title, out / f"{m1}_by_method.png")
    plots.cost_plot(res["rows"], m1, title, out / "quality_vs_bytes.png")
    return ["metrics.json", "results.md", f"{m1}_by_method.png", "quality_vs_bytes.png", "predictions.jsonl"]
