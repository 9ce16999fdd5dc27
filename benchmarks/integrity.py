"""What the checksums cost: sha256 of an adapter file against reading its tensors into
memory (load and copy, as loading into the engine does), at the
sizes of this project's adapters (a rank-2 stack and a rank-8 anchor of SmolLM2 and of
Llama-3-8B, fp32), measured in the same run on this machine.

    .venv/bin/python benchmarks/integrity.py [--out runs/bench/integrity.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mta.paths import sha256_file  # noqa: E402

# (name, parameters): (in + out) x rank summed over the adapted linear layers
SIZES = [("SmolLM2 stack, rank 2, last 8 blocks", 162_816), ("SmolLM2 anchor, rank 8", 2_442_240),
         ("Llama-3-8B stack, rank 2, all blocks", 5_242_880), ("Llama-3-8B anchor, rank 8", 20_971_520)]


def best_of(fn, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench/integrity.json"))
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, params in SIZES:
            f = Path(d) / "adapter_model.safetensors"
            save_file({"w": torch.randn(params)}, str(f))
            # reading the tensors for real (safetensors maps the file lazily)
            load_s = best_of(lambda f=f: load_file(str(f))["w"].clone())
            hash_s = best_of(lambda f=f: sha256_file(f))
            rows.append({"adapter": name, "bytes": f.stat().st_size, "load_ms": load_s * 1e3, "sha256_ms": hash_s * 1e3,
                         "hash_vs_load": hash_s / load_s, "mb_per_s": f.stat().st_size / hash_s / 1e6})
    print(f"{'adapter':<40} {'MB':>8} {'load ms':>9} {'sha256 ms':>10} {'x load':>7} {'MB/s':>7}")
    for r in rows:
        print(f"{r['adapter']:<40} {r['bytes'] / 1e6:>8.1f} {r['load_ms']:>9.1f} {r['sha256_ms']:>10.1f} "
              f"{r['hash_vs_load']:>7.2f} {r['mb_per_s']:>7.0f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
