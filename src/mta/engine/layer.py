"""The injected linear layer: one frozen base weight, a bank of anchor LoRAs mixed per
row, per-user fused factors and per-user stacked adapters.

For row b of a batch::

    y_b = W x_b + sum_{i in top-k(b)} w[b,i] (alpha/r) B_i A_i x_b      (bank: the exact merge)
                + c_f(b) F^B_{f(b)} F^A_{f(b)} x_b                       (fused table: factor or svd merges)
                + c_s(b) B_{u(b)} A_{u(b)} x_b                           (stack table)

with per-slot coefficients c_f, c_s (a stacked user's alpha_s/r_s; 1 for fused factors,
whose scale is folded in). Every term is gathered per row from contiguous stacked
tensors and folded into ONE pair of batched matmuls: A_row = [A parts] (R x in),
B_row = [B parts] (out x R), with a per-row coefficient for each of the R rank
directions. A row with every coefficient 0 (switched off) gets exactly the base output.
How a forward reads those terms (gathered per row, pinned, dense) is the engine's routing
backend (``mta.decoding.routing``); the layer holds the tables and the backends' buffers.

The tables hold fp32 master weights (``dtype``); the two matmuls run in
``compute_dtype`` (bf16 on a bf16 base by default: the cast is differentiable, so the
gradients still land in the fp32 masters).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # the routing module reads layers; a layer only calls its backend
    from mta.decoding.routing import Backend, Routing


def _empty(n: int, a: int, b: int, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(n, a, b, device=like.device, dtype=like.dtype)


# the tables a layer's adapters are read from (``tables``), the stack tables last
STACK_TABLES = ("stack_A", "stack_B", "stack_scale")
TABLES = ("bank_A", "bank_B", "fused_A", "fused_B", "fused_scale", *STACK_TABLES)


class BankLoRALinear(nn.Module):
    """Wraps an ``nn.Linear``; the wrapped module is kept untouched for removal."""

    def __init__(self, base: nn.Linear, routing_ref: list[Routing | None], backend_ref: list[Backend],
                 dtype: torch.dtype = torch.float32, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.compute_dtype = compute_dtype or dtype
        dev = base.weight.device
        proto = torch.zeros(0, device=dev, dtype=dtype)
        self.rank, self.alpha = 0, 0.0
        self.bank_A = nn.Parameter(_empty(0, 0, self.in_features, proto), requires_grad=False)
        self.bank_B = nn.Parameter(_empty(0, self.out_features, 0, proto), requires_grad=False)
        self.stack_rank = 0
        self.stack_A = nn.Parameter(_empty(0, 0, self.in_features, proto), requires_grad=False)
        self.stack_B = nn.Parameter(_empty(0, self.out_features, 0, proto), requires_grad=False)
        self.register_buffer("stack_scale", torch.zeros(0, device=dev, dtype=dtype), persistent=False)
        self.register_buffer("fused_A", _empty(0, 0, self.in_features, proto), persistent=False)
        self.register_buffer("fused_B", _empty(0, self.out_features, 0, proto), persistent=False)
        self.register_buffer("fused_scale", torch.zeros(0, device=dev, dtype=dtype), persistent=False)
        self._routing_ref = routing_ref  # one-element lists owned by the engine: the rows' routing,
        self._backend_ref = backend_ref  # and how the rows' adapters are read (mta.decoding.routing)
        self._cache = None
        # the PINNED backend's buffers: per-row factors in fixed buffers for a compiled /
        # graph-captured decode step; refilled in place for a new batch
        self.register_buffer("pin_A", torch.zeros(0, 0, self.in_features, device=dev), persistent=False)
        self.register_buffer("pin_B", torch.zeros(0, self.out_features, 0, device=dev), persistent=False)
        # the DENSE backend's buffers: every table's factors side by side as columns,
        # read once per step by two dense matmuls; a row's mixture is its coefficients over
        # those columns (dense_W), zero where the row does not use a column
        self.register_buffer("dense_A", torch.zeros(0, self.in_features, device=dev), persistent=False)
        self.register_buffer("dense_B", torch.zeros(self.out_features, 0, device=dev), persistent=False)
        self.register_buffer("dense_W", torch.zeros(0, 0, device=dev), persistent=False)
        # the dense layout's A columns folded into the base matmul: one (out + columns, in)
        # matrix whose first rows ARE the base weight (base.weight becomes a view of them)
        # and whose last rows are dense_A, so x @ ext.T gives the base output and every
        # column's projection in one GEMM. A separate x @ dense_A.T is a small GEMM whose
        # time is its launch and too few tiles, not its bytes: 3.0 ms of a decode step at
        # 8B shape against 0.33 ms of bytes (docs/performance.md). ``fold_dense``
        # False keeps the two GEMMs (the benchmark's comparison).
        self.fold_dense = True
        self._ext: torch.Tensor | None = None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    @property
    def master_dtype(self) -> torch.dtype:
        return self.bank_A.dtype

    # -- tables ---------------------------------------------------------------------------------
    def set_bank(self, n: int, rank: int, alpha: float) -> None:
        proto = self.bank_A
        self.rank, self.alpha = rank, float(alpha)
        self.bank_A = nn.Parameter(_empty(n, rank, self.in_features, proto), requires_grad=False)
        self.bank_B = nn.Parameter(_empty(n, self.out_features, rank, proto), requires_grad=False)

    def set_stack(self, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> None:
        """Stack table: A (U, r, in), B (U, out, r), per-slot coefficient (U,)."""
        dev, dt = self.bank_A.device, self.bank_A.dtype
        self.stack_rank = a.shape[1]
        self.stack_A = nn.Parameter(a.to(dev, dt), requires_grad=False)
        self.stack_B = nn.Parameter(b.to(dev, dt), requires_grad=False)
        self.stack_scale = scale.to(dev, dt)

    def set_fused(self, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> None:
        dev, dt = self.bank_A.device, self.bank_A.dtype
        self.fused_A, self.fused_B, self.fused_scale = a.to(dev, dt), b.to(dev, dt), scale.to(dev, dt)

    # -- forward: the engine's backend (mta.decoding.routing) ----------------------------------
    def clear_cache(self) -> None:
        self._cache = None

    def tables(self) -> tuple[torch.Tensor, ...]:
        """Every table the layer's adapters are read from, in ``TABLES``' order (the stack
        tables last), read from the module's own dicts: ``Module.__getattr__`` per table made
        this a host cost at every join (``mta.decoding.fixed.tables_state``)."""
        own = {**self._parameters, **self._buffers}
        return tuple(own[n] for n in TABLES)

    def stack_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``stack_A``, ``stack_B`` and ``stack_scale``, read as ``tables`` reads them."""
        own = {**self._parameters, **self._buffers}
        return own["stack_A"], own["stack_B"], own["stack_scale"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._backend_ref[0].forward(self, x)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, anchors={self.bank_A.shape[0]}, "
                f"rank={self.rank}, alpha={self.alpha}, users={self.stack_A.shape[0]}, "
                f"stack_rank={self.stack_rank}, compute={self.compute_dtype}")
