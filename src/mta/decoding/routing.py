"""Per-row adapters: one routing interface, three backends (vLLM's punica wrapper is the
model: ``punica_base`` the interface, ``punica_selector`` the choice).

Every injected layer (``mta.engine.layer.BankLoRALinear``) computes, for row b,
``y_b = W x_b + (row b's adapters) x_b``. HOW the rows' adapters are read is a ``Backend``,
chosen once for the whole engine by whoever runs the model (``AdapterEngine.set_backend``; the
fixed layouts by ``mta.decoding.fixed``), never by the layer, which only calls its
engine's current backend:

- ``GATHERED`` (the default): each row's factors gathered from the tables by the engine's
  current ``Routing``; the only backend that trains.
- ``PINNED``: each row's factors in fixed buffers, zero-padded to one width (exact), for a
  compiled or captured step; a new batch refills them in place.
- ``DENSE``: every table's rank directions as the columns of two dense matrices and each
  row's coefficients over them: fewer bytes per step when many rows share a bank. Where
  the base weight is a plain bf16 linear, the A columns ride in the base GEMM (``_fold``).

The tables and the buffers live on the layer; the code that reads and fills them is here.
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
    reuse: without autograd, each layer keeps its rows' gathered factors for the next forward
    with this routing (generation's decode steps); False for a routing of ONE forward (a
    scoring pass), whose layers then free them as they go: kept, they are every row's copy
    of its adapters in every layer at once (64 rows of a rank-8 task LoRA plus a rank-8
    stack on every layer of Qwen2.5-Coder-1.5B: 2.4 GB in bf16).
    """

    anchor_idx: torch.Tensor | None = None
    anchor_w: torch.Tensor | None = None
    fused_idx: torch.Tensor | None = None
    stack_idx: torch.Tensor | None = None
    active: torch.Tensor | None = None
    reuse: bool = True


# How often a base weight has moved to new storage (the dense layout's fold, unfold): a
# captured CUDA graph reads weights at fixed addresses, so GraphDecoder captures again when
# this moved since its capture (one integer to compare per step, not every parameter)
_WEIGHT_MOVES = [0]


def weight_moves() -> int:
    return _WEIGHT_MOVES[0]


def _bank_parts(layer, rt: Routing):
    idx, w = rt.anchor_idx, rt.anchor_w.to(layer.bank_A.dtype)
    bsz, k = idx.shape
    a = layer.bank_A[idx].reshape(bsz, k * layer.rank, layer.in_features)
    b = layer.bank_B[idx].permute(0, 2, 1, 3).reshape(bsz, layer.out_features, k * layer.rank)
    coef = (w * layer.scale).repeat_interleave(layer.rank, dim=1)
    return a, b, coef


def _table_parts(ta: torch.Tensor, tb: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor):
    safe = idx.clamp(min=0)
    coef = (idx >= 0).to(ta.dtype) * scale[safe]
    return ta[safe], tb[safe], coef[:, None].expand(-1, ta.shape[1])


def gathered(layer, rt: Routing):
    """(A_row * coef (B, R, in), B_row (B, out, R)) for the rows of ``rt``, or None.

    Without autograd (generation) the result is cached for as long as the routing and
    the adapter tensors are unchanged: a decode step then costs two batched matmuls
    per layer instead of re-gathering every step. The key holds the tensors'
    identities and version counters, so an in-place update (load_user) invalidates it. The
    cache holds the routing and the tables themselves and compares them by identity (an
    ``id`` alone could be a dead object's, reused by a new routing of other rows or a new
    table).
    """
    cacheable = rt.reuse and not torch.is_grad_enabled()
    if cacheable:  # (never while training: a compiled training layer reads no ids or versions)
        held = (rt, layer.bank_A, layer.bank_B, layer.stack_A, layer.stack_B, layer.stack_scale, layer.fused_A)
        versions = tuple(t._version for t in held[1:6])
        c = layer._cache
        if c is not None and len(c[0]) == len(held) and all(a is b for a, b in zip(c[0], held)) and c[1] == versions:
            return c[2]
    parts = []
    if rt.anchor_idx is not None and layer.bank_A.shape[0]:
        parts.append(_bank_parts(layer, rt))
    if rt.fused_idx is not None and layer.fused_A.shape[0]:
        parts.append(_table_parts(layer.fused_A, layer.fused_B, rt.fused_idx, layer.fused_scale))
    if rt.stack_idx is not None and layer.stack_A.shape[0]:
        parts.append(_table_parts(layer.stack_A, layer.stack_B, rt.stack_idx, layer.stack_scale))
    if not parts:
        out = None
    else:
        if len(parts) == 1:  # (a bank's training: a cat of one tensor is a copy, three a layer a micro-batch)
            a, b, coef = parts[0]
        else:
            a = torch.cat([p[0] for p in parts], dim=1)      # (B, R, in)
            b = torch.cat([p[1] for p in parts], dim=2)      # (B, out, R)
            coef = torch.cat([p[2] for p in parts], dim=1)   # (B, R)
        if rt.active is not None:
            coef = coef * rt.active.to(coef.dtype)[:, None]
        cd = layer.compute_dtype
        out = ((a * coef[:, :, None]).to(cd), b.to(cd))
    if cacheable:
        layer._cache = (held, versions, out)
    return out


