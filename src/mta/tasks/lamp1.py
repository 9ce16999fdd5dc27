"""LaMP-1: personalised citation identification. Output "[1]" or "[2]"; accuracy, macro-F1."""

import re

from mta.data.schema import HistoryItem
from mta.tasks.base import Task


class CitationTask(Task):
    def render_item(self, item: HistoryItem) -> str:
        return f'"{item.get("title")}"'

    def item_example(self, item: HistoryItem) -> tuple[str, str]:
        # A profile paper has no negative reference, so it trains what the task needs
        # most, the author's topics: abstract -> title.
        return (f"Write the title of this author's paper with the abstract: {item.get('abstract')}",
                str(item.get("title")))

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
)
