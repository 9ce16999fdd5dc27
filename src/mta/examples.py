"""Training examples from a user's history: leave-one-out, with BM25 context.

Item i becomes (prompt, target) in the task's query format; the prompt carries the
BM25 top-k of the user's OTHER items (never item i itself, which would leak its answer).
Tasks whose queries contrast the user with others (LaMP-1) also draw on ``negatives``,
items of other users (``negative_pool``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from mta.data.schema import HistoryItem, User
from mta.engine.train import Example, encode_example
from mta.retrieval import retrieve
from mta.tasks.base import Task

NEGATIVES = 64


def negative_pool(task: Task, users: Sequence[User], seed: int = 0) -> list[HistoryItem]:
    """A seeded sample of history items of ``users`` for tasks with ``needs_negatives``
    (empty otherwise). Callers pass users other than the one being trained."""
    if not task.needs_negatives:
        return []
    items = [it for u in users for it in u.history]
    return random.Random(seed).sample(items, min(NEGATIVES, len(items)))


def loo_examples(task: Task, user: User, tokenizer, retrieve_k: int = 1,
                 max_length: int = 512, negatives: Sequence[HistoryItem] = ()) -> list[Example]:
    out = []
    for item in user.history:
        inp, target = task.training_example(item, user.history, negatives)
        context = retrieve(task, inp, user.history, retrieve_k, exclude_id=item.id)
        out.append(encode_example(tokenizer, task.prompt(inp, context), target, max_length))
    return out


def held_out(examples: list, on: bool) -> tuple[list, list]:
    """(the examples an adapter trains on, those it is stopped by): with ``on``, the last
    one (the user's most recent history item, as a new query would be; the history's order
    is the data's) is held out when there are at least two; otherwise every example trains
    and none is held out (``mta.engine.train``'s early stopping)."""
    if on and len(examples) >= 2:
        return examples[:-1], examples[-1:]
    return examples, []
