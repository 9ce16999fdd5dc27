"""A decode loop that takes new sequences in between steps (iteration-level batching, as
Orca and vLLM do), each row routed through its own user's adapters.

A ``Batch`` holds the running rows: their KV cache (transformers' ``DynamicCache``, rows
left-padded to one length), attention mask, next position, routing row and generated
tokens. ``prefill`` starts new rows (one forward over their left-padded prompts);
``merge`` joins two batches (the shorter cache is padded on the left, masked out);
``step`` runs ONE decode step for every row; ``keep`` drops finished rows. Position ids
are computed exactly as ``generate`` does with left padding, so a row's greedy tokens do
not depend on what else is in the batch (tested against one-by-one generation).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from mta.decoding.attention import cache_kwarg
from mta.decoding.prefix import PrefixCache
from mta.engine.engine import to_device


@dataclass
class Sequence:
    """One request's row: its prompt ids, routing row, limits, and what it has made."""

    prompt: list[int]
    row: object                      # mta.engine.Row
    max_new_tokens: int
    stop_ids: frozenset[int]
    temperature: float = 0.0         # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None        # "stop" | "length" | "cancelled"
    generator: torch.Generator | None = None


@dataclass
class Batch:
    seqs: list[Sequence]
    cache: DynamicCache
    mask: torch.Tensor               # (B, T) 1 = a real token
    pos: torch.Tensor                # (B,) position of the next token
    last: torch.Tensor               # (B,) the last token of each row (the next input)
    routing: object | None = None    # the engine's routing for these rows; None: rebuild it

    def __len__(self) -> int:
        return len(self.seqs)


@dataclass
class _Part:
    """Rows prefilled together: their prompts left-padded to ``mask``'s width, the first
    ``mask.shape[1] - ids.shape[1]`` columns already in ``cache`` (a reused prefix), the
    rest computed a chunk at a time (``done`` of them so far)."""

    rows: list[int]                  # the rows' indices in Prefill.seqs
    ids: torch.Tensor                # (B, W) the columns to compute
    mask: torch.Tensor               # (B, T) 1 = a real token, the cached prefix included
    pos: torch.Tensor                # (B, W) their position ids, as generate numbers a left-padded row
    cache: DynamicCache
    done: int = 0

    @property
    def left(self) -> int:
        return self.ids.shape[1] - self.done


@dataclass
class Prefill:
    """Joining rows' prompts, prefilled a chunk of columns at a time (``Decoder.advance``):
    the rows with a cached prefix in one part, the others in another."""

    seqs: list[Sequence]
    keys: list | None                # each row's prefix-cache key (None: not cached)
    parts: list[_Part]
    finished: list[tuple[list[int], Batch]] = field(default_factory=list)

    @property
    def left(self) -> int:
        """Columns not prefilled yet, over every part."""
        return sum(p.left for p in self.parts)


def _out_cache(out):
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


def cache_layers(cache: DynamicCache):
    return cache.layers


