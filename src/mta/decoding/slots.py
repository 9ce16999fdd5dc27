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

A joining row whose user's prompt prefix is cached (``mta.decoding.prefix``) and whose
uncached rest is at most ``feed`` tokens is not prefilled at all: its prefix's keys and
values go into its slot and the rest is fed through the decode steps, one token a step
beside the running rows (their steps go on; a captured step computes every slot whatever
it holds, so a fed token costs nothing), its outputs ignored until its last prompt token
went in; that step's output is its first token. A join of such rows costs no forward:
what held the running rows between two steps was the joining group's prefill. When it
takes its first token, the row's prompt keys and values are kept in the prefix cache, as
a prefill keeps them.

With ``async_steps`` the host runs one step behind the device: a step's tokens stay on
the device as the next step's inputs (greedy rows: the captured argmax; fed rows: their
next prompt token, written in place), go to a pinned host buffer without waiting, and the
rows take them at the next step, once that one is launched; so the host's work between two
steps (taking tokens, the server streaming text and admitting requests) runs while the
device computes, not between its steps. A row that ends is known one step later: that
step's token in its slot is computed and dropped. A step with a sampling row (drawn on the
host from its logits) takes its tokens at once.

Each row keeps its own position ids (as ``generate`` numbers a left-padded row), so its
greedy tokens are what it gets alone (tested against one-by-one generation on the CPU,
where the same step runs eagerly). Adapters ride along through the engine's fixed
routing (``mta.decoding.fixed``: dense or pinned, whichever reads fewer bytes), refilled in
place when the rows change; the step is captured again only when those buffers had to be
reallocated (a bank or user table of another shape). Sampling rows (temperature > 0) are
drawn on the host from the step's logits, greedy rows take the captured argmax.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from mta.decoding.eager import Batch, Decoder, Prefill, Sequence, cache_layers, sample, take_tokens
from mta.decoding.fixed import FixedRouting, captured_buffers, dense_rows, fixed_on
from mta.decoding.prefix import PrefixCache
from mta.decoding.routing import tune_kernel
from mta.decoding.step import GraphDecoder
from mta.engine.engine import Row, to_device


@dataclass
class SlotBatch:
    """The running rows, in the scheduler's order, and the slot each one holds."""

    seqs: list[Sequence] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    routing: object | None = None  # None: the fixed routing must be refilled before the next step

    def __len__(self) -> int:
        return len(self.seqs)


@dataclass
class _Fed:
    """A joining row fed through the decode steps: its cached prefix (``n`` tokens, per
    layer (1, heads, n, dim)) and its prefix-cache key."""

    seq: Sequence
    key: Hashable
    n: int
    kv: list


@dataclass
class _Taken:
    """A step whose tokens the host has not taken yet (``async_steps``): the rows that take
    them and their slots as they were at that step, the tokens' host copy (every slot's)
    and the event after which it is complete (None: complete already, on a CPU)."""

    seqs: list[Sequence]
    slots: list[int]
    tokens: torch.Tensor
    done: torch.cuda.Event | None


@dataclass
class SlotPrefill:
    """Joining rows (``SlotDecoder.start``): those prefilled (``eager``, in chunks) and those
    fed through the decode steps, each with its index among the joining rows."""

    eager: Prefill | None
    eager_rows: list[int]
    fed: list[tuple[int, _Fed]]

    @property
    def left(self) -> int:
        """Columns not prefilled yet (fed rows have none)."""
        return self.eager.left if self.eager is not None else 0


@dataclass
class Joining:
    """What ``advance`` gives ``merge``: the prefilled rows' batch (their first tokens taken)
    and the fed rows, each with its index among the joining rows (their order)."""

    batch: Batch | None
    batch_rows: list[int]
    fed: list[tuple[int, _Fed]] = field(default_factory=list)


