"""Fixed routing for a captured decode step: the two fixed layouts, which one a batch of
rows is read in, the one fill both decoders use, and the buffers a captured step reads.

A captured (or compiled) step reads every layer's adapters from buffers at fixed
addresses, through one of two backends of ``mta.decoding.routing``: ``pinned`` (each
row's own factors, zero-padded to one width) or ``dense`` (every table as columns, each
row's coefficients over them), whichever reads fewer bytes for the rows
(``fixed_layout``). A new batch of rows is a refill of those buffers in place, not a new
capture; the dense tables themselves are copied again only when they changed since the
last fill, or differ from them only by stack slots loaded since (``stack_catch_up``).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from mta.decoding.routing import (
    DENSE,
    GATHERED,
    PINNED,
    Backend,
    Routing,
    dense_coefficients,
    dense_columns,
    dense_layout,
    densify,
    densify_stack_slots,
    pin,
    width,
)
from mta.engine.engine import AdapterEngine, Row
from mta.engine.layer import STACK_TABLES, TABLES

LAYOUTS = {"dense": DENSE, "pinned": PINNED}


def rows_width(engine: AdapterEngine, rt: Routing) -> int:
    """Rank directions per row the widest layer needs for ``rt``."""
    return max((width(layer, rt) for layer in engine.layers.values()), default=0)


def _fixed_rows(engine: AdapterEngine, rows: Sequence[Row], batch: int | None, layout: str,
                routing: Routing | None) -> tuple[Routing, int]:
    batch = batch or len(rows)
    if batch < len(rows):
        raise ValueError(f"{len(rows)} rows do not fit a {layout} batch of {batch}")
    return (engine.routing(rows) if routing is None else routing), batch


@contextlib.contextmanager
def _fixed(engine: AdapterEngine, backend: Backend, fill: Callable) -> Iterator[None]:
    """Fill every layer's buffers for ``backend`` and read through it, then the gathered
    routing again."""
    try:
        with torch.no_grad():
            for layer in engine.layers.values():
                fill(layer)
        engine.set_backend(backend)
        yield
    finally:
        engine.set_backend(GATHERED)
        engine.clear_caches()


@torch.no_grad()
def pinned(engine: AdapterEngine, rows: Sequence[Row], batch: int | None = None, width: int | None = None,
           multiple: int = 1, routing: Routing | None = None) -> contextlib.AbstractContextManager[None]:
    """Routing for a compiled or graph-captured decode step: every layer's per-row
    factors are written into fixed buffers (``batch`` rows, ``width`` rank directions,
    zero-padded, which is exact), and the layers read those instead of the routing. A
    later batch with the same shape refills the same buffers in place, so a compiled step
    (or a captured CUDA graph) is reused, not rebuilt. Without ``width``: what the rows
    need, rounded up to ``multiple`` (so later batches tend to fit the same buffers).
    ``routing``: ``engine.routing(rows)`` when the caller has it already. Inference only."""
    rt, batch = _fixed_rows(engine, rows, batch, "pinned", routing)
    need = rows_width(engine, rt)
    width = -(-need // multiple) * multiple if width is None else width
    if width < need:
        raise ValueError(f"these rows need {need} rank directions; the pinned width is {width}")
    return _fixed(engine, PINNED, lambda layer: pin(layer, rt, batch, width))


@torch.no_grad()
def dense(engine: AdapterEngine, rows: Sequence[Row], batch: int | None = None, tables: bool = True,
          routing: Routing | None = None) -> contextlib.AbstractContextManager[None]:
    """Routing for a graph-captured decode step, the other fixed layout: every layer reads
    ALL its tables (anchors, fused slots, users) as the columns of two dense matrices, and
    each row's coefficients over those columns from a (``batch``, columns) buffer, zero
    where the row uses nothing. The same sum as the routing (exact up to float summation
    order), read once per step for the whole batch instead of per row: fewer bytes than
    ``pinned`` when the tables' columns are fewer than batch x a row's rank directions
    (e.g. 64 users, top-2 of 50 rank-8 anchors and own rank-2 stacks: 528 columns against
    64 x 18 = 1,152). A later batch refills the buffers in place; ``tables=False`` only the
    rows' coefficients, for a caller that knows the tables are as at the last fill
    (``stack_catch_up``); ``routing`` as for ``pinned``. Inference only."""
    rt, batch = _fixed_rows(engine, rows, batch, "dense", routing)
    shared: dict = {}  # the layers of one column layout read one coefficient buffer, filled once
    return _fixed(engine, DENSE, lambda layer: densify(layer, rt, batch, tables, shared))


@contextlib.contextmanager
def fixed_on(engine: AdapterEngine, layout: str) -> Iterator[None]:
    """Turn on the fixed routing that ``dense`` or ``pinned`` last filled (their buffers stay
    filled after the ``with`` ends), without refilling it: for a decode loop whose rows stay
    the same for many steps while other work (a prefill) uses the gathered routing."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be dense or pinned, not {layout!r}")
    engine.set_backend(LAYOUTS[layout])
    try:
        yield
    finally:
        engine.set_backend(GATHERED)


