"""Prompt-only methods: ``base`` (no history) and ``rag-K`` (BM25 top-K history items).

Both use the same instruction (the query's input); ``rag-K`` only adds the user's K
most similar history items before it, so their difference is what history buys.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from mta.data.schema import User
from mta.errors import MtaError
from mta.inference import generate_texts
from mta.retrieval import retrieve
from mta.tasks.base import Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptMethod:
    name: str
    k: int  # history items in the prompt; 0 = none


def parse_method(name: str) -> PromptMethod:
    if name == "base":
        return PromptMethod("base", 0)
    if name == "rag":
        return PromptMethod("rag", 1)
    m = re.fullmatch(r"rag-(\d+)", name)
    if m and int(m.group(1)) >= 1:
        return PromptMethod(name, int(m.group(1)))
    raise MtaError(f"unknown method {name!r}; available now: base, rag (= rag-1), rag-K (K >= 1)")


def build_prompts(task: Task, users: list[User], k: int) -> list[tuple[str, str, str, str | None]]:
    """(user id, query id, prompt, gold) for every query of every user."""
    rows = []
    for u in users:
        for q in u.queries:
            items = retrieve(task, q.input, u.history, k)
            rows.append((u.user_id, q.id, task.prompt(q.input, items), q.gold))
    return rows


def run_prompt_method(
    method: PromptMethod, task: Task, users: list[User], model, tokenizer,
    max_new_tokens: int, batch_size: int, on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Predictions and metrics of one prompt-only method over the users' queries."""
    rows = build_prompts(task, users, method.k)
    if not rows:
        raise MtaError("the selected users have no queries to evaluate")
    t0 = time.perf_counter()
    texts = generate_texts(model, tokenizer, [r[2] for r in rows], max_new_tokens, batch_size,
                           on_batch=on_batch)
    seconds = time.perf_counter() - t0
    preds = [task.parse(t) for t in texts]
    scored = [(p, r[3]) for p, r in zip(preds, rows) if r[3] is not None]
    result = {
        "method": method.name, "history_in_prompt": method.k, "queries": len(rows),
        "scored": len(scored), "seconds_per_user_inference": seconds / len(users),
        "bytes_per_user": 0, "trainable_params_per_user": 0,
        "metrics": task.score([p for p, _ in scored], [g for _, g in scored]) if scored else {},
    }
    result["predictions"] = [
        {"user_id": r[0], "query_id": r[1], "output": t, "parsed": p, "gold": r[3]}
        for r, t, p in zip(rows, texts, preds)
    ]
    return result