class SlotDecoder:
    """Runs the server's rows in ``slots`` slots of one static cache, each row at most
    ``span`` tokens (prompt + new tokens). ``feed``: a joining row with a cached prompt
    prefix and at most this many tokens after it is fed through the decode steps (0: every
    row is prefilled; `mta serve --feed-tokens`). ``async_steps``: each step's tokens are
    taken by the rows at the next step, after it was launched (`mta serve --async-steps`;
    module docstring)."""

    def __init__(self, backbone, pad_id: int, slots: int = 32, span: int = 2048, graph: bool | None = None,
                 compile: bool | str = False, prefix: PrefixCache | None = None, min_window: int = 64,
                 feed: int = 0, async_steps: bool = False):
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
        # through a weak reference: a bound method here would make a reference cycle, and the
        # decoder (its static cache: GBs at 8B) would outlive its last user until a full
        # garbage collection (a benchmark's decoders one after another ran out of memory)
        me = weakref.ref(self)
        self.eager.router = lambda rows: me()._prefill_routing(rows)
        self.prefix, self.feed = prefix, feed
        self.feeding: dict[int, tuple[_Fed, list[int]]] = {}  # slot -> its fed row, the prompt tokens still to go in
        self.async_steps = async_steps
        self._taken: _Taken | None = None  # the last step's tokens, not taken yet (async_steps)
        pin = self.g.tok.device.type == "cuda"  # two host buffers: one step's copy lands while the last's is read
        self._host = [torch.empty(slots, dtype=torch.long, pin_memory=pin) for _ in range(2)]

    # -- the scheduler's interface ---------------------------------------------------------
    def prefill(self, seqs: list[Sequence]) -> Joining:
        """The joining rows' prompts, eagerly; ``merge`` then gives them slots (it checks
        that enough are free: slots of a batch the scheduler dropped are freed there)."""
        return self.advance(self.start(seqs))

    def start(self, seqs: list[Sequence], keys: list | None = None) -> SlotPrefill:
        """The joining rows: those whose cached prefix (``keys``: their prefix-cache keys)
        leaves at most ``feed`` tokens are fed through the decode steps; the others' prompts
        are prefilled in chunks (``advance``; mta.decoding.eager.Decoder.start)."""
        if len(seqs) > self.n:
            raise RuntimeError(f"{len(seqs)} rows join but the decoder has {self.n} slots")
        too_long = [len(s.prompt) + s.max_new_tokens for s in seqs if len(s.prompt) + s.max_new_tokens > self.span]
        if too_long:
            raise ValueError(f"a row of {too_long[0]} tokens (prompt + new) exceeds the decoder's span {self.span}")
        fed = []
        if keys is not None and self.prefix is not None and self.feed > 0:
            for i, (s, key) in enumerate(zip(seqs, keys)):
                if key is None:
                    continue
                n, kv = self.prefix.lookup(key, s.prompt)
                if n and len(s.prompt) - n <= self.feed:
                    self.prefix.count(n)
                    fed.append((i, _Fed(s, key, n, kv)))
        taken = {i for i, _ in fed}
        rows = [i for i in range(len(seqs)) if i not in taken]
        eager = self.eager.start([seqs[i] for i in rows], [keys[i] for i in rows] if keys is not None else None) \
            if rows else None
        return SlotPrefill(eager, rows, fed)

    def advance(self, pf: SlotPrefill, max_tokens: int | None = None) -> Joining | None:
        """The next chunk of ``pf``'s prefilled rows (mta.decoding.eager.Decoder.advance);
        the joining rows once the last is in (at once when every row is fed)."""
        batch = None
        if pf.eager is not None:
            batch = self.eager.advance(pf.eager, max_tokens)
            if batch is None:
                return None
        return Joining(batch, pf.eager_rows, pf.fed)

    @torch.no_grad()
    def merge(self, a: SlotBatch | None, b: Joining | Batch) -> SlotBatch:
        """The joining rows of ``b`` take free slots of the running batch ``a``, in their
        order: the prefilled rows' keys and values go into their slots, the fed rows' cached
        prefixes into theirs (their first uncached token the next step's input). None: no
        row is running any more and every slot is free (the scheduler drops a batch whose
        rows have all finished without calling ``keep``)."""
        if isinstance(b, Batch):
            b = Joining(b, list(range(len(b))))
        if a is None:
            self._release_all()
        batch = a if a is not None else SlotBatch()
        joining = (len(b.batch) if b.batch is not None else 0) + len(b.fed)
        if joining > len(self.free):
            raise RuntimeError(f"{joining} rows join but only {len(self.free)} slots are free")
        self._compact(batch)
        n = b.batch.mask.shape[1] if b.batch is not None else 0
        t = max(self.t, n, *(f.n for _, f in b.fed))
        if t != self.t:
            self.t = t
            self.g.set_position(t)
        placed: list[tuple[int, Sequence, int]] = []  # (index among the joining rows, row, slot)
        if b.batch is not None:
            placed += self._place_prefilled(b.batch, b.batch_rows, t)
        if b.fed:
            placed += self._place_fed(b.fed, t)
        for _, s, slot in sorted(placed, key=lambda x: x[0]):
            batch.seqs.append(s)
            batch.slots.append(slot)
        batch.routing = None
        return batch

    def _place_prefilled(self, b: Batch, order: list[int], t: int) -> list[tuple[int, Sequence, int]]:
        n = b.mask.shape[1]
        lengths = b.mask.sum(-1)
        slots = [self.free.pop(0) for _ in b.seqs]
        idx = self._on_device(slots)
        # every joining row's n prefill positions into [t - n, t) of its slot at once (a row's
        # own p tokens are the last p of them; the padding before them lands masked)
        for mine, theirs in zip(cache_layers(self.g.cache), cache_layers(b.cache)):
            mine.keys[:, :, t - n:t].index_copy_(0, idx, theirs.keys[:, :, :n].to(mine.keys.dtype))
            mine.values[:, :, t - n:t].index_copy_(0, idx, theirs.values[:, :, :n].to(mine.values.dtype))
        self._own(idx, t - lengths, t)
        self.g.pos[idx, 0] = b.pos.to(self.g.pos.dtype)
        self.g.tok[idx, 0] = b.last.to(self.g.tok.dtype)
        for slot, p in zip(slots, lengths.tolist()):
            self.row_start[slot] = t - p
        return list(zip(order, b.seqs, slots))

    def _place_fed(self, fed: list[tuple[int, _Fed]], t: int) -> list[tuple[int, Sequence, int]]:
        """Each fed row's cached prefix into ``[t - n, t)`` of its slot (right-aligned, as a
        prefill's rows are), its first uncached token the next step's input at position n."""
        slots = [self.free.pop(0) for _ in fed]
        idx = self._on_device(slots)
        dst, src = [], []  # every row's every layer in one multi-tensor copy (a few kernels on a GPU)
        for layer, mine in enumerate(cache_layers(self.g.cache)):
            for part, dest in ((0, mine.keys), (1, mine.values)):
                for slot, (_, f) in zip(slots, fed):
                    dst.append(dest[slot, :, t - f.n:t])
                    src.append(f.kv[layer][part][0])
        torch._foreach_copy_(dst, src)
        lengths = self._on_device([f.n for _, f in fed])
        self._own(idx, t - lengths, t)
        self.g.pos[idx, 0] = lengths.to(self.g.pos.dtype)
        self.g.tok[idx, 0] = self._on_device([f.seq.prompt[f.n] for _, f in fed]).to(self.g.tok.dtype)
        for slot, (_, f) in zip(slots, fed):
            self.row_start[slot] = t - f.n
            self.feeding[slot] = (f, list(f.seq.prompt[f.n + 1:]))
        return [(i, f.seq, slot) for (i, f), slot in zip(fed, slots)]

    def _own(self, idx: torch.Tensor, starts: torch.Tensor, t: int) -> None:
        """Slots ``idx`` attend to their own positions ``[starts, t)`` only."""
        cols = torch.arange(self.g.bias.shape[-1], device=idx.device)
        own = (cols >= starts[:, None]) & (cols < t)
        self.g.bias[idx] = torch.where(own, 0.0, self.g.neg).to(self.g.bias.dtype)[:, None, None, :]

    def keep(self, batch: SlotBatch, rows: list[int]) -> SlotBatch:
        """Only ``rows`` stay; the other slots are freed (masked). The routing is kept: a
        freed slot's output is never read, so what it stays routed to does not matter until
        a row joins (``merge`` refills the routing then)."""
        kept = set(rows)
        for k, slot in enumerate(batch.slots):
            if k not in kept:
                self.g.bias[slot].fill_(self.g.neg)
                self.row_start.pop(slot, None)
                self.feeding.pop(slot, None)
                self.free.append(slot)
        self.free.sort()
        if not rows:  # a step run ahead only holds tokens of rows that ended
            self._taken = None
        return SlotBatch([batch.seqs[k] for k in rows], [batch.slots[k] for k in rows], batch.routing)

    @torch.no_grad()
    def step(self, batch: SlotBatch) -> None:
        """One decode step for every slot; the running rows take their tokens (with
        ``async_steps``, the previous step's: this step's are taken at the next)."""
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
        seqs, slots = self._feed(batch)
        if self.async_steps and not any(s.temperature > 0 for s in seqs):
            # this step's tokens go to the host while the next step runs; the last step's are taken now
            buf, self._host = self._host[0], self._host[::-1]
            buf.copy_(self.g.tok[:, 0], non_blocking=True)
            done = torch.cuda.Event() if buf.is_pinned() else None
            if done is not None:
                done.record()
            last, self._taken = self._taken, _Taken(seqs, slots, buf, done)
            self._take(last)
            return
        self._take(self._taken)  # (a step before this one that ran ahead)
        self._taken = None
        for s, slot in zip(seqs, slots):  # a sampled token is the next input
            if s.temperature > 0:
                self.g.tok[slot, 0] = sample(self.g.logits[slot], s)
        tokens = self.g.tok[:, 0].tolist()
        take_tokens(seqs, [tokens[slot] for slot in slots])

    def _feed(self, batch: SlotBatch) -> tuple[list[Sequence], list[int]]:
        """After a step: the rows that take its token and their slots. A fed row still feeding
        its prompt takes none: its next prompt token is the next step's input (one write for
        all of them); one whose last prompt token went in takes its first, and its prompt's
        keys and values (all in the cache now but that token's) go into the prefix cache."""
        seqs, slots, feed_slots, feed_tokens = [], [], [], []
        for s, slot in zip(batch.seqs, batch.slots):
            fed = self.feeding.get(slot)
            if fed is not None:
                if fed[1]:
                    feed_slots.append(slot)
                    feed_tokens.append(fed[1].pop(0))
                    continue
                del self.feeding[slot]
                self._keep_prefix(fed[0], slot)
            seqs.append(s)
            slots.append(slot)
        if feed_slots:
            self.g.tok[self._on_device(feed_slots), 0] = self._on_device(feed_tokens)
        return seqs, slots

    @property
    def forwards(self) -> int:
        """Prefill forwards run (a fed join runs none)."""
        return self.eager.forwards

    @property
    def seconds(self) -> dict[str, float]:
        """The prefills' route and wait seconds (mta.decoding.eager.Decoder.seconds)."""
        return self.eager.seconds

    def _on_device(self, values: list[int]) -> torch.Tensor:
        """Host integers on the step's device without waiting for the step: through pinned
        memory on CUDA (a copy from pageable memory may wait for the stream)."""
        return to_device(torch.tensor(values, dtype=torch.long), self.g.device)

    def _take(self, taken: _Taken | None) -> None:
        """The rows of a step that ran ahead take its tokens, once they are on the host (a
        row that finished or left since takes none: ``take_tokens`` skips finished rows)."""
        if taken is None:
            return
        if taken.done is not None:
            taken.done.synchronize()
        tokens = taken.tokens.tolist()
        take_tokens(taken.seqs, [tokens[slot] for slot in taken.slots])

    def _keep_prefix(self, f: _Fed, slot: int) -> None:
        """A fed row's prompt keys and values (all but the last token's) into the prefix
        cache, as a prefill keeps them (mta.decoding.eager.Decoder._keep_prefixes)."""
        if self.prefix is None:
            return
        start, n = self.row_start[slot], len(f.seq.prompt) - 1
        self.prefix.store(f.key, f.seq.prompt, [(la.keys[slot:slot + 1, :, start:start + n].clone(),
                                                 la.values[slot:slot + 1, :, start:start + n].clone())
                                                for la in cache_layers(self.g.cache)])

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

    def close(self) -> None:
        """Give the static cache and the captured graphs back now (``GraphDecoder.close``);
        the decoder cannot run after. A prefix cache passed in stays its owner's."""
        self.g.close()

    def warm(self, rows: list[Row], prompt: list[int], steps: int = 3) -> None:
        """Run ``steps`` decode steps of ``prompt`` through ``rows`` (at most the slots), then
        one step under every attention window, and free every slot again: the step for these
        rows' layout is compiled and captured for every window now (the server's warm-up
        before it turns ready), and the dense kernel's tiles are timed for every size a
        prefill or a step can have (``routing.tune_kernel``). It frees every slot: call it
        only while no row is running."""
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
        tune_kernel(self.engine)

    # -- internals ---------------------------------------------------------------------------
    def _prefill_routing(self, rows: list[Row]):
        """How a joining group's prefill reads its adapters: through the dense tables the
        decode step reads, when its layout is dense and the tables are those of its last
        fill, or differ from them only by stacks loaded since (a user's first request: their
        stack is loaded at admission; those slots' columns are written into the tables
        first, which the next step then reads as they are); a join then costs a few
        operations a layer, not a gather of every row's factors. Else the engine's gathered
        routing."""
        if self.fixed.catch_up(self.engine):
            return dense_rows(self.engine, rows)
        return self.engine.route(rows)

    def _release_all(self) -> None:
        self.g.bias.fill_(self.g.neg)
        self.free, self.row_start, self.feeding, self._taken = list(range(self.n)), {}, {}, None

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