@contextlib.contextmanager
def dense_rows(engine: AdapterEngine, rows: Sequence[Row]) -> Iterator[None]:
    """Read ``rows`` through the dense tables last filled (``dense``), for a forward beside a
    dense decode loop (a joining group's prefill): the rows' coefficients computed once per
    column layout and put in every layer's place for the time of the ``with``, the decode
    loop's own coefficient buffers put back after it (the tensors a captured step reads, so
    nothing is captured again). Three operations a layer instead of gathering each row's
    factors (about twenty); the caller checks that the tables are those of the last fill
    (``stack_catch_up``). Inference only."""
    rt, n = engine.routing(rows), len(rows)
    saved, shared = [], {}
    try:
        with torch.no_grad():
            for layer in engine.layers.values():
                bufs = layer._buffers  # set in the dict itself: Module.__setattr__ costs ~10 us a call
                saved.append((bufs, bufs["dense_W"]))
                key = dense_layout(layer, n)
                if key not in shared:
                    shared[key] = dense_coefficients(layer, rt, n)
                bufs["dense_W"] = shared[key]
        engine.set_backend(DENSE)
        yield
    finally:
        engine.set_backend(GATHERED)
        for bufs, w in saved:
            bufs["dense_W"] = w


@dataclass
class TablesState:
    """What every layer's tables were at a fill (``tables_state``): each table but the stack
    tables with its version counter, each layer's rank and alpha, the stack tables, and the
    engine's ``stack_versions``. The tensors are weakly referenced, so a table replaced by a
    new tensor that happens to reuse the old one's address is not taken for it."""

    held: list
    stacks: list
    stack_versions: tuple


def tables_state(engine: AdapterEngine) -> TablesState:
    held: list = []
    stacks: list = []
    own = len(TABLES) - len(STACK_TABLES)
    for layer in engine.layers.values():
        tables = layer.tables()  # the stack tables last
        held.extend((weakref.ref(t), t._version) for t in tables[:own])
        stacks.extend(weakref.ref(t) for t in tables[own:])
        held.append((layer.rank, layer.alpha))
    return TablesState(held, stacks, engine.stack_versions())


def _same_but_stack_slots(engine: AdapterEngine, state: TablesState | None) -> TablesState | None:
    """The tables' state now, when every table is as in ``state`` but the stack tables'
    contents (the same tensors, perhaps written in place since); else None."""
    if state is None:
        return None
    now = tables_state(engine)
    if len(now.held) != len(state.held) or len(now.stacks) != len(state.stacks):
        return None
    if any(a() is None or a() is not b() for a, b in zip(state.stacks, now.stacks)):
        return None
    for (a, va), (b, vb) in zip(state.held, now.held):
        if isinstance(a, weakref.ref):
            if a() is None or a() is not b() or va != vb:
                return None
        elif (a, va) != (b, vb):
            return None
    return now


def stack_catch_up(engine: AdapterEngine, state: TablesState | None) -> TablesState | None:
    """Bring the dense tables filled at ``state`` up to the engine's tables when all that
    changed since is stack slots written by ``load_user`` (a user's stack loaded for a
    join): those slots' columns are written in place (``densify_stack_slots``: a few
    operations a stacked layer, against a whole refill of every layer's every column).
    Returns the tables' state now (the dense tables are theirs), also when nothing
    changed; None when anything else did (the caller fills again, or gathers)."""
    now = _same_but_stack_slots(engine, state)
    if now is None:
        return None
    slots = engine.stack_loads(state.stack_versions, now.stack_versions)
    if slots is None:
        return None
    if slots:
        with torch.no_grad():
            for layer in engine.stack_layers.values():
                densify_stack_slots(layer, slots)
    return now


def fixed_layout(engine: AdapterEngine, rows: Sequence[Row], batch: int | None = None,
                 routing: Routing | None = None) -> str:
    """``dense`` or ``pinned``: the fixed layout that reads fewer adapter bytes per decode
    step for these rows in a batch of ``batch`` (``routing`` as for ``pinned``)."""
    need = rows_width(engine, engine.routing(rows) if routing is None else routing)
    cols = max((dense_columns(layer) for layer in engine.layers.values()), default=0)
    return "dense" if cols <= (batch or len(rows)) * need else "pinned"


@dataclass
class FixedRouting:
    """One decoder's fixed routing: the layout it last filled, and the engine's tables then."""

    layout: str = "dense"
    tables: TablesState | None = None

    def fill(self, engine: AdapterEngine, rows: Sequence[Row], batch: int, width: int | None = None
             ) -> contextlib.AbstractContextManager[None]:
        """Fill the fixed routing for ``rows`` in a batch of ``batch`` (the layout that reads
        fewer bytes, or ``pinned`` at ``width`` rank directions when a width is asked for);
        the layout is on inside the ``with`` (``fixed_on`` turns it on again later without
        a refill)."""
        rt = engine.routing(rows)  # built once: the layout's choice and the fill share it
        layout = fixed_layout(engine, rows, batch, routing=rt) if width is None else "pinned"
        # only the rows changed (the tables as at the last fill, or brought up to date by
        # writing the stack slots loaded since)
        same = layout == self.layout == "dense" and self.catch_up(engine)
        if not same:
            self.tables = tables_state(engine)
        self.layout = layout
        if layout == "dense":
            return dense(engine, rows, batch, tables=not same, routing=rt)
        return pinned(engine, rows, batch, width=width, multiple=8, routing=rt)

    def catch_up(self, engine: AdapterEngine) -> bool:
        """Whether the dense tables last filled are the engine's tables now, after writing
        the stack slots loaded since into them (``stack_catch_up``); False for the pinned
        layout or any other change."""
        now = stack_catch_up(engine, self.tables) if self.layout == "dense" else None
        if now is None:
            return False
        self.tables = now
        return True


def captured_buffers(engine: AdapterEngine) -> list[torch.Tensor]:
    """The buffers a captured step reads for the adapters: those of the dense backend while
    it is on, else the pin buffers (a decoder captures again when any of them was
    reallocated)."""
    if engine.backend is DENSE:
        return [t for layer in engine.layers.values() for t in (layer.dense_A, layer.dense_B, layer.dense_W)]
    return [t for layer in engine.layers.values() for t in (layer.pin_A, layer.pin_B)]
