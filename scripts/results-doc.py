#!/usr/bin/env python3
"""Regenerate the run tables of a report (docs/results.md) from the run records they name.

A table is written between two markers, the first naming its run directory:

    <!-- table: results/gpu-2026-12-04b/lastfm-15b -->
    ... scripts/results-table.py's output for that run ...
    <!-- end table -->

    .venv/bin/python scripts/results-doc.py [DOC]           # rewrite every table in place
    .venv/bin/python scripts/results-doc.py --check [DOC]   # exit 1 naming each table that differs

Only the tables are generated: the prose around them (commands, pairs, what a run says)
is written by hand and cites the same records. `--check` runs in the test suite, so a
table cannot drift from its record.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("results_table", ROOT / "scripts" / "results-table.py")
results_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results_table)

BLOCK = re.compile(r"(<!-- table: (?P<run>\S+) -->\n)(?P<body>.*?)(<!-- end table -->)", re.S)


def regenerate(text: str) -> tuple[str, list[str]]:
    """The document with every marked table rendered again from its run, and the runs
    whose table changed."""
    changed: list[str] = []

    def one(m: re.Match) -> str:
        body = "\n" + results_table.table(ROOT / m["run"]) + "\n"
        if body != m["body"]:
            changed.append(m["run"])
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(one, text), changed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("doc", nargs="?", type=Path, default=ROOT / "docs" / "results.md")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its run")
    a = ap.parse_args()
    try:
        text = a.doc.read_text(encoding="utf-8")
    except OSError as e:
        raise SystemExit(f"error: {a.doc}: {e.strerror}") from None
    if "<!-- table:" in text and not BLOCK.search(text):
        raise SystemExit(f"error: {a.doc}: a table marker without its end marker")
    new, changed = regenerate(text)
    n = len(BLOCK.findall(text))
    if a.check:
        if changed:
            sys.exit(f"{a.doc}: {len(changed)} of {n} tables differ from their runs: {', '.join(changed)}")
        print(f"{a.doc}: {n} tables match their runs")
        return
    if changed:
        tmp = a.doc.with_name(a.doc.name + ".tmp")
        tmp.write_text(new, encoding="utf-8")
        tmp.replace(a.doc)
    print(f"{a.doc}: {n} tables, {len(changed)} rewritten")


if __name__ == "__main__":
    main()
