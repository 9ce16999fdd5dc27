"""A Triton kernel for the dense layout's adapter side in decoding, on CUDA.

The dense layout (``BankLoRALinear.densify``) folds every table's A columns into the base
matmul, so one GEMM gives ``full = [y | z]``: the base output y (rows x out) and every
column's projection z (rows x C). What is left per adapted layer is

    out = y + (z * W) @ B.T        W: each row's coefficients over the C columns (rows x C)

which torch runs as two kernels, the product and a GEMM of 64 rows over K = C (~528): a
GEMM too small to fill the GPU, several times its bytes in time (docs/performance.md, run
F: the engine's extra GEMMs cost 1.5 ms a step against 0.66 ms of extra bytes). Here it is
one kernel: each program takes a tile of rows and outputs, reads z and W from ``full`` and
the coefficients, multiplies them in registers (rounded to the compute dtype, as torch's
product is), accumulates the dot with B in fp32 and adds y before the one rounding (as
``addmm`` does). ``dense_mix`` is a torch custom op, so a compiled decode step calls it as
one opaque kernel and a CUDA graph captures it like any other.

On by default on CUDA (``MTA_DENSE_KERNEL=0`` turns it off: ``ENABLED``): on the H200 it
equals torch's ops and is 1.5x faster in a captured eager step, level inside a compiled
one (docs/performance.md, run G). Used for decode-sized batches only (at most ``MAX_ROWS`` rows x tokens); prefill keeps
cuBLAS. Without Triton (the CPU wheels) nothing here is used; with it, Triton is imported
only when the kernel first runs (``_dense_mix_triton``). ``TRITON_INTERPRET=1``
(set before this module is imported) runs the kernel on the CPU through Triton's
interpreter: the tests compare it with torch there.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None  # without it: the torch path everywhere

MAX_ROWS = 256  # rows x tokens up to which the kernel runs (decode); above, cuBLAS (prefill)
# The tile shape is timed per bucket of rows x tokens, not per exact count: timed per count,
# every prefill of a new size (a joining group's prompts) timed 6 configs at every layer
# shape on the server's loop thread, 27% of its samples under load at 8B shape
# (docs/serving.md, run S). ``tune`` times every bucket at a server's warm-up.
BUCKETS = (16, 32, 64, 128, MAX_ROWS)
# On unless MTA_DENSE_KERNEL=0: correct and faster on the GPU (docs/performance.md, run G)
ENABLED = os.environ.get("MTA_DENSE_KERNEL", "1") != "0"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def usable(full: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``dense_mix`` applies: Triton present, the tensors on CUDA (or the
    interpreter on), one dtype throughout, a decode-sized batch and no autograd."""
    if not ENABLED or not HAVE_TRITON or not (full.is_cuda or INTERPRET):
        return False
    if not (full.dtype == w.dtype == b.dtype) or full.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    if torch.is_grad_enabled() and (full.requires_grad or b.requires_grad or w.requires_grad):
        return False
    return full.numel() // full.shape[-1] <= MAX_ROWS


CONFIGS = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
           for bm, bn, bk, nw, ns in ((64, 32, 64, 4, 3), (64, 64, 64, 4, 3), (32, 32, 64, 2, 3),
                                      (64, 128, 32, 4, 3), (16, 64, 64, 2, 4), (64, 16, 128, 2, 3))]


def row_bucket(m: int) -> int:
    """The bucket the kernel's tile choice is timed and kept for: the smallest of
    ``BUCKETS`` holding ``m`` rows x tokens (past the last, the next power of two)."""
    for size in BUCKETS:
        if m <= size:
            return size
    return 1 << (m - 1).bit_length()


def check_shapes(full: torch.Tensor, w: torch.Tensor, b: torch.Tensor, tokens: int) -> None:
    """``full`` (M, OUT + C), ``w`` (at least M / tokens, C), ``b`` (OUT, C), or a ValueError."""
    m, width = full.shape
    out_f, cols = b.shape
    if width != out_f + cols or w.shape[-1] != cols or w.shape[0] * tokens < m or tokens < 1:
        raise ValueError(f"dense_mix: full {tuple(full.shape)}, w {tuple(w.shape)}, b {tuple(b.shape)} "
                         f"and {tokens} tokens per row do not fit together")