def width(layer, rt: Routing) -> int:
    """Rank directions per row that ``gathered`` concatenates for ``rt`` (its anchors',
    fused slot's and stack's), read off the shapes without gathering anything."""
    w = 0
    if rt.anchor_idx is not None and layer.bank_A.shape[0]:
        w += rt.anchor_idx.shape[1] * layer.rank
    if rt.fused_idx is not None and layer.fused_A.shape[0]:
        w += layer.fused_A.shape[1]
    if rt.stack_idx is not None and layer.stack_A.shape[0]:
        w += layer.stack_A.shape[1]
    return w


def pin(layer, rt: Routing, rows: int, width: int) -> None:
    """Fill the pin buffers with the rows' factors (zero-padded to ``rows`` x ``width``
    rank directions: zeros add exactly nothing), in place when the shape is unchanged."""
    got = gathered(layer, rt)
    cd, dev = layer.compute_dtype, layer.bank_A.device
    shape_a, shape_b = (rows, width, layer.in_features), (rows, layer.out_features, width)
    if tuple(layer.pin_A.shape) != shape_a or layer.pin_A.dtype != cd:
        layer.pin_A = torch.zeros(shape_a, device=dev, dtype=cd)
        layer.pin_B = torch.zeros(shape_b, device=dev, dtype=cd)
    else:
        layer.pin_A.zero_()
        layer.pin_B.zero_()
    if got is not None:
        a, b = got
        layer.pin_A[:a.shape[0], :a.shape[1]].copy_(a)
        layer.pin_B[:b.shape[0], :, :b.shape[2]].copy_(b)


def dense_columns(layer) -> int:
    """Columns of the dense layout: every anchor's, fused slot's and user's rank directions."""
    bank_a, _, fused_a, _, _, stack_a, _, _ = layer.tables()  # (no Module.__getattr__ a table)
    return bank_a.shape[0] * bank_a.shape[1] + fused_a.shape[0] * fused_a.shape[1] + stack_a.shape[0] * stack_a.shape[1]


def dense_layout(layer, rows: int) -> tuple:
    """What a layer's dense coefficients depend on besides the routing: its column layout
    (the tables' slots and ranks, in order), the rows and the dtypes. Layers with the same
    layout share one coefficient buffer (``dense_W``): the scales live in ``dense_B``."""
    bank_a, _, fused_a, _, _, stack_a, _, _ = layer.tables()
    return (rows, layer.rank, bank_a.shape[0], tuple(fused_a.shape[:2]), tuple(stack_a.shape[:2]), bank_a.dtype,
            layer.compute_dtype, bank_a.device)


