"""Sharded adaptation on Ray: users/s with 1 worker against N workers (one GPU each on a
GPU machine, one CPU each otherwise), in the same run, on the same bank and users.

    .venv/bin/python benchmarks/ray_adapt.py                                    # tiny model, CPU, a smoke run
    python3 benchmarks/ray_adapt.py --model random-llama3-8b --users 128 --workers 1,2 --out ray-adapt.json

It makes synthetic users, builds one bank (not on Ray, not timed), then runs
``mta adapt --ray local --ray-workers N`` into a fresh store for each N and times the
whole command (Ray's start and the workers' model loads included, as a user sees it),
and reads from the store's run.log the seconds each worker spent inside its shards
(fusion + training; the busiest worker bounds the shard work), so the scaling of the
work itself is seen apart from the start costs. Prints a table and writes the JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mta(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "mta", "--quiet", *args], cwd=ROOT, check=True)


def shard_stats(run_log: Path) -> dict:
    """The driver's summary line (mta.distributed.ray_adapt logs it into the store's run.log)."""
    lines = [ln for ln in run_log.read_text().splitlines() if "ray adapt: " in ln]
    if not lines:
        sys.exit(f"error: no 'ray adapt:' summary in {run_log}")
    return json.loads(lines[-1].split("ray adapt: ", 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-random-llama")
    ap.add_argument("--embedder", default="hashing-embedder")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--users-per-pass", type=int, default=16)
    ap.add_argument("--anchors", type=int, default=4)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts; the first is the reference")
    ap.add_argument("--work", type=Path, default=None, help="keep the data, bank and stores here")
    ap.add_argument("--out", type=Path, default=Path("ray-adapt.json"))
    a = ap.parse_args()
    counts = [int(w) for w in a.workers.split(",")]
    work = a.work or Path(tempfile.mkdtemp(prefix="mta-ray-adapt-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "bank" / "index.json").exists():
        mta("data", "synth", "--out", str(work / "data"), "--users", str(a.users + 8), "--queries", "1")
        mta("bank", "build", "--data", str(work / "data"), "--out", str(work / "bank"), "--anchors", str(a.anchors),
            "--min-history", "1", "--model", a.model, "--embedder", a.embedder, "--device", a.device)
    ids = ",".join(f"synth-{i:04d}" for i in range(a.users))
    rows = []
    for n in counts:
        store = work / f"store-w{n}"
        t = time.perf_counter()
        mta("adapt", "--bank", str(work / "bank"), "--data", str(work / "data"), "--out", str(store), "--users", ids,
            "--users-per-pass", str(a.users_per_pass), "--device", a.device, "--ray", "local", "--ray-workers", str(n))
        wall = time.perf_counter() - t
        inner = shard_stats(store / "run.log")
        rows.append({"workers": n, "users": a.users, "seconds": round(wall, 2),
                     "users_per_s": round(a.users / wall, 3),
                     # inside the actors: the busiest worker's fusion + training seconds, so the
                     # shard work's scaling is read without Ray's and the actors' start costs
                     "busiest_worker_seconds": inner["busiest_worker_seconds"],
                     "shard_seconds": inner["shard_seconds"],
                     "shard_users_per_s": round(a.users / inner["busiest_worker_seconds"], 3)})
    ref, ref_inner = rows[0]["users_per_s"], rows[0]["shard_users_per_s"]
    for r in rows:
        r["vs_first"] = round(r["users_per_s"] / ref, 3)
        r["shard_vs_first"] = round(r["shard_users_per_s"] / ref_inner, 3)
    result = {"model": a.model, "device": a.device, "users": a.users, "users_per_pass": a.users_per_pass,
              "anchors": a.anchors, "rows": rows}
    print(f"{'workers':>8} {'seconds':>9} {'users/s':>9} {'vs ' + str(counts[0]):>7} {'busiest s':>10} "
          f"{'shard users/s':>14} {'vs ' + str(counts[0]):>7}")
    for r in rows:
        print(f"{r['workers']:>8} {r['seconds']:>9.1f} {r['users_per_s']:>9.2f} {r['vs_first']:>6.2f}x "
              f"{r['busiest_worker_seconds']:>10.1f} {r['shard_users_per_s']:>14.2f} {r['shard_vs_first']:>6.2f}x")
    a.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
