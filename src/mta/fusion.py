"""How anchor adapters merge into one user's adapter. Pure functions, checked inputs.

Anchor i is a LoRA with factors A_i (r x in) and B_i (out x r); its update is
dW_i = B_i A_i (the alpha/r scale is applied by the caller). With weights w:

- ``delta`` (exact): dW = sum_i w_i B_i A_i. As factors it is the concatenation
  B = [B_1 ... B_k], A = [w_1 A_1; ...; w_k A_k] of rank k*r, so a forward pass needs
  no per-user matrices.
- ``factor`` (the reference code's merge): dW = (sum_i w_i B_i)(sum_i w_i A_i). This is
  NOT the weighted sum of updates: it adds the cross terms w_i w_j B_i A_j (i != j).
  It averages, so the weights must be non-negative and sum to 1.
- ``svd``: the best rank-``rank`` approximation (Frobenius) of the exact sum.
"""

from __future__ import annotations

from typing import Literal

import torch

MergeMode = Literal["delta", "factor", "svd"]
MERGE_MODES: tuple[str, ...] = ("delta", "factor", "svd")


def check_weights(w: torch.Tensor, mode: str, n: int | None = None) -> None:
    """Raise ValueError when ``w`` is unusable for ``mode`` (shape, finiteness, simplex)."""
    if mode not in MERGE_MODES:
        raise ValueError(f"merge mode must be one of {MERGE_MODES}, got {mode!r}")
    if w.dim() != 1 or (n is not None and w.numel() != n):
        raise ValueError(f"weights must be a vector of {n} values, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weights contain NaN or inf")
    if mode == "factor":
        if (w < 0).any():
            raise ValueError(f"factor merge averages factors: weights must be >= 0, got {w.tolist()}")
        if abs(float(w.sum()) - 1.0) > 1e-4:
            total = float(w.sum())
            raise ValueError(f"factor merge averages factors: weights must sum to 1, got {total:.6f}")


def _check_factors(A: torch.Tensor, B: torch.Tensor) -> None:
    if A.dim() != 3 or B.dim() != 3:
        raise ValueError(f"A must be (n, r, in) and B (n, out, r); got {tuple(A.shape)}, {tuple(B.shape)}")
    if A.shape[0] != B.shape[0] or A.shape[1] != B.shape[2]:
        raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} disagree on count or rank")
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise ValueError("adapter factors contain NaN or inf")


def merge_delta(A: torch.Tensor, B: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Dense exact update: sum_i w_i B_i A_i, shape (out, in)."""
    _check_factors(A, B)
    check_weights(w, "delta", A.shape[0])
    return torch.einsum("n,nor,nri->oi", w.to(A.dtype), B, A)


def concat_delta(A: torch.Tensor, B: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of the exact update: (A_cat (n*r, in), B_cat (out, n*r)) with B_cat A_cat = sum w_i B_i A_i."""
    _check_factors(A, B)
    check_weights(w, "delta", A.shape[0])
    n, r, d_in = A.shape
    a_cat = (A * w.to(A.dtype)[:, None, None]).reshape(n * r, d_in)
    b_cat = B.permute(1, 0, 2).reshape(B.shape[1], n * r)
    return a_cat, b_cat


def merge_factor(A: torch.Tensor, B: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference merge: (sum_i w_i A_i (r, in), sum_i w_i B_i (out, r))."""
    _check_factors(A, B)
    check_weights(w, "factor", A.shape[0])
    w = w.to(A.dtype)
    return torch.einsum("n,nri->ri", w, A), torch.einsum("n,nor->or", w, B)


def merge_svd(
    A: torch.Tensor, B: torch.Tensor, w: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors (A' (rank, in), B' (out, rank)) of the best approximation of
    sum_i w_i B_i A_i. Computed through QR of the concatenated factors, so the dense
    (out x in) matrix is never formed: cost O((out + in) * (n r)^2)."""
    if rank < 1:
        raise ValueError(f"svd rank must be a positive integer, got {rank}")
    a_cat, b_cat = concat_delta(A, B, w)
    work = torch.float64 if A.dtype == torch.float64 else torch.float32
    qb, rb = torch.linalg.qr(b_cat.to(work))          # out x K, K x K
    qa, ra = torch.linalg.qr(a_cat.to(work).T)        # in x K,  K x K
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b_new = (qb @ u[:, :k]) * root
    a_new = root[:, None] * (vh[:k] @ qa.T)
    if k < rank:  # the exact sum has lower rank than asked: pad with zero directions
        a_new = torch.cat([a_new, a_new.new_zeros(rank - k, a_new.shape[1])])
        b_new = torch.cat([b_new, b_new.new_zeros(b_new.shape[0], rank - k)], dim=1)
    return a_new.to(A.dtype), b_new.to(A.dtype)
