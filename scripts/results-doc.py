#!/usr/bin/env python3
"""Regenerate the tables of the reports (docs/results.md, docs/performance.md) from the
records they name under results/.

A table is written between two markers, the first naming its record:

    <!-- table: results/gpu-2026-12-04b/lastfm-15b -->       an `mta eval` run directory
    <!-- bench: results/gpu-2026-12-04c/gpu-8b-gen-kernel.json -->   a benchmarks/gpu.py record
    <!-- serve: results/gpu-2026-12-05/serve-sat.json -->   a benchmarks/serve_load.py open-loop record
    <!-- tune: results/.../trial-values.json#oppu-budget -->    a part's budget grid in an `mta tune` log
    <!-- rules: results/.../rules.json -->    a rating task's answers by rule (scripts/rating-rules.py --out)
    ... the rendering of that record ...
    <!-- end table -->

    .venv/bin/python scripts/results-doc.py [DOC ...]           # rewrite every table in place
    .venv/bin/python scripts/results-doc.py --check [DOC ...]   # exit 1 naming each table that differs

An eval run renders as scripts/results-table.py prints it (the run's own results.md); a
gpu.py record as its decode configurations (tokens/s, ratios, step times) and, where the
record has them, its bank-building, adaptation and memory sections; a serve_load.py record
(open loop) as a row per decoder and model with the scheduler's seconds by phase; a tune's trial
log (`trial-values.json`, the trials it describes) as one part's learning rates by step counts,
each cell the value its trial logged (and its interval, where the log kept one). Only the tables are
generated: the prose around them is written by hand and cites the same records.
`--check` runs in the test suite, so a table cannot drift from its record.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "docs" / "results.md", ROOT / "docs" / "performance.md", ROOT / "docs" / "serving.md"]
_spec = importlib.util.spec_from_file_location("results_table", ROOT / "scripts" / "results-table.py")
results_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results_table)
_spec = importlib.util.spec_from_file_location("rating_rules", ROOT / "scripts" / "rating-rules.py")
rating_rules = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rating_rules)

KINDS = ("table", "bench", "serve", "tune", "rules")
BLOCK = re.compile(r"(<!-- (?P<kind>" + "|".join(KINDS) + r"): (?P<record>\S+) -->\n)(?P<body>.*?)(<!-- end table -->)",
                   re.S)


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def bench_table(path: Path) -> str:
    """A benchmarks/gpu.py record as markdown: the decode configurations, then the bank,
    adaptation and memory sections it has."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {path}: no readable benchmark record ({e})") from None
    shape = d.get("shape", {})
    gen = d.get("generation") or []
    # (a --loop-only record has no transformers-generate row to compare with: no such column)
    first = any(r.get("ratio_to_base") is not None for r in gen)
    lines = [f"Record `{path.relative_to(ROOT)}`: {d.get('device', '?')}, torch {d.get('torch', '?')}, "
             f"{shape.get('num_hidden_layers', '?')} layers x hidden {shape.get('hidden_size', '?')}, "
             f"{str(d.get('dtype', '?')).replace('torch.', '')}"
             + ("; \"x first row\": tokens/s against the first row, transformers' generate of the base model."
                if first else "."), ""]
    if gen:
        lines += ["| decode configuration | tokens/s |" + (" x first row |" if first else "")
                  + " ms per step | x base, same loop |", "|---|---|---|---|" + ("---|" if first else "")]
        for r in gen:
            step = r.get("decode_step_seconds")
            lines.append(f"| {r['config']} | {r['tokens_per_s']:,.0f} |"
                         + (f" {_num(r.get('ratio_to_base'), '.3f')} |" if first else "")
                         + f" {_num(step and 1000 * step, '.2f')} | {_num(r.get('ratio_to_base_same_loop'), '.3f')} |")
        lines.append("")
    rows = []
    for key, label in (("bank", "bank building, eager"), ("bank_compiled", "bank building, compiled")):
        if key in d:
            b = d[key]
            rows.append(f"| {label} | {b['anchors']} anchors, {b['tokens']:,} tokens: {b['ours_seconds']:.1f} s, "
                        f"{b['ours_tokens_per_s']:,.0f} tokens/s |")
    for key, label in (("adapt", "new-user adaptation, eager"), ("adapt_compiled", "new-user adaptation, compiled"),
                       ("adapt_last8", "new-user adaptation, eager, stack in the last 8 blocks"),
                       ("adapt_last8_compiled", "new-user adaptation, compiled, stack in the last 8 blocks")):
        if key in d:
            a = d[key]
            rows.append(f"| {label} | {a['users']} users: {a['ours_seconds_per_user']:.3f} s per user, "
                        f"{a['speedup']:.1f}x the reference procedure |")
    if "memory" in d:
        m = d["memory"]
        rows.append(f"| memory | {m['bytes_per_concurrent_user'] / 2**20:,.0f} MiB per concurrent user at "
                    f"{m['context_tokens']} tokens of context, {m['shared_bytes'] / 2**30:.1f} GiB shared: "
                    f"{m['max_concurrent_users']} users on the device |")
    if rows:
        lines += ["| section | measured |", "|---|---|", *rows, ""]
    return "\n".join(lines)


