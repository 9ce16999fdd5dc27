"""The Triton side of ``mta.engine.kernels`` (imported on first use, so that importing the
engine on a machine that never runs the kernel does not pay for importing Triton)."""

from __future__ import annotations

import triton
import triton.language as tl

from mta.engine.kernels import CONFIGS


@triton.jit
def dense_mix_kernel(full_ptr, w_ptr, b_ptr, o_ptr, M, OUT, COLS, T, stride_full, stride_w, stride_b,
                      MB,  # M's bucket (kernels.row_bucket): the autotuner's key, not read here
                      IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    in_m = rm < M
    in_n = rn < OUT
    wrow = rm // T  # the coefficients are per sequence; a prompt's tokens share its row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, COLS, BLOCK_K):
        kk = k0 + rk
        in_k = kk < COLS
        mk = in_m[:, None] & in_k[None, :]
        z = tl.load(full_ptr + rm[:, None] * stride_full + OUT + kk[None, :], mask=mk, other=0.0)
        w = tl.load(w_ptr + wrow[:, None] * stride_w + kk[None, :], mask=mk, other=0.0)
        zw = z.to(tl.float32) * w.to(tl.float32)
        bt = tl.load(b_ptr + rn[None, :] * stride_b + kk[:, None], mask=in_n[None, :] & in_k[:, None],
                     other=0.0)  # (BLOCK_K, BLOCK_N): B transposed
        if UPCAST:
            # Triton's interpreter multiplies bf16 matrices as integers and converts to bf16 by
            # truncation: there the product stays fp32 and the dot runs in fp32 (tests only)
            acc = tl.dot(zw, bt.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            acc = tl.dot(zw, bt, acc, input_precision="ieee")
        else:  # the product rounded to the compute dtype, as torch's `z * w` is
            acc = tl.dot(zw.to(z.dtype), bt, acc)
    mn = in_m[:, None] & in_n[None, :]
    y = tl.load(full_ptr + rm[:, None] * stride_full + rn[None, :], mask=mn, other=0.0)
    out = acc + y.to(tl.float32)
    tl.store(o_ptr + rm[:, None] * OUT + rn[None, :], out.to(o_ptr.dtype.element_ty), mask=mn)

# on CUDA the tile shape is timed per (bucket of rows, outputs, columns) at the first call
# (kernels.tune, at a server's warm-up); the interpreter has no timer: one config, or the one given
tuned = triton.autotune(configs=[triton.Config({k: c[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")},
                                                num_warps=c["num_warps"], num_stages=c["num_stages"])
                                  for c in CONFIGS], key=["MB", "OUT", "COLS"])(dense_mix_kernel)
