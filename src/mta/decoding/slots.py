"""The server's decode loop on a static KV cache with the step captured in a CUDA graph.

`SlotDecoder` has the interface of `mta.decoding.eager.Decoder` (``prefill``, ``merge``,
``step``, ``keep``), so the scheduler runs either. Rows live in a fixed number of slots
of one static cache; all slots write each step's keys and values at one shared cache
position ``t`` (what a captured step needs: one shape, one write slot), and each slot's
4D mask says which positions are its own:

- a joining row is prefilled eagerly (with the eager decoder's prefill, its own dynamic
  cache), then its prompt's keys and values are copied into its slot at ``[t - p, t)``;
  when ``t`` is smaller than the prompt, ``t`` jumps forward for every slot (the skipped
  positions are masked for all of them);
- a leaving row's slot is masked out (its routing stays until a row joins); it keeps computing (a batch
  never changes shape) but nothing reads it;
- a step reads only the cache's first positions up to a power of two past ``t`` (the
  decoder's attention window; SDPA reads every position it is given, masked or not, so a
  step over the whole cache cost as much as its longest possible rows at every step). When
  the next position falls past the window, or moving the rows left would make the window
  smaller, every slot is shifted left by the oldest live row's start (only the live
  positions are copied). The cache holds twice the longest row (prompt + new tokens), so a
  shift always frees at least half of it.

Each row keeps its own position ids (as ``generate`` numbers a left-padded row), so its
greedy tokens are what it gets alone (tested against one-by-one generation on the CPU,
where the same step runs eagerly). Adapters ride along through the engine's fixed
routing (``mta.decoding.fixed``: dense or pinned, whichever reads fewer bytes), refilled in
place when the rows change; the step is captured again only when those buffers had to be
reallocated (a bank or user table of another shape). Sampling rows (temperature > 0) are
drawn on the host from the step's logits, greedy rows take the captured argmax.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mta.decoding.eager import Batch, Decoder, Prefill, Sequence, cache_layers, sample, take_tokens
from mta.decoding.fixed import FixedRouting, captured_buffers, dense_rows, fixed_on, tables_unchanged
from mta.decoding.prefix import PrefixCache
from mta.decoding.step import GraphDecoder
from mta.engine.engine import Row


@dataclass
class SlotBatch:
    """The running rows, in the scheduler's order, and the slot each one holds."""

    seqs: list[Sequence] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    routing: object | None = None  # None: the fixed routing must be refilled before the next step

    def __len__(self) -> int:
        return len(self.seqs)


