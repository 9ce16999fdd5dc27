"""The adapter engine: one frozen base model, a bank of anchor LoRAs, per-user tables,
and per-row routing so that many users share every forward pass.

An engine is injected into a model ONCE (``AdapterEngine(model, spec)``); its tables
(bank, fused, stack) are then replaced as often as needed, never the layers. Misuse of
this API (a slot out of range, a row that does not match its weights) raises
``ValueError``: it is a bug of the caller, not a user error.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from mta.decoding.routing import GATHERED, Backend, Routing, unfold
from mta.engine.config import LLAMA_TARGETS
from mta.engine.fingerprint import model_fingerprint
from mta.engine.layer import BankLoRALinear
from mta.errors import MtaError
from mta.fusion import check_weights, merge_svd

log = logging.getLogger(__name__)
STACK_LOG = 1024  # stack loads remembered (``AdapterEngine.stack_loads``)

# All linear projections of a Llama-style block (what the reference trains).
Tensors = dict[str, tuple[torch.Tensor, torch.Tensor]]
INJECTIONS = {"count": 0}  # engines built in this process (tests check one per model)


@dataclass(frozen=True)
class Row:
    """What one batch row uses. ``anchors``/``weights``: its top-k bank mixture, merged
    exactly (empty = none); ``fused``: a fused-table slot (factor or svd merges);
    ``user``: a stack-table slot; ``active=False``: the base model only."""

    anchors: Sequence[int] = ()
    weights: Sequence[float] = ()
    user: int | None = None
    fused: int | None = None
    active: bool = True


@dataclass
class EngineSpec:
    n_anchors: int = 0
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = LLAMA_TARGETS
    dtype: torch.dtype = torch.float32          # adapter master weights
    compute_dtype: torch.dtype | None = None    # adapter matmuls (None: dtype)

    def __post_init__(self) -> None:
        if self.n_anchors < 0:
            raise ValueError(f"n_anchors must be >= 0, got {self.n_anchors}")
        if self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if not self.target_modules:
            raise ValueError("target_modules is empty")


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host tensor ``t`` on ``device`` without waiting for the work queued there: on CUDA
    through pinned memory, copied asynchronously (a copy from pageable memory waits for the
    stream to drain first, so one such copy between two decode steps would hold the host
    until the step in flight ends; torch keeps the pinned block until the copy is done)."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


def linear_module_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def block_index(name: str) -> int | None:
    """The transformer block a module belongs to (``model.layers.12.mlp.up_proj`` -> 12)."""
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _kaiming_uniform(shape, gen: torch.Generator) -> torch.Tensor:
    # nn.init.kaiming_uniform_(a=sqrt(5)) on a (rank, in) matrix: bound = 1/sqrt(in).
    bound = 1.0 / math.sqrt(shape[-1])
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def _check_slots(anchors: Sequence[int], weights: Sequence[float], n: int) -> None:
    """A mixture's shape: as many weights as anchors (at least one), each anchor a slot of a
    bank of ``n``."""
    if len(anchors) != len(weights) or not anchors:
        raise ValueError(f"a mixture needs as many weights as anchors (at least one); got {len(anchors)} "
                         f"anchors and {len(weights)} weights")
    if not all(0 <= a < n for a in anchors):
        raise ValueError(f"anchor slots {list(anchors)} out of range (bank has {n})")


class AdapterEngine:
    """Inject bank layers into ``model`` (in place) and route rows through them.

    The base model's parameters are frozen. ``remove()`` puts the original linear
    modules back, leaving the model exactly as it was.
    """

    def __init__(self, model: nn.Module, spec: EngineSpec):
        self.model = model
        self.spec = spec
        self.fingerprint = model_fingerprint(model)  # of the base weights, before injection
        self._routing: list[Routing | None] = [None]
        self._backend: list[Backend] = [GATHERED]
        self.layers: dict[str, BankLoRALinear] = {}
        names = linear_module_names(model)
        wanted = set(spec.target_modules)
        chosen = [n for n in names if n.rsplit(".", 1)[-1] in wanted and not n.endswith("lm_head")]
        found_suffixes = {n.rsplit(".", 1)[-1] for n in chosen}
        missing = sorted(wanted - found_suffixes)
        if missing:
            available = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise MtaError(f"unknown target module(s) {missing}; this model's linear modules: {available}",
                           ("BankConfig.target_modules",))
        for p in model.parameters():
            p.requires_grad_(False)
        for name in chosen:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = BankLoRALinear(getattr(parent, child), self._routing, self._backend, dtype=spec.dtype,
                                   compute_dtype=spec.compute_dtype)
            setattr(parent, child, layer)
            self.layers[name] = layer
        INJECTIONS["count"] += 1
        self.owner: object | None = None  # who filled the bank table (a LoadedBank), for reuse checks
        self.slot_lora: list[tuple[int, float]] = []  # per stack slot: (its own rank, alpha)
        # the slots ``load_user`` wrote, each with the stack tables' versions after it: a
        # chain of loads with nothing else writing the stack tables in between (``stack_loads``)
        self._stack_log: list[tuple[int | None, tuple[int, ...]]] = []
        self.set_bank(spec.n_anchors, spec.rank, spec.alpha)
        log.info("injected %d layers (%s)", len(self.layers), ", ".join(sorted(found_suffixes)))

    # -- structure --------------------------------------------------------------------------
    @property
    def n_anchors(self) -> int:
        return max(ly.bank_A.shape[0] for ly in self.layers.values())

    @property
    def bank_layers(self) -> dict[str, BankLoRALinear]:
        """The injected layers that carry a bank table."""
        return {n: ly for n, ly in self.layers.items() if ly.bank_A.shape[0]}

    @property
    def n_users(self) -> int:
        return max(ly.stack_A.shape[0] for ly in self.layers.values())

    @property
    def stack_layers(self) -> dict[str, BankLoRALinear]:
        """The injected layers that carry a stack table."""
        return {n: ly for n, ly in self.layers.items() if ly.stack_A.shape[0]}

    @property
    def device(self) -> torch.device:
        return next(iter(self.layers.values())).bank_A.device

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(sorted({n.rsplit(".", 1)[-1] for n in self.layers}))

    def remove(self) -> nn.Module:
        """Restore the original linear modules; the engine is unusable afterwards."""
        for name, layer in self.layers.items():
            unfold(layer)  # the base weight back in storage of its own
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, layer.base)
        self.layers = {}
        self._routing[0] = None
        self._backend[0] = GATHERED
        return self.model

    # -- the bank ------------------------------------------------------------------------------
    def set_bank(self, n_anchors: int, rank: int, alpha: float, modules: Sequence[str] | None = None) -> None:
        """(Re)allocate the bank table: ``n_anchors`` zero slots of rank ``rank`` on the
        injected layers whose name ends in one of ``modules`` (default: all)."""
        if n_anchors < 0 or rank < 1 or not alpha > 0:
            raise ValueError(f"bank needs anchors >= 0, rank >= 1, alpha > 0; got {n_anchors}, {rank}, {alpha}")
        short = {n.rsplit(".", 1)[-1] for n in self.layers}
        if modules is not None and (not modules or set(modules) - short):
            raise MtaError(f"bank target modules {sorted(set(modules) - short) or '(none)'} are not among the "
                           f"injected layers {sorted(short)}", ("BankConfig.target_modules",))
        for name, layer in self.layers.items():
            on = modules is None or name.rsplit(".", 1)[-1] in modules
            layer.set_bank(n_anchors if on else 0, rank, alpha)
        self.spec.n_anchors, self.spec.rank, self.spec.alpha = n_anchors, rank, float(alpha)

    def init_bank(self, seed: int = 0, b_std: float = 0.0, slots: Sequence[int] | None = None) -> None:
        """PEFT's LoRA init: A ~ kaiming-uniform(a=sqrt(5)), B = 0 (or N(0, b_std) for tests)."""
        gen = torch.Generator().manual_seed(seed)
        slots = range(self.n_anchors) if slots is None else slots
        with torch.no_grad():
            for layer in self.bank_layers.values():  # (drawn in this order: the same values as ever)
                dst, src = [], []
                for s in slots:
                    dst += [layer.bank_A[s], layer.bank_B[s]]
                    src += [_kaiming_uniform(layer.bank_A[s].shape, gen),
                            torch.randn(layer.bank_B[s].shape, generator=gen) * b_std]
                copy_in(dst, src)  # a layer's slots in one transfer

    # -- stacked adapters -------------------------------------------------------------------------
    def stack_selection(self, modules: Sequence[str] | None = None, last_layers: int | None = None) -> list[str]:
        """Injected layers that get a stacked adapter: those whose name ends in one of
        ``modules`` (all by default) within the last ``last_layers`` blocks (0, None, or
        at least the model's block count: all blocks)."""
        short = {n.rsplit(".", 1)[-1] for n in self.layers}
        if modules is not None:
            unknown = sorted(set(modules) - short)
            if unknown or not modules:
                raise MtaError(f"stack target modules {unknown or '(none)'} are not among the injected layers "
                               f"{sorted(short)}", ("AdaptConfig.stack_targets",))
        blocks = sorted({b for b in map(block_index, self.layers) if b is not None})
        if last_layers is not None and last_layers < 0:
            raise ValueError(f"last_layers must be >= 0 (0 = all blocks), got {last_layers}")
        keep = set(blocks[-last_layers:]) if last_layers else None
        return [n for n in self.layers
                if (modules is None or n.rsplit(".", 1)[-1] in modules)
                and (keep is None or block_index(n) in keep)]

    def add_users(self, n_users: int, rank: int, alpha: float, seed: int = 0, b_std: float = 0.0,
                  modules: Sequence[str] | None = None, last_layers: int | None = None) -> None:
        """(Re)allocate the stack table for ``n_users`` users of rank ``rank``, freshly
        initialised for training, on the layers of ``stack_selection(modules, last_layers)``."""
        if n_users < 0 or rank < 1 or not alpha > 0:
            raise ValueError(f"stack needs users >= 0, rank >= 1, alpha > 0; got {n_users}, {rank}, {alpha}")
        chosen = set(self.stack_selection(modules, last_layers))
        gen = torch.Generator().manual_seed(seed)
        for name, layer in self.layers.items():
            n_here = n_users if name in chosen else 0
            a = torch.stack([_kaiming_uniform((rank, layer.in_features), gen) for _ in range(n_here)]) \
                if n_here else torch.zeros(0, rank, layer.in_features)
            b = torch.randn(n_here, layer.out_features, rank, generator=gen) * b_std
            layer.set_stack(a, b, torch.full((n_here,), alpha / rank))
        self.slot_lora = [(rank, float(alpha))] * n_users

    def alloc_stacks(self, n_slots: int, rank: int, layers: Sequence[str]) -> None:
        """An all-zero stack table of ``n_slots`` slots of rank ``rank`` on ``layers``, to be
        filled by ``load_user`` (users of lower rank, or on fewer layers, are zero-padded:
        zero directions add nothing, so the padding is exact)."""
        unknown = sorted(set(layers) - set(self.layers))
        if unknown:
            raise ValueError(f"stack layers not injected: {unknown[:3]}")
        chosen = set(layers)
        for name, layer in self.layers.items():
            n_here = n_slots if name in chosen else 0
            # made where the table lives: zeros on the host first were the table's bytes twice,
            # and a copy (8.8 GiB for 256 OPPU slots at 1.5B, docs/architecture.md)
            like = {"device": layer.bank_A.device, "dtype": layer.bank_A.dtype}
            layer.set_stack(torch.zeros(n_here, rank, layer.in_features, **like),
                            torch.zeros(n_here, layer.out_features, rank, **like), torch.zeros(n_here, **like))
        self.slot_lora = [(rank, 0.0)] * n_slots

    # -- fused per-user factors (merges that are not the exact sum) ---------------------------------
    def install_fused(self, mixtures: Sequence[tuple], merge: str | None = None, svd_rank: int | None = None) -> None:
        """Fused-table slot u := mixture u's merged factors, per layer.

        A mixture is ``(anchors, weights)`` (merged with ``merge``/``svd_rank``) or
        ``(anchors, weights, merge, svd_rank)``. ``factor`` (the reference's merge):
        ((sum w_i B_i), (sum w_i A_i)) with the bank's alpha/r; ``svd``: the
        rank-``svd_rank`` truncation of the exact sum, alpha/r folded in. Slots of lower
        rank are zero-padded (exact). Rows then use ``Row(fused=u)``. The exact ``delta``
        merge needs no table.
        """
        specs = [(tuple(m[0]), tuple(m[1]), m[2] if len(m) > 2 else merge, m[3] if len(m) > 3 else svd_rank)
                 for m in mixtures]
        for anchors, weights, how, rank in specs:
            if how not in ("factor", "svd"):
                raise ValueError(f"install_fused handles factor and svd merges, got {how!r}")
            if how == "svd" and not rank:
                raise ValueError("an svd merge needs its rank")
            self._check_mixture(anchors, weights, how)
        factor_slots = [u for u, sp in enumerate(specs) if sp[2] == "factor"]
        for layer in self.layers.values():
            parts: list[tuple[torch.Tensor, torch.Tensor, float] | None] = [None] * len(specs)
            if layer.bank_A.shape[0] and factor_slots:
                # all factor merges in one batched einsum (the same arithmetic as a routed row)
                k = max(len(specs[u][0]) for u in factor_slots)  # shorter mixtures pad with weight 0
                idx = torch.tensor([list(specs[u][0]) + [0] * (k - len(specs[u][0])) for u in factor_slots],
                                   dtype=torch.long, device=self.device)
                w = torch.tensor([list(specs[u][1]) + [0.0] * (k - len(specs[u][1])) for u in factor_slots],
                                 dtype=layer.bank_A.dtype, device=self.device)
                with torch.no_grad():
                    a = torch.einsum("bk,bkri->bri", w, layer.bank_A[idx])
                    b = torch.einsum("bk,bkor->bor", w, layer.bank_B[idx])
                for j, u in enumerate(factor_slots):
                    parts[u] = (a[j], b[j], layer.scale)
            for u, (anchors, weights, how, rank) in enumerate(specs):
                if how == "svd" and layer.bank_A.shape[0]:
                    wt = torch.tensor(list(weights), dtype=torch.float64)
                    a, b = merge_svd(layer.bank_A[list(anchors)].detach().double(),
                                     layer.bank_B[list(anchors)].detach().double(), wt, rank)
                    parts[u] = (a * layer.scale, b, 1.0)
            width = max((p[0].shape[0] for p in parts if p is not None), default=0)
            ta = torch.zeros(len(specs), width, layer.in_features, dtype=layer.bank_A.dtype)
            tb = torch.zeros(len(specs), layer.out_features, width, dtype=layer.bank_A.dtype)
            scale = torch.zeros(len(specs))
            for u, p in enumerate(parts):
                if p is not None:
                    ta[u, :p[0].shape[0]] = p[0].to(ta.dtype).cpu()
                    tb[u, :, :p[1].shape[1]] = p[1].to(tb.dtype).cpu()
                    scale[u] = p[2]
            layer.set_fused(ta, tb, scale)

    def clear_fused(self) -> None:
        for layer in self.layers.values():
            layer.set_fused(layer.fused_A[:0], layer.fused_B[:0], layer.fused_scale[:0])

    def _check_mixture(self, anchors: Sequence[int], weights: Sequence[float], merge: str) -> None:
        _check_slots(anchors, weights, self.n_anchors)
        check_weights(torch.tensor(list(weights), dtype=torch.float64), merge)

    # -- trainable parameters ------------------------------------------------------------------------
    def bank_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.bank_layers.values() for p in (layer.bank_A, layer.bank_B)]

    def stack_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.stack_layers.values() for p in (layer.stack_A, layer.stack_B)]

    def table_names(self) -> dict[int, str]:
        """id of every bank and stack table -> '<layer> <table> A|B', for messages."""
        return {id(t): f"{n} {kind} {ab}" for n, ly in self.layers.items()
                for kind, pair in (("bank", (ly.bank_A, ly.bank_B)), ("stack", (ly.stack_A, ly.stack_B)))
                for ab, t in zip("AB", pair)}

    def trainable(self, what: str | None) -> list[nn.Parameter]:
        """Make only the bank, only the stack table, or nothing trainable; return those params."""
        for p in self.bank_parameters() + self.stack_parameters():
            p.requires_grad_(False)
        params = {"bank": self.bank_parameters, "stack": self.stack_parameters}.get(what, list)()
        for p in params:
            p.requires_grad_(True)
        return params

    # -- per-adapter tensors ------------------------------------------------------------------------
    def anchor_tensors(self, slot: int) -> Tensors:
        return {n: (ly.bank_A[slot].detach().clone(), ly.bank_B[slot].detach().clone())
                for n, ly in self.bank_layers.items()}

    def load_anchor(self, slot: int, tensors: Tensors) -> None:
        """Write one anchor's factors into bank slot ``slot``, every check first."""
        self._check_modules(tensors, self.bank_layers, "the bank")
        for name, (a, b) in tensors.items():
            ly = self.layers[name]
            _check_shapes(name, a, b, ly.bank_A.shape, ly.bank_B.shape, slot)
        check_finite(tensors)
        with torch.no_grad():
            dst = [t for name in tensors for t in (self.layers[name].bank_A[slot], self.layers[name].bank_B[slot])]
            copy_in(dst, [t for ab in tensors.values() for t in ab])

    def user_tensors(self, slot: int) -> Tensors:
        """The slot's stacked factors at the slot's own rank."""
        r = self.slot_lora[slot][0]
        return {n: (ly.stack_A[slot, :r].detach().clone(), ly.stack_B[slot, :, :r].detach().clone())
                for n, ly in self.stack_layers.items()}

    def load_user(self, slot: int, tensors: Tensors, alpha: float | None = None, checked: bool = False) -> None:
        """Write one user's stacked adapter into stack slot ``slot``. Factors of a lower rank
        than the table are zero-padded; table layers the adapter lacks are zeroed. With
        ``alpha``, the slot's coefficient becomes alpha / (the adapter's rank). Every check
        comes before the first write (a refused adapter leaves the slot as it was). The
        factors must be finite; ``checked``: the caller has checked that (the server's
        read-ahead does, on its reader thread). The writes are a few multi-tensor operations,
        not one per layer: this runs on a server's decode loop, where each torch call is a
        host cost (at Llama-3-8B shape the stack layers are 56 to 224)."""
        table = self.stack_layers
        rank = next(iter(tensors.values()))[0].shape[0] if tensors else 0
        scale = None if alpha is None else alpha / rank
        self._check_modules(tensors, table, "the stack table", subset=True)
        before = self.stack_versions()
        dst, src, zero, scales = [], [], [], []
        for name, ly in table.items():
            own = ly._parameters  # (Module.__getattr__ per table: a host cost of every load)
            ta, tb = own["stack_A"], own["stack_B"]
            if name in tensors:
                a, b = tensors[name]
                r = a.shape[0]
                if r > ly.stack_rank:
                    raise ValueError(f"{name}: stacked rank {r} exceeds the table's {ly.stack_rank}")
                _check_shapes(name, a, b, (ta.shape[0], r, ta.shape[2]), (tb.shape[0], tb.shape[1], r), slot)
                if r < ly.stack_rank:  # the directions past the user's rank: zero
                    zero += [ta[slot, r:], tb[slot, :, r:]]
                dst += [ta[slot, :r], tb[slot, :, :r]]
                src += [a, b]
            else:
                if not 0 <= slot < ta.shape[0]:
                    raise ValueError(f"slot {slot} out of range (0..{ta.shape[0] - 1})")
                zero += [ta[slot], tb[slot]]
            if scale is not None:
                scales.append(ly._buffers["stack_scale"][slot:slot + 1])
        if not checked:
            check_finite(tensors)
        with torch.no_grad():
            if zero:
                torch._foreach_zero_(zero)
            # a read-ahead stack (pinned: ResidentStacks.prefetch) without waiting for the step
            # in flight; one read from the store at its load (answering) in one transfer
            copy_in(dst, src)
            if scales:
                one = torch.full((1,), scale, dtype=scales[0].dtype, device=scales[0].device)
                torch._foreach_copy_(scales, [one] * len(scales))
        if alpha is not None:
            self.slot_lora[slot] = (rank, float(alpha))
        self._log_load(slot, before)

    # -- which stack slots changed (a fixed layout's dense tables catch up on those alone) ----------
    def stack_versions(self) -> tuple[int, ...]:
        """The version counters of every layer's stack tables (an in-place write moves them)."""
        return tuple(t._version for ly in self.layers.values() for t in ly.stack_tables())

    def _log_load(self, slot: int, before: tuple[int, ...]) -> None:
        if not self._stack_log or self._stack_log[-1][1] != before:  # something else wrote them: a new chain
            self._stack_log = [(None, before)]
        elif len(self._stack_log) > STACK_LOG:  # the newer half kept (an older state gets a whole refill)
            keep = self._stack_log[-(STACK_LOG // 2):]
            self._stack_log = [(None, keep[0][1]), *keep[1:]]
        self._stack_log.append((slot, self.stack_versions()))

    def stack_loads(self, versions: tuple[int, ...], now: tuple[int, ...] | None = None) -> list[int] | None:
        """The slots ``load_user`` wrote since the stack tables had ``versions``
        (``stack_versions``), when those loads are all that wrote them since; None when
        anything else did (training, a direct write) or the log no longer reaches back.
        ``now``: ``stack_versions()`` when the caller has just read it."""
        now = self.stack_versions() if now is None else now
        if versions == now:
            return []
        log_ = self._stack_log
        if not log_ or log_[-1][1] != now:
            return None
        for i in range(len(log_) - 1, -1, -1):
            if log_[i][1] == versions:
                return sorted({slot for slot, _ in log_[i + 1:]})
        return None

    @staticmethod
    def _check_modules(tensors: Tensors, expected: dict, what: str, subset: bool = False) -> None:
        missing = [] if subset else sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise MtaError(f"adapter modules do not match {what}: missing {missing[:3]}, unexpected {extra[:3]}")

    # -- routing ---------------------------------------------------------------------------------
    def routing(self, rows: Sequence[Row]) -> Routing:
        """Turn per-row specs into the padded index/weight tensors the layers gather with."""
        dev = self.device
        k = max((len(r.anchors) for r in rows), default=0)
        out = Routing()
        bad = next((i for i, r in enumerate(rows) if r.weights and not r.anchors), None)
        if bad is not None:
            raise ValueError(f"row {bad}: weights without anchors")
        if k:
            # padded lists first, then one tensor each (a join routes every running row: element
            # by element tensor writes and a check tensor per row cost milliseconds a join)
            n = self.n_anchors
            ids, ws = [], []
            for r in rows:
                if r.anchors:
                    _check_slots(r.anchors, r.weights, n)  # (the weights' finiteness: once, below)
                pad = k - len(r.anchors)
                ids.append([*r.anchors, *[0] * pad])
                ws.append([*map(float, r.weights), *[0.0] * pad])
            w64 = torch.tensor(ws, dtype=torch.float64)
            if not torch.isfinite(w64).all():
                raise ValueError("weights contain NaN or inf")
            out.anchor_idx = to_device(torch.tensor(ids, dtype=torch.long), dev)
            out.anchor_w = to_device(w64.to(torch.float32), dev)
        if any(r.user is not None for r in rows):
            users = [(-1 if r.user is None else r.user) for r in rows]
            n = self.n_users
            if max(users) >= n or min(u for u in users if u != -1) < 0:
                raise ValueError(f"user slots {users} out of range (stack table has {n})")
            out.stack_idx = to_device(torch.tensor(users, dtype=torch.long), dev)
        if any(r.fused is not None for r in rows):
            fused = [(-1 if r.fused is None else r.fused) for r in rows]
            n_fused = next(iter(self.layers.values())).fused_A.shape[0]
            if max(fused) >= n_fused:
                raise ValueError(f"fused slots {fused} out of range (fused table has {n_fused})")
            out.fused_idx = to_device(torch.tensor(fused, dtype=torch.long), dev)
        if not all(r.active for r in rows):
            out.active = to_device(torch.tensor([r.active for r in rows], dtype=torch.bool), dev)
        return out

    def set_routing(self, routing: Routing | None) -> None:
        self._routing[0] = routing

    def clear_caches(self) -> None:
        """Forget every layer's gathered per-row factors."""
        for layer in self.layers.values():
            layer.clear_cache()

    @contextlib.contextmanager
    def route(self, rows: Sequence[Row] | Routing, reuse: bool = True) -> Iterator[Routing]:
        """Route the model's rows through ``rows``' adapters inside the block. ``reuse=False``:
        the block runs ONE forward with it (``Routing.reuse``)."""
        rt = rows if isinstance(rows, Routing) else self.routing(rows)
        if not reuse and rt.reuse:
            rt = replace(rt, reuse=False)
        prev = self._routing[0]
        self._routing[0] = rt
        try:
            yield rt
        finally:
            self._routing[0] = prev
            for layer in self.layers.values():  # gathered factors of this routing are dead now
                layer.clear_cache()

    # -- the routing backend (mta.decoding.routing) ------------------------------------------
    @property
    def backend(self) -> Backend:
        """How the layers read their rows' adapters now (``GATHERED`` unless a fixed layout is on)."""
        return self._backend[0]

    def set_backend(self, backend: Backend) -> None:
        """Every layer reads its rows' adapters through ``backend`` from the next forward on."""
        self._backend[0] = backend


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite, by one multi-tensor norm and ONE
    host-device sync (a norm is NaN or inf exactly when an element is, short of an overflow
    of huge finite values: then False, which ``finite`` checks again exactly)."""
    tensors = [t.detach() for t in tensors if t.numel()]
    if not tensors:
        return True
    norms = torch._foreach_norm(tensors)
    try:
        stacked = torch.stack(norms)
    except RuntimeError:  # on different devices
        stacked = torch.stack([n.float().to(norms[0].device) for n in norms])
    return bool(torch.isfinite(stacked).all())


def finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every value of ``tensors`` is finite, exactly: ``all_finite``'s one norm over
    all of them first, and only where that says no (a value not finite, or finite values so
    large that the norm overflows) the exact check a tensor at a time. Before, one
    ``isfinite`` over all of them concatenated: at Llama-3-8B shape (a rank-2 stack on 32
    blocks, 448 factors) in run X (an H100) ``load_user`` took 42.8 ms a load from pinned
    memory with that check and 5.1 ms without it (``results/gpu-2026-12-07/stack-load-8b-32.json``)."""
    try:
        if all_finite(tensors):
            return True
    except RuntimeError:  # (a dtype the norm does not take)
        pass
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _check_shapes(name, a, b, table_a: Sequence[int], table_b: Sequence[int], slot: int) -> None:
    """``a`` and ``b`` fit a slot of tables shaped ``table_a`` (slots, r, in) and ``table_b``
    (slots, out, r), and ``slot`` is one of them (shapes, not tensors: no view made a layer)."""
    if not 0 <= slot < table_a[0]:
        raise ValueError(f"slot {slot} out of range (0..{table_a[0] - 1})")
    if tuple(a.shape) != tuple(table_a[1:]) or tuple(b.shape) != tuple(table_b[1:]):
        raise MtaError(f"{name}: shape mismatch: got A {tuple(a.shape)}, B {tuple(b.shape)}; "
                       f"the engine expects A {tuple(table_a[1:])}, B {tuple(table_b[1:])}")


def copy_in(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for every i in a few multi-tensor operations: from pinned
    host memory without waiting for the device; from pageable host memory to another
    device as one transfer (``host_to_device``), not one waiting copy a tensor."""
    if not dst:
        return
    if (any(s.device != d.device and not s.is_pinned() for s, d in zip(src, dst))
            and len({(d.device, d.dtype) for d in dst}) == 1):
        src = host_to_device(src, dst[0].device, dst[0].dtype)
    torch._foreach_copy_(list(dst), list(src), non_blocking=all(t.is_pinned() for t in src))


def host_to_device(tensors: Sequence[torch.Tensor], device: torch.device | str,
                   dtype: torch.dtype) -> list[torch.Tensor]:
    """``tensors`` (host memory) on ``device`` in ``dtype``, moved as ONE buffer: flattened
    into one host tensor, moved by ``to_device`` (pinned, one copy that waits for nothing),
    views of it out. A copy from pageable host memory waits for the device each time, and a
    stack has two factors a layer (392 at Qwen2.5-1.5B's 196 layers). In run W (H100, four tune processes on the
    card) OPPU's answering spent 64.2 s of its 67.9 loading 28 stored stacks that way, 2.3 s
    a stack; that the waits for the device's turn among the processes made it so is
    inferred (the device was mostly idle meanwhile, run V's nvidia-smi), not profiled."""
    if not tensors:
        return []
    flat = to_device(flat_host(tensors, dtype), device)
    return [v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


# the dtypes numpy holds as torch does (bfloat16 is not among them)
NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8,
                torch.uint8, torch.bool)


def flat_host(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``tensors`` flattened, in order, into one contiguous tensor of ``dtype``. Where they are
    in host memory and numpy holds their one dtype, numpy concatenates them: one
    single-threaded copy. ``torch.cat`` copies each part in its own parallel region, and a
    parallel region waits for its slowest thread, so on a host whose cores other processes
    keep busy every part can wait for a time slice. That this is what made OPPU's 24 stored
    stacks at Qwen2.5-1.5B (392 factors, 37 MB each) take 52 s to load in run AA's evaluation
    beside three other processes, where mta's rank-2 stacks (parts too small to split among
    threads) took 0.6 s, is inferred, not profiled on the GPU host. On this project's 2 CPU
    cores beside 3 busy processes such a stack's ``torch.cat`` took 354 ms a call and this
    26.7 ms (17.3 and 7.4 alone: ``benchmarks/host_concat.py``, docs/serving.md). Parts on a
    device (``copy_in`` from another GPU) go through ``torch.cat`` as before."""
    kinds = {t.dtype for t in tensors}
    if len(kinds) == 1 and next(iter(kinds)) in NUMPY_DTYPES and all(t.device.type == "cpu" for t in tensors):
        flat = torch.from_numpy(np.concatenate([t.detach().reshape(-1).numpy() for t in tensors]))
        return flat if flat.dtype == dtype else flat.to(dtype)
    return torch.cat([t.reshape(-1).to(dtype) for t in tensors])


def device_to_host(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` in host memory, contiguous: those on a device brought back in ONE copy a
    device and dtype (flattened there), not one copy a tensor, each of which waits for the
    device (an adapter's save: two factors a layer), then each cloned out of that buffer
    (safetensors refuses tensors that share a storage); host ones as they are (made
    contiguous), as ``.to("cpu").contiguous()`` leaves them."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.device.type == "cpu":
            out[i] = t.detach().contiguous()
        else:
            groups.setdefault((t.device, t.dtype), []).append(i)
    for idx in groups.values():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx]).cpu()
        for i, v in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            out[i] = v.view(tensors[i].shape).clone()
    return out


def check_finite(tensors: Tensors, why: str = "adapter weights contain NaN or inf") -> None:
    """An MtaError naming the first module whose factors are not all finite, ``why`` after
    its name (one check over every factor first: ``finite``)."""
    if tensors and not finite([t for ab in tensors.values() for t in ab]):
        bad = next(name for name, ab in tensors.items() if not finite(list(ab)))
        raise MtaError(f"{bad}: {why}")
