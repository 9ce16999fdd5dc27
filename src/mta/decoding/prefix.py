"""A per-user prefix cache for the server's prefill: the keys and values of a user's last
prompt, reused for the prefix their next prompt shares (chat template, task instruction,
retrieved history), so only the rest is computed.

A prefix is never shared across users: the keys and values depend on the adapters a row
goes through, so an entry's key is the user's id with what decides their adapters (the
stored stack's checksum, the anchors, weights and merge; ``mta.serving.scheduler`` builds
it), and the base model's rows share one key of their own. Entries are kept least
recently used first out, within a number of cached tokens. A reused prefix was computed
in another batch, so its values may differ from a fresh prefill's by float rounding
(like any change of batch shape); tested to give the same greedy tokens on the CPU.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import torch

MIN_REUSE = 8  # a shorter shared prefix is recomputed: not worth a prefill of its own


class PrefixCache:
    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.entries: OrderedDict[Hashable, tuple[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]]] = \
            OrderedDict()
        self.tokens = 0
        self.hits = self.reused = 0  # lookups that reused a prefix, and the tokens they reused

    def lookup(self, key: Hashable, prompt: list[int]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """How many leading tokens of ``prompt`` have cached keys and values under ``key``
        (at most all but its last token, whose logits the prefill needs), and those
        tensors per layer, each (1, heads, n, dim); (0, []) when none is worth reusing."""
        entry = self.entries.get(key)
        if entry is None:
            return 0, []
        ids, kv = entry
        n = 0
        for a, b in zip(ids, prompt[:-1]):
            if a != b:
                break
            n += 1
        if n < MIN_REUSE:
            return 0, []
        self.entries.move_to_end(key)
        return n, [(k[:, :, :n], v[:, :, :n]) for k, v in kv]

    def count(self, tokens: int) -> None:
        """One prompt started from ``tokens`` cached tokens (what a prefill actually reused)."""
        self.hits, self.reused = self.hits + 1, self.reused + tokens

    def store(self, key: Hashable, prompt: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep ``kv`` (per layer, (1, heads, n, dim)) as the keys and values of ``prompt[:n]``
        under ``key``, replacing what the key held; the oldest entries go while the cache
        holds more than ``max_tokens``."""
        n = kv[0][0].shape[2] if kv else 0
        if n < MIN_REUSE or n > self.max_tokens:
            return
        self._drop(key)
        self.entries[key] = (tuple(prompt[:n]), kv)
        self.tokens += n
        while self.tokens > self.max_tokens:
            self._drop(next(iter(self.entries)))

    def forget(self, user_id: str) -> None:
        """Drop every entry of ``user_id`` (keys whose first element it is): a deleted or
        re-adapted user's keys and values do not outlive them."""
        for key in [k for k in self.entries if isinstance(k, tuple) and k and k[0] == user_id]:
            self._drop(key)

    def _drop(self, key: Hashable) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.tokens -= len(entry[0])
