"""BM25 retrieval of a user's history items for a query (bm25s, English stopwords)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import bm25s

from mta.data.schema import HistoryItem
from mta.tasks.base import Task

log = logging.getLogger(__name__)
logging.getLogger("bm25s").setLevel(logging.WARNING)


def _tokens(texts: list[str]) -> list[list[str]]:
    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


def retrieve(
    task: Task, query_input: str, history: Sequence[HistoryItem], k: int,
    exclude_id: str | None = None,
) -> list[HistoryItem]:
    """The ``k`` history items most similar to the query by BM25, best first.

    ``exclude_id`` drops one item (leave-one-out training must not see its own answer).
    Ties and all-zero scores keep history order, so the result is deterministic.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    pool = [it for it in history if it.id != exclude_id]
    if k == 0 or not pool:
        return []
    k = min(k, len(pool))
    corpus = _tokens([task.render_item(it) for it in pool])
    query = _tokens([task.retrieval_text(query_input)])[0]
    if not any(corpus) or not query:
        return pool[:k]
    retriever = bm25s.BM25()
    retriever.index(corpus, show_progress=False)
    scores = retriever.get_scores(query)
    order = sorted(range(len(pool)), key=lambda i: (-float(scores[i]), i))
    return [pool[i] for i in order[:k]]