PHASES = ("admit", "load", "route", "prefill", "wait", "merge", "step", "stream")  # mta.serving.metrics.PHASES


def serve_table(path: Path) -> str:
    """A benchmarks/serve_load.py open-loop record as markdown: per decoder and model its
    tokens/s, latencies, the server's mean decode step, the scheduler's seconds by phase
    (the phases the record has) and its errors."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        rows = d["rows"] if d.get("open_loop") else None
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {path}: no readable serve_load record ({e})") from None
    if not rows:
        raise SystemExit(f"error: {path}: not an open-loop serve_load record")
    phases = [p for p in PHASES if any(p in r.get("server_phase_s", {}) for r in rows)]
    # counts later records carry: prefill forwards, stack loads and those read ahead, the
    # CUDA allocator's driver allocations and retries (a server on a GPU)
    counts = [(k, label) for k, label in (("server_prefill_forwards", "prefill forwards"),
                                           ("server_stack_loads", "stack loads"),
                                           ("server_stack_reads_ahead", "read ahead"),
                                           ("server_cuda_mallocs", "cudaMalloc"),
                                           ("server_cuda_alloc_retries", "alloc retries")) if any(k in r for r in rows)]
    warm = "; each user's first request before the timed load (--warm-users)" if d.get("warm_users") else ""
    lines = [f"Record `{path.relative_to(ROOT)}`: {d.get('model', '?')} on {d.get('device', '?')}, "
             f"{rows[0]['requests']:,} requests at {d['rate_per_s']:g}/s, {rows[0]['users']} users, "
             f"max batch {rows[0]['max_batch']}, {d.get('max_tokens', '?')} new tokens{warm}. "
             "ITL p50 <=: the upper edge of the server's histogram bucket it falls in; step: the "
             "server's mean decode step; phases: the scheduler thread's seconds over the run.", "",
             "| decoder | model | tokens/s | TTFT p50 s | ITL mean ms | ITL p50 <= ms | step ms | "
             + "".join(f"{p} s | " for p in phases) + "joins | fed | " + "".join(f"{c} | " for _, c in counts)
             + "errors |",
             "|---|---|---|---|---|---|---|" + "---|" * (len(phases) + len(counts)) + "---|---|---|"]
    for r in rows:
        itl, step, ph = r.get("server_itl", {}), r.get("server_step", {}), r.get("server_phase_s", {})
        lines.append(f"| {r['decoder']} | `{r['model']}` | {r['tokens_per_s']:,.0f} | {r['ttft_p50_s']:.1f} | "
                     f"{_num(itl.get('mean_s') and 1000 * itl['mean_s'], '.1f')} | "
                     f"{_num(itl.get('p50_le_s') and 1000 * itl['p50_le_s'], 'g')} | "
                     f"{_num(step.get('mean_s') and 1000 * step['mean_s'], '.1f')} | "
                     + "".join(f"{_num(ph.get(p), '.1f')} | " for p in phases)
                     + f"{r.get('server_joins', '-'):,} | {r.get('server_fed', '-'):,} | "
                     + "".join(f"{r[k]:,} | " if k in r else "- | " for k, _ in counts) + f"{r['errors']} |")
    return "\n".join(lines) + "\n"


def _rate(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-")


def tune_grid(record: str) -> str:
    """``PATH#part``: the budget grid of ``part`` (``oppu-budget``: the group's name with
    hyphens) in the trial log at PATH, learning rates by step counts; a cell no trial
    logged says so."""
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    from mta.evaluation.tune import BUDGET_LRS, BUDGETS

    path, _, part = record.partition("#")
    by_flag = {b.replace(" ", "-"): b for b in BUDGETS}  # "task-lora budget" keeps its hyphen
    budget = by_flag.get(part)
    if budget is None:
        raise SystemExit(f"error: {record}: name a budget after '#' ({', '.join(by_flag)})")
    try:
        log = json.loads((ROOT / path).read_text(encoding="utf-8"))
        values, about = log["values"], log.get("trials", {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {path}: no readable trial log ({e})") from None
    cells = {(d["budget"]["lr"], d["budget"]["steps"]): (values.get(k), d.get("ci")) for k, d in about.items()
             if d.get("budget", {}).get("part") == budget}
    if not cells:
        raise SystemExit(f"error: {path}: no described trial of {budget!r} (a log written before trials were "
                         "described: run the tune again over it)")
    counts = BUDGETS[budget][4]
    method = BUDGETS[budget][3]

    def cell(found) -> str:
        v, ci = found or (None, None)
        if v is None:
            return "(not run)"
        if not isinstance(v, (int, float)):
            return next(iter(v))  # "failed" or "skipped"
        return f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")  # (a log before intervals: none)

    lines = [f"Record `{path}`: `{method}`'s {log.get('metric', 'metric')} on the tune's dev persons, one "
             "trial a cell" + (" [95% person-bootstrap interval]" if any(c[1] for c in cells.values()) else "")
             + ".", "", f"| {budget} lr | " + " | ".join(f"{n} steps" for n in counts) + " |",
             "|---|" + "---|" * len(counts)]
    for lr in BUDGET_LRS:
        lines.append(f"| {_rate(lr)} | " + " | ".join(cell(cells.get((lr, n))) for n in counts) + " |")
    none = [found for (_, n), found in cells.items() if n == 0]  # the "no training" trial (any lr: one)
    if none:
        lines += ["", f"No training (0 steps: the part left out): {cell(none[0])}."]
    return "\n".join(lines) + "\n"


def rules_table(record: str) -> str:
    """A scripts/rating-rules.py record: each method's answers by rule."""
    try:
        d = json.loads((ROOT / record).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {record}: no readable rating-rules record ({e})") from None
    return f"Record `{record}`: " + rating_rules.table(d)


def render(kind: str, record: str) -> str:
    if kind == "rules":
        return rules_table(record)
    if kind == "tune":
        return tune_grid(record)
    if kind == "table":
        return results_table.table(ROOT / record)
    if kind == "serve":
        return serve_table(ROOT / record)
    return bench_table(ROOT / record)


def regenerate(text: str) -> tuple[str, list[str]]:
    """The document with every marked table rendered again from its record, and the
    records whose table changed."""
    changed: list[str] = []

    def one(m: re.Match) -> str:
        body = "\n" + render(m["kind"], m["record"]) + "\n"
        if body != m["body"]:
            changed.append(m["record"])
        return m.group(1) + body + m.group(5)

    return BLOCK.sub(one, text), changed


def one_doc(doc: Path, check: bool) -> bool:
    """Check or rewrite ``doc``'s tables; False when a check found a difference."""
    try:
        text = doc.read_text(encoding="utf-8")
    except OSError as e:
        raise SystemExit(f"error: {doc}: {e.strerror}") from None
    n = len(BLOCK.findall(text))
    if sum(text.count(f"<!-- {k}:") for k in KINDS) != n:
        raise SystemExit(f"error: {doc}: a table marker without its end marker")
    new, changed = regenerate(text)
    if check:
        if changed:
            print(f"{doc}: {len(changed)} of {n} tables differ from their records: {', '.join(changed)}",
                  file=sys.stderr)
            return False
        print(f"{doc}: {n} tables match their records")
        return True
    if changed:
        tmp = doc.with_name(doc.name + ".tmp")
        tmp.write_text(new, encoding="utf-8")
        tmp.replace(doc)
    print(f"{doc}: {n} tables, {len(changed)} rewritten")
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("docs", nargs="*", type=Path, help="default: docs/results.md, docs/performance.md, docs/serving.md")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its record")
    a = ap.parse_args()
    ok = [one_doc(d, a.check) for d in a.docs or DOCS]
    if not all(ok):
        sys.exit(1)


if __name__ == "__main__":
    main()
