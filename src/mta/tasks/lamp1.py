"""LaMP-1: personalised citation identification. Output "[1]" or "[2]"; accuracy, macro-F1."""

import hashlib
import re
from collections.abc import Sequence

from mta.data.schema import HistoryItem
from mta.tasks.base import Task

QUERY = ('For an author who has written the paper with the title "{title}", which reference is related? '
         'Just answer with [1] or [2] without explanation. [1]: "{one}" [2]: "{two}"')


def _pick(key: str, n: int) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") % n


class CitationTask(Task):
    def render_item(self, item: HistoryItem) -> str:
        return f'"{item.get("title")}"'

    def item_example(self, item: HistoryItem) -> tuple[str, str]:
        # A profile paper has no negative reference, so it trains what the task needs
        # most, the author's topics: abstract -> title.
        return (f"Write the title of this author's paper with the abstract: {item.get('abstract')}",
                str(item.get("title")))

    def training_example(self, item: HistoryItem, history: Sequence[HistoryItem],
                         negatives: Sequence[HistoryItem]) -> tuple[str, str]:
        """A [1]/[2] choice in the query's own form: the related reference is the author's
        own paper closest to this one (BM25 on titles), the other a paper of another
        author (``negatives``; without any, the author's least related paper). Which of
        the two is [1] follows a hash of the item id, so the answers are balanced and
        reproducible."""
        from mta.retrieval import retrieve

        others = [it for it in history if it.id != item.id]
        if not others:  # nothing to relate to: the abstract -> title form
            return self.item_example(item)
        ranked = retrieve(self, f'"{item.get("title")}"', others, len(others))
        positive = ranked[0]
        negative = negatives[_pick(f"neg:{item.id}", len(negatives))] if negatives else ranked[-1]
        pos, neg = str(positive.get("title")), str(negative.get("title"))
        first = _pick(f"order:{item.id}", 2) == 0
        one, two = (pos, neg) if first else (neg, pos)
        return QUERY.format(title=item.get("title"), one=one, two=two), "[1]" if first else "[2]"

    def retrieval_text(self, query_input: str) -> str:
        return " ".join(re.findall(r'"([^"]*)"', query_input)) or query_input

    def parse(self, text: str) -> str | None:
        m = re.search(r"\[\s*([12])\s*\]", text) or re.search(r"(?<!\d)([12])(?!\d)", text)
        return f"[{m.group(1)}]" if m else None


TASK = CitationTask(
    name="lamp1",
    title="LaMP-1 (citation identification)",
    kind="classification",
    item_fields=("title", "abstract"),
    labels=("[1]", "[2]"),
    needs_negatives=True,
)
