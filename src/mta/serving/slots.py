"""The server's decode loop on a static KV cache with the step captured in a CUDA graph.

`SlotDecoder` has the interface of `mta.serving.decode.Decoder` (``prefill``, ``merge``,
``step``, ``keep``), so the scheduler runs either. Rows live in a fixed number of slots
of one static cache; all slots write each step's keys and values at one shared cache
position ``t`` (what a captured step needs: one shape, one write slot), and each slot's
4D mask says which positions are its own:

- a joining row is prefilled eagerly (with the eager decoder's prefill, its own dynamic
  cache), then its prompt's keys and values are copied into its slot at ``[t - p, t)``;
  when ``t`` is smaller than the prompt, ``t`` jumps forward for every slot (the skipped
  positions are masked for all of them);
- a leaving row's slot is masked out and routed to nothing; it keeps computing (a batch
  never changes shape) but nothing reads it;
- when ``t`` reaches the end of the cache, every slot is shifted left by the oldest live
  row's start. The cache holds twice the longest row (prompt + new tokens), so a shift
  always frees at least half of it.

Each row keeps its own position ids (as ``generate`` numbers a left-padded row), so its
greedy tokens are what it gets alone (tested against one-by-one generation on the CPU,
where the same step runs eagerly). Adapters ride along through the engine's fixed
routing (``AdapterEngine.dense`` or ``pinned``, whichever reads fewer bytes), refilled in
place when the rows change; the step is captured again only when those buffers had to be
reallocated (a bank or user table of another shape). Sampling rows (temperature > 0) are
drawn on the host from the step's logits, greedy rows take the captured argmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mta.engine.engine import Row
from mta.engine.graphs import GraphDecoder, pinned_buffers
from mta.serving.decode import Batch, Decoder, Sequence, _layers, _sample, take_tokens


@dataclass
class SlotBatch:
    """The running rows, in the scheduler's order, and the slot each one holds."""

    seqs: list[Sequence] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    routing: object | None = None  # None: the fixed routing must be refilled before the next step

    def __len__(self) -> int:
        return len(self.seqs)


class _SlotStep(GraphDecoder):
    """GraphDecoder's buffers and capture; its step also keeps the logits (for sampling rows)
    and never runs out of its token buffer (slots do not record what they decode)."""

    def __init__(self, model, batch: int, max_len: int, graph: bool | None, compile: bool | str = False):
        super().__init__(model, batch, max_len, graph, compile=compile)
        self.logits = None

    def _step_inner(self) -> None:
        self.bias.index_fill_(3, self.cpos, 0.0)
        logits = self.model(input_ids=self.tok, attention_mask=self.bias, position_ids=self.pos,
                            cache_position=self.cpos, use_cache=True, **{self.kw: self.cache}).logits[:, -1]
        if self.logits is None:  # first (eager) step: allocate; a captured step writes into it
            self.logits = torch.empty_like(logits, dtype=torch.float32)
        self.logits.copy_(logits)
        self.tok.copy_(logits.argmax(-1, keepdim=True))
        self.pos.add_(1)
        self.cpos.add_(1)

    def _counters(self) -> list[torch.Tensor]:
        own = [self.tok, self.pos, self.cpos, self.bias]
        return own + [c for layer in getattr(self.cache, "layers", [])
                      if isinstance(c := getattr(layer, "cumulative_length", None), torch.Tensor)]

    def set_position(self, t: int) -> None:
        """The shared write position, in our buffer and in the cache layers' own counters."""
        self.cpos.fill_(t)
        for c in self._counters()[4:]:
            c.fill_(t)