def dense_coefficients(layer, rt: Routing, rows: int) -> torch.Tensor:
    """Each row's coefficients over the dense columns (anchors, fused slots, users, in that
    order): an anchor's weight, 1 for the row's fused slot and stack, 0 for an inactive or
    padding row. The scales (the bank's, each slot's) are in ``dense_B``'s columns, so the
    coefficients depend on the layer only through ``dense_layout``. (rows, columns), in
    the compute dtype."""
    dev, master = layer.bank_A.device, layer.bank_A.dtype
    w = torch.zeros(rows, dense_columns(layer), dtype=master, device=dev)
    if rt.anchor_idx is not None and layer.bank_A.shape[0]:
        idx = rt.anchor_idx
        cols = (idx[:, :, None] * layer.rank + torch.arange(layer.rank, device=dev)).reshape(idx.shape[0], -1)
        vals = rt.anchor_w.to(master)[:, :, None].expand(-1, -1, layer.rank).reshape(idx.shape[0], -1)
        w[:idx.shape[0]].scatter_add_(1, cols, vals)
    off = layer.bank_A.shape[0] * layer.rank
    for ta, idx in ((layer.fused_A, rt.fused_idx), (layer.stack_A, rt.stack_idx)):
        r = ta.shape[1]
        if idx is not None and ta.shape[0]:
            safe = idx.clamp(min=0)
            cols = off + safe[:, None] * r + torch.arange(r, device=dev)
            w[:idx.shape[0]].scatter_add_(1, cols, (idx >= 0).to(master)[:, None].expand(-1, r))
        off += ta.shape[0] * r
    if rt.active is not None:
        w[:rt.active.shape[0]] *= rt.active.to(master)[:, None]
    return w.to(layer.compute_dtype)


def densify(layer, rt: Routing, rows: int, tables: bool = True, shared: dict | None = None) -> None:
    """Fill the dense buffers: the tables as columns (anchors, fused slots, users, in
    that order; each B column times its scale: the bank's, or its slot's) and each row's
    coefficients over them (``dense_coefficients``). In place when the shapes are
    unchanged. ``tables=False`` refills the rows' coefficients only (the caller knows the
    tables did not change since the last fill: ``mta.decoding.fixed.tables_state``).
    ``shared``: layout -> coefficients already filled for another layer of this fill, which
    this layer's ``dense_W`` then is (one tensor, computed once, for every layer of a layout)."""
    cd = layer.compute_dtype
    n = dense_columns(layer)
    if tables or layer.dense_A.shape[0] != n:
        tables_ = [(layer.bank_A, layer.bank_B, torch.full((layer.bank_A.shape[0],), layer.scale,
                                                            dtype=layer.bank_A.dtype, device=layer.bank_A.device)),
                   (layer.fused_A, layer.fused_B, layer.fused_scale), (layer.stack_A, layer.stack_B, layer.stack_scale)]
        a = torch.cat([ta.reshape(-1, layer.in_features) for ta, _, _ in tables_])
        b = torch.cat([(tb * sc.to(tb.dtype)[:, None, None]).permute(1, 0, 2).reshape(layer.out_features, -1)
                       for _, tb, sc in tables_], dim=1)
        if _foldable(layer, cd):
            _fold(layer, n)
        elif layer._ext is not None:  # no longer foldable (fold_dense turned off): own dense_A again
            unfold(layer)
        if tuple(layer.dense_A.shape) != (n, layer.in_features) or layer.dense_A.dtype != cd:
            layer.dense_A = a.to(cd).contiguous()
        else:
            layer.dense_A.copy_(a)
        if tuple(layer.dense_B.shape) != (layer.out_features, n) or layer.dense_B.dtype != cd:
            layer.dense_B = b.to(cd).contiguous()
        else:
            layer.dense_B.copy_(b)
    # the coefficients through the buffer dict (a refill after every join: Module.__setattr__
    # and __getattr__ were most of its host time, at every layer)
    bufs = layer._buffers
    key = dense_layout(layer, rows)
    if shared is not None and key in shared:
        bufs["dense_W"] = shared[key]
        return
    w = dense_coefficients(layer, rt, rows)
    mine = bufs["dense_W"]
    claimed = shared is not None and any(t is mine for t in shared.values())  # another layout's now
    if tuple(mine.shape) != (rows, n) or mine.dtype != cd or claimed:
        bufs["dense_W"] = mine = w
    else:
        mine.copy_(w)
    if shared is not None:
        shared[key] = mine


