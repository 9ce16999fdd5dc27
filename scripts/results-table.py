#!/usr/bin/env python3
"""Print the table of an `mta eval` run from its metrics.json, as docs/results.md holds it:
the same rendering as the run's own results.md (mta.evaluation.report.markdown), under a
level-3 heading. Every table in docs/results.md is this script's output for its run.

    .venv/bin/python scripts/results-table.py RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mta.evaluation.report import markdown  # noqa: E402
from mta.tasks import get_task  # noqa: E402


def table(run: Path) -> str:
    try:
        m = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {run}: no readable metrics.json ({e})") from None
    if "protocol" not in m:
        raise SystemExit(f"error: {run}/metrics.json predates the recorded protocol; run it again")
    task = get_task(m["config"]["task"])
    return markdown(m["title"], m["protocol"], task, m["results"], m["references"], m.get("failed"), level=3,
                    variants=m.get("variants"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    print("\n".join(table(r) for r in ap.parse_args().runs), end="")


if __name__ == "__main__":
    main()