class SlotDecoder:
    """Runs the server's rows in ``slots`` slots of one static cache, each row at most
    ``span`` tokens (prompt + new tokens)."""

    def __init__(self, backbone, pad_id: int, slots: int = 32, span: int = 2048, graph: bool | None = None,
                 compile: bool | str = False):
        if slots < 1 or span < 2:
            raise ValueError(f"a slot decoder needs at least 1 slot and a span of 2, not {slots} x {span}")
        self.backbone, self.engine, self.model = backbone, backbone.engine, backbone.model
        self.pad_id, self.n, self.span = pad_id, slots, span
        self.eager = Decoder(backbone, pad_id)  # prefills joining rows
        self.g = _SlotStep(self.model, slots, 2 * span, graph, compile)
        with torch.no_grad():  # one forward allocates the static cache's tensors; then all empty
            ids = torch.full((slots, 1), pad_id, dtype=torch.long)
            self.g.prefill(ids, torch.ones_like(ids))
        self.g.bias.fill_(self.g.neg)
        self.g.set_position(0)
        self.t = 0
        self.free = list(range(slots))
        self.start: dict[int, int] = {}  # slot -> first position of its row
        self.layout, self._tables = "dense", None  # the fixed routing last filled, and its tables' state

    # -- the scheduler's interface ---------------------------------------------------------
    def prefill(self, seqs: list[Sequence]) -> Batch:
        """The joining rows' prompts, eagerly; ``merge`` then gives them slots (it checks
        that enough are free: slots of a batch the scheduler dropped are freed there)."""
        if len(seqs) > self.n:
            raise RuntimeError(f"{len(seqs)} rows join but the decoder has {self.n} slots")
        too_long = [len(s.prompt) + s.max_new_tokens for s in seqs if len(s.prompt) + s.max_new_tokens > self.span]
        if too_long:
            raise ValueError(f"a row of {too_long[0]} tokens (prompt + new) exceeds the decoder's span {self.span}")
        return self.eager.prefill(seqs)

    @torch.no_grad()
    def merge(self, a: SlotBatch | None, b: Batch) -> SlotBatch:
        """The prefilled rows of ``b`` take free slots of the running batch ``a``. None: no
        row is running any more and every slot is free (the scheduler drops a batch whose
        rows have all finished without calling ``keep``)."""
        if a is None:
            self._release_all()
        batch = a if a is not None else SlotBatch()
        if len(b.seqs) > len(self.free):
            raise RuntimeError(f"{len(b.seqs)} rows join but only {len(self.free)} slots are free")
        n = b.mask.shape[1]
        self._compact(batch)
        t = max(self.t, n)
        if t != self.t:
            self.t = t
            self.g.set_position(t)
        lengths = b.mask.sum(-1).tolist()
        layers = list(zip(_layers(self.g.cache), _layers(b.cache)))
        for i, s in enumerate(b.seqs):
            slot, p = self.free.pop(0), int(lengths[i])
            for mine, theirs in layers:
                mine.keys[slot, :, t - p:t].copy_(theirs.keys[i, :, n - p:n])
                mine.values[slot, :, t - p:t].copy_(theirs.values[i, :, n - p:n])
            self.g.bias[slot].fill_(self.g.neg)
            self.g.bias[slot, 0, 0, t - p:t] = 0.0
            self.g.pos[slot, 0] = b.pos[i]
            self.g.tok[slot, 0] = b.last[i]
            self.start[slot] = t - p
            batch.seqs.append(s)
            batch.slots.append(slot)
        batch.routing = None
        return batch

    def keep(self, batch: SlotBatch, rows: list[int]) -> SlotBatch:
        """Only ``rows`` stay; the other slots are freed (masked, routed to nothing)."""
        kept = set(rows)
        for k, slot in enumerate(batch.slots):
            if k not in kept:
                self.g.bias[slot].fill_(self.g.neg)
                self.start.pop(slot, None)
                self.free.append(slot)
        self.free.sort()
        return SlotBatch([batch.seqs[k] for k in rows], [batch.slots[k] for k in rows])

    @torch.no_grad()
    def step(self, batch: SlotBatch) -> None:
        """One decode step for every slot; the running rows take their tokens."""
        if self.t >= 2 * self.span:
            self._compact(batch)
        if batch.routing is None:  # the rows changed: refill the fixed routing once
            rows = [Row(active=False)] * self.n
            for s, slot in zip(batch.seqs, batch.slots):
                rows[slot] = s.row
            rt = self.engine.routing(rows)  # built once: the layout's choice and the fill share it
            layout = self.engine.fixed_layout(rows, self.n, routing=rt)
            same = layout == self.layout and self.engine.tables_unchanged(self._tables)  # only rows changed
            self.layout, self._tables = layout, self.engine.tables_state()
            fill = self.engine.dense(rows, self.n, tables=not same, routing=rt) if layout == "dense" else \
                self.engine.pinned(rows, self.n, multiple=8, routing=rt)
            with fill:
                self.g.buffers = pinned_buffers(self.engine)
            batch.routing = self.layout
        with self.engine.fixed_on(self.layout):
            self.g.advance()
        self.t += 1
        nxt = self.g.tok[:, 0].clone()
        for s, slot in zip(batch.seqs, batch.slots):
            if s.temperature > 0:
                nxt[slot] = _sample(self.g.logits[slot], s)
        self.g.tok[:, 0].copy_(nxt)  # a sampled token is the next input
        take_tokens(batch.seqs, nxt[batch.slots].tolist())

    # -- internals ---------------------------------------------------------------------------
    def _release_all(self) -> None:
        self.g.bias.fill_(self.g.neg)
        self.free, self.start = list(range(self.n)), {}

    def _compact(self, batch: SlotBatch) -> None:
        """Shift every slot left by the oldest live row's start (all of ``t`` when none is live)."""
        live = [self.start[s] for s in batch.slots if s in self.start] if batch else []
        shift = min(live) if live else self.t
        if shift <= 0:
            return
        keep = 2 * self.span - shift
        for layer in _layers(self.g.cache):
            layer.keys[:, :, :keep] = layer.keys[:, :, shift:].clone()
            layer.values[:, :, :keep] = layer.values[:, :, shift:].clone()
        self.g.bias[..., :keep] = self.g.bias[..., shift:].clone()
        self.g.bias[..., keep:] = self.g.neg
        for s in list(self.start):
            self.start[s] -= shift
        self.t -= shift
        self.g.set_position(self.t)
