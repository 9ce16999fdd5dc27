"""Training examples from a user's history: leave-one-out, with BM25 context.

Item i becomes (prompt, target) in the task's query format; the prompt carries the
BM25 top-k of the user's OTHER items (never item i itself, which would leak its answer).
"""

from __future__ import annotations

from mta.data.schema import User
from mta.engine.train import Example, encode_example
from mta.retrieval import retrieve
from mta.tasks.base import Task


def loo_examples(task: Task, user: User, tokenizer, retrieve_k: int = 1,
                 max_length: int = 512) -> list[Example]:
    out = []
    for item in user.history:
        inp, target = task.item_example(item)
        context = retrieve(task, inp, user.history, retrieve_k, exclude_id=item.id)
        out.append(encode_example(tokenizer, task.prompt(inp, context), target, max_length))
    return out
