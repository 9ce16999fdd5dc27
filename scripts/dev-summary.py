"""Print one Markdown table over the `mta eval` runs under a directory (dev sweeps).

    .venv/bin/python scripts/dev-summary.py runs/dev
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(root: str) -> None:
    print("| run | method | metric [95% CI] | Δ vs rag-1 [95% CI] | s/user adapt |")
    print("|---|---|---|---|---|")
    for f in sorted(Path(root).glob("*/metrics.json")):
        m = json.loads(f.read_text())
        for r in m["results"]:
            name, v = next(iter(r["metrics"].items()))
            d = v.get("diff_vs_rag-1")
            diff = "-" if d is None else f"{d['value']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"
            print(f"| {f.parent.name} | {r['method']} | {name} {v['value']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]"
                  f" | {diff} | {r['seconds_per_user_adapt']:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/dev")
