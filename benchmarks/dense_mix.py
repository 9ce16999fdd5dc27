"""The dense layout's Triton kernel (``mta.engine.kernels.dense_mix``) against the torch ops
it replaces, alone, at Llama-3-8B's decode shapes.

    python benchmarks/dense_mix.py --out runs/bench/dense_mix.json      # CUDA + Triton
    TRITON_INTERPRET=1 python benchmarks/dense_mix.py --tiny            # CPU smoke run (correctness only)

Per adapted layer the dense layout leaves ``out = y + (z * W) @ B.T`` after the folded base
GEMM: torch runs it as the product and an ``addmm`` of ROWS x COLS by COLS x OUT (the
reference, ``dense_mix_reference``); the kernel does it in one. For each output width of an
8B block (k/v 1024, q/o/down 4096, gate/up 14336) it first checks the kernel, every tile
config and the timed choice, against the reference (one bf16 unit in the last place, 2^-7
relative; 1e-5 in fp32), then times both as a decode step runs them: ``--calls`` calls
captured in one CUDA graph, replayed ``--reps`` times, median per call. The last row sums one
step's 224 such ops (32 blocks: 2 x 1024, 3 x 4096, 2 x 14336 outputs each) from the
per-shape medians: the ops alone, not a decode step (benchmarks/gpu.py --kernel-compare
measures the step).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mta.engine import kernels  # noqa: E402

# output width -> how many of a Llama-3-8B block's adapted layers have it
WIDTHS_8B = {1024: 2, 4096: 3, 14336: 2}
BLOCKS_8B = 32
DTYPES = {"bf16": (torch.bfloat16, 2 ** -7), "fp32": (torch.float32, 1e-5)}


def operands(rows: int, out_f: int, cols: int, dtype: torch.dtype, device: torch.device, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    full = torch.randn(rows, out_f + cols, generator=g, device=device).to(dtype)
    w = torch.randn(rows, cols, generator=g, device=device).to(dtype)
    b = (0.02 * torch.randn(out_f, cols, generator=g, device=device)).to(dtype)
    return full, w, b


def check(full, w, b, tol: float) -> float:
    """The largest relative error of the kernel (timed choice and every tile config) against
    torch (``kernels.worst_error``); exits past ``tol``."""
    err, config = kernels.worst_error(full, w, b, 1)
    if not err <= tol:
        raise SystemExit(f"dense_mix: config {config or 'timed'} is {err:.3g} from torch at "
                         f"{tuple(full.shape)} x {tuple(b.shape)} (allowed {tol:.3g})")
    return err


def time_graph(fn, calls: int, reps: int) -> float:
    """Median seconds per call of ``fn`` captured ``calls`` times in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()  # warm-up: the kernel's tile timing and cuBLAS's choice happen outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / calls)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64, help="decode rows (users in the batch)")
    ap.add_argument("--cols", type=int, default=528, help="adapter columns (anchors x rank + stack ranks)")
    ap.add_argument("--dtypes", default="bf16", help="comma-separated: bf16, fp32")
    ap.add_argument("--calls", type=int, default=50, help="calls per CUDA graph")
    ap.add_argument("--reps", type=int, default=50, help="graph replays timed")
    ap.add_argument("--tiny", action="store_true", help="small shapes, correctness only (the interpreter)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/dense_mix.json"))
    a = ap.parse_args(argv)
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise SystemExit(f"--dtypes: unknown {', '.join(bad) or '(none given)'}; one or more of {', '.join(DTYPES)}")
    if not kernels.HAVE_TRITON:
        raise SystemExit("dense_mix: Triton is not installed (pip install triton; CUDA wheels ship it)")
    timed = torch.cuda.is_available() and not kernels.INTERPRET
    if not timed and not (kernels.INTERPRET and a.tiny):
        raise SystemExit("dense_mix: needs CUDA, or TRITON_INTERPRET=1 with --tiny for a CPU check")
    device = torch.device("cuda" if timed else "cpu")
    widths = {96: 1, 130: 1} if a.tiny else WIDTHS_8B
    rows, cols = (12, 40) if a.tiny else (a.rows, a.cols)
    if rows > kernels.MAX_ROWS:
        raise SystemExit(f"--rows {rows}: the kernel runs for at most {kernels.MAX_ROWS} (decode) rows")
    meta = {"device": torch.cuda.get_device_name() if timed else "cpu (Triton interpreter)",
            "torch": torch.__version__, "rows": rows, "cols": cols, "calls": a.calls, "reps": a.reps,
            "protocol": "median per call of CUDA-graph replays; reference = z*W product + addmm"}
    rows_out = []
    t0 = time.perf_counter()
    for name in dtypes:
        dtype, tol = DTYPES[name]
        if kernels.INTERPRET and dtype != torch.float32:
            tol = 2 ** -6  # the interpreter's bf16 path is not the GPU's (tests/kernel_check.py)
        step_ref = step_kernel = 0.0
        for i, (out_f, count) in enumerate(widths.items()):
            full, w, b = operands(rows, out_f, cols, dtype, device, seed=i)
            err = check(full, w, b, tol)
            row = {"dtype": name, "out": out_f, "per_block": count, "max_rel_err": err}
            if timed:
                ref = time_graph(functools.partial(kernels.dense_mix_reference, full, w, b, 1), a.calls, a.reps)
                ker = time_graph(functools.partial(kernels.dense_mix, full, w, b, 1), a.calls, a.reps)
                row.update(reference_us=ref * 1e6, kernel_us=ker * 1e6, speedup=ref / ker)
                step_ref += BLOCKS_8B * count * ref
                step_kernel += BLOCKS_8B * count * ker
            rows_out.append(row)
            print(f"[{time.perf_counter() - t0:5.1f}s] {name} out {out_f}: max rel err {err:.2e}"
                  + (f", torch {row['reference_us']:.2f} us, kernel {row['kernel_us']:.2f} us" if timed else ""),
                  flush=True)
        if timed:
            rows_out.append({"dtype": name, "out": "step (224 ops)", "reference_us": step_ref * 1e6,
                             "kernel_us": step_kernel * 1e6, "speedup": step_ref / step_kernel})
    def cell(r: dict, key: str, fmt: str) -> str:
        return format(r[key], fmt) if key in r else "-"

    print(f"\n{'dtype':>5} {'out':>15} {'torch us':>9} {'kernel us':>9} {'speed-up':>8} {'max rel err':>11}")
    for r in rows_out:
        print(f"{r['dtype']:>5} {str(r['out']):>15} {cell(r, 'reference_us', '.2f'):>9} "
              f"{cell(r, 'kernel_us', '.2f'):>9} {cell(r, 'speedup', '.2f'):>8} {cell(r, 'max_rel_err', '.2e'):>11}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(a.out.suffix + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows_out}, indent=2) + "\n")
    tmp.replace(a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
