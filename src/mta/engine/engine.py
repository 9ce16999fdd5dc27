"""The adapter engine: one frozen base model, a bank of anchor LoRAs, per-user tables,
and per-row routing so that many users share every forward pass."""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mta.engine.layer import BankLoRALinear, Routing
from mta.errors import MtaError
from mta.fusion import MERGE_MODES, check_weights

log = logging.getLogger(__name__)

# All linear projections of a Llama-style block (what the reference trains).
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Row:
    """What one batch row uses. ``anchors``/``weights``: its top-k bank mixture (empty =
    none); ``user``: stack-table slot or None; ``fused``: fused-table slot or None;
    ``active=False``: base model only."""

    anchors: Sequence[int] = ()
    weights: Sequence[float] = ()
    user: int | None = None
    fused: int | None = None
    active: bool = True


@dataclass
class EngineSpec:
    n_anchors: int
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = LLAMA_TARGETS
    dtype: torch.dtype = torch.float32
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_anchors < 0:
            raise MtaError(f"n_anchors must be >= 0, got {self.n_anchors}")
        if self.rank < 1:
            raise MtaError(f"rank must be a positive integer, got {self.rank}")
        if not self.alpha > 0:
            raise MtaError(f"alpha must be positive, got {self.alpha}")
        if not self.target_modules:
            raise MtaError("target_modules is empty")


def linear_module_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def block_index(name: str) -> int | None:
    """The transformer block a module belongs to (``model.layers.12.mlp.up_proj`` -> 12)."""
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