def densify_stack_slots(layer, slots: list[int]) -> None:
    """Write stack slots ``slots`` into the dense tables a ``densify`` filled: each slot's A
    rows and its B columns times the slot's scale, where ``densify`` puts them (after the
    anchors' and the fused slots' columns, slot after slot), in place (a captured step reads
    the same tensors). For tables that changed in those slots alone (users' stacks loaded,
    usually one or a few: a slice each, a few operations a layer)."""
    bank_a, _, fused_a, _, _, stack_a, stack_b, stack_scale = layer.tables()  # (no Module.__getattr__ a table)
    dense_a, dense_b = layer._buffers["dense_A"], layer._buffers["dense_B"]
    r = stack_a.shape[1]
    if not r or not dense_a.shape[0]:
        return
    off = bank_a.shape[0] * layer.rank + fused_a.shape[0] * fused_a.shape[1]
    for slot in slots:
        c = off + slot * r
        dense_a[c:c + r].copy_(stack_a[slot])
        # (computed in the tables' dtype and rounded once to the compute dtype, as densify does)
        torch.mul(stack_b[slot], stack_scale[slot].to(stack_b.dtype), out=dense_b[:, c:c + r])


def _foldable(layer, cd: torch.dtype) -> bool:
    """The A columns can ride in the base matmul: a plain bias-free linear whose weight
    is in the adapter compute dtype (a bf16 base with bf16 adapter compute)."""
    w = layer.base.weight
    return (layer.fold_dense and type(layer.base) is nn.Linear and layer.base.bias is None
            and w.dtype == cd and not w.requires_grad)


def _fold(layer, n: int) -> None:
    """Make room for ``n`` A columns after the base weight's rows: a new (out + n, in)
    matrix when the column count changed (the base weight copied into its first rows
    and ``base.weight`` made a view of them, so no second copy of the base is held),
    dense_A the view of its last rows (densify fills it)."""
    out = layer.out_features
    if layer._ext is None or layer._ext.shape[0] != out + n:
        w = layer.base.weight
        ext = torch.empty(out + n, layer.in_features, dtype=w.dtype, device=w.device)
        ext[:out].copy_(w)
        w.data = ext[:out]  # the old storage is freed here
        _WEIGHT_MOVES[0] += 1
        layer._ext = ext
    layer.dense_A = layer._ext[out:]


def unfold(layer) -> None:
    """Give the base weight its own storage again (the engine's removal calls this)."""
    if layer._ext is None:
        return
    w = layer.base.weight
    w.data = w.data.clone()
    _WEIGHT_MOVES[0] += 1
    layer.dense_A = layer._ext[layer.out_features:].clone()
    layer._ext = None


def tune_kernel(engine) -> int:
    """Time the dense kernel's tile choice now (``kernels.tune``) for every folded dense
    layer's (outputs, columns), in its tables' dtype: a server's warm-up, so that no
    prefill of a new size times it under requests. Returns the launches made."""
    shapes, dtype, device = set(), None, None
    for layer in engine.layers.values():
        b = layer._buffers["dense_B"]
        if layer._ext is not None and b.shape[1]:
            shapes.add(tuple(b.shape))
            dtype, device = b.dtype, b.device
    return kernels.tune(shapes, dtype, device) if shapes else 0


def dense_forward(layer, x: torch.Tensor) -> torch.Tensor:
    # the buffers from the module's dict: each ``layer.dense_*`` is a Module.__getattr__ call,
    # a host cost of every eager forward (a joining group's prefill) at every layer
    bufs = layer._buffers
    w, dense_a, dense_b = bufs["dense_W"], bufs["dense_A"], bufs["dense_B"]
    if w.shape[0] != x.shape[0]:
        raise RuntimeError(f"routing is set for {w.shape[0]} rows but the batch has {x.shape[0]}")
    if not dense_a.shape[0]:  # no table at all: the base layer alone
        return layer.base(x)
    if layer._ext is not None:  # one GEMM: the base output, then every column's projection
        full = F.linear(x, layer._ext)
        flat = full.reshape(-1, full.shape[-1])
        if kernels.usable(flat, w, dense_b):  # the mixing, the B side and the add: one kernel
            tokens = x.shape[1] if x.dim() == 3 else 1
            return kernels.dense_mix(flat, w, dense_b, tokens).reshape(*x.shape[:-1], layer.out_features)
        y, z = full[..., :layer.out_features], full[..., layer.out_features:]
    else:
        y = layer.base(x)
        z = x.to(dense_a.dtype) @ dense_a.t()        # (..., N): every column's projection
    z = z * (w if x.dim() == 2 else w[:, None, :])             # each row's own mixture
    if torch.compiler.is_compiling():
        # inductor fuses a plain add into the next elementwise kernel (the rotary
        # embedding, the activation, the residual add); an addmm on the strided slice y
        # would copy y into its output first, a kernel more per layer
        return y + (z @ dense_b.t()).to(y.dtype)
    # y is a view of the one GEMM's own output, or the base's output: the sum goes into it
    # (``_add_rows``: an out-of-place addmm copies y first, a kernel a layer a step)
    into_y = layer._ext is not None or _own_output(layer)
    if y.dtype == dense_b.dtype:  # the add inside the matmul
        flat_y = y.reshape(-1, y.shape[-1])  # (a view here; were it a copy, the sum is still returned)
        zz = z.reshape(-1, z.shape[-1])
        out = flat_y.addmm_(zz, dense_b.t()) if into_y else torch.addmm(flat_y, zz, dense_b.t())
        return out.view(y.shape)
    return y.add_((z @ dense_b.t()).to(y.dtype)) if into_y else y + (z @ dense_b.t()).to(y.dtype)