class SlotDecoder:
    """Runs the server's rows in ``slots`` slots of one static cache, each row at most
    ``span`` tokens (prompt + new tokens)."""

    def __init__(self, backbone, pad_id: int, slots: int = 32, span: int = 2048, graph: bool | None = None,
                 compile: bool | str = False, prefix: PrefixCache | None = None, min_window: int = 64):
        if slots < 1 or span < 2:
            raise ValueError(f"a slot decoder needs at least 1 slot and a span of 2, not {slots} x {span}")
        self.backbone, self.engine, self.model = backbone, backbone.engine, backbone.model
        self.pad_id, self.n, self.span = pad_id, slots, span
        self.eager = Decoder(backbone, pad_id, prefix)  # prefills joining rows (reusing cached prefixes)
        self.g = GraphDecoder(self.model, slots, 2 * span, graph, compile=compile, keep_logits=True, windowed=True,
                              min_window=min_window)
        with torch.no_grad():  # one forward allocates the static cache's tensors; then all empty
            ids = torch.full((slots, 1), pad_id, dtype=torch.long)
            self.g.prefill(ids, torch.ones_like(ids))
        self.g.bias.fill_(self.g.neg)
        self.g.set_position(0)
        self.t = 0
        self.free = list(range(slots))
        self.row_start: dict[int, int] = {}  # slot -> first position of its row
        self.fixed = FixedRouting()  # the fixed routing last filled
        self.eager.router = self._prefill_routing

    # -- the scheduler's interface ---------------------------------------------------------
    def prefill(self, seqs: list[Sequence]) -> Batch:
        """The joining rows' prompts, eagerly; ``merge`` then gives them slots (it checks
        that enough are free: slots of a batch the scheduler dropped are freed there)."""
        return self.advance(self.start(seqs))

    def start(self, seqs: list[Sequence], keys: list | None = None) -> Prefill:
        """The joining rows' prompts to prefill in chunks (``advance``), eagerly (``keys``:
        their prefix-cache keys, mta.decoding.eager.Decoder.start)."""
        if len(seqs) > self.n:
            raise RuntimeError(f"{len(seqs)} rows join but the decoder has {self.n} slots")
        too_long = [len(s.prompt) + s.max_new_tokens for s in seqs if len(s.prompt) + s.max_new_tokens > self.span]
        if too_long:
            raise ValueError(f"a row of {too_long[0]} tokens (prompt + new) exceeds the decoder's span {self.span}")
        return self.eager.start(seqs, keys)

    def advance(self, pf: Prefill, max_tokens: int | None = None) -> Batch | None:
        """The next chunk of ``pf`` (mta.decoding.eager.Decoder.advance)."""
        return self.eager.advance(pf, max_tokens)

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
        lengths = b.mask.sum(-1)
        slots = [self.free.pop(0) for _ in b.seqs]
        idx = torch.tensor(slots, dtype=torch.long, device=lengths.device)
        # every joining row's n prefill positions into [t - n, t) of its slot at once (a row's
        # own p tokens are the last p of them; the padding before them lands masked)
        for mine, theirs in zip(cache_layers(self.g.cache), cache_layers(b.cache)):
            mine.keys[:, :, t - n:t].index_copy_(0, idx, theirs.keys[:, :, :n].to(mine.keys.dtype))
            mine.values[:, :, t - n:t].index_copy_(0, idx, theirs.values[:, :, :n].to(mine.values.dtype))
        cols = torch.arange(self.g.bias.shape[-1], device=lengths.device)
        own = (cols >= (t - lengths)[:, None]) & (cols < t)  # each row attends to its own positions only
        self.g.bias[idx] = torch.where(own, 0.0, self.g.neg).to(self.g.bias.dtype)[:, None, None, :]
        self.g.pos[idx, 0] = b.pos.to(self.g.pos.dtype)
        self.g.tok[idx, 0] = b.last.to(self.g.tok.dtype)
        for s, slot, p in zip(b.seqs, slots, lengths.tolist()):
            self.row_start[slot] = t - p
            batch.seqs.append(s)
            batch.slots.append(slot)
        batch.routing = None
        return batch

    def keep(self, batch: SlotBatch, rows: list[int]) -> SlotBatch:
        """Only ``rows`` stay; the other slots are freed (masked). The routing is kept: a
        freed slot's output is never read, so what it stays routed to does not matter until
        a row joins (``merge`` refills the routing then)."""
        kept = set(rows)
        for k, slot in enumerate(batch.slots):
            if k not in kept:
                self.g.bias[slot].fill_(self.g.neg)
                self.row_start.pop(slot, None)
                self.free.append(slot)
        self.free.sort()
        return SlotBatch([batch.seqs[k] for k in rows], [batch.slots[k] for k in rows], batch.routing)

    @torch.no_grad()
    def step(self, batch: SlotBatch) -> None:
        """One decode step for every slot; the running rows take their tokens."""
        self._fit_window(batch)
        if batch.routing is None:  # the rows changed: refill the fixed routing once
            rows = [Row(active=False)] * self.n
            for s, slot in zip(batch.seqs, batch.slots):
                rows[slot] = s.row
            with self.fixed.fill(self.engine, rows, self.n):
                self.g.buffers = captured_buffers(self.engine)
            batch.routing = self.fixed.layout
        with fixed_on(self.engine, self.fixed.layout):
            self.g.advance()
        self.t += 1
        nxt = self.g.tok[:, 0].clone()
        for s, slot in zip(batch.seqs, batch.slots):
            if s.temperature > 0:
                nxt[slot] = sample(self.g.logits[slot], s)
        self.g.tok[:, 0].copy_(nxt)  # a sampled token is the next input
        take_tokens(batch.seqs, nxt[batch.slots].tolist())

    def run(self, seqs: list[Sequence], join_rows: int = 1, on_step: Callable[[], None] | None = None,
            on_finish: Callable[[Sequence], None] | None = None) -> None:
        """Decode every row of ``seqs`` to its end (continuous batching, as the server runs):
        rows join in their order once ``join_rows`` slots are free (or no row is running),
        finished rows leave; ``on_step`` after each step, ``on_finish`` for each finished row.
        Each row gets the tokens it gets alone. Batch generation's loop (`mta.decoding.batch`)."""
        waiting, batch = list(seqs), None
        join = max(1, min(join_rows, self.n))
        while waiting or (batch is not None and len(batch)):
            room = self.n - (len(batch) if batch is not None else 0)
            if waiting and room >= min(join, len(waiting)):  # (an empty batch: room is every slot)
                batch = self.merge(batch, self.prefill(waiting[:room]))
                waiting = waiting[room:]
            left = [k for k, s in enumerate(batch.seqs) if s.finish is None]
            if on_finish:
                for s in batch.seqs:
                    if s.finish is not None:
                        on_finish(s)
            batch = self.keep(batch, left)
            if len(batch):
                self.step(batch)
                if on_step:
                    on_step()

    def warm(self, rows: list[Row], prompt: list[int], steps: int = 3) -> None:
        """Run ``steps`` decode steps of ``prompt`` through ``rows`` (at most the slots), then
        one step under every attention window, and free every slot again: the step for these
        rows' layout is compiled and captured for every window now (the server's warm-up
        before it turns ready). It frees every slot: call it only while no row is running."""
        seqs = [Sequence(list(prompt), row, steps + 1, frozenset()) for row in rows]
        batch = self.merge(None, self.prefill(seqs))
        for _ in range(max(1, steps)):  # (the first fills the fixed routing the windows' steps read)
            self.step(batch)
        with fixed_on(self.engine, self.fixed.layout):
            for w in self.g.windows():  # (the rows' tokens are not taken: they are dropped below)
                if w > self.t:
                    self.g.set_window(w)
                    self.g.advance()
                    self.t += 1
        self.keep(batch, [])

    # -- internals ---------------------------------------------------------------------------
    def _prefill_routing(self, rows: list[Row]):
        """How a joining group's prefill reads its adapters: through the dense tables the
        decode step reads, when its layout is dense and the tables are those of its last
        fill (a join then costs a few operations a layer, not a gather of every row's
        factors); else the engine's gathered routing."""
        if self.fixed.layout == "dense" and tables_unchanged(self.engine, self.fixed.tables):
            return dense_rows(self.engine, rows)
        return self.engine.route(rows)

    def _release_all(self) -> None:
        self.g.bias.fill_(self.g.neg)
        self.free, self.row_start = list(range(self.n)), {}

    def _shift(self, batch: SlotBatch | None) -> int:
        """How far every slot can move left: the oldest live row's start (all of ``t`` when
        none is live)."""
        live = [self.row_start[s] for s in batch.slots if s in self.row_start] if batch else []
        return min(live) if live else self.t

    def _fit_window(self, batch: SlotBatch) -> None:
        """Before a step: the rows moved left when the step's position is past the cache's
        end or its window, or when moving them would make the window smaller; then the
        smallest window that holds the step's position."""
        g = self.g
        if self.t >= 2 * self.span or (g.windowed and (self.t + 1 > g.window or g.window_for(
                self.t + 1 - self._shift(batch)) < g.window_for(self.t + 1))):
            self._compact(batch)
        g.set_window(g.window_for(self.t + 1))

    def _compact(self, batch: SlotBatch | None) -> None:
        """Shift every slot left by the oldest live row's start, copying the positions in use
        (those before ``t``; the ones after it are masked and written before they are read)."""
        shift = self._shift(batch)
        if shift <= 0:
            return
        keep = self.t - shift
        for layer in cache_layers(self.g.cache):
            layer.keys[:, :, :keep] = layer.keys[:, :, shift:self.t].clone()
            layer.values[:, :, :keep] = layer.values[:, :, shift:self.t].clone()
        self.g.bias[..., :keep] = self.g.bias[..., shift:self.t].clone()
        self.g.bias[..., keep:] = self.g.neg
        for s in list(self.row_start):
            self.row_start[s] -= shift
        self.t -= shift
        self.g.set_position(self.t)
