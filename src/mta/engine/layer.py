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

The tables hold fp32 master weights (``dtype``); the two matmuls run in
``compute_dtype`` (bf16 on a bf16 base by default: the cast is differentiable, so the
gradients still land in the fp32 masters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mta.engine import kernels


@dataclass
class Routing:
    """Per-row selection, shared by every injected layer of one engine.

    anchor_idx: (B, k) bank slots; anchor_w: (B, k) their weights (0 for padding slots).
    fused_idx / stack_idx: (B,) rows into the fused / stack tables, -1 for none.
    active: (B,) False switches the row to the base model alone.
    """

    anchor_idx: torch.Tensor | None = None
    anchor_w: torch.Tensor | None = None
    fused_idx: torch.Tensor | None = None
    stack_idx: torch.Tensor | None = None
    active: torch.Tensor | None = None


# How often a base weight has moved to new storage (the dense layout's fold, unfold): a
# captured CUDA graph reads weights at fixed addresses, so GraphDecoder captures again when
# this moved since its capture (one integer to compare per step, not every parameter)
_WEIGHT_MOVES = [0]


def weight_moves() -> int:
    return _WEIGHT_MOVES[0]


def _empty(n: int, a: int, b: int, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(n, a, b, device=like.device, dtype=like.dtype)


class BankLoRALinear(nn.Module):
    """Wraps an ``nn.Linear``; the wrapped module is kept untouched for removal."""

    def __init__(self, base: nn.Linear, routing_ref: list[Routing | None], dtype: torch.dtype = torch.float32,
                 compute_dtype: torch.dtype | None = None):
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
        self._routing_ref = routing_ref  # a one-element list owned by the engine
        self._cache = None
        # pinned routing (AdapterEngine.pinned): per-row factors in fixed buffers for a
        # compiled / graph-captured decode step; refilled in place for a new batch
        self.register_buffer("pin_A", torch.zeros(0, 0, self.in_features, device=dev), persistent=False)
        self.register_buffer("pin_B", torch.zeros(0, self.out_features, 0, device=dev), persistent=False)
        self.pin_on = False
        # dense routing (AdapterEngine.dense): every table's factors side by side as columns,
        # read once per step by two dense matmuls; a row's mixture is its coefficients over
        # those columns (dense_W), zero where the row does not use a column
        self.register_buffer("dense_A", torch.zeros(0, self.in_features, device=dev), persistent=False)
        self.register_buffer("dense_B", torch.zeros(self.out_features, 0, device=dev), persistent=False)
        self.register_buffer("dense_W", torch.zeros(0, 0, device=dev), persistent=False)
        self.dense_on = False
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

    # -- forward --------------------------------------------------------------------------------
    def _bank_parts(self, rt: Routing):
        idx, w = rt.anchor_idx, rt.anchor_w.to(self.bank_A.dtype)
        bsz, k = idx.shape
        a = self.bank_A[idx].reshape(bsz, k * self.rank, self.in_features)
        b = self.bank_B[idx].permute(0, 2, 1, 3).reshape(bsz, self.out_features, k * self.rank)
        coef = (w * self.scale).repeat_interleave(self.rank, dim=1)
        return a, b, coef

    @staticmethod
    def _table_parts(ta: torch.Tensor, tb: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor):
        safe = idx.clamp(min=0)
        coef = (idx >= 0).to(ta.dtype) * scale[safe]
        return ta[safe], tb[safe], coef[:, None].expand(-1, ta.shape[1])

    def _gathered(self, rt: Routing):
        """(A_row * coef (B, R, in), B_row (B, out, R)) for the rows of ``rt``, or None.

        Without autograd (generation) the result is cached for as long as the routing and
        the adapter tensors are unchanged: a decode step then costs two batched matmuls
        per layer instead of re-gathering every step. The key holds the tensors'
        identities and version counters, so an in-place update (load_user) invalidates it.
        """
        cacheable = not torch.is_grad_enabled()
        if cacheable:  # (never while training: a compiled training layer reads no ids or versions)
            key = (id(rt), id(self.bank_A), self.bank_A._version, self.bank_B._version, id(self.stack_A),
                   self.stack_A._version, self.stack_B._version, self.stack_scale._version, id(self.fused_A))
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
        parts = []
        if rt.anchor_idx is not None and self.bank_A.shape[0]:
            parts.append(self._bank_parts(rt))
        if rt.fused_idx is not None and self.fused_A.shape[0]:
            parts.append(self._table_parts(self.fused_A, self.fused_B, rt.fused_idx, self.fused_scale))
        if rt.stack_idx is not None and self.stack_A.shape[0]:
            parts.append(self._table_parts(self.stack_A, self.stack_B, rt.stack_idx, self.stack_scale))
        if not parts:
            out = None
        else:
            a = torch.cat([p[0] for p in parts], dim=1)          # (B, R, in)
            b = torch.cat([p[1] for p in parts], dim=2)          # (B, out, R)
            coef = torch.cat([p[2] for p in parts], dim=1)       # (B, R)
            if rt.active is not None:
                coef = coef * rt.active.to(coef.dtype)[:, None]
            cd = self.compute_dtype
            out = ((a * coef[:, :, None]).to(cd), b.to(cd))
        if cacheable:
            self._cache = (key, out)
        return out

    def clear_cache(self) -> None:
        self._cache = None

    def pin(self, rt: Routing, rows: int, width: int) -> None:
        """Fill the pin buffers with the rows' factors (zero-padded to ``rows`` x ``width``
        rank directions: zeros add exactly nothing), in place when the shape is unchanged."""
        got = self._gathered(rt)
        cd, dev = self.compute_dtype, self.bank_A.device
        shape_a, shape_b = (rows, width, self.in_features), (rows, self.out_features, width)
        if tuple(self.pin_A.shape) != shape_a or self.pin_A.dtype != cd:
            self.pin_A = torch.zeros(shape_a, device=dev, dtype=cd)
            self.pin_B = torch.zeros(shape_b, device=dev, dtype=cd)
        else:
            self.pin_A.zero_()
            self.pin_B.zero_()
        if got is not None:
            a, b = got
            self.pin_A[:a.shape[0], :a.shape[1]].copy_(a)
            self.pin_B[:b.shape[0], :, :b.shape[2]].copy_(b)
        self.pin_on = True

    def dense_columns(self) -> int:
        """Columns of the dense layout: every anchor's, fused slot's and user's rank directions."""
        return sum(t.shape[0] * t.shape[1] for t in (self.bank_A, self.fused_A, self.stack_A))

    def tables(self) -> tuple[torch.Tensor, ...]:
        """Every table the layer's adapters are read from."""
        return (self.bank_A, self.bank_B, self.fused_A, self.fused_B, self.fused_scale, self.stack_A, self.stack_B,
                self.stack_scale)

    def densify(self, rt: Routing, rows: int, tables: bool = True) -> None:
        """Fill the dense buffers: the tables as columns (anchors, fused slots, users, in
        that order) and each row's coefficients over them, the same coefficients
        ``_gathered`` applies (anchor weight x scale, a slot's scale; 0 for an inactive or
        padding row). In place when the shapes are unchanged. ``tables=False`` refills the
        rows' coefficients only (the caller knows the tables did not change since the last
        fill: ``AdapterEngine.tables_state``)."""
        cd, dev, master = self.compute_dtype, self.bank_A.device, self.bank_A.dtype
        n = self.dense_columns()
        if tables or self.dense_A.shape[0] != n:
            tables_ = [(self.bank_A, self.bank_B), (self.fused_A, self.fused_B), (self.stack_A, self.stack_B)]
            a = torch.cat([ta.reshape(-1, self.in_features) for ta, _ in tables_])
            b = torch.cat([tb.permute(1, 0, 2).reshape(self.out_features, -1) for _, tb in tables_], dim=1)
            if self._foldable(cd):
                self._fold(n)
            elif self._ext is not None:  # no longer foldable (fold_dense turned off): own dense_A again
                self.unfold()
            if tuple(self.dense_A.shape) != (n, self.in_features) or self.dense_A.dtype != cd:
                self.dense_A = a.to(cd).contiguous()
            else:
                self.dense_A.copy_(a)
            if tuple(self.dense_B.shape) != (self.out_features, n) or self.dense_B.dtype != cd:
                self.dense_B = b.to(cd).contiguous()
            else:
                self.dense_B.copy_(b)
        w = torch.zeros(rows, n, dtype=master, device=dev)
        if rt.anchor_idx is not None and self.bank_A.shape[0]:
            idx = rt.anchor_idx
            cols = (idx[:, :, None] * self.rank + torch.arange(self.rank, device=dev)).reshape(idx.shape[0], -1)
            vals = (rt.anchor_w.to(master) * self.scale)[:, :, None].expand(-1, -1, self.rank).reshape(idx.shape[0], -1)
            w[:idx.shape[0]].scatter_add_(1, cols, vals)
        off = self.bank_A.shape[0] * self.rank
        for ta, scale, idx in ((self.fused_A, self.fused_scale, rt.fused_idx), (self.stack_A, self.stack_scale,
                                                                                 rt.stack_idx)):
            r = ta.shape[1]
            if idx is not None and ta.shape[0]:
                safe = idx.clamp(min=0)
                cols = off + safe[:, None] * r + torch.arange(r, device=dev)
                vals = ((idx >= 0).to(master) * scale[safe])[:, None].expand(-1, r)
                w[:idx.shape[0]].scatter_add_(1, cols, vals)
            off += ta.shape[0] * r
        if rt.active is not None:
            w[:rt.active.shape[0]] *= rt.active.to(master)[:, None]
        if tuple(self.dense_W.shape) != (rows, n) or self.dense_W.dtype != cd:
            self.dense_W = w.to(cd)
        else:
            self.dense_W.copy_(w)
        self.dense_on = True

    def _foldable(self, cd: torch.dtype) -> bool:
        """The A columns can ride in the base matmul: a plain bias-free linear whose weight
        is in the adapter compute dtype (a bf16 base with bf16 adapter compute)."""
        w = self.base.weight
        return (self.fold_dense and type(self.base) is nn.Linear and self.base.bias is None
                and w.dtype == cd and not w.requires_grad)

    def _fold(self, n: int) -> None:
        """Make room for ``n`` A columns after the base weight's rows: a new (out + n, in)
        matrix when the column count changed (the base weight copied into its first rows
        and ``base.weight`` made a view of them, so no second copy of the base is held),
        dense_A the view of its last rows (densify fills it)."""
        out = self.out_features
        if self._ext is None or self._ext.shape[0] != out + n:
            w = self.base.weight
            ext = torch.empty(out + n, self.in_features, dtype=w.dtype, device=w.device)
            ext[:out].copy_(w)
            w.data = ext[:out]  # the old storage is freed here
            _WEIGHT_MOVES[0] += 1
            self._ext = ext
        self.dense_A = self._ext[out:]

    def unfold(self) -> None:
        """Give the base weight its own storage again (the engine's removal calls this)."""
        if self._ext is None:
            return
        w = self.base.weight
        w.data = w.data.clone()
        _WEIGHT_MOVES[0] += 1
        self.dense_A = self._ext[self.out_features:].clone()
        self._ext = None

    def _dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dense_W
        if w.shape[0] != x.shape[0]:
            raise RuntimeError(f"routing is set for {w.shape[0]} rows but the batch has {x.shape[0]}")
        if not self.dense_A.shape[0]:  # no table at all: the base layer alone
            return self.base(x)
        if self._ext is not None:  # one GEMM: the base output, then every column's projection
            full = F.linear(x, self._ext)
            flat = full.reshape(-1, full.shape[-1])
            if kernels.usable(flat, w, self.dense_B):  # the mixing, the B side and the add: one kernel
                tokens = x.shape[1] if x.dim() == 3 else 1
                return kernels.dense_mix(flat, w, self.dense_B, tokens).reshape(*x.shape[:-1], self.out_features)
            y, z = full[..., :self.out_features], full[..., self.out_features:]
        else:
            y = self.base(x)
            z = x.to(self.dense_A.dtype) @ self.dense_A.t()        # (..., N): every column's projection
        z = z * (w if x.dim() == 2 else w[:, None, :])             # each row's own mixture
        if torch.compiler.is_compiling():
            # inductor fuses a plain add into the next elementwise kernel (the rotary
            # embedding, the activation, the residual add); an addmm on the strided slice y
            # would copy y into its output first, a kernel more per layer
            return y + (z @ self.dense_B.t()).to(y.dtype)
        if y.dtype == self.dense_B.dtype:  # the add inside the matmul
            return torch.addmm(y.reshape(-1, y.shape[-1]), z.reshape(-1, z.shape[-1]),
                               self.dense_B.t()).reshape(y.shape)
        return y + (z @ self.dense_B.t()).to(y.dtype)

    def width(self, rt: Routing) -> int:
        """Rank directions per row that ``_gathered`` concatenates for ``rt`` (its anchors',
        fused slot's and stack's), read off the shapes without gathering anything."""
        w = 0
        if rt.anchor_idx is not None and self.bank_A.shape[0]:
            w += rt.anchor_idx.shape[1] * self.rank
        if rt.fused_idx is not None and self.fused_A.shape[0]:
            w += self.fused_A.shape[1]
        if rt.stack_idx is not None and self.stack_A.shape[0]:
            w += self.stack_A.shape[1]
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense_on:
            return self._dense_forward(x)
        y = self.base(x)
        if self.pin_on:
            a, b = self.pin_A, self.pin_B
        else:
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
        if y.dtype == b.dtype:  # the add inside the second matmul: one kernel fewer per layer
            out = torch.baddbmm(y.unsqueeze(1) if squeeze else y, z, b.transpose(1, 2))
            return out.squeeze(1) if squeeze else out
        delta = torch.bmm(z, b.transpose(1, 2))
        if squeeze:
            delta = delta.squeeze(1)
        return y + delta.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, anchors={self.bank_A.shape[0]}, "
                f"rank={self.rank}, alpha={self.alpha}, users={self.stack_A.shape[0]}, "
                f"stack_rank={self.stack_rank}, compute={self.compute_dtype}")