class Decoder:
    """Runs prefill and decode steps for the backbone's model through its engine."""

    def __init__(self, backbone, pad_id: int, prefix: PrefixCache | None = None):
        self.backbone, self.engine, self.model = backbone, backbone.engine, backbone.model
        self.pad_id = pad_id
        self.prefix = prefix  # per-user prompt prefixes (mta.decoding.prefix), or None
        self.forwards = 0  # prefill forwards run (chunks of joining prompts): a server's count of them
        # host seconds of the prefills so far in two of their parts (a server's phases): "route",
        # making the rows' adapters readable by the forward (the router), and "wait", taking
        # the first tokens (on a GPU: waiting for the device to finish the forward, launched
        # asynchronously); the rest of a prefill's time is the forward's launch
        self.seconds = {"route": 0.0, "wait": 0.0}
        self.kw = cache_kwarg(self.model)
        # a prefill needs the last position's logits only: without this the model computes the
        # vocabulary's logits at every position (a 2,048-token chunk at Llama-3-8B's vocabulary:
        # 0.5 GB and 2 TFLOP for nothing)
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(
            self.model.forward).parameters else {}
        self.device = backbone.engine.device
        # how a prefill forward reads its rows' adapters: the engine's gathered routing, or
        # what a decoder that owns this one chooses (mta.decoding.slots: its dense tables)
        self.router: Callable[[list], contextlib.AbstractContextManager] = self.engine.route

    def _forward(self, ids, mask, pos_ids, cache, rows):
        with contextlib.ExitStack() as routed:
            t = time.monotonic()
            routed.enter_context(self.router(rows))
            self.seconds["route"] += time.monotonic() - t
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos_ids, use_cache=True,
                             **{self.kw: cache}, **self.last_only)
        return out.logits[:, -1, :].float(), _out_cache(out)

    def _decode_forward(self, batch: Batch):
        """A decode step's forward. The routing stays the same object while the rows do, so
        every layer's gathered per-row factors are reused from step to step."""
        if batch.routing is None:
            self.engine.clear_caches()  # a new routing object may reuse a dead one's id
            batch.routing = self.engine.routing([s.row for s in batch.seqs])
        self.engine.set_routing(batch.routing)
        try:
            out = self.model(input_ids=batch.last[:, None], attention_mask=batch.mask, position_ids=batch.pos[:, None],
                             use_cache=True, **{self.kw: batch.cache})
        finally:
            self.engine.set_routing(None)
        return out.logits[:, -1, :].float(), _out_cache(out)

    @torch.no_grad()
    def prefill(self, seqs: list[Sequence]) -> Batch:
        """One forward over the new rows' left-padded prompts; picks each row's first token."""
        return self.advance(self.start(seqs))

    def start(self, seqs: list[Sequence], keys: list | None = None) -> Prefill:
        """The new rows' prompts to prefill with ``advance``. With ``keys`` (each row's
        prefix-cache key, mta.decoding.prefix) and a prefix cache, the rows whose user's last
        prompt shares a prefix with this one start from those keys and values, together in
        one part; the others in another."""
        hits = []
        if keys is not None and self.prefix is not None:
            found = [(i, *self.prefix.lookup(key, s.prompt)) for i, (s, key) in enumerate(zip(seqs, keys))
                     if key is not None]
            hits = [(i, n, kv) for i, n, kv in found if n]
        hit = {h[0] for h in hits}
        rows = [i for i in range(len(seqs)) if i not in hit]
        parts = ([self._part(rows, [seqs[i].prompt for i in rows])] if rows else []) + \
            ([self._hit_part(seqs, hits)] if hits else [])
        return Prefill(seqs, keys, parts)

    def _hit_part(self, seqs: list[Sequence], hits: list[tuple[int, int, list]]) -> _Part:
        """The rows with a cached prefix, batched: each computes the last ``w`` tokens of its
        prompt (``w`` the longest uncached rest among them) and reuses the cached keys and
        values of the tokens before those, right-aligned behind left padding, so every
        row's real tokens stay contiguous as in any batch (a row with a shorter rest reuses
        a little less than it could)."""
        w = max(len(seqs[i].prompt) - n for i, n, _ in hits)
        reuse = [len(seqs[i].prompt) - w for i, _, _ in hits]
        width = max(reuse)
        for r in reuse:
            self.prefix.count(r)
        # every layer's keys and values in one zeroed tensor, and every row's cached prefix
        # copied into it in one multi-tensor copy: a few kernels on a GPU, where a copy per
        # row, layer and part was ~500 launches for 8 rows at Llama-3-8B's 32 layers
        k0 = hits[0][2][0][0]
        n_layers = len(hits[0][2])
        kv_all = k0.new_zeros((n_layers, 2, len(hits), k0.shape[1], width, k0.shape[3]))
        dst, src = [], []
        for b, ((_, _, kv), r) in enumerate(zip(hits, reuse)):
            if r:
                row = kv_all[:, :, b, :, width - r:]  # (layers, 2, heads, r, dim) of row b
                for layer, (k, v) in enumerate(kv):
                    dst += (row[layer, 0], row[layer, 1])
                    src += (k[0, :, :r], v[0, :, :r])
        if dst:
            torch._foreach_copy_(dst, src)
        cache = DynamicCache()
        for layer in range(n_layers):
            cache.update(kv_all[layer, 0], kv_all[layer, 1], layer)
        mask = torch.zeros((len(hits), width + w), dtype=torch.long)
        ids = torch.tensor([seqs[i].prompt[r:] for (i, _, _), r in zip(hits, reuse)], dtype=torch.long)
        for b, r in enumerate(reuse):
            mask[b, width - r:] = 1
        pos = torch.stack([torch.arange(r, r + w) for r in reuse])
        return _Part([h[0] for h in hits], *(to_device(t, self.device) for t in (ids, mask, pos)), cache)

    def _part(self, rows: list[int], prompts: list[list[int]]) -> _Part:
        """Rows without a cached prefix: their prompts left-padded, all to compute."""
        n = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), n), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, n - len(p):] = torch.tensor(p)
            mask[i, n - len(p):] = 1
        ids, mask = to_device(ids, self.device), to_device(mask, self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() does for left padding
        return _Part(rows, ids, mask, pos, DynamicCache())

    @torch.no_grad()
    def advance(self, pf: Prefill, max_tokens: int | None = None) -> Batch | None:
        """Prefill the next columns of ``pf``: all that are left, or as many as keep rows x
        columns within ``max_tokens`` (at least one column: chunked prefill, so that decode
        steps of running rows go on between chunks). Returns the batch of every row in
        ``pf``'s order, each with its first token, once the last column is in; None before."""
        budget = max_tokens
        while pf.parts:
            part = pf.parts[0]
            b = len(part.rows)
            width = part.left if budget is None else max(1, min(part.left, budget // b))
            end = part.done + width
            cached = part.mask.shape[1] - part.ids.shape[1]
            logits, part.cache = self._forward(part.ids[:, part.done:end], part.mask[:, :cached + end],
                                               part.pos[:, part.done:end], part.cache,
                                               [pf.seqs[i].row for i in part.rows])
            self.forwards += 1
            part.done = end
            if budget is not None:
                budget -= b * width
            if part.left:
                return None
            pf.parts.pop(0)
            batch = Batch([pf.seqs[i] for i in part.rows], part.cache, part.mask, part.mask.sum(-1),
                          torch.zeros(b, dtype=torch.long, device=self.device))
            self._keep_prefixes(pf, part, batch)
            t = time.monotonic()
            self._take(batch, logits)
            self.seconds["wait"] += time.monotonic() - t
            pf.finished.append((part.rows, batch))
            if budget is not None and budget <= 0:
                break
        if pf.parts:
            return None
        order = [i for rows, _ in pf.finished for i in rows]
        batch = pf.finished[0][1]
        for _, other in pf.finished[1:]:
            batch = self.merge(batch, other)
        return batch if order == sorted(order) else self.keep(batch, sorted(range(len(order)), key=order.__getitem__))

    def _keep_prefixes(self, pf: Prefill, part: _Part, batch: Batch) -> None:
        """Each row's prompt keys and values (all but the last token's) into the prefix cache."""
        if self.prefix is None or pf.keys is None:
            return
        t = part.mask.shape[1]
        layers = cache_layers(batch.cache)
        for b, i in enumerate(part.rows):
            key, prompt = pf.keys[i], pf.seqs[i].prompt
            if key is not None:
                n = len(prompt)
                self.prefix.store(key, prompt, [(la.keys[b:b + 1, :, t - n:t - 1].clone(),
                                                 la.values[b:b + 1, :, t - n:t - 1].clone()) for la in layers])

    @torch.no_grad()
    def step(self, batch: Batch) -> None:
        """One decode step for every row of ``batch``."""
        batch.mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)
        logits, batch.cache = self._decode_forward(batch)
        batch.pos = batch.pos + 1
        self._take(batch, logits)

    def _take(self, batch: Batch, logits: torch.Tensor) -> None:
        nxt = logits.argmax(-1)
        for i, s in enumerate(batch.seqs):
            if s.temperature > 0:
                nxt[i] = sample(logits[i], s)
        batch.last = nxt
        take_tokens(batch.seqs, nxt.tolist())

    @staticmethod
    def merge(a: Batch | None, b: Batch) -> Batch:
        """Rows of ``a`` then rows of ``b`` in one batch (the shorter side left-padded)."""
        if a is None or not len(a):
            return b
        ta, tb = a.mask.shape[1], b.mask.shape[1]
        t = max(ta, tb)

        def pad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
            if width == 0:
                return x
            shape = list(x.shape)
            shape[dim] = width
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        for la, lb in zip(cache_layers(a.cache), cache_layers(b.cache)):
            la.keys = torch.cat([pad(la.keys, t - ta, 2), pad(lb.keys, t - tb, 2)], dim=0)
            la.values = torch.cat([pad(la.values, t - ta, 2), pad(lb.values, t - tb, 2)], dim=0)
        return Batch(a.seqs + b.seqs, a.cache, torch.cat([pad(a.mask, t - ta, 1), pad(b.mask, t - tb, 1)]),
                     torch.cat([a.pos, b.pos]), torch.cat([a.last, b.last]))

    @staticmethod
    def keep(batch: Batch, rows: list[int]) -> Batch:
        """Only ``rows`` stay; columns no remaining row uses are dropped from the left."""
        idx = torch.tensor(rows, dtype=torch.long, device=batch.mask.device)
        mask = batch.mask.index_select(0, idx)
        used = mask.any(0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]
        for layer in cache_layers(batch.cache):
            layer.keys = layer.keys.index_select(0, idx)[:, :, start:]
            layer.values = layer.values.index_select(0, idx)[:, :, start:]
        return Batch([batch.seqs[i] for i in rows], batch.cache, mask[:, start:], batch.pos.index_select(0, idx),
                     batch.last.index_select(0, idx))


def take_tokens(seqs: list[Sequence], tokens: list[int]) -> None:
    """Each running row takes its new token: a stop token finishes it (not kept), its
    ``max_new_tokens``-th token too (kept)."""
    for s, t in zip(seqs, tokens):
        if s.finish is not None:
            continue
        if t in s.stop_ids:
            s.finish = "stop"
            continue
        s.tokens.append(t)
        if len(s.tokens) >= s.max_new_tokens:
            s.finish = "length"


def sample(logits: torch.Tensor, s: Sequence) -> torch.Tensor:
    """Temperature and nucleus (top-p) sampling for one row, with its own generator."""
    probs = torch.softmax(logits / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cut = sorted_p.cumsum(-1) - sorted_p > s.top_p
        sorted_p[cut] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    if s.generator is None:
        s.generator = torch.Generator(device=probs.device)
        s.generator.manual_seed(s.seed if s.seed is not None else torch.seed() % (2**63))
    return torch.multinomial(probs / probs.sum(), 1, generator=s.generator)[0]
