"""Fixed routing for a captured decode step: which layout a batch of rows is read in, the
one fill both decoders use, and the buffers a captured step reads.

A captured (or compiled) step reads every layer's adapters from buffers at fixed
addresses: ``pinned`` (each row's own factors, zero-padded to one width) or ``dense``
(every table as columns, each row's coefficients over them), whichever reads fewer bytes
for the rows (``AdapterEngine.fixed_layout``). A new batch of rows is a refill of those
buffers in place, not a new capture; the dense tables themselves are copied again only
when they changed since the last fill (``AdapterEngine.tables_unchanged``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class FixedRouting:
    """One decoder's fixed routing: the layout it last filled, and the engine's tables then."""

    layout: str = "dense"
    tables: list | None = None

    def fill(self, engine, rows: Sequence, batch: int, width: int | None = None
             ) -> contextlib.AbstractContextManager[None]:
        """Fill the fixed routing for ``rows`` in a batch of ``batch`` (the layout that reads
        fewer bytes, or ``pinned`` at ``width`` rank directions when a width is asked for);
        the layout is on inside the ``with`` (``AdapterEngine.fixed_on`` turns it on again
        later without a refill)."""
        rt = engine.routing(rows)  # built once: the layout's choice and the fill share it
        layout = engine.fixed_layout(rows, batch, routing=rt) if width is None else "pinned"
        same = layout == self.layout and engine.tables_unchanged(self.tables)  # only the rows changed
        self.layout, self.tables = layout, engine.tables_state()
        if layout == "dense":
            return engine.dense(rows, batch, tables=not same, routing=rt)
        return engine.pinned(rows, batch, width=width, multiple=8, routing=rt)


def captured_buffers(engine) -> list[torch.Tensor]:
    """The buffers a captured step reads for the adapters: those of the engine's dense
    routing while it is on, else its pin buffers (a decoder captures again when any of
    them was reallocated)."""
    if any(layer.dense_on for layer in engine.layers.values()):
        return [t for layer in engine.layers.values() for t in (layer.dense_A, layer.dense_B, layer.dense_W)]
    return [t for layer in engine.layers.values() for t in (layer.pin_A, layer.pin_B)]