def launch(full: torch.Tensor, w: torch.Tensor, b: torch.Tensor, tokens: int, config: dict | None = None):
    """Run the kernel (``config``: one of ``CONFIGS`` instead of the timed choice)."""
    from mta.engine import _dense_mix_triton as tk  # Triton, on first use

    check_shapes(full, w, b, tokens)
    m, out_f = full.shape[0], b.shape[0]
    cols = b.shape[1]
    full, w, b = full.contiguous(), w.contiguous(), b.contiguous()
    out = torch.empty(m, out_f, dtype=full.dtype, device=full.device)
    args = (full, w, b, out, m, out_f, cols, tokens, full.stride(0), w.stride(0), b.stride(0), row_bucket(m))
    ieee = full.dtype == torch.float32
    kw = dict(IEEE=ieee, UPCAST=INTERPRET and not ieee)
    if config is None and not INTERPRET:
        def grid(meta):
            return -(-m // meta["BLOCK_M"]), -(-out_f // meta["BLOCK_N"])
        tk.tuned[grid](*args, **kw)
    else:
        c = config or CONFIGS[0]
        grid = (-(-m // c["BLOCK_M"]), -(-out_f // c["BLOCK_N"]))
        tk.dense_mix_kernel[grid](*args, **kw, **c)
    return out


_TUNED: set[tuple] = set()  # (outputs, columns, dtype, device) whose buckets ``tune`` timed in this process


def tune(shapes, dtype: torch.dtype, device: torch.device) -> int:
    """Time the kernel's tile choice now for every bucket of ``BUCKETS`` and every
    (outputs, columns) of ``shapes`` (the dense layers'), so that no later call times it
    (a prefill or a decode step of a new size on a server's loop); a shape done before in
    this process is skipped (the autotuner's cache lives as long). Returns the launches
    made: 0 where the kernel does not apply (no Triton, not CUDA, turned off) or has no
    timer (Triton's interpreter)."""
    n = 0
    if INTERPRET:
        return n
    for out_f, cols in sorted(set(shapes)):
        key = (out_f, cols, dtype, str(device))
        if key in _TUNED:
            continue
        b = torch.zeros(out_f, cols, dtype=dtype, device=device)
        for m in BUCKETS:
            full = torch.zeros(m, out_f + cols, dtype=dtype, device=device)
            w = torch.zeros(m, cols, dtype=dtype, device=device)
            if not usable(full, w, b):
                return n
            launch(full, w, b, 1)
            n += 1
        _TUNED.add(key)
    return n


@torch.library.custom_op("mta::dense_mix", mutates_args=())
def dense_mix(full: torch.Tensor, w: torch.Tensor, b: torch.Tensor, tokens: int) -> torch.Tensor:
    """``full`` (M, OUT + C) = [y | z], ``w`` (M / tokens, C), ``b`` (OUT, C) -> y + (z * w[m // tokens]) @ b.T,
    (M, OUT), in ``full``'s dtype."""
    return launch(full, w, b, tokens)


@dense_mix.register_fake
def _(full, w, b, tokens):
    return full.new_empty(full.shape[0], b.shape[0])


def dense_mix_reference(full: torch.Tensor, w: torch.Tensor, b: torch.Tensor, tokens: int) -> torch.Tensor:
    """What ``dense_mix`` computes, in torch (the tests' reference)."""
    out_f = b.shape[0]
    y, z = full[:, :out_f], full[:, out_f:]
    zw = z * w.repeat_interleave(tokens, dim=0)[: full.shape[0]]
    return torch.addmm(y, zw, b.t())


def worst_error(full: torch.Tensor, w: torch.Tensor, b: torch.Tensor, tokens: int) -> tuple[float, dict | None]:
    """The kernel against ``dense_mix_reference``, the timed choice (None) and every one of
    ``CONFIGS``: the largest relative error (|got - want| / max(|want|, 1)) and its config
    (the tests' and benchmarks/dense_mix.py's check)."""
    want = dense_mix_reference(full, w, b, tokens).float()
    worst, where = -1.0, None
    for config in [None, *CONFIGS]:
        got = launch(full, w, b, tokens, config).float()
        err = float(((got - want).abs() / want.abs().clamp(min=1)).max())
        if err > worst or (math.isnan(err) and not math.isnan(worst)):  # a NaN is the worst, and stays
            worst, where = err, config
    return worst, where