def _add_rows(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, into_y: bool = False) -> torch.Tensor:
    """``y`` plus each row's ``x @ a_row.T @ b_row.T``: two batched matmuls (the add inside
    the second one when the dtypes allow). ``into_y``: the sum is written into ``y`` itself
    (the caller's own fresh output that nothing saved for a backward pass), which spares the
    copy of ``y`` an out-of-place ``baddbmm`` makes first: a copy as large as the layer's
    output, a layer a forward (run Y's bank profile counted 39,401 device-to-device copies
    in two steps; which of them were these, it does not say)."""
    if a.shape[0] != x.shape[0]:
        raise RuntimeError(f"routing is set for {a.shape[0]} rows but the batch has {x.shape[0]}")
    squeeze = x.dim() == 2
    h = x.unsqueeze(1) if squeeze else x
    h = h.to(a.dtype)
    z = torch.bmm(h, a.transpose(1, 2))
    if y.dtype == b.dtype:  # the add inside the second matmul: one kernel fewer per layer
        y3 = y.unsqueeze(1) if squeeze else y
        if into_y:
            y3.baddbmm_(z, b.transpose(1, 2))
            return y
        out = torch.baddbmm(y3, z, b.transpose(1, 2))
        return out.squeeze(1) if squeeze else out
    delta = torch.bmm(z, b.transpose(1, 2))
    if squeeze:
        delta = delta.squeeze(1)
    return y.add_(delta.to(y.dtype)) if into_y else y + delta.to(y.dtype)


def _own_output(layer) -> bool:
    """Whether the base layer's output may be written in place: a plain ``nn.Linear``
    saves its input and weight for the backward pass, never its output (another module
    might; autograd would then refuse the backward, so only the plain one is trusted)."""
    return type(layer.base) is torch.nn.Linear


class Backend:
    """How an injected layer reads its rows' adapters: ``forward(layer, x)`` is the layer's
    output for ``x``, the base output plus every row's own adapters."""

    name = ""

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Gathered(Backend):
    """Each row's factors gathered from the tables by the engine's current ``Routing``
    (cached while nothing changes and no gradient is taken); no routing: the base model.
    Training and the eager decoders."""

    name = "gathered"

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        y = layer.base(x)
        rt = layer._routing_ref[0]
        if rt is None:
            return y
        got = gathered(layer, rt)
        if got is None:
            return y
        return _add_rows(x, y, *got, into_y=_own_output(layer))


class Pinned(Backend):
    """Each row's factors in fixed buffers (``pin`` fills them): a captured step's routing."""

    name = "pinned"

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        return _add_rows(x, layer.base(x), layer.pin_A, layer.pin_B, into_y=_own_output(layer))


class Dense(Backend):
    """Every table as columns, each row's coefficients over them (``densify`` fills them):
    a captured step's routing when it reads fewer bytes than ``Pinned``."""

    name = "dense"

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        return dense_forward(layer, x)


GATHERED, PINNED, DENSE = Gathered(), Pinned(), Dense()
