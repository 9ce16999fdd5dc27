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

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from mta.decoding.attention import cache_kwarg


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
class Prefill:
    """Joining rows' left-padded prompts, prefilled a chunk of columns at a time
    (``Decoder.advance``): ``done`` columns are in ``cache`` so far."""

    seqs: list[Sequence]
    ids: torch.Tensor                # (B, T) left-padded prompts
    mask: torch.Tensor               # (B, T) 1 = a real token
    pos: torch.Tensor                # (B, T) position ids, as generate numbers a left-padded row
    cache: DynamicCache = field(default_factory=DynamicCache)
    done: int = 0

    @property
    def left(self) -> int:
        """Columns not prefilled yet."""
        return self.ids.shape[1] - self.done


def _out_cache(out):
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


def cache_layers(cache: DynamicCache):
    return cache.layers


class Decoder:
    """Runs prefill and decode steps for the backbone's model through its engine."""

    def __init__(self, backbone, pad_id: int):
        self.backbone, self.engine, self.model = backbone, backbone.engine, backbone.model
        self.pad_id = pad_id
        self.kw = cache_kwarg(self.model)
        self.device = backbone.engine.device

    def _forward(self, ids, mask, pos_ids, cache, rows):
        with self.engine.route(rows):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos_ids, use_cache=True,
                             **{self.kw: cache})
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

    def start(self, seqs: list[Sequence]) -> Prefill:
        """The new rows' prompts, left-padded, to prefill with ``advance``."""
        n = max(len(s.prompt) for s in seqs)
        ids = torch.full((len(seqs), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, n - len(s.prompt):] = torch.tensor(s.prompt)
            mask[i, n - len(s.prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        return Prefill(seqs, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))  # positions as generate() gives

    @torch.no_grad()
    def advance(self, pf: Prefill, max_tokens: int | None = None) -> Batch | None:
        """Prefill the next columns of ``pf``: all that are left, or as many as keep rows x
        columns within ``max_tokens`` (at least one column: chunked prefill, so that decode
        steps of running rows go on between chunks). Returns the batch, each row with its
        first token, once the last column is in; None before."""
        width = pf.left if not max_tokens else max(1, min(pf.left, max_tokens // len(pf.seqs)))
        end = pf.done + width
        logits, pf.cache = self._forward(pf.ids[:, pf.done:end], pf.mask[:, :end], pf.pos[:, pf.done:end], pf.cache,
                                         [s.row for s in pf.seqs])
        pf.done = end
        if pf.left:
            return None
        batch = Batch(pf.seqs, pf.cache, pf.mask, pf.mask.sum(-1),
                      torch.zeros(len(pf.seqs), dtype=torch.long, device=self.device))
        self._take(batch, logits)
        return batch

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
