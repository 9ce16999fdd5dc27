"""The injected linear layer: one frozen base weight, a bank of anchor LoRAs mixed per
row, optional per-user fused factors and per-user stacked adapters.

For row b of a batch::

    y_b = W x_b + sum_{i in top-k(b)} w[b,i] (alpha/r) B_i A_i x_b      (bank, mode "delta")
                + (alpha_f/r_f) F^B_{f(b)} F^A_{f(b)} x_b                (fused table, e.g. "svd")
                + (alpha_s/r_s) B_{u(b)} A_{u(b)} x_b                    (stacked adapter)

In mode "factor" the bank term is (alpha/r)(sum_i w[b,i] B_i)(sum_i w[b,i] A_i) x_b.
Every term is gathered per row from contiguous stacked tensors and folded into ONE pair
of batched matmuls: A_row = [A parts] (R x in), B_row = [B parts] (out x R), with a
per-row coefficient for each of the R rank directions. A row with every coefficient 0
(switched off) gets exactly the base output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Routing:
    """Per-row selection, shared by every injected layer of one engine.

    anchor_idx: (B, k) bank slots; anchor_w: (B, k) their weights (0 for padding slots).
    fused_idx / stack_idx: (B,) rows into the fused / stack tables, -1 for none.
    active: (B,) False switches the row to the base model alone.
    """

    mode: str = "delta"
    anchor_idx: torch.Tensor | None = None
    anchor_w: torch.Tensor | None = None
    fused_idx: torch.Tensor | None = None
    stack_idx: torch.Tensor | None = None
    active: torch.Tensor | None = None


class BankLoRALinear(nn.Module):
    """Wraps an ``nn.Linear``; the wrapped module is kept untouched for removal."""

    def __init__(self, base: nn.Linear, n_anchors: int, rank: int, alpha: float,
                 routing_ref: list[Routing | None], dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, alpha
        dev = base.weight.device
        self.bank_A = nn.Parameter(torch.zeros(n_anchors, rank, self.in_features, device=dev, dtype=dtype))
        self.bank_B = nn.Parameter(torch.zeros(n_anchors, self.out_features, rank, device=dev, dtype=dtype))
        self.stack_rank, self.stack_alpha = 0, 0.0
        self.stack_A = nn.Parameter(torch.zeros(0, 0, self.in_features, device=dev, dtype=dtype))
        self.stack_B = nn.Parameter(torch.zeros(0, self.out_features, 0, device=dev, dtype=dtype))
        self.fused_scale = 1.0
        self.register_buffer("fused_A", torch.zeros(0, 0, self.in_features, device=dev, dtype=dtype),
                             persistent=False)
        self.register_buffer("fused_B", torch.zeros(0, self.out_features, 0, device=dev, dtype=dtype),
                             persistent=False)
        self._routing_ref = routing_ref  # a one-element list owned by the engine
        self._cache = None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def _bank_parts(self, rt: Routing):
        idx, w = rt.anchor_idx, rt.anchor_w.to(self.bank_A.dtype)
        if rt.mode == "factor":
            a = torch.einsum("bk,bkri->bri", w, self.bank_A[idx])
            b = torch.einsum("bk,bkor->bor", w, self.bank_B[idx])
            coef = torch.full((a.shape[0], self.rank), self.scale, dtype=a.dtype, device=a.device)
            return a, b, coef
        bsz, k = idx.shape
        a = self.bank_A[idx].reshape(bsz, k * self.rank, self.in_features)
        b = self.bank_B[idx].permute(0, 2, 1, 3).reshape(bsz, self.out_features, k * self.rank)
        coef = (w * self.scale).repeat_interleave(self.rank, dim=1)
        return a, b, coef

    @staticmethod
    def _table_parts(ta: torch.Tensor, tb: torch.Tensor, idx: torch.Tensor, scale: float):
        safe = idx.clamp(min=0)
        coef = (idx >= 0).to(ta.dtype)[:, None] * scale
        return ta[safe], tb[safe], coef.expand(-1, ta.shape[1])

    def _gathered(self, rt: Routing):
        """(A_row * coef (B, R, in), B_row (B, out, R)) for the rows of ``rt``, or None.

        Without autograd (generation) the result is cached for as long as the routing and
        the adapter tensors are unchanged: a decode step then costs two batched matmuls
        per layer instead of re-gathering every step. The key holds the tensors' version
        counters, so an in-place update (load_user) invalidates it.
        """
        cacheable = not torch.is_grad_enabled()
        key = (id(rt), self.bank_A._version, self.bank_B._version, id(self.stack_A), self.stack_A._version,
               self.stack_B._version, id(self.fused_A))
        if cacheable and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        parts = []
        if rt.anchor_idx is not None and self.bank_A.shape[0]:
            parts.append(self._bank_parts(rt))
        if rt.fused_idx is not None and self.fused_A.shape[0]:
            parts.append(self._table_parts(self.fused_A, self.fused_B, rt.fused_idx, self.fused_scale))
        if rt.stack_idx is not None and self.stack_A.shape[0]:
            parts.append(self._table_parts(self.stack_A, self.stack_B, rt.stack_idx,
                                           self.stack_alpha / self.stack_rank))
        if not parts:
            out = None
        else:
            a = torch.cat([p[0] for p in parts], dim=1)          # (B, R, in)
            b = torch.cat([p[1] for p in parts], dim=2)          # (B, out, R)
            coef = torch.cat([p[2] for p in parts], dim=1)       # (B, R)
            if rt.active is not None:
                coef = coef * rt.active.to(coef.dtype)[:, None]
            out = (a * coef[:, :, None], b)
        if cacheable:
            self._cache = (key, out)
        return out

    def clear_cache(self) -> None:
        self._cache = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rt = self._routing_ref[0]
        if rt is None:
            return y
        got = self._gathered(rt)
        if got is None:
            return y
        a, b = got
        if a.shape[0] != x.shape[0]:
            raise RuntimeError(f"routing is set for {a.shape[0]} rows but the batch has {x.shape[0]}")
        squeeze = x.dim() == 2
        h = x.unsqueeze(1) if squeeze else x
        h = h.to(a.dtype)
        z = torch.bmm(h, a.transpose(1, 2))
        delta = torch.bmm(z, b.transpose(1, 2))
        if squeeze:
            delta = delta.squeeze(1)
        return y + delta.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, anchors={self.bank_A.shape[0]}, "
                f"rank={self.rank}, alpha={self.alpha}, users={self.stack_A.shape[0]}, "
                f"stack_rank={self.stack_rank}")
