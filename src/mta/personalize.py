"""Personalised generation: many users in one batch, each through their own adapters.

A request names a user. A user in the store uses their fused anchors + stacked adapter;
a user not in the store but with history gets fusion only, computed on the fly; a user
with no history gets the base model. The last two come back with a notice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mta.bank import load_bank
from mta.config import AdaptConfig
from mta.data.schema import User
from mta.engine import Row
from mta.engine.peft_io import load_adapter
from mta.errors import MtaError
from mta.inference import generate_routed
from mta.retrieval import retrieve
from mta.stacking import bank_id, user_mixtures
from mta.store import UserStore
from mta.tasks.base import Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    user_id: str
    input: str
    user: User | None = None  # history for retrieval and on-the-fly fusion


@dataclass(frozen=True)
class Answer:
    user_id: str
    input: str
    output: str
    parsed: object
    route: str  # "mta" (fusion + stack), "fusion", "base"
    notice: str | None = None


class Personalizer:
    """Holds the model with the bank injected; serves batches of mixed-user requests."""

    def __init__(self, model, tokenizer, embedder, embedder_id: str, bank: Path, task: Task,
                 store: Path | None = None, fusion: AdaptConfig | None = None):
        self.engine, self.idx = load_bank(model, bank)
        if self.idx.data["task"] != task.name:
            self.engine.remove()
            raise MtaError(f"bank {bank} was built for task {self.idx.data['task']}, not {task.name}")
        self.tokenizer, self.embedder, self.task = tokenizer, embedder, task
        self.embedder_id = embedder_id
        self.store = UserStore(store) if store else None
        self.fusion = fusion or AdaptConfig()
        self.bank_id = bank_id(self.idx)

    def close(self) -> None:
        self.engine.remove()

    def _plan(self, requests: Sequence[Request]) -> tuple[list[Row], list[str], list[str | None], str]:
        stored = {}
        if self.store:
            for r in requests:
                if r.user_id not in stored and self.store.has(r.user_id):
                    meta = self.store.meta(r.user_id)
                    if meta.get("bank") != self.bank_id:
                        raise MtaError(f"user '{r.user_id}' in {self.store.root} was adapted against another "
                                       "bank; re-run `mta adapt` with this bank")
                    stored[r.user_id] = meta
        modes = {m["merge"] for m in stored.values()}
        if len(modes) > 1:
            raise MtaError(f"users in one batch use different merge modes {sorted(modes)}")
        mode = modes.pop() if modes else "delta"
        # stacked adapters of the stored users -> stack-table slots
        with_stack = sorted({u for u, m in stored.items() if m.get("stack")})
        slot = {u: i for i, u in enumerate(with_stack)}
        if with_stack:
            first = stored[with_stack[0]]["stack"]
            self.engine.add_users(len(with_stack), first["rank"], first["alpha"], modules=first.get("targets"),
                                  last_layers=first.get("layers"))
            for u in with_stack:
                tensors, _, _ = load_adapter(self.store.user_dir(u) / "stack", self.idx.data["fingerprint"])
                self.engine.load_user(slot[u], tensors)
        # fusion on the fly for users with history but no record
        fresh = [r.user for r in requests if r.user_id not in stored and r.user is not None and r.user.history]
        fresh_mix = {}
        if fresh:
            uniq = list({u.user_id: u for u in fresh}.values())
            for u, m in zip(uniq, user_mixtures(uniq, self.task, self.embedder, self.idx, self.fusion)):
                fresh_mix[u.user_id] = m
        mix: dict[str, tuple[list[int], list[float]]] = {u: (m["anchors"], m["weights"]) for u, m in stored.items()}
        mix.update({u: (list(m.anchors), list(m.weights)) for u, m in fresh_mix.items()})
        fused_slot: dict[str, int] = {}
        if mode == "svd" and mix:
            # svd merges are per-user factors: materialise them for this batch's users
            order = sorted(mix)
            fused_slot = {u: i for i, u in enumerate(order)}
            rank = next((m.get("svd_rank") for m in stored.values() if m.get("svd_rank")), None) \
                or self.fusion.svd_rank
            self.engine.install_svd([mix[u] for u in order], rank)
        rows, routes, notices = [], [], []
        for r in requests:
            if r.user_id in mix:
                anchors, weights = mix[r.user_id]
                user_slot = slot.get(r.user_id)
                if mode == "svd":
                    rows.append(Row(fused=fused_slot[r.user_id], user=user_slot))
                else:
                    rows.append(Row(anchors, weights, user=user_slot))
                routes.append("mta" if user_slot is not None else "fusion")
                notices.append(None if r.user_id in stored else
                               f"user '{r.user_id}' is not in the store: fusion only, computed from history")
            else:
                rows.append(Row(active=False))
                routes.append("base")
                notices.append(f"user '{r.user_id}' has no history: base model")
        return rows, routes, notices, mode

    def answer(self, requests: Sequence[Request], retrieve_k: int = 1, max_new_tokens: int = 16,
               batch_size: int = 8, on_batch: Callable[[int], None] | None = None) -> list[Answer]:
        if not requests:
            return []
        rows, routes, notices, mode = self._plan(requests)
        prompts = []
        for r in requests:
            items = retrieve(self.task, r.input, r.user.history, retrieve_k) if r.user else []
            prompts.append(self.task.prompt(r.input, items))
        texts = generate_routed(self.engine, self.tokenizer, prompts, rows, "delta" if mode == "svd" else mode,
                                max_new_tokens,
                                batch_size, on_batch=on_batch)
        for n in {n for n in notices if n}:
            log.warning(n)
        return [Answer(r.user_id, r.input, t, self.task.parse(t), route, note)
                for r, t, route, note in zip(requests, texts, routes, notices)]