class AdapterEngine:
    """Inject bank layers into ``model`` (in place) and route rows through them.

    The base model's parameters are frozen. ``remove()`` puts the original linear
    modules back, leaving the model exactly as it was.
    """

    def __init__(self, model: nn.Module, spec: EngineSpec):
        self.model = model
        self.spec = spec
        self._routing: list[Routing | None] = [None]
        self.layers: dict[str, BankLoRALinear] = {}
        names = linear_module_names(model)
        wanted = set(spec.target_modules)
        chosen = [n for n in names if n.rsplit(".", 1)[-1] in wanted and not n.endswith("lm_head")]
        found_suffixes = {n.rsplit(".", 1)[-1] for n in chosen}
        missing = sorted(wanted - found_suffixes)
        if missing:
            available = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise MtaError(f"unknown target module(s) {missing}; this model's linear modules: {available}")
        for p in model.parameters():
            p.requires_grad_(False)
        for name in chosen:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = BankLoRALinear(getattr(parent, child), spec.n_anchors, spec.rank, spec.alpha,
                                   self._routing, dtype=spec.dtype)
            setattr(parent, child, layer)
            self.layers[name] = layer
        log.info("injected %d layers (%s)", len(self.layers), ", ".join(sorted(found_suffixes)))

    # -- structure --------------------------------------------------------------------------
    @property
    def n_anchors(self) -> int:
        return self.spec.n_anchors

    @property
    def n_users(self) -> int:
        return max(ly.stack_A.shape[0] for ly in self.layers.values())

    @property
    def stack_layers(self) -> dict[str, BankLoRALinear]:
        """The injected layers that carry a stack table (all, unless add_users chose modules)."""
        return {n: ly for n, ly in self.layers.items() if ly.stack_A.shape[0]}

    @property
    def device(self) -> torch.device:
        return next(iter(self.layers.values())).bank_A.device

    def remove(self) -> nn.Module:
        """Restore the original linear modules; the engine is unusable afterwards."""
        for name, layer in self.layers.items():
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, layer.base)
        self.layers = {}
        self._routing[0] = None
        return self.model

    def init_bank(self, seed: int = 0, b_std: float = 0.0, slots: Sequence[int] | None = None) -> None:
        """PEFT's LoRA init: A ~ kaiming-uniform(a=sqrt(5)), B = 0 (or N(0, b_std) for tests)."""
        gen = torch.Generator().manual_seed(seed)
        slots = range(self.n_anchors) if slots is None else slots
        with torch.no_grad():
            for layer in self.layers.values():
                for s in slots:
                    layer.bank_A[s].copy_(_kaiming_uniform(layer.bank_A[s].shape, gen))
                    layer.bank_B[s].copy_(torch.randn(layer.bank_B[s].shape, generator=gen) * b_std)

    def stack_selection(self, modules: Sequence[str] | None = None, last_layers: int | None = None) -> list[str]:
        """Injected layers that get a stacked adapter: those whose name ends in one of
        ``modules`` (all by default) within the last ``last_layers`` blocks (0, None, or
        at least the model's block count: all blocks)."""
        short = {n.rsplit(".", 1)[-1] for n in self.layers}
        if modules is not None:
            unknown = sorted(set(modules) - short)
            if unknown or not modules:
                raise MtaError(f"stack target modules {unknown or '(none)'} are not among the injected layers "
                               f"{sorted(short)}")
        blocks = sorted({b for b in map(block_index, self.layers) if b is not None})
        if last_layers is not None and last_layers < 0:
            raise MtaError(f"stack layers must be >= 0 (0 = all blocks), got {last_layers}")
        keep = set(blocks[-last_layers:]) if last_layers else None
        return [n for n in self.layers
                if (modules is None or n.rsplit(".", 1)[-1] in modules)
                and (keep is None or block_index(n) in keep)]

    def add_users(self, n_users: int, rank: int, alpha: float, seed: int = 0, b_std: float = 0.0,
                  modules: Sequence[str] | None = None, last_layers: int | None = None) -> None:
        """(Re)allocate the stack table for ``n_users`` users of rank ``rank``, freshly
        initialised, on the layers of ``stack_selection(modules, last_layers)``."""
        if n_users < 0 or rank < 1 or not alpha > 0:
            raise MtaError(f"stack needs users >= 0, rank >= 1, alpha > 0; got {n_users}, {rank}, {alpha}")
        chosen = set(self.stack_selection(modules, last_layers))
        gen = torch.Generator().manual_seed(seed)
        for name, layer in self.layers.items():
            dev, dt = layer.bank_A.device, layer.bank_A.dtype
            n_here = n_users if name in chosen else 0
            a = torch.stack([_kaiming_uniform((rank, layer.in_features), gen) for _ in range(n_here)]) \
                if n_here else torch.zeros(0, rank, layer.in_features)
            b = torch.randn(n_here, layer.out_features, rank, generator=gen) * b_std
            layer.stack_A = nn.Parameter(a.to(dev, dt), requires_grad=False)
            layer.stack_B = nn.Parameter(b.to(dev, dt), requires_grad=False)
            layer.stack_rank, layer.stack_alpha = rank, float(alpha)

    def set_fused(self, tables: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> None:
        """Install per-user fused factors (e.g. from ``svd`` merges): name -> (A (U,r,in), B (U,out,r))."""
        if set(tables) != set(self.layers):
            raise MtaError("fused tables must cover exactly the injected layers")
        for name, (a, b) in tables.items():
            layer = self.layers[name]
            layer.fused_A = a.to(layer.bank_A.device, layer.bank_A.dtype)
            layer.fused_B = b.to(layer.bank_A.device, layer.bank_A.dtype)
            layer.fused_scale = float(scale)

    def install_svd(self, mixtures: Sequence[tuple[Sequence[int], Sequence[float]]], rank: int) -> None:
        """Fused table slot u := the rank-``rank`` SVD truncation of mixture u's exact merge
        (per layer, alpha/r folded in). Rows then use ``Row(fused=u)``."""
        from mta.fusion import merge_svd

        tables = {}
        for name, layer in self.layers.items():
            a_s, b_s = [], []
            for anchors, weights in mixtures:
                w = torch.tensor(list(weights), dtype=torch.float64)
                a, b = merge_svd(layer.bank_A[list(anchors)].detach().double(),
                                 layer.bank_B[list(anchors)].detach().double(), w, rank)
                a_s.append(a * layer.scale)
                b_s.append(b)
            tables[name] = (torch.stack(a_s), torch.stack(b_s))
        self.set_fused(tables, scale=1.0)

    def bank_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.bank_A, layer.bank_B)]

    def stack_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.stack_layers.values() for p in (layer.stack_A, layer.stack_B)]

    def trainable(self, what: str | None) -> list[nn.Parameter]:
        """Make only the bank, only the stack table, or nothing trainable; return those params."""
        for p in self.bank_parameters() + self.stack_parameters():
            p.requires_grad_(False)
        params = {"bank": self.bank_parameters, "stack": self.stack_parameters}.get(what, list)()
        for p in params:
            p.requires_grad_(True)
        return params

    # -- per-adapter tensors ------------------------------------------------------------------
    def anchor_tensors(self, slot: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {n: (ly.bank_A[slot].detach().clone(), ly.bank_B[slot].detach().clone())
                for n, ly in self.layers.items()}

    def load_anchor(self, slot: int, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._load(slot, tensors, "bank")

    def user_tensors(self, slot: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {n: (ly.stack_A[slot].detach().clone(), ly.stack_B[slot].detach().clone())
                for n, ly in self.stack_layers.items()}

    def load_user(self, slot: int, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._load(slot, tensors, "stack")

    def _load(self, slot: int, tensors: dict, kind: str) -> None:
        expected = self.layers if kind == "bank" else self.stack_layers
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise MtaError(f"adapter modules do not match the engine: missing {missing[:3]}, "
                           f"unexpected {extra[:3]}")
        with torch.no_grad():
            for name, (a, b) in tensors.items():
                layer = self.layers[name]
                ta, tb = (layer.bank_A, layer.bank_B) if kind == "bank" else (layer.stack_A, layer.stack_B)
                if not 0 <= slot < ta.shape[0]:
                    raise MtaError(f"{kind} slot {slot} out of range (0..{ta.shape[0] - 1})")
                if tuple(a.shape) != tuple(ta.shape[1:]) or tuple(b.shape) != tuple(tb.shape[1:]):
                    raise MtaError(f"{name}: shape mismatch: got A {tuple(a.shape)}, B {tuple(b.shape)}; "
                                   f"the engine expects A {tuple(ta.shape[1:])}, B {tuple(tb.shape[1:])}")
                if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                    raise MtaError(f"{name}: adapter weights contain NaN or inf")
                ta[slot].copy_(a)
                tb[slot].copy_(b)

    # -- routing ---------------------------------------------------------------------------------
    def routing(self, rows: Sequence[Row], mode: str = "delta") -> Routing:
        """Turn per-row specs into the padded index/weight tensors the layers gather with."""
        if mode not in MERGE_MODES:
            raise MtaError(f"merge mode must be one of {MERGE_MODES}, got {mode!r}")
        dev = self.device
        k = max((len(r.anchors) for r in rows), default=0)
        if mode == "svd" and k:
            raise MtaError("svd merges route through fused tables: call install_svd() and give rows "
                           "`fused=` slots instead of anchors")
        out = Routing(mode="factor" if mode == "factor" else "delta")
        if k:
            idx = torch.zeros(len(rows), k, dtype=torch.long)
            w = torch.zeros(len(rows), k, dtype=torch.float32)
            for i, r in enumerate(rows):
                if len(r.anchors) != len(r.weights):
                    raise MtaError(f"row {i}: {len(r.anchors)} anchors but {len(r.weights)} weights")
                for j, (a, wt) in enumerate(zip(r.anchors, r.weights)):
                    if not 0 <= a < self.n_anchors:
                        raise MtaError(f"row {i}: anchor {a} out of range (bank has {self.n_anchors})")
                    idx[i, j], w[i, j] = a, wt
                if r.anchors:
                    check_weights(w[i, : len(r.anchors)], mode if mode == "factor" else "delta")
            out.anchor_idx, out.anchor_w = idx.to(dev), w.to(dev)
        if any(r.user is not None for r in rows):
            users = [(-1 if r.user is None else r.user) for r in rows]
            if max(users) >= self.n_users:
                raise MtaError(f"user slot {max(users)} out of range (stack table has {self.n_users})")
            out.stack_idx = torch.tensor(users, dtype=torch.long, device=dev)
        if any(r.fused is not None for r in rows):
            out.fused_idx = torch.tensor([(-1 if r.fused is None else r.fused) for r in rows],
                                         dtype=torch.long, device=dev)
        if not all(r.active for r in rows):
            out.active = torch.tensor([r.active for r in rows], dtype=torch.bool, device=dev)
        return out

    def set_routing(self, routing: Routing | None) -> None:
        self._routing[0] = routing

    @contextlib.contextmanager
    def route(self, rows: Sequence[Row] | Routing, mode: str = "delta") -> Iterator[Routing]:
        rt = rows if isinstance(rows, Routing) else self.routing(rows, mode)
        prev = self._routing[0]
        self._routing[0] = rt
        try:
            yield rt
        finally:
            self._routing[0] = prev
            for layer in self.layers.values():  # gathered factors of this routing are dead now
                layer.clear_cache()

    @torch.no_grad()
    def generate(self, rows: Sequence[Row], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 mode: str = "delta", **gen_kwargs) -> torch.Tensor:
        """``model.generate`` with every row routed through its own adapters (KV cache on)."""
        if len(rows) != input_ids.shape[0]:
            raise MtaError(f"{len(rows)} routing rows for a batch of {input_ids.shape[0]}")
        if gen_kwargs.get("num_beams", 1) != 1 or gen_kwargs.get("num_return_sequences", 1) != 1:
            raise MtaError("beam search and several sequences per row would reorder rows; not supported")
        with self.route(rows, mode):
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)


def _kaiming_uniform(shape, gen: torch.Generator) -> torch.Tensor:
    # nn.init.kaiming_uniform_(a=sqrt(5)) on a (rank, in) matrix: bound = 1/sqrt(in).
    bound = 1.0 / math.sqrt(shape[-1])
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound
