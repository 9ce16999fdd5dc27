"""Whether this GPU's SDPA backward returns non-finite query gradients in the case that
broke training on the H200 (pytorch/pytorch#196678; docs/results.md, 2026-12-01 third
session): an explicit attention mask, a length of 64 modulo 128, and every score of a row
so negative that its log-sum-exp is below ln(FLT_MAX) ~ -88.7 (what Qwen2.5's
massive-activation heads produce). Prints, per length and per way of calling SDPA, how many
query-gradient elements are not finite; mta's training calls it the last way (causal, no
mask tensor).

    python3 scripts/sdpa-nan-check.py          # on a CUDA machine
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def bad_grad_q(length: int, how: str, dim: int = 64, score: float = -120.0) -> int:
    g = torch.Generator(device="cuda").manual_seed(0)
    q = 0.1 * torch.randn(1, 2, length, dim, device="cuda", generator=g)
    k = 0.1 * torch.randn(1, 2, length, dim, device="cuda", generator=g)
    v = torch.randn(1, 2, length, dim, device="cuda", generator=g)
    q[..., 0] = 1.0
    k[..., 0] = score * math.sqrt(dim)  # every scaled score ~ score: the log-sum-exp far below -88.7
    q, k, v = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
    causal = torch.ones(length, length, dtype=torch.bool, device="cuda").tril()[None, None]
    if how == "mask, default backends":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
    elif how == "mask, cuDNN off":
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
    else:  # what mta's training does: right-padded rows, causal, no mask tensor
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.backward(torch.randn(out.shape, device="cuda", generator=g, dtype=out.dtype))
    return int((~torch.isfinite(q.grad)).sum())


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}")
    ways = ("mask, default backends", "mask, cuDNN off", "causal, no mask (mta's training)")
    print(f"{'length':>7}  " + "  ".join(f"{w:>32}" for w in ways))
    for length in (192, 256, 320, 384, 704, 768):
        print(f"{length:>7}  " + "  ".join(f"{bad_grad_q(length, w):>32}" for w in ways), flush=True)
    print("(non-finite elements of the query gradient, of 2 x length x 64)")


if __name__ == "__main__":
    main()
